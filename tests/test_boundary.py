"""Issue 32: every value from a server or a file is checked once, at the boundary.

One test (or parametrized test) per numbered case of the issue, each pinning what the fixed code
does, plus property tests that feed random JSON shapes (huge integers, NaN, lone surrogates, ...)
into the response classifier, the datasets row reader and the sample-log reader: nothing but a
NanoEvalError may escape, and what comes out has a documented status.

Everything talks to fakes on 127.0.0.1; a few fakes that must misbehave at the socket level
(a body sent a byte at a time, or in slow chunks) are raw socket servers defined here.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from fakes import (CHARTQA, GSM, GSM8K_GOLD, LOG_NAME, NANO_EVAL, ROOT, ROWS_JSONL, ByRow, FakeDatasetsServer,  # noqa: E402
                   FakeOpenAI, Headers, LogprobModel, Reply, answers_responder, chartqa_dataset, cli, cli_command,
                   cli_env, error_lines, gsm8k_args, gsm8k_row_of, openai_token, question_of, read_log, wait_for,
                   warning_lines)

import nano_eval as ne  # noqa: E402

HUGE = "1" + "0" * 400  # 10**400 as JSON writes it: a valid number no float holds
STATUSES = {"ok", "truncated", "empty", "bad_response", "timeout", "connection", "too_large", "missing_image"}
SAMPLE_RECORD = "not a nano-eval sample record ("


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def no_crash(err: str) -> None:
    assert "internal error" not in err and "Traceback" not in err, err


def one_line_error(code: int, err: str, expected: int, *fragments: str) -> str:
    assert code == expected, (code, err)
    no_crash(err)
    lines = error_lines(err)
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def completion(content="Let me think. The final answer is 18", finish="stop", usage=True, logprobs=None) -> dict:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]}
    if logprobs is not None:
        body["choices"][0]["logprobs"] = logprobs
    if usage is True:
        usage = {"prompt_tokens": 900, "completion_tokens": 9, "total_tokens": 909}
    if usage:
        body["usage"] = usage
    return body


def raw_reply(body: dict, **replacements: str) -> Reply:
    """A 200 whose JSON text is json.dumps(body) with each placeholder (a key) replaced by its
    raw JSON text: escapes and numbers that json.dumps would never write."""
    text = json.dumps(body)
    for placeholder, raw in replacements.items():
        assert placeholder in text, placeholder
        text = text.replace(placeholder, raw)
    return Reply(raw=text.encode(), headers={"Content-Type": "application/json"})


def right(row: int) -> str:
    return f"Let me think. The final answer is {GSM8K_GOLD[row]}"


def good_page(hf: FakeDatasetsServer, key=CHARTQA, offset=0) -> dict:
    """The /rows page the fake datasets-server would send (to be spoiled, then served as a fault)."""
    dataset, config, split = key
    request = {"query": {"dataset": dataset, "config": config, "split": split, "offset": str(offset),
                         "length": "100"}, "headers": Headers()}
    return json.loads(hf._rows(request).body)


def page_fault(body, offset=0, times=100) -> dict:
    return {"path": "/rows", "match": {"offset": str(offset)}, "status": 200, "body": body, "times": times}


def chart_server() -> FakeOpenAI:
    from fakes import ANSWERS
    return FakeOpenAI(responder=answers_responder(ANSWERS))


def chartqa_args(server, n, *extra) -> list:
    return ["--tasks", "chartqa", "--base_url", server.base_url, "--max_samples", n, "--no_progress",
            "--max_retries", 1, *extra]


@pytest.fixture(scope="module")
def chartqa_spec_module():
    return chartqa_dataset(ROWS_JSONL)


class RawHTTP:
    """A bare HTTP/1.1 server on 127.0.0.1 (a thread per connection, keep-alive) for answers the
    fakes cannot give: route(method, path, body) returns (status, headers, body) or (status,
    headers, total length, chunks) where chunks yields (bytes, seconds to wait before sending).
    ``sent[path]``: body bytes each answer to that path got out before the client went away."""

    def __init__(self, route):
        self.route = route
        self.requests: list = []
        self.sent: dict = {}
        self.closing = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.conns: list = []
        self.lock = threading.Lock()

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()

    def _accept(self):
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        f = conn.makefile("rb")
        try:
            while not self.closing.is_set():
                line = f.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    h = f.readline().decode("latin-1")
                    if h in ("\r\n", "\n", ""):
                        break
                    name, _, value = h.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = f.read(int(headers.get("content-length") or 0))
                path = path.split("?")[0]
                with self.lock:
                    self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
                answer = self.route(method, path, body)
                status, extra = answer[0], answer[1]
                if len(answer) == 3:
                    total, chunks = len(answer[2]), [(answer[2], 0)]
                else:
                    total, chunks = answer[2], answer[3]
                head = f"HTTP/1.1 {status} X\r\nContent-Length: {total}\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in {"Content-Type": "application/json", **extra}.items()) + "\r\n"
                conn.sendall(head.encode())
                sent = 0
                try:
                    for chunk, wait in chunks:
                        if wait and self.closing.wait(wait):
                            return
                        conn.sendall(chunk)
                        sent += len(chunk)
                finally:
                    with self.lock:
                        self.sent.setdefault(path, []).append(sent)
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()


def models_json() -> bytes:
    return json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}).encode()


def chat_body_for(body: bytes) -> bytes:
    try:
        row = gsm8k_row_of(json.loads(body))
        content = right(row)
    except Exception:  # noqa: BLE001 -- a preflight prompt
        content = "1 2 3 4 5 6 7 8 9 10"
    return json.dumps(completion(content)).encode()


# --------------------------------------------------------------------------------------------
# 1. A lone surrogate loses nothing
# --------------------------------------------------------------------------------------------


SURROGATE_ROWS = {0, 2}


def surrogate_reply(where: str, row: int) -> Reply:
    if where == "content":
        return raw_reply(completion(right(row) + " @SUR@"), **{"@SUR@": "\\ud800"})
    if where == "finish_reason":
        return raw_reply(completion(right(row), finish="stop@SUR@"), **{"@SUR@": "\\ud800"})
    lp = [{"token": "@SUR@", "logprob": -0.1, "top_logprobs": [{"token": "@SUR@", "logprob": -0.1}]}]
    return raw_reply(completion(right(row), logprobs={"content": lp}), **{"@SUR@": "\\ud800"})


@pytest.mark.parametrize("where", ["content", "logprob_token", "finish_reason"])
def test_1_a_lone_surrogate_is_logged_as_replacement_character(tmp_path, where):
    n = 4
    plan = {row: surrogate_reply(where, row) for row in SURROGATE_ROWS}
    out, logs = tmp_path / "r.json", tmp_path / "logs"
    extra = ["--logprobs", 2] if where == "logprob_token" else []
    with FakeOpenAI(responder=ByRow(plan)) as srv:
        code, stdout, err = cli(*gsm8k_args(srv, n, "--max_retries", 1, "--output", out, *extra, log_dir=logs),
                                env=cli_env(tmp_path))
        assert len(srv.chat_requests) == n  # sanity: every sample was answered once
    no_crash(err)
    assert code == 0, err
    assert out.exists() and json.loads(out.read_text("utf-8"))["results"][GSM]["num_samples"] == n
    text = (logs / LOG_NAME).read_bytes().decode("utf-8")  # strict: no surrogate in the file
    records = read_log(logs)
    assert [r["row_idx"] for r in records] == list(range(n))  # every answered sample is logged
    for r in records:
        if r["row_idx"] in SURROGATE_ROWS:
            field = {"content": r["response"]["content"], "finish_reason": r["response"]["finish_reason"],
                     "logprob_token": json.dumps(r["response"].get("logprobs"), ensure_ascii=False)}[where]
            assert "\ufffd" in str(field), r["response"]
    assert "\ud800" not in text


# --------------------------------------------------------------------------------------------
# 2. /v1/models ids that are not strings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [[{"id": 5}], [{"id": {"name": "m"}}], [{"id": 5}, {"id": 6}]],
                         ids=["int", "dict", "two_ints"])
def test_2_a_model_id_that_is_not_a_string(tmp_path, data):
    models = {"object": "list", "data": [{**m, "object": "model", "owned_by": "fake"} for m in data]}
    with FakeOpenAI(responder=ByRow(), extra_routes={"/v1/models": (200, models)}) as srv:
        code, out, err = cli(*gsm8k_args(srv, 2, "--max_retries", 1), env=cli_env(tmp_path))
        one_line_error(code, err, 3, "/v1/models")
        assert out.strip() == ""
        code, out, err = cli(*gsm8k_args(srv, 2, "--max_retries", 1, "--model", "fake-model"), env=cli_env(tmp_path))
    no_crash(err)
    assert code == 0, err
    assert json.loads(out)["results"][GSM]["num_ok"] == 2


# --------------------------------------------------------------------------------------------
# 3. usage.completion_tokens = 10**400
# --------------------------------------------------------------------------------------------


def test_3_a_huge_usage_integer_is_not_kept(tmp_path):
    usage = {"prompt_tokens": 900, "completion_tokens": -7777, "total_tokens": 909}
    plan = {1: raw_reply(completion(right(1), usage=usage), **{"-7777": HUGE})}
    logs = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow(plan)) as srv:
        code, out, err = cli(*gsm8k_args(srv, 3, "--max_retries", 1, log_dir=logs), env=cli_env(tmp_path))
    no_crash(err)
    assert "OverflowError" not in out + err
    assert code == 0, err
    result = json.loads(out)["results"][GSM]
    assert isinstance(result["metrics"]["exact_match"], float) and result["num_ok"] == 3, result
    assert HUGE not in (logs / LOG_NAME).read_text("utf-8")
    usage_1 = next(r for r in read_log(logs) if r["row_idx"] == 1)["response"]["usage"]
    assert (usage_1 or {}).get("completion_tokens") in (None,), usage_1
    code, out, err = cli("compare", logs, logs, env=cli_env(tmp_path))
    no_crash(err)
    assert code == 0, err
    code, out, err = cli("report", logs, "-o", tmp_path / "r.html", env=cli_env(tmp_path))
    no_crash(err)
    assert code == 0, err


# --------------------------------------------------------------------------------------------
# 4. Secrets echoed by the server are never written
# --------------------------------------------------------------------------------------------

KEY, HEADER = "SECRETKEY123", "HEADERSECRET9"
ECHO = f"{KEY}-{HEADER}"


def echoing_responder(where: str):
    def respond(body, n):
        found = question_of(body) or ("gsm8k", "")
        if found[0] == "chartqa":
            return Reply(content=f"I see {ECHO}.\nFinal Answer: {ECHO}")
        content = "Let me think. The final answer is 18"
        if where == "finish_reason":
            return Reply(content=content, finish_reason=f"stop {ECHO}")
        if where == "usage_string":
            return Reply(content=content, usage={"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18,
                                                 "note": f"key {ECHO}"})
        if where == "logprob_token":
            lp = [openai_token(KEY, -0.1, top_logprobs=[openai_token(KEY, -0.1), openai_token(HEADER, -0.2)]),
                  openai_token(HEADER, -0.2, top_logprobs=[openai_token(HEADER, -0.2), openai_token(KEY, -0.3)])]
            return Reply(content=content, logprobs={"content": lp})
        return Reply(content=content)
    return respond


SECRET_PLACES = ["models_id", "finish_reason", "logprob_token", "usage_string", "version_dict", "version_list",
                 "chartqa_final_answer"]


@pytest.mark.parametrize("where", SECRET_PLACES)
def test_4_secrets_a_server_echoes_are_never_written(tmp_path, where, chartqa_spec_module):
    routes = {}
    if where == "models_id":
        routes["/v1/models"] = (200, {"object": "list", "data": [{"id": f"m-{ECHO}", "object": "model"}]})
    if where == "version_dict":
        routes["/version"] = (200, {"version": {"build": ECHO}})
    if where == "version_list":
        routes["/version"] = (200, {"version": [KEY, HEADER]})
    task = "chartqa" if where == "chartqa_final_answer" else GSM
    outdir = tmp_path / "out"
    outdir.mkdir()
    with FakeOpenAI(responder=echoing_responder(where), api_key=KEY, extra_routes=routes) as srv, \
            FakeDatasetsServer({CHARTQA: chartqa_spec_module}) as hf:
        args = ["--tasks", task, "--base_url", srv.base_url, "--max_samples", 2, "--no_progress", "--max_retries", 1,
                "--api_key", KEY, "--header", f"X-Tok: {HEADER}", "--output", outdir / "r.json",
                "--log_samples", outdir / "logs", "--report", outdir / "r.html"]
        if where == "logprob_token":
            args += ["--logprobs", 2]
        if where != "models_id":
            args += ["--model", "fake-model"]
        code, out, err = cli(*args, env=cli_env(tmp_path, datasets_server=hf))
        # sanity: the server was asked what it echoes
        assert any(r["path"] == "/v1/models" for r in srv.requests)
        if where != "models_id":
            assert srv.chat_requests, err
        if where.startswith("version"):
            assert any(r["path"] == "/version" for r in srv.requests)
    if where != "models_id":
        assert code == 0, err
        assert (outdir / "r.json").exists() and (outdir / "r.html").exists()
    no_crash(err)
    for secret in (KEY, HEADER):
        forms = {secret, json.dumps(secret)[1:-1], secret.encode("utf-16-le").decode("latin-1")}
        for form in forms:
            assert form not in out, (secret, "stdout")
            assert form not in err, (secret, "stderr")
        for path in [p for p in outdir.rglob("*") if p.is_file()]:
            data = path.read_bytes()
            for form in forms:
                assert form.encode("latin-1") not in data, (secret, str(path))


# --------------------------------------------------------------------------------------------
# 5. top_logprobs a number, a logprob of -10**400
# --------------------------------------------------------------------------------------------


def bad_logprobs_reply(kind: str, content="Let me think. The final answer is 18") -> Reply:
    if kind == "top_is_a_number":
        return Reply(content=content, logprobs={"content": [{"token": "Let", "logprob": -0.1, "top_logprobs": 5}]})
    lp = {"content": [{"token": "Let", "logprob": -4242.25, "top_logprobs": [{"token": "Let", "logprob": -4242.25}]}]}
    return raw_reply(completion(content, logprobs=lp), **{"-4242.25": "-" + HUGE})


@pytest.mark.parametrize("kind", ["top_is_a_number", "huge_negative_logprob"])
def test_5_malformed_logprobs_are_not_a_connection_error(tmp_path, kind):
    n = 6
    logs = tmp_path / "logs"
    with FakeOpenAI(responder=lambda body, i: bad_logprobs_reply(kind)) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_retries", 1, "--num_concurrent", 1, "--logprobs", 2,
                                         "--max_fail_rate", 1, log_dir=logs), env=cli_env(tmp_path))
        sent = len(srv.chat_requests)
    no_crash(err)
    assert code in (0, 1), err
    assert "stopped answering" not in err
    assert sent == n, err  # every sample sent, once
    records = read_log(logs)
    assert len(records) == n
    statuses = {r["status"] for r in records}
    assert "connection" not in statuses, statuses
    for r in records:
        logprobs = r["response"].get("logprobs")
        if r["status"] == "bad_response" or not logprobs:
            continue
        # kept: then no value a float cannot hold (-10**400 is -inf, logged as null like an -inf)
        assert r["status"] in ("ok", "truncated"), r["status"]
        values = [e[1] for e in logprobs] + [t[1] for e in logprobs for t in e[2]]
        assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in values), logprobs
    if any(r["status"] in ("ok", "truncated") and not r["response"].get("logprobs") for r in records):
        assert warning_lines(err), err  # logprobs dropped: said


@pytest.mark.parametrize("kind", ["top_is_a_number", "huge_negative_logprob"])
def test_5_the_preflight_survives_malformed_logprobs(tmp_path, kind):
    def respond(body, i):
        text = "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"
        if body.get("logprobs"):
            return bad_logprobs_reply(kind, text)
        return Reply(content=text, finish_reason="length" if body.get("max_tokens") == 5 else "stop")

    with FakeOpenAI(responder=respond) as srv:
        code, out, err = cli("--check", "--base_url", srv.base_url, "--max_retries", 1, "--no_progress",
                             env=cli_env(tmp_path))
        assert any(r["body"].get("logprobs") for r in srv.chat_requests if isinstance(r["body"], dict))
    no_crash(err)
    grid = [line for line in err.splitlines() if line[:4] in ("PASS", "WARN", "FAIL")]
    assert any("logprobs" in line for line in grid), err
    assert any("malformed request" in line for line in grid), err  # the last check ran: the grid is whole
    assert json.loads(out)["results"]["api_conformance"]["checks"]


# --------------------------------------------------------------------------------------------
# 6. A body trickled a byte at a time: --timeout bounds the whole attempt
# --------------------------------------------------------------------------------------------


def test_6_a_trickled_body_ends_within_the_timeout(tmp_path):
    body = json.dumps(completion()).encode()

    def route(method, path, _):
        if method == "GET" and path == "/v1/models":
            return 200, {}, models_json()
        if method == "POST" and path == "/v1/chat/completions":
            return 200, {}, len(body), ((body[i:i + 1], 0.5) for i in range(len(body)))
        return 404, {}, b'{"error": "no"}'

    logs = tmp_path / "logs"
    with RawHTTP(route) as srv:
        start = time.monotonic()
        try:
            code, out, err = cli("--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 1, "--no_progress",
                                 "--timeout", 2, "--max_retries", 1, "--log_samples", logs, "--max_fail_rate", 1,
                                 env=cli_env(tmp_path), timeout=60)
        except subprocess.TimeoutExpired:  # the trickle takes ~150 s to send the whole body
            pytest.fail("still running 60 s after a start with --timeout 2 --max_retries 1")
        elapsed = time.monotonic() - start
        assert any(r["path"] == "/v1/chat/completions" for r in srv.requests)  # sanity: it was sent
    no_crash(err)
    assert elapsed < 45, elapsed
    (record,) = read_log(logs)
    assert record["status"] == "timeout" and record["latency"] < 6, record  # 2 s, and the watchdog's 0.25 s


# --------------------------------------------------------------------------------------------
# 7. --max_response_mb caps every read: the preflight, identification, the datasets client
# --------------------------------------------------------------------------------------------

MB = 2 ** 20


def test_7_the_preflight_applies_max_response_mb(tmp_path):
    big = "1 2 3 " + "x" * (3 * MB)
    with FakeOpenAI(responder=lambda body, i: Reply(content=big)) as srv:
        code, out, err = cli("--check", "--base_url", srv.base_url, "--max_response_mb", 1, "--no_progress",
                             env=cli_env(tmp_path), timeout=60)
        assert srv.chat_requests  # sanity
    no_crash(err)
    line = next((ln for ln in err.splitlines() if ln[:4] in ("PASS", "WARN", "FAIL") and "chat completion" in ln), "")
    assert line.startswith("FAIL"), err[-2000:]
    assert "too large" in line or "max_response_mb" in line or "MB" in line, line


IDENTITY_PATHS = ("/props", "/get_server_info", "/server_info", "/api/version", "/info", "/version", "/openapi.json")


def test_7_server_identification_applies_max_response_mb(tmp_path):
    size, chunk = 3 * MB, 64 * 1024
    big = b'{"version": "' + b"x" * (size - 16) + b'"}'

    def route(method, path, body):
        if method == "GET" and path == "/v1/models":
            return 200, {}, models_json()
        if method == "POST" and path == "/v1/chat/completions":
            return 200, {}, chat_body_for(body)
        if method == "GET" and path in IDENTITY_PATHS:
            return 200, {}, len(big), ((big[i:i + chunk], 0.02) for i in range(0, len(big), chunk))
        return 404, {}, b'{"error": "no"}'

    with RawHTTP(route) as srv:
        try:
            code, out, err = cli(*gsm8k_args(srv, 1, "--max_retries", 1, "--max_response_mb", 1),
                                 env=cli_env(tmp_path), timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("identification against 3 MB endpoints hung")
        deadline = time.monotonic() + 10  # each answer's thread records what it sent once the client hangs up
        while time.monotonic() < deadline:
            with srv.lock:
                asked = sum(1 for r in srv.requests if r["path"] in IDENTITY_PATHS)
                answered = sum(len(v) for path, v in srv.sent.items() if path in IDENTITY_PATHS)
            if asked and answered >= asked:
                break
            time.sleep(0.05)
        sent = {path: max(v) for path, v in srv.sent.items() if path in IDENTITY_PATHS}
    no_crash(err)
    assert code == 0, err
    assert sent, "sanity: the identification endpoints were asked"
    over = {path: n for path, n in sent.items() if n > 2 * MB}
    assert not over, f"read past --max_response_mb 1: {over}"


def test_7_the_datasets_client_is_capped(tmp_path, chartqa_spec_module):
    """The datasets client has its own cap (DATASETS_MAX_MB, 64 MB: a page of rows or an image is
    far smaller); the run is made with it at 1 MB, so that a 3 MB page is over it. A body over the
    cap is a one-line error naming the size, soon: it is not retried as a busy server would be."""
    rows = list(chartqa_spec_module.rows)
    rows[0] = {**rows[0], "query": "What is it? " + "x" * (3 * MB)}
    spec = type(chartqa_spec_module)(chartqa_spec_module.features, rows)
    capped = ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import nano_eval; nano_eval._DATASETS_MAX_MB = 1; "
                    "sys.exit(nano_eval.main())"]
    with chart_server() as srv, FakeDatasetsServer({CHARTQA: spec}) as hf:
        start = time.monotonic()
        code, out, err = cli(*chartqa_args(srv, 2), env=cli_env(tmp_path, datasets_server=hf), timeout=90,
                             command=[sys.executable, *capped])
        elapsed = time.monotonic() - start
        assert hf.rows_requests  # sanity
    line = one_line_error(code, err, 5)
    assert "too large" in line, line
    assert elapsed < 15, f"{elapsed:.0f} s: a body over the cap was retried ({len(hf.rows_requests)} /rows requests)"


# --------------------------------------------------------------------------------------------
# 8. Bad rows: exit 5, and nothing unchecked is cached
# --------------------------------------------------------------------------------------------


def spoil_row(page: dict, how: str) -> dict:
    row = page["rows"][0]
    if how == "no_row":
        del row["row"]
    elif how == "row_not_a_dict":
        row["row"] = "not a row"
    elif how == "no_query":
        del row["row"]["query"]
    elif how == "no_label":
        del row["row"]["label"]
    elif how == "image_is_a_string":
        row["row"]["image"] = row["row"]["image"]["src"]
    return page


@pytest.mark.parametrize("how", ["no_row", "row_not_a_dict", "no_query", "no_label", "image_is_a_string"])
def test_8_a_bad_chartqa_row_is_a_dataset_error_and_not_cached(tmp_path, how, chartqa_spec_module):
    with chart_server() as srv, FakeDatasetsServer({CHARTQA: chartqa_spec_module}) as hf:
        bad = spoil_row(good_page(hf), how)
        hf.faults.append(page_fault(bad))
        env = cli_env(tmp_path, datasets_server=hf)
        code, out, err = cli(*chartqa_args(srv, 2), env=env)
        assert any(r["status"] == 200 and r["path"] == "/rows" for r in hf.rows_requests)  # sanity: the bad page went out
        one_line_error(code, err, 5)
        hf.faults.clear()
        code, out, err = cli(*chartqa_args(srv, 2), env=env)
    no_crash(err)
    assert code == 0, err
    assert json.loads(out)["results"]["chartqa"]["num_ok"] == 2


@pytest.fixture
def lone_copy(tmp_path) -> Path:
    """nano_eval.py copied alone (no data/ beside it): gsm8k is fetched from the datasets-server."""
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(NANO_EVAL, folder / "nano_eval.py")
    return folder / "nano_eval.py"


@pytest.mark.parametrize("field", ["question", "answer"])
def test_8_a_gsm8k_row_without_its_field_is_a_dataset_error_and_not_cached(tmp_path, lone_copy, field, gsm8k_spec):
    from fakes import GSM8K
    with FakeOpenAI(responder=ByRow()) as srv, FakeDatasetsServer({GSM8K: gsm8k_spec}) as hf:
        bad = good_page(hf, GSM8K)
        del bad["rows"][0]["row"][field]
        hf.faults.append(page_fault(bad))
        env = cli_env(tmp_path, datasets_server=hf)
        args = gsm8k_args(srv, 2, "--max_retries", 1)
        code, out, err = cli(*args, env=env, script=lone_copy)
        assert hf.rows_requests  # sanity: fetched, not read from a shipped split
        one_line_error(code, err, 5)
        hf.faults.clear()
        code, out, err = cli(*args, env=env, script=lone_copy)
    no_crash(err)
    assert code == 0, err
    assert json.loads(out)["results"][GSM]["num_ok"] == 2


# --------------------------------------------------------------------------------------------
# 9. num_rows_total 0, -5, true
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [0, -5, True])
def test_9_an_impossible_num_rows_total_is_a_dataset_error(tmp_path, total, chartqa_spec_module):
    with chart_server() as srv, FakeDatasetsServer({CHARTQA: chartqa_spec_module}) as hf:
        page = good_page(hf)
        page["num_rows_total"] = total
        if total is not True:
            page["rows"] = []
        hf.faults.append(page_fault(page))
        code, out, err = cli(*chartqa_args(srv, 2), env=cli_env(tmp_path, datasets_server=hf))
        assert hf.rows_requests  # sanity
    one_line_error(code, err, 5, "num_rows_total")


# --------------------------------------------------------------------------------------------
# 10. Sample logs with malformed fields
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_log(tmp_path_factory) -> Path:
    """A real sample log with logprobs: 10 gsm8k rows."""
    folder = tmp_path_factory.mktemp("goodlog")
    with FakeOpenAI(responder=LogprobModel(seed=1)) as srv:
        code, out, err = cli(*gsm8k_args(srv, 10, "--logprobs", 2, log_dir=folder / "logs"), env=cli_env(folder))
    assert code == 0, err
    return folder / "logs" / LOG_NAME


def spoiled_log(good_log: Path, folder: Path, change=None, raw_line: str | None = None) -> Path:
    """A copy of the good log (in folder/), its line 2 changed by change(record) or replaced by raw_line."""
    lines = good_log.read_text("utf-8").splitlines()
    if raw_line is not None:
        lines[1] = raw_line
    else:
        record = json.loads(lines[1])
        lines[1] = json.dumps(change(record))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_NAME
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def with_response(**fields):
    def change(record):
        record["response"].update(fields)
        return record
    return change


MALFORMED = {
    "logprobs_text": with_response(logprobs="abc"),
    "logprobs_number": with_response(logprobs=5),
    "logprobs_object": with_response(logprobs={}),
    "logprobs_short_entry": with_response(logprobs=[["a"]]),
    "content_number": with_response(content=12345),
    "latency_text": lambda r: {**r, "latency": "fast"},
}


@pytest.mark.parametrize("command", ["compare", "report"])
@pytest.mark.parametrize("what", [*MALFORMED, "usage_huge", "nested_line"])
def test_10_a_malformed_log_line_is_named(tmp_path, good_log, what, command):
    if what == "usage_huge":
        record = json.loads(good_log.read_text("utf-8").splitlines()[1])
        record["response"]["usage"] = {"prompt_tokens": 900, "completion_tokens": -7777, "total_tokens": 1}
        log = spoiled_log(good_log, tmp_path / "b", raw_line=json.dumps(record).replace("-7777", HUGE))
    elif what == "nested_line":
        log = spoiled_log(good_log, tmp_path / "b", raw_line="[" * 100_000 + "]" * 100_000)
    else:
        log = spoiled_log(good_log, tmp_path / "b", MALFORMED[what])
    args = ["compare", good_log, log] if command == "compare" else ["report", log, "-o", tmp_path / "r.html"]
    code, out, err = cli(*args, env=cli_env(tmp_path))
    one_line_error(code, err, 2, SAMPLE_RECORD, f"{log}:2")


def test_10_resume_of_a_log_holding_a_nested_line(tmp_path, good_log):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / LOG_NAME).write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*gsm8k_args(srv, 2, "--max_retries", 1, log_dir=logs), env=cli_env(tmp_path))
    no_crash(err)
    assert code == 0 or (code == 2 and len(error_lines(err)) == 1), (code, err)


def test_10_nan_logprobs_never_make_equivalent(tmp_path, good_log):
    same = spoiled_log(good_log, tmp_path / "same", lambda r: r)
    code, out, err = cli("compare", good_log, same, "--json", env=cli_env(tmp_path))
    assert code == 0, err
    # sanity: the unspoiled copy is equivalent, so the NaN is what changes the verdict
    assert json.loads(out)["comparison"][GSM]["numerics"]["verdict"] == "equivalent"

    def nan(record):
        record["response"]["logprobs"][0][1] = float("nan")
        return record

    log = spoiled_log(good_log, tmp_path / "b", nan)
    assert "NaN" in log.read_text("utf-8")
    code, out, err = cli("compare", good_log, log, "--json", env=cli_env(tmp_path))
    no_crash(err)
    if code == 2:
        one_line_error(code, err, 2, SAMPLE_RECORD, f"{log}:2")
    else:
        assert code == 0, err
        assert json.loads(out)["comparison"][GSM]["numerics"]["verdict"] == "different"


# --------------------------------------------------------------------------------------------
# 11. The report of a crafted results JSON holds no live markup, and a CSP
# --------------------------------------------------------------------------------------------

MARKUP = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def two_server_document(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two")
    with FakeOpenAI(responder=ByRow()) as a, FakeOpenAI(responder=ByRow(wrong={1})) as b:
        code, out, err = cli("--tasks", GSM, "--base_url", a.base_url, "--base_url", b.base_url, "--max_samples", 3,
                             "--no_progress", "--max_retries", 1, "--output", folder / "r.json", env=cli_env(folder))
    assert code == 0, err
    return folder / "r.json"


def csp_meta(page: str) -> bool:
    import re
    return re.search(r"""<meta\s[^>]*http-equiv\s*=\s*["']?content-security-policy""", page, re.I) is not None


