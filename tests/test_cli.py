"""CLI: every flag, in both spellings, with its effect; bad input; main() and the entry points.

Bad input gives one "nano-eval: error:" line, no traceback, the documented exit code, and sends
nothing. Several --base_url servers and several tasks run to the end when one of them fails.
nano-eval runs as ``python nano_eval.py``, ``python -m nano_eval``, the console script and the
wheel installed into a fresh venv.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from fakes import ROOT  # noqa: E402

import nano_eval  # noqa: E402
from fakes import (ANSWERS, ByRow, FakeDatasetsServer, FakeOpenAI, GSM, GSM8K, GSM8K_GOLD, GSM_ARGS,  # noqa: E402
                   NANO_EVAL, PROXY_VARS, Reply, SECRET, TASK_ARGS, answers_responder, bodies, cli, cli_env,
                   error_line, error_lines, free_port, gsm8k_args, gsm8k_row_of, image_bytes_of, main_json, one_error,
                   question_of, read_log, right)


# --------------------------------------------------------------------------------------------
# Every flag, in both spellings, and its effect
# --------------------------------------------------------------------------------------------



FLAG_VALUES = {
    "tasks": GSM, "base_url": None, "model": "custom-model", "model_args": "model=from-model-args,seed=5",
    "api_key": "sk-flag", "num_concurrent": "3", "gen_kwargs": "top_k=5", "max_samples": "3", "limit": "3",
    "seed": "77", "output": "{tmp}/out.json", "log_samples": "{tmp}/logs", "log_images": True, "timeout": "33",
    "max_retries": "2", "max_fail_rate": "0.5", "keep_think": True, "data_dir": "{tmp}/dd",
    "system_instruction": "Be brief.", "fewshot_as_multiturn": "false", "no_progress": True,
}

SPELLINGS = [(name, f"--{name}") for name in FLAG_VALUES] + \
    [(name, f"--{name.replace('_', '-')}") for name in FLAG_VALUES if "_" in name and name != "limit"]


def _in_flight_gate(width: int):
    """A responder (right answers) whose first `width` requests wait until all `width` are in
    flight, then up to 0.5 s for one more: with at most `width` requests in flight none comes, so
    the server's peak is exactly `width`; a client sending more at once shows a larger one."""
    arrived = threading.Condition()
    seen = []
    answer = ByRow()

    def respond(body, n):
        with arrived:
            seen.append(n)
            arrived.notify_all()
            if n < width:
                arrived.wait_for(lambda: len(seen) >= width, timeout=10)
                arrived.wait_for(lambda: len(seen) > width, timeout=0.5)
        return answer(body, n)

    return respond


def _think_wrapped(body, n):
    """Row r's gold answer only inside a think block: scored right with --keep_think only."""
    return f"<think>The final answer is {GSM8K_GOLD[gsm8k_row_of(body)]}</think> I am not sure."


# What a flag needs to show its effect: another task or sample count, extra arguments, a responder
FLAG_SETUP = {
    "num_concurrent": {"max_samples": "4", "responder": lambda: _in_flight_gate(3)},
    # row 0 fails twice (Retry-After: 0, so no backoff wait), then answers: 2 attempts fail it, 5 would not
    "max_retries": {"extra": ["--max_fail_rate", "1"], "responder": lambda: ByRow(
        {0: [Reply(status=500, headers={"Retry-After": "0"})] * 2 + [right(0)]})},
    # 1 of 2 failed is 0.5: not more than --max_fail_rate 0.5 (exit 0), more than the default 0.05
    "max_fail_rate": {"responder": lambda: ByRow({1: Reply(status=400)})},
    "keep_think": {"responder": lambda: _think_wrapped},
    "log_images": {"tasks": "chartqa", "extra": ["--log_samples", "{tmp}/logs"]},
    "data_dir": {"tasks": "chartqa"},
}
CHARTQA_CACHE = Path("HuggingFaceM4__ChartQA") / "default" / "test"


def _check_flag(name, doc, server, tmp, err, timeouts, data_dir):
    cfg = doc["config"]
    task = FLAG_SETUP.get(name, {}).get("tasks", GSM)
    res = doc["results"][task]
    sent = bodies(server)
    chat_timeouts = {t for method, target, t in timeouts if method == "POST" and target.endswith("/chat/completions")}

    def images_logged():
        records = read_log(tmp / "logs", "chartqa")
        return len(records) == 2 and all(
            hashlib.sha256(image_bytes_of(r["request"])).hexdigest() == r["image"]["sha256"] for r in records)

    checks = {
        "tasks": lambda: list(doc["results"]) == [GSM],
        "base_url": lambda: len(sent) == 2 and cfg["base_url"] == server.base_url,
        "model": lambda: {b["model"] for b in sent} == {"custom-model"} and cfg["model"] == "custom-model",
        "model_args": lambda: {b["model"] for b in sent} == {"from-model-args"} and {b["seed"] for b in sent} == {5},
        "api_key": lambda: {r["headers"].get("Authorization") for r in server.chat_requests} == {"Bearer sk-flag"},
        # 3 requests at once and no more (the default, 8, would send all 4 rows at once)
        "num_concurrent": lambda: server.max_in_flight == 3 and len(sent) == 4 and cfg["num_concurrent"] == 3,
        "gen_kwargs": lambda: all(b["top_k"] == 5 and list(b)[-1] == "top_k" for b in sent),
        "max_samples": lambda: res["num_samples"] == 3 and len(sent) == 3 and cfg["max_samples"] == 3,
        "limit": lambda: res["num_samples"] == 3 and len(sent) == 3,
        "seed": lambda: {b["seed"] for b in sent} == {77} and cfg["seed"] == 77,
        "output": lambda: json.loads((tmp / "out.json").read_text()) == doc,
        "log_samples": lambda: len((tmp / "logs" / f"samples_{GSM}.jsonl").read_text().splitlines()) == 2,
        # the logged request holds the image itself (without the flag: a "<image sha256=...>" stub)
        "log_images": lambda: images_logged() and res["num_ok"] == 2,
        # the socket of every chat request waits 33 s (the default is 600)
        "timeout": lambda: chat_timeouts == {33.0} and cfg["timeout"] == 33.0,
        "max_retries": lambda: server.responder.attempts == {0: 2, 1: 1} and res["failures"] == {"http_500": 1}
                               and cfg["max_retries"] == 2,
        "max_fail_rate": lambda: res["failures"] == {"http_400": 1} and res["num_ok"] == 1
                                 and cfg["max_fail_rate"] == 0.5,
        "keep_think": lambda: res["metrics"]["exact_match,strict-match"] == 1.0
                              and res["metrics"]["exact_match,flexible-extract"] == 1.0 and cfg["keep_think"] is True,
        # the dataset cache is written there, not in NANO_EVAL_DATA_DIR
        "data_dir": lambda: (tmp / "dd" / CHARTQA_CACHE / "manifest.json").is_file()
                            and not (data_dir / CHARTQA_CACHE).exists() and cfg["data_dir"] == str(tmp / "dd"),
        "system_instruction": lambda: all(b["messages"][0] == {"role": "system", "content": "Be brief."}
                                          for b in sent),
        "fewshot_as_multiturn": lambda: all(len(b["messages"]) == 1 for b in sent)
                                         and cfg["fewshot_as_multiturn"] is False,
        # stderr is a terminal here (see the test): only the flag keeps the progress line off it
        "no_progress": lambda: not PROGRESS_LINE.search(err) and res["num_ok"] == 2,
    }
    return checks[name]()


