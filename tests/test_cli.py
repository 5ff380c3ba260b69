"""The command line: every flag in both spellings, precedence, gen_kwargs, exit codes, model and
server detection, the results document, secrets, the entry points and the Python API."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fakes  # noqa: E402
import nano_eval  # noqa: E402
from fakes import FakeOpenAI, cli, cli_env, error_line, free_port, main_json  # noqa: E402
from nano_eval import TASKS, APIConfig, UsageError, normalize_base_url, parse_kv, parse_value, run_task  # noqa: E402

NANO = ROOT / "nano_eval.py"
GSM = "gsm8k_cot_llama"
STOP = ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "Q:", "</s>"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def bodies(server) -> list[dict]:
    return [r["body"] for r in server.chat_requests]


# --------------------------------------------------------------------------------------------
# every flag, both spellings
# --------------------------------------------------------------------------------------------


def _check_flag(name, doc, server, tmp):
    cfg = doc["config"]
    res = doc["results"][GSM]
    sent = bodies(server)
    checks = {
        "tasks": lambda: list(doc["results"]) == [GSM],
        "base_url": lambda: len(sent) == 2 and cfg["base_url"] == server.base_url,
        "model": lambda: {b["model"] for b in sent} == {"custom-model"} and cfg["model"] == "custom-model",
        "model_args": lambda: {b["model"] for b in sent} == {"from-model-args"} and {b["seed"] for b in sent} == {5},
        "api_key": lambda: {r["headers"].get("Authorization") for r in server.chat_requests} == {"Bearer sk-flag"},
        "num_concurrent": lambda: cfg["num_concurrent"] == 3,
        "gen_kwargs": lambda: all(b["top_k"] == 5 and list(b)[-1] == "top_k" for b in sent),
        "max_samples": lambda: res["num_samples"] == 3 and len(sent) == 3 and cfg["max_samples"] == 3,
        "limit": lambda: res["num_samples"] == 3 and len(sent) == 3,
        "seed": lambda: {b["seed"] for b in sent} == {77} and cfg["seed"] == 77,
        "output": lambda: json.loads((tmp / "out.json").read_text()) == doc,
        "log_samples": lambda: len((tmp / "logs" / f"samples_{GSM}.jsonl").read_text().splitlines()) == 2,
        "log_images": lambda: res["num_ok"] == 2,
        "timeout": lambda: cfg["timeout"] == 33.0,
        "max_retries": lambda: cfg["max_retries"] == 2,
        "max_fail_rate": lambda: cfg["max_fail_rate"] == 0.5,
        "keep_think": lambda: cfg["keep_think"] is True,
        "data_dir": lambda: cfg["data_dir"] == str(tmp / "dd"),
        "system_instruction": lambda: all(b["messages"][0] == {"role": "system", "content": "Be brief."}
                                          for b in sent),
        "fewshot_as_multiturn": lambda: all(len(b["messages"]) == 1 for b in sent)
                                         and cfg["fewshot_as_multiturn"] is False,
        "no_progress": lambda: res["num_ok"] == 2,
    }
    return checks[name]()


FLAG_VALUES = {
    "tasks": GSM, "base_url": None, "model": "custom-model", "model_args": "model=from-model-args,seed=5",
    "api_key": "sk-flag", "num_concurrent": "3", "gen_kwargs": "top_k=5", "max_samples": "3", "limit": "3",
    "seed": "77", "output": "{tmp}/out.json", "log_samples": "{tmp}/logs", "log_images": True, "timeout": "33",
    "max_retries": "2", "max_fail_rate": "0.5", "keep_think": True, "data_dir": "{tmp}/dd",
    "system_instruction": "Be brief.", "fewshot_as_multiturn": "false", "no_progress": True,
}
SPELLINGS = [(name, f"--{name}") for name in FLAG_VALUES] + \
    [(name, f"--{name.replace('_', '-')}") for name in FLAG_VALUES if "_" in name and name != "limit"]


@pytest.mark.parametrize("name, spelling", SPELLINGS, ids=[s for _, s in SPELLINGS])
def test_flag_spelling(name, spelling, isolated_env, fake_openai, fake_hf, tmp_path, capsys):
    base = {"tasks": GSM, "base_url": fake_openai.base_url, "max_samples": "2"}
    value = FLAG_VALUES[name]
    if name == "base_url":
        value = fake_openai.base_url
    if name == "limit":
        base.pop("max_samples")
    argv = []
    for key, val in base.items():
        if key != name:
            argv += [f"--{key}", val]
    argv += [spelling] if value is True else [spelling, str(value).format(tmp=tmp_path)]
    code, doc, err = main_json(argv, capsys)
    assert code == 0, err
    assert _check_flag(name, doc, fake_openai, tmp_path), (name, doc["config"])
    assert fake_hf.requests == []  # gsm8k ships in data/: no datasets-server call


def test_check_flag_and_conformance_task(isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "2", "--check"], capsys)
    assert code in (0, 1)  # the fake is not a perfect server; FAILs make it 1
    checks = doc["results"]["api_conformance"]["checks"]
    assert {c["result"] for c in checks} <= {"PASS", "WARN", "FAIL"}
    assert doc["results"][GSM]["num_samples"] == 2
    metrics = doc["results"]["api_conformance"]["metrics"]
    assert metrics["pass"] + metrics["warn"] + metrics["fail"] == len(checks)
    code2, doc2, _ = main_json(["--tasks", "api_conformance", "--base_url", fake_openai.base_url], capsys)
    assert list(doc2["results"]) == ["api_conformance"]
    assert code2 == code


# --------------------------------------------------------------------------------------------
# precedence: flags > --model_args > environment/defaults
# --------------------------------------------------------------------------------------------


def test_flags_win_over_model_args(isolated_env, fake_openai, capsys):
    code, doc, err = main_json([
        "--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "2",
        "--model_args", "model=a,seed=7,num_concurrent=2,max_gen_toks=77,timeout=5,max_retries=3,"
                        "base_url=http://127.0.0.1:9/v1",
        "--model", "b", "--seed", "9", "--num_concurrent", "4"], capsys)
    assert code == 0, err
    sent = bodies(fake_openai)
    assert {b["model"] for b in sent} == {"b"}
    assert {b["seed"] for b in sent} == {9}
    assert {b["max_tokens"] for b in sent} == {77}  # model_arg max_gen_toks: the default max_tokens
    cfg = doc["config"]
    assert (cfg["num_concurrent"], cfg["timeout"], cfg["max_retries"]) == (4, 5, 3)
    assert cfg["base_url"] == fake_openai.base_url  # --base_url beat model_args base_url


def test_model_args_alone(isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--max_samples", "2",
                           "--model_args", f"base_url={fake_openai.base_url},model=m,seed=11,num_concurrent=1,"
                                           "tokenizer_backend=None,tokenized_requests=False"], capsys)
    assert code == 0, err
    assert {(b["model"], b["seed"]) for b in bodies(fake_openai)} == {("m", 11)}
    assert doc["config"]["num_concurrent"] == 1
    assert "tokenizer_backend" in err and "ignored" in err
    assert fake_openai.max_in_flight == 1


def test_gen_kwargs_max_gen_toks_beats_model_args(isolated_env, fake_openai, capsys):
    code, _, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "1",
                         "--model_args", "max_gen_toks=77", "--gen_kwargs", "max_gen_toks=100"], capsys)
    assert code == 0, err
    assert bodies(fake_openai)[0]["max_tokens"] == 100


def test_unknown_model_arg_is_usage_error(isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--model_args", "bogus=1"], capsys)
    assert code == 2 and doc is None
    assert "bogus" in error_line(err)
    assert fake_openai.requests == []


@pytest.mark.parametrize("how", ["flag", "model_args", "env"])
def test_api_key_sources(how, isolated_env, monkeypatch, capsys):
    with FakeOpenAI(api_key="sk-right") as server:
        argv = ["--tasks", GSM, "--base_url", server.base_url, "--max_samples", "1"]
        if how == "flag":
            monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-env")
            argv += ["--api_key", "sk-right", "--model_args", "api_key=sk-wrong-args"]
        elif how == "model_args":
            monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-env")
            argv += ["--model_args", "api_key=sk-right"]
        else:
            monkeypatch.setenv("OPENAI_API_KEY", "sk-right")
        code, doc, err = main_json(argv, capsys)
        assert code == 0, err
        assert server.chat_requests[0]["headers"]["Authorization"] == "Bearer sk-right"
    assert "sk-right" not in json.dumps(doc) and "sk-right" not in err


def test_wrong_api_key_exit_4(isolated_env, capsys):
    with FakeOpenAI(api_key="sk-right") as server:
        code, doc, err = main_json(["--tasks", GSM, "--base_url", server.base_url, "--api_key", "sk-bad-key-123"], capsys)
        assert server.chat_requests == []
    assert code == 4 and doc is None
    assert "authentication" in error_line(err) and "sk-bad-key-123" not in err


# --------------------------------------------------------------------------------------------
# gen_kwargs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    # lm-eval's handle_arg_string: no None, and only digit strings become int ("-3" -> -3.0)
    ("true", True), ("False", False), ("NONE", "NONE"), ("12", 12), ("-3", -3.0), ("0.5", 0.5), ("1e3", 1000.0),
    ("abc", "abc"), ("", ""), ("0.1.2", "0.1.2"),
])
def test_parse_value(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_kv():
    assert parse_kv(" a = 1 , b=x,,c=b=c ", "--gen_kwargs") == {"a": 1, "b": "x", "c": "b=c"}
    assert parse_kv("", "--gen_kwargs") == {} and parse_kv(None, "--x") == {}
    for bad in ("a", "=1", "a=1,b"):
        with pytest.raises(UsageError):
            parse_kv(bad, "--gen_kwargs")


def test_gen_kwargs_merged_into_body(isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "2",
                           "--gen_kwargs", "temperature=0.7,top_p=1,do_sample=true,max_gen_toks=64,"
                                           "presence_penalty=-0.5,logprobs=false,user=alice,min_p=none"], capsys)
    assert code == 0, err
    for body in bodies(fake_openai):
        assert list(body) == ["messages", "model", "max_tokens", "temperature", "stop", "seed",
                              "top_p", "presence_penalty", "logprobs", "user", "min_p"]
        assert body["max_tokens"] == 64 and body["temperature"] == 0.7 and body["stop"] == STOP
        assert body["top_p"] == 1 and type(body["top_p"]) is int
        assert body["presence_penalty"] == -0.5 and body["logprobs"] is False
        assert body["user"] == "alice" and body["min_p"] == "none"  # lm-eval sends the text
        assert "do_sample" not in body and "max_gen_toks" not in body and "until" not in body
    params = doc["config"]["request_params"][GSM]
    assert "do_sample" not in params and params["max_tokens"] == 64
    assert doc["config"]["gen_kwargs"]["temperature"] == 0.7


def test_gen_kwargs_chartqa_defaults_overridden():
    config = APIConfig(url="http://127.0.0.1:9/v1", gen_kwargs={"temperature": 0, "max_gen_toks": 9})
    params = TASKS["chartqa"].request_params(config)
    assert params == {"max_tokens": 9, "temperature": 0, "stop": [], "seed": 1234}


@pytest.mark.parametrize("argv", [
    ["--gen_kwargs", "temperature"], ["--gen_kwargs", "=3"], ["--max_samples", "0"], ["--max_samples", "x"],
    ["--limit", "-1"], ["--num_concurrent", "0"], ["--timeout", "0"], ["--timeout", "inf"],
    ["--max_retries", "0"], ["--max_fail_rate", "1.5"], ["--fewshot_as_multiturn", "maybe"], ["--seed", "x"],
    ["--no-such-flag"], ["--model_args", "num_concurrent=0"], ["--model_args", "seed=abc"],
])
def test_bad_values_exit_2(argv, isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, *argv], capsys)
    assert code == 2 and doc is None
    error_line(err)
    assert fake_openai.chat_requests == []


# --------------------------------------------------------------------------------------------
# --max_samples/--limit, --seed, --output
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--max_samples", "--max-samples", "--limit"])
def test_max_samples_limits_requests(flag, isolated_env, fake_openai, capsys):
    code, doc, _ = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, flag, "7"], capsys)
    assert code == 0
    assert doc["results"][GSM]["num_samples"] == 7 and len(fake_openai.chat_requests) == 7
    assert doc["config"]["max_samples"] == 7


def test_seed_sent_as_body_seed(isolated_env, fake_openai, capsys):
    code, doc, _ = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "3", "--seed", "-5"], capsys)
    assert code == 0
    assert [b["seed"] for b in bodies(fake_openai)] == [-5, -5, -5]
    assert doc["config"]["request_params"][GSM]["seed"] == -5


def test_default_seed_is_1234(isolated_env, fake_openai, capsys):
    code, _, _ = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "1"], capsys)
    assert code == 0 and bodies(fake_openai)[0]["seed"] == 1234


def test_output_file_equals_stdout(isolated_env, fake_openai, tmp_path, capsys):
    out = tmp_path / "res.json"
    code, doc, _ = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "3", "--output", out], capsys)
    assert code == 0
    assert json.loads(out.read_text("utf-8")) == doc
    log = tmp_path / "res_samples" / f"samples_{GSM}.jsonl"  # the sample log defaults beside it
    records = [json.loads(line) for line in log.read_text("utf-8").splitlines()]
    assert sorted(r["row_idx"] for r in records) == [0, 1, 2]
    assert doc["config"]["log_samples"] == str(tmp_path / "res_samples")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["missing_dir", "is_dir"])
def test_bad_output_exit_2(where, isolated_env, fake_openai, tmp_path, capsys):
    target = tmp_path / "nope" / "r.json" if where == "missing_dir" else tmp_path
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--output", target], capsys)
    assert code == 2 and doc is None
    assert "--output" in error_line(err)
    assert fake_openai.chat_requests == []


# --------------------------------------------------------------------------------------------
# --version, unknown task, entry points
# --------------------------------------------------------------------------------------------


def test_version(tmp_path):
    proc = cli("--version", env=cli_env(tmp_path))
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"nano-eval {nano_eval.__version__}"


def test_unknown_task_exit_2_with_valid_list(tmp_path):
    proc = cli("--tasks", "gsm8k,chartqa", "--base_url", "http://127.0.0.1:9/v1", env=cli_env(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = error_line(proc.stderr)
    assert proc.stderr.strip() == line  # nothing else: no usage block, no traceback
    assert "gsm8k" in line
    for name in ("gsm8k_cot_llama", "chartqa", "api_conformance"):
        assert name in line


def test_no_tasks_exit_2(tmp_path):
    proc = cli("--base_url", "http://127.0.0.1:9/v1", env=cli_env(tmp_path))
    assert proc.returncode == 2 and "--tasks" in error_line(proc.stderr)


def test_python_dash_m(tmp_path, fake_openai):
    env = cli_env(tmp_path, PYTHONPATH=str(ROOT))
    proc = cli("--version", env=env, cwd=tmp_path, command=[sys.executable, "-m", "nano_eval"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"nano-eval {nano_eval.__version__}"
    proc = cli("--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "2", "--no_progress", env=env, cwd=tmp_path, command=[sys.executable, "-m", "nano_eval"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][GSM]["num_samples"] == 2


@pytest.mark.skipif(shutil.which("nano-eval") is None, reason="the nano-eval console script is not installed")
def test_console_script(tmp_path, fake_openai):
    env = cli_env(tmp_path)
    proc = cli("--version", env=env, command=["nano-eval"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"nano-eval {nano_eval.__version__}"
    proc = cli("--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "2", env=env, command=["nano-eval"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][GSM]["num_samples"] == 2


# --------------------------------------------------------------------------------------------
# model autodetection, server probing, URLs
# --------------------------------------------------------------------------------------------


def test_model_autodetected_when_one(isolated_env, capsys):
    with FakeOpenAI(models=["the-only-model"]) as server:
        code, doc, err = main_json(["--tasks", GSM, "--base_url", server.base_url, "--max_samples", "2"], capsys)
        assert code == 0, err
        assert {b["model"] for b in bodies(server)} == {"the-only-model"}
    assert doc["config"]["model"] == "the-only-model"


@pytest.mark.parametrize("models", [[], ["model-a", "model-b", "model-c"]])
def test_model_autodetection_none_or_several_exit_3(models, isolated_env, capsys):
    with FakeOpenAI(models=models) as server:
        code, doc, err = main_json(["--tasks", GSM, "--base_url", server.base_url], capsys)
        assert server.chat_requests == []
    assert code == 3 and doc is None
    line = error_line(err)
    assert "--model" in line
    for m in models:
        assert m in line


def test_given_model_skips_detection_among_several(isolated_env, capsys):
    with FakeOpenAI(models=["model-a", "model-b"]) as server:
        code, _, err = main_json(["--tasks", GSM, "--base_url", server.base_url, "--model", "model-b",
                             "--max_samples", "1"], capsys)
        assert code == 0, err
        assert bodies(server)[0]["model"] == "model-b"


def test_unreachable_server_exit_3(isolated_env, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", f"http://127.0.0.1:{free_port()}/v1"], capsys)
    assert code == 3 and doc is None
    assert "cannot reach" in error_line(err)


class _PortHTTPServer(fakes._HTTPServer):
    def __init__(self, fake, port):
        self.fake = fake
        http.server.ThreadingHTTPServer.__init__(self, ("127.0.0.1", port), fakes._Handler)


class FakeOpenAIOnPort(FakeOpenAI):
    """FakeOpenAI bound to a chosen port (the base class picks a random one)."""

    def __init__(self, port, **kwargs):
        super().__init__(**kwargs)
        self._httpd.server_close()
        self._httpd = _PortHTTPServer(self, port)
        self.port, self.url = port, f"http://127.0.0.1:{port}"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


PROBED = [8000, 8080, 30000, 11434, 1234]


def test_base_url_probing(tmp_path, gsm8k_answers):
    for i, port in enumerate(PROBED[:2]):
        if _bindable(port) and not any(_listening(p) for p in PROBED[:i]):
            break
    else:
        pytest.skip("ports 8000 and 8080 are both in use on 127.0.0.1")
    with FakeOpenAIOnPort(port, answers=gsm8k_answers) as server:
        proc = cli("--tasks", GSM, "--max_samples", "3", "--no_progress", env=cli_env(tmp_path))
        assert any(r["path"] == "/v1/models" for r in server.requests)
        assert len(server.chat_requests) == 3
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["config"]["base_url"] == f"http://127.0.0.1:{port}/v1"
    assert doc["results"][GSM]["metrics"]["exact_match"] == 1.0
    assert str(port) in proc.stderr  # it says which port it picked


def test_base_url_probing_nothing_answers(tmp_path):
    if any(_listening(p) for p in PROBED):
        pytest.skip("something listens on one of the probed ports")
    proc = cli("--tasks", GSM, env=cli_env(tmp_path))
    assert proc.returncode == 3
    line = error_line(proc.stderr)
    for port in PROBED:
        assert str(port) in line


@pytest.mark.parametrize("suffix", ["/v1/chat/completions", "/v1/chat/completions/", "/v1/", "/v1", ""])
def test_base_url_forms_accepted(suffix, isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.url + suffix, "--max_samples", "2"], capsys)
    assert code == 0, err
    assert {r["path"] for r in fake_openai.chat_requests} == {"/v1/chat/completions"}
    assert doc["config"]["base_url"] == fake_openai.base_url
    assert doc["config"]["chat_url"] == fake_openai.base_url + "/chat/completions"


def test_normalize_base_url():
    assert normalize_base_url("http://h:1/v1/chat/completions") == ("http://h:1/v1", "http://h:1/v1/chat/completions")
    assert normalize_base_url(" https://h/api/v1/ ") == ("https://h/api/v1", "https://h/api/v1/chat/completions")
    assert normalize_base_url("http://h:8000") == ("http://h:8000/v1", "http://h:8000/v1/chat/completions")
    for bad in ("localhost:8000", "ftp://h/v1", "http:///v1", "http://h:99999999/v1", "", None):
        with pytest.raises(UsageError):
            normalize_base_url(bad)


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://127.0.0.1/v1", "http://127.0.0.1:abc/v1"])
def test_invalid_base_url_exit_2(url, isolated_env, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", url], capsys)
    assert code == 2 and doc is None
    assert "URL" in error_line(err)


# --------------------------------------------------------------------------------------------
# a full run as a user runs it, and secrets
# --------------------------------------------------------------------------------------------

SECRET = "sk-test-SECRET-0123456789abcdef"


def test_full_subprocess_run(tmp_path, gsm8k_answers, fake_hf):
    out = tmp_path / "results.json"
    with FakeOpenAI(answers=gsm8k_answers, api_key=SECRET) as server:
        proc = cli("--tasks", GSM, "--base_url", server.base_url, "--max_samples", "20", "--api_key", SECRET,
                        "--output", out, env=cli_env(tmp_path, datasets_server=fake_hf.url))
        chats = server.chat_requests
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    result = doc["results"][GSM]
    assert result["metrics"]["exact_match"] == 1.0  # the fake answers the first 50 correctly
    assert result["metrics"]["exact_match_stderr"] == 0.0
    assert result["num_samples"] == 20 and result["num_ok"] == 20 and result["failures"] == {}
    assert isinstance(result["elapsed"], (int, float)) and result["elapsed"] >= 0
    assert result["complete"] is True and doc["complete"] is True
    assert result["version"] == "4.0"
    assert result["dataset"]["path"] == "openai/gsm8k" and result["dataset"]["split"] == "test"
    assert doc["config"]["model"] == "fake-model"
    assert doc["config"]["max_samples"] == 20
    assert isinstance(doc["total_seconds"], (int, float))
    assert len(chats) == 20 and {r["row_idx"] for r in map(json.loads, (
        tmp_path / "results_samples" / f"samples_{GSM}.jsonl").read_text().splitlines())} == set(range(20))
    assert fake_hf.requests == []  # the bundled gsm8k cache is complete
    # the key goes to the server, and nowhere else
    assert {c["headers"]["Authorization"] for c in chats} == {f"Bearer {SECRET}"}
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert json.loads(out.read_text()) == doc


def test_secret_key_not_printed_on_failure(tmp_path):
    """An unreachable server: the error line names the URL but never the key."""
    proc = cli("--tasks", GSM, "--base_url", f"http://127.0.0.1:{free_port()}/v1", env=cli_env(tmp_path, OPENAI_API_KEY=SECRET))
    assert proc.returncode == 3
    assert SECRET not in proc.stderr and SECRET not in proc.stdout


# --------------------------------------------------------------------------------------------
# the Python API
# --------------------------------------------------------------------------------------------


def test_python_api_run_task(isolated_env, fake_openai):
    config = APIConfig(url=fake_openai.base_url, num_concurrent=8)
    result = asyncio.run(run_task(TASKS[GSM], config, max_samples=10))
    assert config.model == "fake-model"  # detected from /v1/models
    assert result["num_samples"] == 10 and result["num_ok"] == 10
    assert result["metrics"]["exact_match"] == 1.0
    assert result["metrics"]["exact_match,flexible-extract"] == 1.0
    assert len(fake_openai.chat_requests) == 10
    assert fake_openai.max_in_flight <= 8


def test_python_api_rejects_bad_config():
    with pytest.raises(UsageError):
        APIConfig(url="http://127.0.0.1:9/v1", num_concurrent=0)
    with pytest.raises(UsageError):
        APIConfig(url="not a url")
    with pytest.raises(UsageError):
        asyncio.run(run_task(TASKS[GSM], APIConfig(url="http://127.0.0.1:9/v1", model="m"), max_samples=0))