def test_11_the_report_has_a_content_security_policy(tmp_path, two_server_document):
    code, out, err = cli("report", two_server_document, "-o", tmp_path / "r.html", env=cli_env(tmp_path))
    assert code == 0, err
    page = (tmp_path / "r.html").read_text("utf-8")
    assert csp_meta(page), page[:600]
    assert "<script" not in page.lower()


@pytest.mark.parametrize("where", ["metric_value", "comparison_n", "comparison_unmatched"])
def test_11_markup_in_a_results_json_is_not_live(tmp_path, two_server_document, where):
    doc = json.loads(two_server_document.read_text("utf-8"))
    assert doc["comparisons"][0]["comparison"][GSM]["n"] == 3  # sanity: the shape this test spoils
    if where == "metric_value":
        doc["runs"][0]["results"][GSM]["metrics"]["exact_match"] = MARKUP
    elif where == "comparison_n":
        doc["comparisons"][0]["comparison"][GSM]["n"] = MARKUP
    else:
        doc["comparisons"][0]["comparison"][GSM]["unmatched"] = MARKUP
    crafted = tmp_path / "crafted.json"
    crafted.write_text(json.dumps(doc), encoding="utf-8")
    code, out, err = cli("report", crafted, "-o", tmp_path / "r.html", env=cli_env(tmp_path))
    no_crash(err)
    if code == 2:  # refused as not a results JSON nano-eval wrote: also fine
        one_line_error(code, err, 2, "results JSON")
        return
    assert code == 0, err
    page = (tmp_path / "r.html").read_text("utf-8")
    assert "<script" not in page.lower()
    assert csp_meta(page)