PROGRESS_LINE = re.compile(r"\r(gsm8k_cot_llama|chartqa): \d+/\d+ ")


@pytest.mark.parametrize("name, spelling", SPELLINGS, ids=[s for _, s in SPELLINGS])
def test_flag_spelling(name, spelling, isolated_env, fake_openai, fake_hf, tmp_path, capsys, monkeypatch):
    setup = FLAG_SETUP.get(name, {})
    base = {"tasks": setup.get("tasks", GSM), "base_url": fake_openai.base_url,
            "max_samples": setup.get("max_samples", "2")}
    value = FLAG_VALUES[name]
    if name == "base_url":
        value = fake_openai.base_url
    if name == "limit":
        base.pop("max_samples")
    if "responder" in setup:
        fake_openai.responder = setup["responder"]()
    argv = []
    for key, val in base.items():
        if key != name:
            argv += [f"--{key}", val]
    argv += [spelling] if value is True else [spelling, str(value).format(tmp=tmp_path)]
    argv += [arg.format(tmp=tmp_path) for arg in setup.get("extra", [])]
    timeouts = []  # (method, target, the socket's timeout) of every request sent

    def request(conn, method, url, *args, **kwargs):
        timeouts.append((method, url, conn.sock.gettimeout()))
        return http.client.HTTPConnection.request(conn, method, url, *args, **kwargs)

    monkeypatch.setattr(nano_eval._Connection, "request", request)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a progress line unless --no_progress
    code, doc, err = main_json(argv, capsys)
    assert code == 0, err
    assert _check_flag(name, doc, fake_openai, tmp_path, err, timeouts, isolated_env), (name, doc["config"])
    assert (PROGRESS_LINE.search(err) is None) == (name == "no_progress"), err
    if base["tasks"] == GSM:
        assert fake_hf.requests == []  # gsm8k ships in data/: no datasets-server call
    else:
        assert fake_hf.requests


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


@pytest.mark.usefixtures("no_datasets_server")
def test_timeout_bounds_each_attempt_of_a_cli_run(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NANO_EVAL_") and k not in ("OPENAI_API_KEY", "HF_TOKEN")}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               NANO_EVAL_DATA_DIR=str(tmp_path / "data"), NANO_EVAL_DATASETS_SERVER="http://127.0.0.1:9")
    with FakeOpenAI(responder=lambda body, n: Reply(delay=15)) as server:
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "nano_eval.py"), "--tasks", "gsm8k_cot_llama", "--base_url",
             server.base_url, "--max_samples", "3", "--timeout", "1", "--max_retries", "1", "--no_progress"],
            capture_output=True, text=True, env=env, timeout=120)
        elapsed = time.monotonic() - start
        assert len(server.chat_requests) == 3
    assert proc.returncode == 1, proc.stderr  # every sample failed
    doc = json.loads(proc.stdout)
    assert doc["results"]["gsm8k_cot_llama"]["failures"] == {"timeout": 3}
    assert doc["config"]["timeout"] == 1.0 and doc["config"]["max_retries"] == 1
    assert elapsed < 30
    assert "Traceback" not in proc.stderr


# (content, keep_think) -> the extracted (strict-match, flexible-extract) answers of row 0 (gold 18).
# Both filters take the LAST match (lm-eval's group_select -1), so an answer after the think block
# wins either way; an answer only inside it counts only with --keep_think.
KEEP_THINK_CASES = {
    ("<think>16-3-4=9, 9*2=18. The final answer is 18</think> Hmm, maybe 7", False): ("[invalid]", "7"),
    ("<think>16-3-4=9, 9*2=18. The final answer is 18</think> Hmm, maybe 7", True): ("18", "7"),
    ("<think>16-3-4=9 and 9*2=18. The final answer is 18</think>\nI am not sure.", False): ("[invalid]", "[invalid]"),
    ("<think>16-3-4=9 and 9*2=18. The final answer is 18</think>\nI am not sure.", True): ("18", "18"),
    ("<think>The final answer is 5</think> The final answer is 18", False): ("18", "18"),
    ("<think>The final answer is 5</think> The final answer is 18", True): ("18", "18"),
    ("<think>Maybe 7. The final answer is 18</think> The final answer is 7", False): ("7", "7"),
    ("<think>Maybe 7. The final answer is 18</think> The final answer is 7", True): ("7", "7"),
}


@pytest.mark.parametrize("content, keep_think", list(KEEP_THINK_CASES))
def test_keep_think_decides_what_is_scored(content, keep_think, tmp_path):
    strict, flexible = KEEP_THINK_CASES[content, keep_think]
    with FakeOpenAI(responder=lambda body, n: Reply(content=content)) as srv:
        code, out, err = cli(*gsm8k_args(srv, 1, *(["--keep_think"] if keep_think else []), log_dir=tmp_path / "log"),
                             env=cli_env(tmp_path))
    assert code == 0, err
    (record,) = read_log(tmp_path / "log")
    assert record["extracted"] == {"strict-match": strict, "flexible-extract": flexible}
    assert json.loads(out)["config"]["keep_think"] is keep_think
    metrics = json.loads(out)["results"][GSM]["metrics"]
    assert metrics["exact_match,strict-match"] == float(strict == "18")
    assert metrics["exact_match,flexible-extract"] == float(flexible == "18")
    assert record["response"]["content"] == content  # logged raw either way


