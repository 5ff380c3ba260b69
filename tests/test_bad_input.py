"""Bad input: one "nano-eval: error:" line on stderr, no traceback, the documented exit code, nothing sent;
and the API key never written anywhere.

Every case runs the CLI as a subprocess (``python nano_eval.py ...``) against a FakeOpenAI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fakes
from fakes import cli, one_error
from fakes import FakeOpenAI, Reply, free_port

ROOT = Path(__file__).resolve().parent.parent
NANO_EVAL = ROOT / "nano_eval.py"
TASK_ARGS = ["--tasks", "gsm8k_cot_llama", "--max_samples", "2", "--no_progress"]




@pytest.fixture
def server(isolated_env):
    with FakeOpenAI() as srv:
        yield srv


# --- malformed flags and values: exit 2 before anything is sent --------------------------------

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
}


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


def test_missing_tasks_is_a_usage_error(server):
    code, out, err = cli("--base_url", server.base_url)
    one_error(code, err, 2, "--tasks")


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://x", "http://", "127.0.0.1:8000/v1",
                                 "http://127.0.0.1:99999/v1", "http://:80/v1"])
def test_invalid_base_url(server, url):
    code, out, err = cli(*TASK_ARGS, "--base_url", url)
    one_error(code, err, 2, "base URL")
    assert server.requests == []


def test_invalid_base_url_in_model_args(server):
    code, out, err = cli(*TASK_ARGS, "--model_args", "base_url=localhost:8000")
    one_error(code, err, 2, "base URL")


# --- output, log and data folders ------------------------------------------------------------


def test_directory_as_output(server, tmp_path):
    code, out, err = cli(*TASK_ARGS, "--base_url", server.base_url, "--output", str(tmp_path))
    one_error(code, err, 2, "--output")
    assert server.chat_requests == []


def test_output_in_a_missing_folder(server, tmp_path):
    code, out, err = cli(*TASK_ARGS, "--base_url", server.base_url, "--output", str(tmp_path / "no" / "r.json"))
    one_error(code, err, 2, "--output")
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


def test_unwritable_data_dir(server):
    code, out, err = cli(*TASK_ARGS, "--base_url", server.base_url, "--data_dir", "/etc/passwd/data")
    one_error(code, err, 2, "/etc/passwd/data")
    assert server.requests == []  # checked before connecting


def test_unwritable_data_dir_from_env(server, monkeypatch):
    monkeypatch.setenv("NANO_EVAL_DATA_DIR", "/etc/passwd/data")
    code, out, err = cli(*TASK_ARGS, "--base_url", server.base_url)
    one_error(code, err, 2, "/etc/passwd/data")
    assert server.chat_requests == []


# --- what the server sends back --------------------------------------------------------------


class RawModels(FakeOpenAI):
    """A FakeOpenAI whose GET /v1/models answers with fixed bytes."""

    def __init__(self, body: bytes, status: int = 200, content_type: str = "application/json", **kwargs):
        super().__init__(**kwargs)
        self.models_answer = (status, body, content_type)

    def _route(self, request):
        if request["method"] == "GET" and request["path"] == "/v1/models":
            self._record(self.requests, request)
            status, body, content_type = self.models_answer
            return fakes._Response(status, body, {"Content-Type": content_type})
        return super()._route(request)


HTML_PAGE = ("<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
             "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>")


@pytest.mark.parametrize("status", [200, 502])
def test_html_page_instead_of_model_list(isolated_env, status):
    with RawModels(HTML_PAGE.encode(), status=status, content_type="text/html") as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url)
        assert srv.chat_requests == []
    line = one_error(code, err, 3, "/v1/models")
    assert "<html" not in line.lower()


@pytest.mark.parametrize("body", [b"\xff\xfe\x00garbage\x80\x81", b'{"data": [{"id": "m\xff\xfe"}]}'],
                         ids=["binary", "json-with-bad-bytes"])
def test_non_utf8_model_list(isolated_env, body):
    with RawModels(body) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url)
        assert srv.chat_requests == []
    one_error(code, err, 3, "/v1/models")


def test_empty_model_list(isolated_env):
    with FakeOpenAI(models=()) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url)
    one_error(code, err, 3, "no models")


def test_several_models_listed(isolated_env):
    with FakeOpenAI(models=("alpha", "beta")) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url)
    one_error(code, err, 3, "alpha", "beta")


# --- non-UTF-8 bytes in the input ------------------------------------------------------------


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


def test_replay_of_a_non_utf8_file(isolated_env, tmp_path):
    path = tmp_path / "samples_gsm8k_cot_llama.jsonl"
    path.write_bytes(b"\xff\xfe\x00{not a record}\n")
    code, out, err = cli("replay", f"{path}:1")
    one_error(code, err, 2)


def test_compare_of_a_non_utf8_file(isolated_env, tmp_path):
    path = tmp_path / "samples_gsm8k_cot_llama.jsonl"
    path.write_bytes(b"\xff\xfe\x00{not a record}\n")
    code, out, err = cli("compare", str(path), str(path))
    one_error(code, err, 2)


def test_replay_of_a_line_that_is_not_a_record(isolated_env, tmp_path):
    path = tmp_path / "samples_gsm8k_cot_llama.jsonl"
    path.write_text('{"task": "gsm8k_cot_llama"}\n[1, 2]\nnot json\n', encoding="utf-8")
    for line in (1, 2, 3):
        code, out, err = cli("replay", f"{path}:{line}")
        one_error(code, err, 2, "not a sample record")


# --- the API key is never written ------------------------------------------------------------

FLAG_KEY = "sk-SECRET-123"
ENV_KEY = "sk-ENVSECRET-456"
HF_KEY = "hf_TOKENSECRET789"


def all_bytes_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_no_secret(out: str, err: str, folder: Path, *secrets: str):
    files = all_bytes_under(folder)
    assert files, "nothing was written"
    for secret in secrets:
        assert secret not in out, f"{secret} on stdout"
        assert secret not in err, f"{secret} on stderr"
        for path, data in files.items():
            assert secret.encode() not in data, f"{secret} in {path}"


@pytest.fixture
def secret_env(isolated_env, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_KEY)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # temporary files land where they are searched too
    return tmp_path


def test_api_key_never_written(secret_env, fake_hf):
    tmp_path = secret_env
    with FakeOpenAI(api_key=FLAG_KEY) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama,chartqa", "--base_url", srv.base_url,
                             "--api_key", FLAG_KEY, "--max_samples", "3", "--no_progress",
                             "--output", str(tmp_path / "results.json"),
                             "--log_samples", str(tmp_path / "logs"), "--log_images",
                             "--data_dir", str(tmp_path / "data"), "--max_fail_rate", "1")
        auth = {r["headers"].get("Authorization") for r in srv.chat_requests}
    assert code == 0, err
    assert auth == {f"Bearer {FLAG_KEY}"}  # the flag's key was used (and won over the env)
    document = json.loads(out)
    assert set(document["results"]) == {"gsm8k_cot_llama", "chartqa"}
    assert (tmp_path / "data").is_dir() and (tmp_path / "logs" / "samples_chartqa.jsonl").exists()
    assert_no_secret(out, err, tmp_path, FLAG_KEY, ENV_KEY, HF_KEY)


def test_env_api_key_never_written(secret_env):
    tmp_path = secret_env
    with FakeOpenAI(api_key=ENV_KEY) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url, "--output", str(tmp_path / "results.json"))
        auth = {r["headers"].get("Authorization") for r in srv.chat_requests}
    assert code == 0, err
    assert auth == {f"Bearer {ENV_KEY}"}
    assert_no_secret(out, err, tmp_path, ENV_KEY, HF_KEY)


def test_model_args_api_key_never_written(secret_env, monkeypatch):
    tmp_path = secret_env
    monkeypatch.delenv("OPENAI_API_KEY")
    with FakeOpenAI(api_key=FLAG_KEY) as srv:
        code, out, err = cli(*TASK_ARGS, "--model_args", f"base_url={srv.base_url},api_key={FLAG_KEY}",
                             "--output", str(tmp_path / "results.json"))
    assert code == 0, err
    assert_no_secret(out, err, tmp_path, FLAG_KEY)


@pytest.mark.parametrize("where", ["models", "chat"])
def test_rejected_api_key_never_written(secret_env, where):
    tmp_path = secret_env
    models = {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}
    routes = {"/v1/models": (200, models)} if where == "chat" else {}
    with FakeOpenAI(api_key="sk-the-right-one", extra_routes=routes) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url, "--api_key", FLAG_KEY,
                             "--output", str(tmp_path / "results.json"), "--log_samples", str(tmp_path / "logs"))
    one_error(code, err, 4, "authentication failed")
    for secret in (FLAG_KEY, ENV_KEY, HF_KEY):
        assert secret not in out and secret not in err
        for path, data in all_bytes_under(tmp_path).items():
            assert secret.encode() not in data, f"{secret} in {path}"


def test_api_key_in_an_error_message_is_redacted(secret_env):
    # a server that echoes the Authorization header back in its error message
    def echo(body, n):
        return Reply(status=400, json_body={"error": {"message": f"bad request with key {FLAG_KEY}"}})

    tmp_path = secret_env
    with FakeOpenAI(responder=echo) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url, "--api_key", FLAG_KEY,
                             "--output", str(tmp_path / "results.json"), "--max_fail_rate", "1")
    assert code == 0, err
    assert_no_secret(out, err, tmp_path, FLAG_KEY)