# --------------------------------------------------------------------------------------------
# 12. Control characters never reach the terminal raw
# --------------------------------------------------------------------------------------------


def test_12_control_characters_in_flipped_answers_are_escaped(tmp_path, good_log):
    hostile = "\x1b[2J\x07\u202e42"

    def flip(record):
        record["scores"] = {k: 0.0 for k in record["scores"]}
        record["extracted"] = {k: hostile for k in record["extracted"]}
        record["target"] = hostile
        return record

    log = spoiled_log(good_log, tmp_path / "b", flip)
    code, out, err = cli("compare", good_log, log, env=cli_env(tmp_path))
    no_crash(err)
    assert code == 0, err
    assert "flipped samples" in out  # sanity: the hostile answers are in the listed flips
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in out, repr(raw)
        assert raw not in err, repr(raw)
    assert any(form in out for form in ("\\x1b", "\\u001b", "\\033", "\\e", "^[")), out[-800:]


# --------------------------------------------------------------------------------------------
# 13. replay --curl quotes every argument
# --------------------------------------------------------------------------------------------


def single_quoted(line: str) -> list:
    """For each character of a shell command line: whether it stands inside '...' ."""
    state, inside = None, []
    i = 0
    while i < len(line):
        c = line[i]
        if state == "'":
            if c == "'":
                state = None
                inside.append(False)
            else:
                inside.append(True)
        elif state == '"':
            if c == "\\" and i + 1 < len(line):
                inside += [False, False]
                i += 2
                continue
            if c == '"':
                state = None
            inside.append(False)
        else:
            if c == "\\" and i + 1 < len(line):
                inside += [False, True]  # an escaped character is as literal as a quoted one
                i += 2
                continue
            if c in "'\"":
                state = c
            inside.append(False)
        i += 1
    return inside