@pytest.mark.parametrize("timeout, status", [("0.5", "timeout"), ("10", "ok")])
def test_timeout_decides_whether_a_slow_answer_counts(timeout, status, tmp_path):
    # the same right answer, 1.5 s late: a timeout under --timeout 0.5, an ok sample under 10
    with FakeOpenAI(responder=lambda body, n: Reply(content="The final answer is 18", delay=1.5)) as srv:
        code, out, err = cli(*gsm8k_args(srv, 1, "--timeout", timeout, "--max_retries", 1,
                                         log_dir=tmp_path / "log"), env=cli_env(tmp_path))
        assert len(srv.chat_requests) == 1
    (record,) = read_log(tmp_path / "log")
    assert record["status"] == status and record["attempts"] == 1
    result = json.loads(out)["results"][GSM]
    assert result["num_ok"] == (status == "ok") and code == (0 if status == "ok" else 1), err


@pytest.mark.parametrize("max_retries", [1, 2, 4])
def test_max_retries_is_the_number_of_attempts(max_retries, tmp_path):
    # HTTP 500 is retryable: the server sees exactly --max_retries attempts (Retry-After: 0 keeps it fast)
    with FakeOpenAI(responder=lambda body, n: Reply(status=500, headers={"Retry-After": "0"})) as srv:
        code, out, err = cli(*gsm8k_args(srv, 1, "--max_retries", max_retries, "--max_fail_rate", 1,
                                         log_dir=tmp_path / "log"), env=cli_env(tmp_path))
        assert len(srv.chat_requests) == max_retries
    (record,) = read_log(tmp_path / "log")
    assert record["status"] == "http_500" and record["attempts"] == max_retries
    assert json.loads(out)["config"]["max_retries"] == max_retries


@pytest.mark.parametrize("rate, expected", [(None, 1), ("0.05", 1), ("0.0999", 1), ("0.1", 0), ("0.5", 0)])
def test_max_fail_rate_is_the_exit_threshold(rate, expected, tmp_path):
    # the same 2 failures of 20 (a fail rate of 0.1) every time: exit 1 above the rate, 0 at or
    # below it (the default is 0.05)
    plan = {3: Reply(status=400), 11: Reply(status=400)}
    with FakeOpenAI(responder=ByRow(plan)) as srv:
        code, out, err = cli(*gsm8k_args(srv, 20, *(["--max_fail_rate", rate] if rate else [])), env=cli_env(tmp_path))
    result = json.loads(out)["results"][GSM]
    assert result["num_failed"] == 2 and result["failures"] == {"http_400": 2}
    assert code == expected, err
    lines = error_lines(err)
    assert len(lines) == expected and all("2 of 20" in line and "max_fail_rate" in line for line in lines)


@pytest.mark.parametrize("flag", [None, "--no_progress", "--no-progress"])
def test_no_progress_removes_the_progress_line_from_a_terminal(flag, tmp_path):
    # stderr is a terminal: the progress line ("\rTASK: done/total ...") is drawn, unless --no_progress
    with FakeOpenAI() as srv:
        args = ["--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 3, *([flag] if flag else [])]
        code, out, err = cli(*args, env=cli_env(tmp_path), terminal=True)
    assert code == 0, err
    assert json.loads(out)["results"][GSM]["num_samples"] == 3
    progress = re.findall(rf"\r{GSM}: (\d+)/3", err)
    if flag:
        assert progress == [] and "\r" not in err, repr(err)
    else:
        assert progress and progress[-1] == "3", repr(err)


@pytest.mark.parametrize("log_images", [False, True])
def test_log_images_puts_the_image_itself_in_the_sample_log(log_images, fake_hf, tmp_path):
    # without --log_images the logged request holds a stub naming the image; with it, the data: URL sent
    with FakeOpenAI() as srv:
        code, out, err = cli("--tasks", "chartqa", "--base_url", srv.base_url, "--max_samples", 3, "--no_progress",
                             "--log_samples", tmp_path / "log", *(["--log_images"] if log_images else []),
                             env=cli_env(tmp_path, fake_hf))
        sent = sorted(image_url_of(r["body"]) for r in srv.chat_requests)
    assert code == 0, err
    assert len(sent) == 3 and all(url.startswith("data:image/png;base64,") for url in sent)
    records = read_log(tmp_path / "log", "chartqa")
    logged = sorted(image_url_of(r["request"]) for r in records)
    if log_images:
        assert logged == sent
    else:
        for record, url in zip(records, (image_url_of(r["request"]) for r in records)):
            image = record["image"]
            assert url == f"<image sha256={image['sha256']} bytes={image['bytes']} format={image['format']}>"
            assert re.fullmatch(r"<image sha256=[0-9a-f]{64} bytes=\d+ format=png>", url)
        assert "base64," not in (tmp_path / "log" / "samples_chartqa.jsonl").read_text("utf-8")


def image_url_of(body: dict) -> str:
    """The one image URL of a chartqa request body."""
    (url,) = [p["image_url"]["url"] for p in body["messages"][-1]["content"] if p.get("type") == "image_url"]
    return url


# --------------------------------------------------------------------------------------------
# Bad input: one error line, the documented exit code, nothing sent
# --------------------------------------------------------------------------------------------


USAGE_CASES = {
    "model_args-no-equals": (["--model_args", "a,b"], "--model_args"),
    "model_args-empty-key": (["--model_args", "=x"], "--model_args"),
    "model_args-unknown-key": (["--model_args", "colour=blue"], "colour"),
    "model_args-zero-concurrency": (["--model_args", "num_concurrent=0"], "num_concurrent"),
    "model_args-text-timeout": (["--model_args", "timeout=soon"], "timeout"),
    "model_args-negative-retries": (["--model_args", "max_retries=-2"], "max_retries"),
    "gen_kwargs-no-equals": (["--gen_kwargs", "a,b"], "--gen_kwargs"),
    "gen_kwargs-empty-key": (["--gen_kwargs", "=x"], "--gen_kwargs"),
    "unknown-task": (["--tasks", "gsm9k"], "gsm9k"),
    "num_concurrent-0": (["--num_concurrent", "0"], "num_concurrent"),
    "num_concurrent-negative": (["--num_concurrent", "-4"], "num_concurrent"),
    "num_concurrent-text": (["--num_concurrent", "many"], "num_concurrent"),
    "max_samples-negative": (["--max_samples", "-1"], "max_samples"),
    "max_samples-0": (["--max_samples", "0"], "max_samples"),
    "limit-0": (["--limit", "0"], None),
    "timeout-0": (["--timeout", "0"], "timeout"),
    "timeout-negative": (["--timeout", "-5"], "timeout"),
    "timeout-nan": (["--timeout", "nan"], "timeout"),
    "timeout-inf": (["--timeout", "inf"], "timeout"),
    "max_retries-0": (["--max_retries", "0"], "max_retries"),
    "max_fail_rate-2": (["--max_fail_rate", "2"], "max_fail_rate"),
    "max_fail_rate-negative": (["--max_fail_rate", "-0.1"], "max_fail_rate"),
    "max_fail_rate-nan": (["--max_fail_rate", "nan"], "max_fail_rate"),
    "seed-text": (["--seed", "lucky"], "seed"),
    "fewshot-not-bool": (["--fewshot_as_multiturn", "maybe"], "fewshot_as_multiturn"),
    "unknown-flag": (["--temperature", "0"], "--temperature"),
    "no-such-flag": (["--no-such-flag"], "--no-such-flag"),
    "gen_kwargs-lone-key": (["--gen_kwargs", "temperature"], "temperature"),
    "max_samples-text": (["--max_samples", "x"], "max_samples"),
    "limit-negative": (["--limit", "-1"], "--limit"),
    "max_fail_rate-1.5": (["--max_fail_rate", "1.5"], "max_fail_rate"),
    "model_args-text-seed": (["--model_args", "seed=abc"], "seed"),
}


@pytest.fixture
def server(isolated_env):
    with FakeOpenAI() as srv:
        yield srv


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_errors(server, case):
    extra, fragment = USAGE_CASES[case]
    args = [*TASK_ARGS, "--base_url", server.base_url]
    if extra[0] == "--tasks":
        args = args[2:]
    code, out, err = cli(*args, *extra)
    one_error(code, err, 2, *([fragment] if fragment else []))
    assert out == ""
    assert server.chat_requests == []


def test_unknown_model_arg_is_usage_error(isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--model_args", "bogus=1"], capsys)
    assert code == 2 and doc is None
    assert "bogus" in error_line(err)
    assert fake_openai.requests == []


def test_missing_tasks_is_a_usage_error(server):
    code, out, err = cli("--base_url", server.base_url)
    one_error(code, err, 2, "--tasks")
    assert server.requests == []


def test_unknown_task_exit_2_with_valid_list(tmp_path):
    proc = cli("--tasks", "gsm8k,chartqa", "--base_url", "http://127.0.0.1:9/v1", env=cli_env(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = error_line(proc.stderr)
    assert proc.stderr.strip() == line  # nothing else: no usage block, no traceback
    assert "gsm8k" in line
    for name in ("gsm8k_cot_llama", "chartqa", "api_conformance"):
        assert name in line


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://x", "http://", "127.0.0.1:8000/v1",
                                 "http://127.0.0.1:99999/v1", "http://:80/v1",
                                 "localhost:8000/v1", "ftp://127.0.0.1/v1", "http://127.0.0.1:abc/v1"])
def test_invalid_base_url(server, url):
    code, out, err = cli(*TASK_ARGS, "--base_url", url)
    one_error(code, err, 2, "base URL")
    assert out == ""
    assert server.requests == []


def test_invalid_base_url_in_model_args(server):
    code, out, err = cli(*TASK_ARGS, "--model_args", "base_url=localhost:8000")
    one_error(code, err, 2, "base URL")


def test_directory_as_output(server, tmp_path):
    code, out, err = cli(*TASK_ARGS, "--base_url", server.base_url, "--output", str(tmp_path))
    one_error(code, err, 2, "--output")
    assert out == ""
    assert server.chat_requests == []


def test_output_in_a_missing_folder(server, tmp_path):
    code, out, err = cli(*TASK_ARGS, "--base_url", server.base_url, "--output", str(tmp_path / "no" / "r.json"))
    one_error(code, err, 2, "--output")
    assert out == ""
    assert server.chat_requests == []


def test_output_under_a_regular_file(server, tmp_path):
    # a path under a regular file cannot be written, even by root
    code, out, err = cli(*TASK_ARGS, "--base_url", server.base_url, "--output", "/etc/passwd/out.json")
    one_error(code, err, 2)
    assert server.chat_requests == []
    assert not Path("/etc/passwd").is_dir()


@pytest.mark.parametrize("flag", ["--output", "--log_samples"])
def test_unwritable_paths_are_usage_errors_before_connecting(isolated_env, flag):
    path = "/etc/passwd/out.json" if flag == "--output" else "/etc/passwd/logs"
    code, out, err = cli(*TASK_ARGS, "--base_url", f"http://127.0.0.1:{free_port()}/v1", flag, path)
    one_error(code, err, 2)


def test_log_samples_under_a_regular_file(server):
    code, out, err = cli(*TASK_ARGS, "--base_url", server.base_url, "--log_samples", "/etc/passwd/logs")
    one_error(code, err, 2, "/etc/passwd/logs")
    assert server.chat_requests == []


def test_non_utf8_task_name(server):
    proc = subprocess.run([sys.executable, str(NANO_EVAL), "--tasks", b"gsm8k\xff", "--base_url", server.base_url],
                          capture_output=True, timeout=60)
    one_error(proc.returncode, proc.stderr.decode("utf-8", "replace"), 2, "not valid UTF-8")
    assert server.requests == []


def test_non_utf8_system_instruction(server, tmp_path):
    proc = subprocess.run([sys.executable, str(NANO_EVAL), *TASK_ARGS, "--base_url", server.base_url,
                           "--system_instruction", b"Be brief \xff", "--log_samples", str(tmp_path / "logs")],
                          capture_output=True, timeout=60)
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "internal error" not in err, err
    if proc.returncode != 0:
        one_error(proc.returncode, err, 2)


def test_fail_if_needs_several_servers(isolated_env, fake_openai):
    proc = subprocess.run([sys.executable, str(ROOT / "nano_eval.py"), "--tasks", "gsm8k_cot_llama", "--base_url",
                           fake_openai.base_url, "--fail_if", "worse"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "several --base_url" in proc.stderr
    assert fake_openai.chat_requests == []


# --------------------------------------------------------------------------------------------
# Several --base_url: one unusable server does not lose the others
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("closed_first", [True, False], ids=["unreachable-first", "unreachable-last"])
def test_an_unreachable_server_does_not_stop_the_others(isolated_env, tmp_path, closed_first):
    port = free_port()
    closed = f"http://127.0.0.1:{port}/v1"
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=ByRow()) as srv:
        urls = [closed, srv.base_url] if closed_first else [srv.base_url, closed]
        code, out, err = cli(*GSM_ARGS, "--base_url", urls[0], "--base_url", urls[1], "--max_samples", 5,
                             "--output", output)
        chat = srv.chat_requests
    assert code == 3, err
    assert "Traceback" not in err
    document = json.loads(out)
    assert set(document) >= {"runs", "comparisons"}
    assert len(document["runs"]) == 2
    dead, alive = document["runs"] if closed_first else document["runs"][::-1]
    assert "connection refused" in dead["error"] and str(port) in dead["error"]
    assert dead["complete"] is False and dead["results"] == {}
    assert "error" not in alive
    assert alive["config"]["chat_url"] == srv.base_url + "/chat/completions"
    result = alive["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 5 and result["num_ok"] == 5 and result["metrics"]["exact_match"] == 1.0
    assert alive["complete"] is True
    assert len(chat) == 5
    assert sorted(gsm8k_row_of(r["body"]) for r in chat) == [0, 1, 2, 3, 4]  # each row sent once
    assert document["comparisons"] == []  # one usable server: nothing to compare it with
    assert json.loads(output.read_text("utf-8")) == document


def test_one_unusable_server_does_not_lose_the_others(isolated_env, fake_openai, tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(status=404)) as broken:
        code, out, err = cli(*GSM_ARGS, "--base_url", fake_openai.base_url, "--base_url", broken.base_url,
                             "--max_samples", 3, "--output", tmp_path / "o.json")
    document = json.loads(out)
    assert code == 3 and "Traceback" not in err
    assert document["runs"][0]["results"]["gsm8k_cot_llama"]["num_samples"] == 3
    assert "answered 404" in document["runs"][1]["error"] and document["comparisons"] == []
    assert json.loads((tmp_path / "o.json").read_text()) == document


# --------------------------------------------------------------------------------------------
# Several tasks: a later task's failure keeps the finished ones
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", ["gsm8k_cot_llama,chartqa", "chartqa,gsm8k_cot_llama"])
def test_a_dataset_error_in_one_task_keeps_the_other(isolated_env, gsm8k_spec, tmp_path, tasks):
    """chartqa cannot be fetched (the datasets-server does not have it: 401, not retried); gsm8k
    comes from the shipped data. Whichever runs first, gsm8k's results are reported."""
    output = tmp_path / "o.json"
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as hf, FakeOpenAI(responder=ByRow()) as srv:
        env = {**os.environ, "NANO_EVAL_DATASETS_SERVER": hf.url}
        code, out, err = cli("--tasks", tasks, "--base_url", srv.base_url, "--max_samples", 3,
                             "--output", output, "--no_progress", env=env)
        chat = len(srv.chat_requests)
        asked = [r["query"].get("dataset") for r in hf.rows_requests]
    assert code == 5, err
    assert "Traceback" not in err
    assert asked and set(asked) == {"HuggingFaceM4/ChartQA"}  # gsm8k was not fetched: the shipped split
    document = json.loads(out)
    gsm = document["results"]["gsm8k_cot_llama"]
    assert gsm["num_samples"] == 3 and gsm["num_ok"] == 3 and gsm["complete"] is True
    assert gsm["metrics"]["exact_match"] == 1.0
    chartqa = document["results"]["chartqa"]
    assert chartqa["complete"] is False
    assert "HuggingFaceM4/ChartQA" in chartqa["error"] and "401" in chartqa["error"]
    assert document["complete"] is False
    assert chat == 3  # only gsm8k's requests
    assert json.loads(output.read_text("utf-8")) == document
    assert "chartqa" in err and "gsm8k_cot_llama" in err  # both in the stderr table / error line


def test_an_unreachable_datasets_server_in_a_later_task_keeps_the_finished_one(isolated_env, tmp_path, capsys,
                                                                              monkeypatch):
    """The datasets-server is not listening at all (connection refused after every retry). In
    process, with the datasets-server client's retries made short."""
    monkeypatch.setenv("NANO_EVAL_DATASETS_SERVER", f"http://127.0.0.1:{free_port()}")
    init = nano_eval._DatasetsClient.__init__
    monkeypatch.setattr(nano_eval._DatasetsClient, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "retries": 2, "retry_base_delay": 0.01}))
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=ByRow()) as srv:
        code = nano_eval.main(["--tasks", "gsm8k_cot_llama,chartqa", "--base_url", srv.base_url, "--max_samples", "4",
                               "--output", str(output), "--no_progress"])
        chat = len(srv.chat_requests)
    out, err = capsys.readouterr()
    assert code == 5, err
    document = json.loads(out)
    gsm = document["results"]["gsm8k_cot_llama"]
    assert gsm["num_samples"] == 4 and gsm["num_ok"] == 4 and gsm["complete"] is True
    chartqa = document["results"]["chartqa"]
    assert chartqa["complete"] is False and "connection refused" in chartqa["error"]
    assert chat == 4
    assert json.loads(output.read_text("utf-8")) == document


def test_an_auth_failure_after_a_finished_task_keeps_it(isolated_env, tmp_path):
    """The gateway accepts gsm8k requests and answers 401 to chartqa ones."""
    def responder(body, n):
        found = question_of(body)
        if found and found[0] == "chartqa":
            return Reply(status=401)
        return ByRow()(body, n)

    output = tmp_path / "o.json"
    with FakeOpenAI(responder=responder) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama,chartqa", "--base_url", srv.base_url, "--max_samples", 3,
                             "--num_concurrent", 1, "--output", output, "--no_progress")
        chartqa_sent = [r for r in srv.chat_requests if question_of(r["body"])[0] == "chartqa"]
    assert code == 4, err
    assert "Traceback" not in err
    document = json.loads(out)
    gsm = document["results"]["gsm8k_cot_llama"]
    assert gsm["num_samples"] == 3 and gsm["num_ok"] == 3 and gsm["complete"] is True
    chartqa = document["results"]["chartqa"]
    assert chartqa["complete"] is False and "authentication failed" in chartqa["error"]
    assert 1 <= len(chartqa_sent) <= 2  # stopped at the first 401
    assert document["complete"] is False
    assert json.loads(output.read_text("utf-8")) == document