CURL_QUERIES = {
    "ampersand": "?api-version=1&x=2",  # Azure's: a legitimate & that must not end the command
    "command": "?q=$(touch${IFS}PWNED)",  # a crafted log's command substitution (no space: a valid URL)
    "command_with_space": "?q=$(touch PWNED)",  # the issue's: refused as a URL, or quoted like the others
}


@pytest.mark.parametrize("what", list(CURL_QUERIES))
def test_13_replay_curl_quotes_the_url(tmp_path, good_log, what):
    pwned = tmp_path / "pwned"
    url = "http://127.0.0.1:9/v1/chat/completions" + CURL_QUERIES[what].replace("PWNED", str(pwned))
    log = spoiled_log(good_log, tmp_path / "b", lambda r: {**r, "url": url})
    code, out, err = cli("replay", f"{log}:2", "--curl", env=cli_env(tmp_path, TMPDIR=str(tmp_path)))
    no_crash(err)
    if what == "command_with_space" and code == 2:
        one_line_error(code, err, 2)
        return
    assert code == 0, err
    line = out.strip()
    assert line.startswith("curl ") and "\n" not in line, out
    import shlex
    assert url in shlex.split(line), shlex.split(line)
    syntax = subprocess.run(["bash", "-n", "-c", line], capture_output=True, timeout=10)
    assert syntax.returncode == 0, syntax.stderr
    inside = single_quoted(line)
    at = line.find(url)
    assert at >= 0, line
    special = [i for i, c in enumerate(url) if c in "&$(){} "]
    assert special and all(inside[at + i] for i in special), line
    assert not pwned.exists()