def test_a_task_not_run_because_the_server_refused_the_key_has_an_entry(isolated_env, tmp_path):
    """Every request gets 401: the first task stops with the auth error and the second cannot run;
    each task asked for has an entry with its error and complete false."""
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=lambda body, n: Reply(status=401)) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama,chartqa", "--base_url", srv.base_url, "--max_samples", 2,
                             "--num_concurrent", 1, "--output", output, "--no_progress")
        chat = len(srv.chat_requests)
    assert code == 4, err
    assert chat == 1
    document = json.loads(out)
    assert "authentication failed" in document["results"]["gsm8k_cot_llama"]["error"]
    assert document["results"]["gsm8k_cot_llama"]["complete"] is False
    assert "chartqa" in document["results"], document["results"].keys()
    assert document["results"]["chartqa"]["complete"] is False and document["results"]["chartqa"]["error"]
    assert json.loads(output.read_text("utf-8")) == document


CHARTQA_KEYS = {"exact_match", "relaxed_accuracy", "anywhere_accuracy"}



def test_chartqa_run_of_30_rows_from_the_command_line(fake_hf, chart_server, tmp_path):
    args = ["--tasks", "chartqa", "--base_url", chart_server.base_url, "--max_samples", "30", "--no_progress"]
    proc = cli(*args, env=cli_env(tmp_path, fake_hf))
    assert proc.returncode == 1, proc.stderr  # 2 of 30 failed (missing_image) > --max_fail_rate 0.05
    doc = json.loads(proc.stdout)  # results are still written
    res = doc["results"]["chartqa"]
    expected_keys = set()
    for k in CHARTQA_KEYS:
        expected_keys |= {k, f"{k}_stderr", f"{k},valid"}
    expected_keys.add("relaxed_accuracy,human")
    assert set(res["metrics"]) == expected_keys  # every row of the fixture is human
    assert res["headline"] == "relaxed_accuracy"
    assert res["num_samples"] == 30 and res["num_ok"] == 28
    assert res["failures"] == {"missing_image": 2}
    assert res["images"] == {"formats": {"png": 28}, "jpeg_reencoded": 0}
    assert res["metrics"]["relaxed_accuracy"] == pytest.approx(28 / 30)
    assert res["metrics"]["relaxed_accuracy,human"] == pytest.approx(28 / 30)
    assert res["metrics"]["exact_match,valid"] == 1.0
    assert res["dataset"] == {"path": "HuggingFaceM4/ChartQA", "config": "default", "split": "test",
                              "revision": "a" * 40}
    assert doc["config"]["request_params"]["chartqa"] == {"max_tokens": 512, "temperature": 0.0, "stop": [],
                                                          "seed": 1234}
    assert len(chart_server.chat_requests) == 28
    assert len(fake_hf.asset_requests) == 28
    assert "missing_image" in proc.stderr
    # the same run again, allowing 10% failures: exit 0, and nothing downloaded
    n = len(fake_hf.requests) + len(fake_hf.asset_requests)
    proc = cli(*(args + ["--max_fail_rate", "0.1"]), env=cli_env(tmp_path, fake_hf))
    assert proc.returncode == 0, proc.stderr
    assert len(fake_hf.requests) + len(fake_hf.asset_requests) == n
    assert json.loads(proc.stdout)["results"]["chartqa"]["metrics"] == res["metrics"]


def test_both_tasks_in_one_command(fake_hf, gsm8k_answers, tmp_path):
    with FakeOpenAI(responder=answers_responder({**gsm8k_answers, **ANSWERS})) as oa:
        proc = cli("--tasks", "gsm8k_cot_llama,chartqa", "--base_url", oa.base_url, "--max_samples", "5",
                        "--log_samples", tmp_path / "log", env=cli_env(tmp_path, fake_hf))
        kinds = sorted(question_of(r["body"])[0] for r in oa.chat_requests)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc["results"]) == ["gsm8k_cot_llama", "chartqa"]
    assert doc["results"]["gsm8k_cot_llama"]["metrics"]["exact_match"] == 1.0
    assert doc["results"]["chartqa"]["metrics"]["relaxed_accuracy"] == 1.0
    assert kinds == ["chartqa"] * 5 + ["gsm8k"] * 5
    assert (tmp_path / "log" / "samples_gsm8k_cot_llama.jsonl").is_file()
    assert (tmp_path / "log" / "samples_chartqa.jsonl").is_file()
    assert set(doc["config"]["request_params"]) == {"gsm8k_cot_llama", "chartqa"}
    assert not [r for r in fake_hf.rows_requests if r["query"]["dataset"] == GSM8K[0]]  # gsm8k ships in data/


# --------------------------------------------------------------------------------------------
# main(), the entry points and the installed wheel
# --------------------------------------------------------------------------------------------


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


def test_version(tmp_path):
    proc = cli("--version", env=cli_env(tmp_path))
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"nano-eval {nano_eval.__version__}"


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