# --------------------------------------------------------------------------------------------
# 14. replay sends a key only to a host the user named, and says where it sends
# --------------------------------------------------------------------------------------------


def test_14_replay_names_the_host_and_keeps_the_key(tmp_path):
    key = "sk-REPLAY-ENV-KEY-0001"
    logs = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*gsm8k_args(srv, 1, log_dir=logs), env=cli_env(tmp_path))
        assert code == 0, err
        env = cli_env(tmp_path, OPENAI_API_KEY=key)
        code, out, err = cli("replay", f"{logs / LOG_NAME}:1", env=env)
        replayed = srv.chat_requests[-1]
        assert len(srv.chat_requests) == 2  # sanity: it was sent to the logged host
        no_crash(err)
        assert f"127.0.0.1:{srv.port}" in err, err
        assert "Authorization" not in replayed["headers"], "the key went to a host the user did not name"
        code, out, err = cli("replay", f"{logs / LOG_NAME}:1", "--base_url", srv.base_url, env=env)
        assert code == 0, err
        assert srv.chat_requests[-1]["headers"].get("Authorization") == f"Bearer {key}"
    assert key not in out + err


# --------------------------------------------------------------------------------------------
# 15. Small words
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["compare", "report"])
def test_15a_a_string_row_idx_in_a_log(tmp_path, good_log, command):
    log = spoiled_log(good_log, tmp_path / "b", lambda r: {**r, "row_idx": str(r["row_idx"])})
    args = ["compare", good_log, log] if command == "compare" else ["report", log, "-o", tmp_path / "r.html"]
    code, out, err = cli(*args, env=cli_env(tmp_path))
    one_line_error(code, err, 2, SAMPLE_RECORD, "'row_idx'", f"{log}:2")


def test_15a_a_string_row_idx_from_the_datasets_server(tmp_path, chartqa_spec_module):
    with chart_server() as srv, FakeDatasetsServer({CHARTQA: chartqa_spec_module}) as hf:
        page = good_page(hf)
        page["rows"][2]["row_idx"] = "2"
        hf.faults.append(page_fault(page))
        code, out, err = cli(*chartqa_args(srv, 2), env=cli_env(tmp_path, datasets_server=hf))
    line = one_line_error(code, err, 5, "row_idx")
    assert "row_idx 2 where 2 belongs" not in line, line


def test_15b_a_positive_logprob_is_warned_about_during_the_run(tmp_path):
    def respond(body, n):
        row = gsm8k_row_of(body)
        lp = [openai_token("Let", 0.5, top_logprobs=[openai_token("Let", 0.5), openai_token("So", -1.0)])]
        return Reply(content=right(row), logprobs={"content": lp})

    with FakeOpenAI(responder=respond) as srv:
        code, out, err = cli(*gsm8k_args(srv, 2, "--logprobs", 2, "--max_retries", 1), env=cli_env(tmp_path))
    no_crash(err)
    assert code == 0, err
    about = [w for w in warning_lines(err) if "logprob" in w and any(s in w for s in ("above 0", "positive", "> 0"))]
    assert about, err


def test_15c_a_symlink_at_the_log_path_is_refused(tmp_path):
    target = tmp_path / "elsewhere" / "precious.txt"
    target.parent.mkdir()
    target.write_text("precious\n", encoding="utf-8")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / LOG_NAME).symlink_to(target)
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*gsm8k_args(srv, 1, "--max_retries", 1, log_dir=logs), env=cli_env(tmp_path))
    assert target.read_text("utf-8") == "precious\n"
    one_line_error(code, err, 2)


def test_15d_two_runs_on_one_log_are_not_silent(tmp_path):
    logs = tmp_path / "logs"
    env = cli_env(tmp_path)
    with FakeOpenAI(responder=ByRow(delay=1.5)) as srv:
        args = gsm8k_args(srv, 3, "--max_retries", 1, "--num_concurrent", 1, log_dir=logs)
        first = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                 cwd=str(ROOT))
        try:
            assert wait_for(lambda: srv.chat_requests, timeout=20), "the first run did not start sending"
            code, out, err = cli(*args, env=env, timeout=60)  # while the first one waits for its answers
        finally:
            first.terminate()  # ours: its answer is not needed
            first.communicate(timeout=60)
    no_crash(err)
    said = [line for line in error_lines(err) + warning_lines(err)
            if any(s in line.lower() for s in ("lock", "another", "at the same time", "concurren", str(logs).lower()))]
    assert said, err
    if error_lines(err):
        assert code == 2, (code, err)