def test_the_wheel_runs_gsm8k_offline_from_the_shipped_split(tmp_path):
    """Build the wheel, install it into a fresh venv, run it from elsewhere with no datasets-server
    and no data dir: gsm8k must come from the split the wheel carries (slow-ish: ~10 s)."""
    # build from a clean copy of what the build reads, so no build/ dir of the checkout is reused or left
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "nano_eval.py", *(p.name for p in ROOT.glob("LICENSE*"))):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "data" / "openai__gsm8k", source / "data" / "openai__gsm8k")
    shutil.copy2(ROOT / "data" / "README.md", source / "data" / "README.md")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", ".", "-w", str(wheels)],
                           cwd=source, capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        text = build.stdout + build.stderr
        if any(s in text for s in ("No matching distribution", "Could not find a version", "NewConnectionError",
                                   "Network is unreachable", "Temporary failure in name resolution",
                                   "ProxyError", "connection broken", "ConnectTimeoutError")):
            pytest.skip(f"cannot build the wheel without the package index: {text.strip().splitlines()[-1]}")
        pytest.fail(f"pip wheel failed:\n{text}")
    (wheel,) = wheels.glob("nano_eval-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nano_eval.py" in names
    shipped = sorted(n for n in names if n.startswith("nano_eval_data/openai__gsm8k/main/test/"))
    assert "nano_eval_data/openai__gsm8k/main/test/manifest.json" in shipped and len(shipped) == 15
    assert not [n for n in names if "chartqa" in n.lower() or n.startswith("tests/")]  # no GPL test data

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                              "--no-index", "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANO_EVAL_") and k not in PROXY_VARS
           and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "cache"),
               NANO_EVAL_DATASETS_SERVER=f"http://127.0.0.1:{free_port()}", NO_PROXY="127.0.0.1,localhost")
    where = subprocess.run([str(python), "-c", "import nano_eval; print(nano_eval.__file__); "
                            "print(nano_eval._BUNDLED_DATA)"], capture_output=True, text=True, cwd=home, env=env,
                           timeout=60)
    module_file, bundled = where.stdout.split()
    assert Path(module_file).is_relative_to(venv) and Path(bundled).is_relative_to(venv), where.stdout
    assert Path(bundled).name == "nano_eval_data"

    responder = ByRow()
    with FakeOpenAI(responder=responder) as srv:
        proc = subprocess.run([str(venv / "bin" / "nano-eval"), *GSM_ARGS, "--base_url", srv.base_url, "--max_samples", "3"],
                              capture_output=True, text=True, cwd=home, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    result = document["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 3 and result["num_ok"] == 3 and result["metrics"]["exact_match"] == 1.0
    assert sorted(responder.rows) == [0, 1, 2]  # the first 3 test rows, in dataset order
    shipped_manifest = json.loads((ROOT / "data" / "openai__gsm8k" / "main" / "test" / "manifest.json").read_text())
    revision = shipped_manifest["pages"]["0"].get("revision") or shipped_manifest.get("source")
    assert result["dataset"]["revision"] == revision
    assert not (home / "cache" / "nano-eval" / "openai__gsm8k" / "main" / "test" / "rows-00000.jsonl").exists()


# ============================================================================
# The module itself
# ============================================================================


def test_the_collector_is_paused_only_inside():
    """The speed trick of the tools (section 14): no cycle collection while they read whole logs,
    and the collector as it was after, an error or not."""
    import gc
    assert gc.isenabled()
    with nano_eval._collector_paused():
        assert not gc.isenabled()
    with pytest.raises(KeyError), nano_eval._collector_paused():
        raise KeyError
    assert gc.isenabled()
    gc.disable()
    try:
        with nano_eval._collector_paused():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def test_no_line_of_the_module_is_over_100_columns():
    lines = Path(nano_eval.__file__).read_text(encoding="utf-8").splitlines()
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 100] == []


def test_the_public_api_is_all_and_the_readme_names_only_it():
    """__all__ names what the README documents, each exists, and every other name the module
    defines is private; the README and the module docstring name no private function or class."""
    assert all(hasattr(nano_eval, name) for name in nano_eval.__all__)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in nano_eval.__all__:
        assert name.startswith("__") or f"`{name}" in readme or f"import {name}" in readme or \
            f", {name}" in readme, name
    own = {name for name, value in vars(nano_eval).items() if getattr(value, "__module__", None) == "nano_eval"}
    assert own - set(nano_eval.__all__) == {name for name in own if name.startswith("_")}
    private = {name[1:] for name in vars(nano_eval) if name.startswith("_") and not name.startswith("__")}
    for text in (readme, nano_eval.__doc__):
        named = set(re.findall(r"`(\w+)\(|\b(\w+)\(\)", text))
        named = {a or b for a, b in named}
        assert not named & private, named & private


def test_the_module_docstring_names_every_section_in_order():
    """The docstring's map names each numbered section banner of nano_eval.py, in order, and
    main() is in section 9, the end of the core."""
    lines = Path(nano_eval.__file__).read_text(encoding="utf-8").splitlines()
    banners = [(i, line[2:].split(". ", 1)) for i, line in enumerate(lines) if re.match(r"# \d+\. ", line)]
    assert len(banners) == 14
    mapped = re.findall(r"^ +(\d+)\. +(\S+(?: \S+)?)", nano_eval.__doc__, re.M)
    assert [(n, title.split()[0]) for n, title in mapped] == [(n, t.split()[0]) for _, (n, t) in banners]
    main_at = next(i for i, line in enumerate(lines) if line.startswith("def main("))
    assert banners[8][0] < main_at < banners[9][0]


# --------------------------------------------------------------------------------------------
# Nothing finished is lost (issue 23, items 1, 2, 4)
# --------------------------------------------------------------------------------------------

import signal  # noqa: E402
import tempfile  # noqa: E402

from conformance_fakes import ConformanceFake  # noqa: E402
from fakes import cli_command, interrupted_cli  # noqa: E402


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs (root only; skipped where it cannot be mounted)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a 64 KB tmpfs")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_under_the_sample_log_keeps_every_finished_result(isolated_env, tmp_path, small_disk):
    """Any exception, not only nano-eval's own, is the task's error: the results JSON still
    reaches stdout and --output, and the task that failed says why (issue 23, item 1)."""
    with FakeOpenAI(responder=ByRow()) as srv:
        proc = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 40, "--num_concurrent", 1,
                   "--log_samples", small_disk, "--output", tmp_path / "r.json", env=cli_env(tmp_path))
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    result = doc["results"][GSM]
    assert result["error"].startswith("No space left on device") and result["complete"] is False, result
    assert result["num_ok"] >= 1 and "metrics" in result  # what finished before the disk filled is there
    assert json.loads((tmp_path / "r.json").read_text("utf-8")) == doc
    assert f"error: {GSM}: No space left on device" in proc.stderr and "internal error" not in proc.stderr


def test_a_closed_stdout_still_writes_the_report_and_the_output(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        proc = subprocess.Popen(cli_command(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2,
                                            "--output", tmp_path / "r.json", "--report", tmp_path / "r.html"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT), env=cli_env(tmp_path))
        proc.stdout.close()  # `nano-eval ... | true`
        err = proc.stderr.read().decode()
        code = proc.wait(60)
    assert code == 0, err
    assert "stdout is closed: the results JSON was not printed; it is in" in err
    assert "internal error" not in err and "Exception ignored" not in err and "BrokenPipe" not in err
    assert (tmp_path / "r.html").stat().st_size > 1000
    assert json.loads((tmp_path / "r.json").read_text("utf-8"))["results"][GSM]["num_samples"] == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_the_second_servers_check_keeps_the_first_run(isolated_env, tmp_path, sig):
    with FakeOpenAI(responder=ByRow()) as a, ConformanceFake(malformed="hang") as b:
        run, _ = interrupted_cli(*GSM_ARGS, "--base_url", a.base_url, "--base_url", b.base_url, "--max_samples", 2,
                                 "--check", "--output", tmp_path / "r.json", env=cli_env(tmp_path),
                                 when=lambda: any(r["body"] == {"model": "conformance-model",
                                                                "messages": "this is not a list of messages"}
                                                  for r in b.chat_requests if isinstance(r["body"], dict)),
                                 what="the second server's check did not start", sig=sig)
    assert run.code == 130, run.err
    doc = json.loads(run.out)
    assert [r["results"][GSM]["num_samples"] for r in doc["runs"]] == [2]
    assert json.loads((tmp_path / "r.json").read_text("utf-8")) == doc
    assert "interrupted: the runs that finished are written" in run.err


@pytest.mark.parametrize("flags, message", [
    (["--output", "{t}/x.json", "--report", "{t}/x.json"], "--output and --report are the same file"),
    (["--report", "{t}/logs/samples_gsm8k_cot_llama.jsonl", "--log_samples", "{t}/logs"],
     "--report {t}/logs/samples_gsm8k_cot_llama.jsonl is a sample log of this run"),
    (["--output", "{t}/logs/samples_chartqa.jsonl", "--log_samples", "{t}/logs"],
     "--output {t}/logs/samples_chartqa.jsonl is a sample log of this run"),
])
def test_colliding_output_paths_are_refused_up_front(isolated_env, tmp_path, flags, message):
    """Issue 23, item 5: nothing is sent, nothing is written over."""
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / f"samples_{GSM}.jsonl"
    log.write_text('{"task": "gsm8k_cot_llama"}\n', encoding="utf-8")
    with FakeOpenAI(responder=ByRow()) as srv:
        proc = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1,
                   *[f.format(t=tmp_path) for f in flags], env=cli_env(tmp_path))
        assert srv.chat_requests == []
    one_error(proc.returncode, proc.stderr, 2, message.format(t=tmp_path))
    assert log.read_text("utf-8") == '{"task": "gsm8k_cot_llama"}\n' and not (tmp_path / "x.json").exists()