# --------------------------------------------------------------------------------------------
# Property tests: random JSON shapes at each boundary
# --------------------------------------------------------------------------------------------
#
# Each boundary gets random JSON (huge integers, NaN, infinities, lone surrogates, wrong types at
# any depth), mostly as a valid document with a few of its values replaced or deleted, so the
# random values reach the code behind the first checks. @example pins the shapes issue 32 found.

ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x1b[2J", "\u202e", "<script>", "", " ", "NaN", "length",
                            "stop", "ok"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([10 ** 400, -10 ** 400, 2 ** 64]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), ODD_TEXT)
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), ODD_TEXT), children, max_size=4)),
    max_leaves=12)

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,  # the same examples on every CI run
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])
DELETE = "__delete__"


def mutated(base, paths):
    """A strategy: deep copies of `base` with up to 3 values at `paths` replaced by random JSON
    (or deleted), or (1 in 8) random JSON instead of the whole document."""
    def apply(changes):
        doc = json.loads(json.dumps(base))
        for path, value in changes:
            node = doc
            for key in path[:-1]:
                if isinstance(node, dict) and key in node or isinstance(node, list) and isinstance(key, int) \
                        and -len(node) <= key < len(node):
                    node = node[key]
                else:
                    node = None
                    break
            last = path[-1]
            if isinstance(node, dict) or isinstance(node, list) and isinstance(last, int) and -len(node) <= last < len(node):
                if value == DELETE:
                    if isinstance(node, dict):
                        node.pop(last, None)
                    else:
                        del node[last]
                else:
                    node[last] = value
        return doc

    changes = st.lists(st.tuples(st.sampled_from(paths), st.one_of(json_values, st.just(DELETE))), min_size=1,
                       max_size=3)
    return st.one_of(changes.map(apply), changes.map(apply), changes.map(apply), changes.map(apply),
                     changes.map(apply), changes.map(apply), changes.map(apply), json_values)


def writable(value) -> None:
    """What the sample log would hold of it: JSON text that UTF-8 can hold."""
    json.dumps(value, ensure_ascii=False).encode("utf-8")


# -- (a) the response classifier --------------------------------------------------------------

GOOD_CHAT = completion(logprobs={"content": [
    openai_token("Let", -0.1, top_logprobs=[openai_token("Let", -0.1), openai_token("So", -2.0)]),
    {"token": "<|eot_id|>", "id": 7, "bytes": [], "logprob": -0.01, "top_logprobs": []}]})
CHAT_PATHS = [("choices",), ("choices", 0), ("choices", 0, "message"), ("choices", 0, "message", "content"),
              ("choices", 0, "message", "reasoning_content"), ("choices", 0, "message", "reasoning"),
              ("choices", 0, "finish_reason"), ("choices", 0, "logprobs"), ("choices", 0, "logprobs", "content"),
              ("choices", 0, "logprobs", "content", 0), ("choices", 0, "logprobs", "content", 0, "token"),
              ("choices", 0, "logprobs", "content", 0, "logprob"), ("choices", 0, "logprobs", "content", 0, "bytes"),
              ("choices", 0, "logprobs", "content", 1, "id"),
              ("choices", 0, "logprobs", "content", 0, "top_logprobs"),
              ("choices", 0, "logprobs", "content", 0, "top_logprobs", 0),
              ("choices", 0, "logprobs", "content", 0, "top_logprobs", 1, "logprob"),
              ("choices", 0, "logprobs", "content", 0, "top_logprobs", 1, "token"),
              ("usage",), ("usage", "prompt_tokens"), ("usage", "completion_tokens"), ("error",), ("model",)]


def with_value(document, path, value):
    """A deep copy of a JSON document with the value at `path` (keys and indexes) replaced."""
    doc = json.loads(json.dumps(document))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def chat_with(path, value):
    return with_value(GOOD_CHAT, path, value)


@settings(PROPERTY, max_examples=200)
@given(mutated(GOOD_CHAT, CHAT_PATHS), st.sampled_from([200, 200, 200, 200, 400, 500]))
@example(chat_with(("choices", 0, "finish_reason"), "stop\ud800"), 200)
@example(chat_with(("choices", 0, "message", "content"), "18 \ud800"), 200)
@example(chat_with(("choices", 0, "logprobs", "content", 0, "token"), "\ud800"), 200)
@example(chat_with(("choices", 0, "logprobs", "content", 0, "top_logprobs"), 5), 200)
@example(chat_with(("choices", 0, "logprobs", "content", 0, "logprob"), -10 ** 400), 200)
@example(chat_with(("usage", "completion_tokens"), 10 ** 400), 200)
def test_property_classify_response_never_raises(shape, status):
    body = json.dumps(shape).encode()
    try:
        outcome = ne._classify_response(ne._HTTPResponse(status, {"content-type": "application/json"}, body))
    except ne.NanoEvalError:
        return
    assert outcome.status in STATUSES | {f"http_{status}"}, outcome.status
    if status != 200:
        return
    assert outcome.status in ("ok", "truncated", "empty", "bad_response"), outcome.status
    assert outcome.content is None or isinstance(outcome.content, str)
    for text in (outcome.content, outcome.reasoning, outcome.finish_reason, outcome.error):
        writable(text)
    if outcome.usage is not None:
        assert isinstance(outcome.usage, dict)
        writable(outcome.usage)
        for v in outcome.usage.values():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                float(v)  # nothing downstream meets an OverflowError
    if outcome.logprobs is not None:
        assert isinstance(outcome.logprobs, list)
        writable(outcome.logprobs)
        for entry in outcome.logprobs:
            values = [entry[1]] + [t[1] for t in entry[2]]
            assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in values), entry


# -- (b) the datasets row reader ---------------------------------------------------------------


class StubHTTP:
    """The datasets client's HTTP: /rows answers the page (JSON text), anything else a 1-pixel PNG."""

    def __init__(self, page_bytes: bytes):
        self.page_bytes = page_bytes

    def request(self, method, url, body=None, headers=None):
        if "/rows?" in url:
            return ne._HTTPResponse(200, {"content-type": "application/json", "x-revision": "a" * 40}, self.page_bytes)
        return ne._HTTPResponse(200, {"content-type": "image/png"}, ne._ONE_PIXEL_PNG)