def test_small_words(isolated_env, tmp_path, capsys):
    """Issue 23, item 14: the user's own text in a bad value; no temporary sample folder left by
    --report; a bidirectional override in a response does not reverse the report's lines; a wrong
    row_idx is not called a short page; --check says it is working before a slow server answers."""
    proc = cli(*GSM_ARGS, "--base_url", "http://127.0.0.1:9/v1", "--max_samples", "-1")
    one_error(proc.returncode, proc.stderr, 2, "expected a positive integer, got '-1'")
    scratch_before = set(Path(tempfile.gettempdir()).glob("nano-eval-samples-*"))
    rlo = "The final answer is \u202e81"
    with FakeOpenAI(responder=ByRow(plan={0: rlo})) as srv:
        proc = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2, "--check", "--report",
                   tmp_path / "r.html", env=cli_env(tmp_path, TMPDIR=tempfile.gettempdir()))
    assert proc.returncode in (0, 1), proc.stderr
    assert set(Path(tempfile.gettempdir()).glob("nano-eval-samples-*")) == scratch_before
    page = (tmp_path / "r.html").read_text("utf-8")
    assert "\u202e" not in page and "The final answer is \\u202e81" in page
    assert "nano-eval: --check: 13 conformance checks against" in proc.stderr


def test_a_wrong_row_idx_is_named_as_such(isolated_env, tmp_path):
    from fakes import CHARTQA, FakeDatasetsServer, synthetic_chartqa_dataset

    class Shifted(FakeDatasetsServer):
        def _rows(self, request):
            response = super()._rows(request)
            body = json.loads(response.body)
            body["rows"][1]["row_idx"] = 7
            response.body = json.dumps(body).encode()
            response.headers["Content-Length"] = str(len(response.body))
            return response

    with FakeOpenAI(responder=ByRow()) as srv, Shifted({CHARTQA: synthetic_chartqa_dataset(3)}) as hf:
        proc = cli("--tasks", "chartqa", "--base_url", srv.base_url, "--no_progress", env=cli_env(tmp_path, hf))
    one_error(proc.returncode, proc.stderr, 5, "rows out of place, row_idx 7 where 1 belongs")
    assert "short page" not in proc.stderr


def test_ctrl_c_while_chartqa_loads_keeps_gsm8k_and_names_chartqa(isolated_env, tmp_path):
    from fakes import CHARTQA, FakeDatasetsServer, synthetic_chartqa_dataset

    class Slow(FakeDatasetsServer):
        def _rows(self, request):
            self._sleep(30)
            return super()._rows(request)

    with FakeOpenAI(responder=ByRow()) as srv, Slow({CHARTQA: synthetic_chartqa_dataset(3)}) as hf:
        run, _ = interrupted_cli("--tasks", "gsm8k_cot_llama,chartqa", "--base_url", srv.base_url, "--max_samples", 2,
                                 "--no_progress", env=cli_env(tmp_path, hf), when=lambda: hf.rows_requests,
                                 what="chartqa's rows were not asked for")
    assert run.code == 130, run.err
    results = json.loads(run.out)["results"]
    assert results["gsm8k_cot_llama"]["num_samples"] == 2
    assert results["chartqa"] == {"error": "not run: interrupted", "exit_code": 130, "complete": False}


def test_a_datasets_server_name_that_does_not_resolve_is_said_at_once(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        proc = cli("--tasks", "chartqa", "--base_url", srv.base_url, "--no_progress",
                   env=cli_env(tmp_path, "http://no-such-host.invalid"))
    line = one_error(proc.returncode, proc.stderr, 5, "cannot resolve host", "NANO_EVAL_DATASETS_SERVER",
                     "--data_dir")
    assert "answered" not in line and "waiting" not in proc.stderr  # nothing answered; not retried


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_comparison_keeps_both_runs(isolated_env, tmp_path, capsys, monkeypatch, sig):
    """Issue 23, item 2: Ctrl-C or SIGTERM after both servers' runs finished, while they are being
    compared: both runs reach stdout and --output, the comparison is left out, exit 130. SIGINT is
    ignored when the run starts, as in a script's background job: Ctrl-C must still stop it."""
    def interrupted_comparison(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the signal's handler raises here
        raise AssertionError("the signal did not arrive")

    monkeypatch.setattr(nano_eval, "compare_paths", interrupted_comparison)
    previous = {s: signal.signal(s, signal.SIG_IGN if s == signal.SIGINT else signal.SIG_DFL)
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with FakeOpenAI(responder=ByRow()) as a, FakeOpenAI(responder=ByRow(wrong={0})) as b:
            code, doc, err = main_json([*GSM_ARGS, "--base_url", a.base_url, "--base_url", b.base_url,
                                        "--max_samples", 3, "--output", tmp_path / "r.json",
                                        "--log_samples", tmp_path / "logs"], capsys)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert code == 130, err
    assert [r["results"][GSM]["num_samples"] for r in doc["runs"]] == [3, 3] and doc["comparisons"] == []
    assert json.loads((tmp_path / "r.json").read_text("utf-8")) == doc
    assert "interrupted: the runs that finished are written, without their comparison" in err