def valid_page(task: str, n: int = 3) -> dict:
    if task == GSM:
        rows = [{"question": f"Tom has {i} apples. How many?", "answer": f"He has {i}. #### {i}"} for i in range(n)]
    else:
        rows = [{"image": {"src": f"http://127.0.0.1:9/cached-assets/x/{i}/image/image.png", "height": 1, "width": 1},
                 "query": f"What is bar {i}?", "label": [str(i)], "human_or_machine": i % 2} for i in range(n)]
    return {"features": [], "rows": [{"row_idx": i, "row": r, "truncated_cells": []} for i, r in enumerate(rows)],
            "num_rows_total": n, "num_rows_per_page": 100, "partial": False}


def page_paths(task: str) -> list:
    fields = ["question", "answer"] if task == GSM else ["image", "query", "label", "human_or_machine"]
    paths = [("num_rows_total",), ("rows",), ("features",)]
    for i in range(3):
        paths += [("rows", i), ("rows", i, "row_idx"), ("rows", i, "row")]
        paths += [("rows", i, "row", f) for f in fields]
    if task != GSM:
        paths += [("rows", 0, "row", "image", "src"), ("rows", 0, "row", "label", 0)]
    return paths


def page_with(task, path, value):
    doc = valid_page(task)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value == DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


ROW_EXAMPLES = {
    GSM: [(("rows", 0, "row", "question"), DELETE), (("rows", 1, "row", "answer"), 5), (("rows", 0, "row"), "x"),
          (("rows", 0), 7), (("num_rows_total",), 10 ** 400), (("num_rows_total",), 0), (("rows", 1, "row_idx"), "1")],
    "chartqa": [(("rows", 0, "row", "image"), "http://127.0.0.1:9/i.png"), (("rows", 0, "row", "label"), "7"),
                (("rows", 0, "row", "query"), DELETE), (("num_rows_total",), True), (("rows", 0, "row"), [1]),
                (("rows", 2, "row", "human_or_machine"), [])],
}


@pytest.fixture(scope="module")
def any_chat_server():
    with FakeOpenAI(responder=lambda body, n: "The final answer is 0") as srv:
        yield srv


@pytest.mark.parametrize("task", [GSM, "chartqa"])
def test_property_the_row_reader_never_raises(any_chat_server, task, monkeypatch, tmp_path):
    monkeypatch.setattr(ne, "_BUNDLED_DATA", tmp_path / "no-shipped-data")  # gsm8k too comes from the stub

    def run(page):
        data = json.dumps(page).encode()
        client = ne._DatasetsClient(base_url="http://127.0.0.1:9", token=None, retries=1, retry_base_delay=0.01)
        client.http = StubHTTP(data)
        config = ne.APIConfig(url=any_chat_server.base_url, model="fake-model", max_retries=1, retry_base_delay=0.01,
                              num_concurrent=2)
        with tempfile.TemporaryDirectory() as folder:
            try:
                result = asyncio.run(ne.run_task(ne.TASKS[task], config, max_samples=3, data_dir=folder,
                                                 datasets_server=client, progress=False))
            except ne.NanoEvalError:
                return
        assert set(result["failures"]) <= STATUSES, result["failures"]
        assert result["num_samples"] >= 1, result  # an empty split is no result
        return result

    def check(page):
        run(page)

    assert run(valid_page(task))["num_ok"] == 3  # sanity: a good page runs, from the stub
    test = given(mutated(valid_page(task), page_paths(task)))(check)
    for path, value in ROW_EXAMPLES[task]:
        test = example(page_with(task, path, value))(test)
    PROPERTY(test)()


# -- (c) the sample-log reader -----------------------------------------------------------------

RECORD_PATHS = [("response",), ("response", "logprobs"), ("response", "logprobs", 0), ("response", "logprobs", 0, 0),
                ("response", "logprobs", 0, 1), ("response", "logprobs", 0, 2), ("response", "logprobs", 0, 2, 0),
                ("response", "logprobs", 0, 2, 0, 1), ("response", "content"), ("response", "reasoning_content"),
                ("response", "usage"), ("response", "usage", "completion_tokens"),
                ("response", "usage", "prompt_tokens"), ("response", "finish_reason"), ("response", "http_status"),
                ("latency",), ("attempts",), ("row_idx",), ("repeat",), ("scores",), ("scores", "exact_match"),
                ("extracted",), ("extracted", "strict-match"), ("target",), ("request",), ("request", "messages"),
                ("request", "messages", -1), ("request", "messages", -1, "content"), ("request", "model"),
                ("image",), ("status",), ("doc_hash",), ("body_hash",), ("task",), ("group",), ("error",), ("url",),
                ("reasoning_flags",), ("reused",)]
LOG_EXAMPLES = [(("response", "logprobs"), "abc"), (("response", "logprobs"), 5), (("response", "logprobs"), {}),
                (("response", "logprobs"), [["a"]]), (("response", "content"), 12345), (("latency",), "fast"),
                (("response", "usage"), {"completion_tokens": 10 ** 400}), (("row_idx",), "2"),
                (("response", "logprobs", 0, 1), float("nan")), (("request", "messages"), 3), (("image",), {"": None})]


def test_property_the_log_reader_never_raises(tmp_path, good_log):
    good_lines = good_log.read_text("utf-8").splitlines()[:2]
    base = json.loads(good_lines[1])

    def check(record):
        problem = ne._record_problem(record)
        if problem is None:
            logged = ne._Logged.of(record)
            logged.score("exact_match")
            logged.completion_tokens, logged.prompt_tokens  # noqa: B018
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            a, b = Path(folder) / "a" / LOG_NAME, Path(folder) / "b" / LOG_NAME
            a.parent.mkdir()
            b.parent.mkdir()
            a.write_text("\n".join(good_lines) + "\n", encoding="utf-8")
            b.write_text(good_lines[0] + "\n" + json.dumps(record) + "\n", encoding="utf-8", errors="surrogatepass")
            for argv in (["compare", str(a), str(b)], ["compare", str(b), str(b), "--json"],
                         ["report", str(b), "-o", str(Path(folder) / "r.html")],
                         ["report", str(a), str(b), "-o", str(Path(folder) / "r2.html")]):
                command = ne._cmd_compare if argv[0] == "compare" else ne._cmd_report
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    try:
                        command(argv[1:])
                    except ne.NanoEvalError:
                        pass
            try:  # resume reads the log too
                log = ne._SampleLog(b)
                try:
                    for r in log.completed(GSM, base["url"]).values():
                        ne._outcome_from_record(r)
                finally:
                    log.close()
            except ne.NanoEvalError:
                pass

    check(base)  # sanity: the good record reads
    test = given(mutated(base, RECORD_PATHS))(check)
    for path, value in LOG_EXAMPLES:
        test = example(with_value(base, path, value))(test)
    PROPERTY(test)()
