"""HTTP: how requests reach the server and what each answer counts as.

HTTPClient sends each request in one send() on keep-alive connections, with no more in flight than
num_concurrent; classify_response() gives each answer its Outcome (ok, truncated, empty, bad
responses, dropped connections, timeouts); retryable failures are retried up to max_retries with
growing backoff and Retry-After honoured (long waits announced, Ctrl-C stops them); client errors
are not retried; the AdaptiveLimiter halves on throttling and grows back; responses over the size
cap are refused; TLS options and HTTP(S)_PROXY/NO_PROXY reach every deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator
from pathlib import Path

import pytest


import nano_eval  # noqa: E402
from fakes import (ByRow, FakeOpenAI, ForwardProxy, GSM_ARGS, METRICS, NANO_EVAL, PROXY_VARS,  # noqa: E402
                   Reply, TLS_CERT, assert_auth_failure, cli, error_lines, fault_plan, gsm8k_row_of,
                   interrupt_while_waiting, read_log, run_inproc, send_chunked, serve_https)
from nano_eval import (_AdaptiveLimiter, APIConfig, AuthError, _ChatClient, _Connection, _HTTPClient, TASKS,  # noqa: E402
                       UsageError, run_task)


# --------------------------------------------------------------------------------------------
# HTTPClient: one send per request, keep-alive, requests in flight bounded by num_concurrent
# --------------------------------------------------------------------------------------------


class Recorder:
    """What a connection's send() is given, instead of a socket."""

    def __init__(self, connection_class):
        self.conn = connection_class("127.0.0.1", 9)
        self.sent: list = []
        self.conn.send = self.sent.append

    def request(self, body) -> bytes:
        self.conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        self.conn.putheader("Content-Type", "application/json")
        self.conn.putheader("Content-Length", str(len(body)))
        self.conn.endheaders(body)
        return b"".join(self.sent)


@pytest.mark.parametrize("body", [b'{"messages": []}', b""])
def test_one_send_sends_what_http_client_sends(body):
    ours, theirs = Recorder(_Connection), Recorder(http.client.HTTPConnection)
    assert ours.request(body) == theirs.request(body)
    assert len(ours.sent) == 1


@pytest.mark.usefixtures("no_datasets_server")
def test_http_client_reuses_one_connection(tmp_path):
    with FakeOpenAI() as server:
        client = _HTTPClient(timeout=5)
        for _ in range(10):
            resp = client.request("GET", server.base_url + "/models")
            assert resp.status == 200 and json.loads(resp.body)["data"][0]["id"] == "fake-model"
        assert server.connections == 1


GSM_TASK = TASKS["gsm8k_cot_llama"]


def run_gsm8k(config: APIConfig, n: int, tmp_path: Path, **kwargs) -> dict:
    return asyncio.run(run_task(GSM_TASK, config, max_samples=n, data_dir=str(tmp_path / "data"), progress=False,
                                **kwargs))


@pytest.mark.usefixtures("no_datasets_server")
@pytest.mark.parametrize("n", [1, 4])
def test_keep_alive_connections(n, tmp_path):
    with FakeOpenAI(delay=0.01) as server:
        result = run_gsm8k(APIConfig(url=server.base_url, model="m", num_concurrent=n), 40, tmp_path)
        assert len(server.chat_requests) == 40
        assert server.connections <= n  # one persistent connection per worker, not one per request
    assert result["num_ok"] == 40


class CountingResponder:
    """Our own count of chat requests being answered at once (besides FakeOpenAI.max_in_flight)."""

    def __init__(self, delay: float):
        self.delay = delay
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, body, n):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.delay)
        with self.lock:
            self.now -= 1
        return "The final answer is 1"


@pytest.mark.usefixtures("no_datasets_server")
@pytest.mark.parametrize("n", [1, 3, 8])
def test_in_flight_reaches_but_never_exceeds_num_concurrent(n, tmp_path):
    counter = CountingResponder(delay=0.08)
    with FakeOpenAI(responder=counter) as server:
        result = run_gsm8k(APIConfig(url=server.base_url, model="m", num_concurrent=n), 3 * n, tmp_path)
        assert len(server.chat_requests) == 3 * n
        assert server.max_in_flight == n
    assert counter.peak == n
    assert result["num_ok"] == 3 * n


@pytest.mark.usefixtures("no_datasets_server")
def test_less_work_than_workers(tmp_path):
    counter = CountingResponder(delay=0.05)
    with FakeOpenAI(responder=counter) as server:
        run_gsm8k(APIConfig(url=server.base_url, model="m", num_concurrent=8), 3, tmp_path)
        assert server.max_in_flight <= 3
    assert counter.peak <= 3


@pytest.mark.usefixtures("no_datasets_server")
def test_cli_num_concurrent_bounds_in_flight(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANO_EVAL_DATA_DIR", str(tmp_path / "data"))
    with FakeOpenAI(delay=0.05) as server:
        code = nano_eval.main(["--tasks", "gsm8k_cot_llama", "--base_url", server.base_url, "--max_samples", "10",
                               "--num_concurrent", "2"])
        assert code == 0
        assert server.max_in_flight == 2
    assert json.loads(capsys.readouterr().out)["config"]["num_concurrent"] == 2


# --------------------------------------------------------------------------------------------
# classify_response: what each answer is (Outcome)
# --------------------------------------------------------------------------------------------




def test_ok_is_scored(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        result, (rec,) = run_inproc(srv, tmp_path)
    assert rec["status"] == "ok" and rec["attempts"] == 1 and rec["error"] is None
    assert rec["extracted"] == {"strict-match": "18", "flexible-extract": "18"}
    assert rec["scores"] == {m: 1.0 for m in METRICS}
    assert result["num_ok"] == 1 and result["num_failed"] == 0 and result["failures"] == {}
    assert result["metrics"]["exact_match"] == 1.0


def test_truncated_is_still_scored(isolated_env, tmp_path):
    reply = Reply(content="Step one... The final answer is 18", finish_reason="length")
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        result, (rec,) = run_inproc(srv, tmp_path)
    assert rec["status"] == "truncated"
    assert rec["response"]["finish_reason"] == "length"
    assert rec["scores"] == {m: 1.0 for m in METRICS}
    assert result["num_truncated"] == 1 and result["num_ok"] == 0
    assert result["num_failed"] == 0 and result["failures"] == {}
    assert result["finish_reasons"] == {"length": 1}
    assert result["metrics"]["exact_match"] == 1.0 and result["metrics"]["exact_match,valid"] == 1.0


@pytest.mark.parametrize("content", [None, "", "  \n\t "], ids=["null", "empty-string", "blank"])
def test_empty_content(isolated_env, tmp_path, content):
    with FakeOpenAI(responder=lambda body, n: Reply(content=content)) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=3)
    assert rec["status"] == "empty"
    assert rec["attempts"] == 1 and len(srv.chat_requests) == 1  # not retried
    assert rec["extracted"] is None and rec["scores"] == {m: 0.0 for m in METRICS}
    assert result["failures"] == {"empty": 1} and result["num_failed"] == 1


BAD_RESPONSES = {
    "html-page": (Reply(raw=b"<html><head><title>502</title></head><body><h1>Bad Gateway</h1></body></html>"),
                  "not JSON"),
    "plain-text": (Reply(raw=b"this is not json at all"), "not JSON"),
    "non-utf8": (Reply(raw=b'{"choices":[{"message":{"role":"assistant","content":"\xff\xfe\x80"}}]}',
                       headers={"Content-Type": "application/json"}), "UTF-8"),
    "json-array": (Reply(raw=b"[1, 2, 3]", headers={"Content-Type": "application/json"}), None),
    "error-in-200": (Reply(json_body={"error": {"message": "model overloaded, sorry", "type": "server_error"}}),
                     "model overloaded"),
    "empty-choices": (Reply(json_body={"id": "x", "object": "chat.completion", "choices": []}), "choices"),
    "no-choices-key": (Reply(json_body={"id": "x", "object": "chat.completion"}), "choices"),
    "choices-not-list": (Reply(json_body={"choices": "nope"}), None),
    "no-message": (Reply(json_body={"choices": [{"index": 0, "finish_reason": "stop"}]}), "message"),
    "content-not-string": (Reply(json_body={"choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": [1, 2]}}]}),
                           None),
}


@pytest.mark.parametrize("case", list(BAD_RESPONSES))
def test_bad_response(isolated_env, tmp_path, case):
    reply, fragment = BAD_RESPONSES[case]
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=3)
    assert rec["status"] == "bad_response"
    assert rec["attempts"] == 1 and len(srv.chat_requests) == 1  # a malformed answer is not retried
    assert rec["response"]["http_status"] == 200
    assert isinstance(rec["error"], str) and rec["error"]
    if fragment:
        assert fragment in rec["error"]
    assert rec["extracted"] is None and rec["scores"] == {m: 0.0 for m in METRICS}
    assert result["failures"] == {"bad_response": 1}
    assert result["metrics"]["exact_match"] == 0.0


def test_dropped_connection(isolated_env, tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(drop=True)) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=3)
    assert rec["status"] == "connection"
    assert rec["attempts"] == 3 and len(srv.chat_requests) == 3
    assert rec["response"]["http_status"] is None and rec["error"]
    assert result["failures"] == {"connection": 1}


# --------------------------------------------------------------------------------------------
# Timeouts
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_datasets_server")
def test_hanging_server_times_out(tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(delay=15)) as server:
        start = time.monotonic()
        result = run_gsm8k(APIConfig(url=server.base_url, model="m", timeout=1, max_retries=1), 2, tmp_path,
                     log_dir=tmp_path / "log")
        elapsed = time.monotonic() - start
        assert len(server.chat_requests) == 2  # max_retries 1 = one attempt each
    assert result["failures"] == {"timeout": 2}
    assert result["num_ok"] == 0 and result["metrics"]["exact_match"] == 0.0
    assert elapsed < 30  # bounded by --timeout, not the 600 s default
    records = [json.loads(line) for line in (tmp_path / "log" / "samples_gsm8k_cot_llama.jsonl").open()]
    assert [(r["status"], r["attempts"]) for r in records] == [("timeout", 1), ("timeout", 1)]
    assert all(r["error"] for r in records)


@pytest.mark.usefixtures("no_datasets_server")
def test_timeout_is_retried_up_to_max_retries(tmp_path):
    plan = {0: Reply(delay=15)}  # the first attempt hangs, the retry answers
    with FakeOpenAI(responder=lambda body, n: plan.get(n, "The final answer is 18")) as server:
        config = APIConfig(url=server.base_url, model="m", timeout=1, max_retries=2, num_concurrent=1,
                           retry_base_delay=0.01)
        result = run_gsm8k(config, 1, tmp_path, log_dir=tmp_path / "log")
        assert len(server.chat_requests) == 2
    assert result["num_ok"] == 1 and result["metrics"]["exact_match"] == 1.0
    record = json.loads((tmp_path / "log" / "samples_gsm8k_cot_llama.jsonl").read_text())
    assert record["attempts"] == 2 and record["status"] == "ok"


def test_timeout_on_a_hanging_server_is_retried(isolated_env, tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(hang=True)) as srv:
        start = time.monotonic()
        result, (rec,) = run_inproc(srv, tmp_path, timeout=1, max_retries=2)
        elapsed = time.monotonic() - start
        requests = len(srv.chat_requests)
    assert rec["status"] == "timeout"
    assert rec["attempts"] == 2 and requests == 2
    assert elapsed >= 1.9  # each attempt waited its full 1 s timeout
    assert result["failures"] == {"timeout": 1}


# --------------------------------------------------------------------------------------------
# Retries, backoff, Retry-After and long waits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [429, 500, 502, 503, 504])
def test_server_errors_are_retried_up_to_max_retries(isolated_env, tmp_path, code):
    with FakeOpenAI(responder=lambda body, n: Reply(status=code)) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=3)
    assert rec["status"] == f"http_{code}"
    assert rec["attempts"] == 3 and len(srv.chat_requests) == 3
    assert result["failures"] == {f"http_{code}": 1} and result["num_failed"] == 1


def test_success_after_two_failures(isolated_env, tmp_path):
    responder = fault_plan({0: Reply(status=500), 1: Reply(status=502)}, ByRow())
    with FakeOpenAI(responder=responder) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=5)
    assert rec["status"] == "ok" and rec["attempts"] == 3 and len(srv.chat_requests) == 3
    assert rec["scores"] == {m: 1.0 for m in METRICS}
    assert result["num_ok"] == 1 and result["failures"] == {}


@pytest.mark.parametrize("code", [400, 404, 422])
def test_client_errors_are_not_retried(isolated_env, tmp_path, code):
    # row 0 succeeds first (a 404 before any success stops the run: see below)
    responder = fault_plan({1: Reply(status=code)}, ByRow())
    with FakeOpenAI(responder=responder) as srv:
        result, (_, rec) = run_inproc(srv, tmp_path, n=2, max_retries=4, num_concurrent=1)
    assert rec["status"] == f"http_{code}"
    assert rec["attempts"] == 1 and len(srv.chat_requests) == 2
    assert rec["response"]["http_status"] == code
    assert f"fake error {code}" in rec["error"]  # the server's error.message
    assert result["failures"] == {f"http_{code}": 1}


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_honoured(isolated_env, tmp_path, code):
    responder = fault_plan({0: Reply(status=code, headers={"Retry-After": "1"})}, ByRow())
    with FakeOpenAI(responder=responder) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=3, retry_base_delay=0.01)
        times = [r["time"] for r in srv.chat_requests]
    assert rec["status"] == "ok" and rec["attempts"] == 2
    assert len(times) == 2
    assert times[1] - times[0] >= 0.95  # waited Retry-After, not the 0.01 s backoff


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_backoff_grows(isolated_env, tmp_path):
    base = 0.1
    with FakeOpenAI(responder=lambda body, n: Reply(status=500)) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=4, retry_base_delay=base)
        times = [r["time"] for r in srv.chat_requests]
    assert rec["attempts"] == 4 and len(times) == 4
    g = gaps(times)
    # step k waits base * 2**(k-1) * jitter(0.5..1): lower bounds hold whatever the jitter
    for k, gap in enumerate(g):
        assert gap >= 0.5 * base * 2 ** k * 0.95, g
    assert g[2] > g[0], g


def test_a_long_retry_after_is_announced_and_ctrl_c_stops_the_wait(isolated_env, tmp_path):
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=lambda body, n: Reply(status=429, headers={"Retry-After": "3600"})) as srv:
        proc, lines, notice, out, elapsed = interrupt_while_waiting(
            [sys.executable, str(NANO_EVAL), *GSM_ARGS, "--base_url", srv.base_url, "--max_samples", "2",
             "--num_concurrent", "1", "--max_retries", "2", "--output", str(output)])
        chat = len(srv.chat_requests)
    assert "429" in notice and "waiting 300 s" in notice
    assert "Retry-After: 3600 s" in notice and "capped at 300 s" in notice
    assert "attempt 2 of 2" in notice and "Ctrl-C" in notice
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert elapsed < 5, elapsed
    assert chat == 1  # the wait was not skipped: attempt 2 was never sent
    document = json.loads(out)
    assert document["complete"] is False and document["interrupted"] is True
    assert document["results"]["gsm8k_cot_llama"]["complete"] is False
    assert json.loads(output.read_text("utf-8")) == document
    assert "interrupted" in err


def test_short_waits_are_not_announced(isolated_env):
    with FakeOpenAI(responder=lambda body, n: Reply(status=429, headers={"Retry-After": "1"})) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1, "--max_retries", 2,
                             "--max_fail_rate", 1)
    assert code == 0, err
    assert len(srv.chat_requests) == 2
    assert "waiting" not in err


# --------------------------------------------------------------------------------------------
# ChatClient: authentication failures on chat requests
# --------------------------------------------------------------------------------------------


def test_401_on_first_chat_request_exits_4(isolated_env):
    # /v1/models is open (extra route), only chat requests check the key
    models = {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}
    with FakeOpenAI(api_key="sk-right-key", responder=ByRow(), extra_routes={"/v1/models": (200, models)}) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 30,
                             "--api_key", "sk-wrong-key", "--num_concurrent", 2, "--no_progress")
        chat = len(srv.chat_requests)
    assert_auth_failure(code, out, err, "sk-wrong-key")
    assert 1 <= chat <= 4  # stops at once, does not send the whole run


@pytest.mark.parametrize("status", [401, 403])
def test_auth_status_from_chat_without_key_exits_4(isolated_env, status):
    with FakeOpenAI(responder=lambda body, n: Reply(status=status)) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 10,
                             "--num_concurrent", 1, "--no_progress")
        chat = len(srv.chat_requests)
    assert code == 4, err
    assert "authentication failed" in error_lines(err)[0]
    assert chat == 1  # 401/403 are never retried


def test_401_after_a_success_is_a_sample_failure(isolated_env):
    responder = fault_plan({3: Reply(status=401)}, ByRow())
    with FakeOpenAI(responder=responder) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 10,
                             "--num_concurrent", 1, "--max_fail_rate", 0.5, "--no_progress")
    assert code == 0, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["failures"] == {"http_401": 1} and result["num_samples"] == 10


def test_in_process_auth_error_is_raised(isolated_env, tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(status=401)) as srv:
        with pytest.raises(AuthError, match="authentication failed"):
            run_inproc(srv, tmp_path, n=3)


# --------------------------------------------------------------------------------------------
# AdaptiveLimiter
# --------------------------------------------------------------------------------------------


def test_adaptive_concurrency_shrinks_on_429_and_recovers(isolated_env, tmp_path):
    seen = []  # requests in flight at the fake when each request arrived
    holder = {}
    inner = ByRow(delay=0.04)

    def responder(body, n):
        seen.append(holder["srv"].in_flight)
        if n < 8:
            return Reply(status=429, delay=0.1)
        return inner(body, n)

    srv = FakeOpenAI(responder=responder)
    holder["srv"] = srv
    with srv:
        result, records = run_inproc(srv, tmp_path, n=60, num_concurrent=8, max_retries=3)
    assert result["num_ok"] == 60
    assert max(seen[:8]) == 8, seen  # the run started at full width
    # 8 throttled answers halve the limit 8 -> 1; only first-attempt successes grow it back one by one
    assert seen[8:10] == [1, 1], seen
    assert max(seen[8:16]) <= 3, seen
    # ... and the successes grow it back
    assert max(seen[-20:]) >= 4, seen


PAYLOAD = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@contextlib.contextmanager
def client_of_throttling_server(replies: dict) -> Iterator[_ChatClient]:
    """A ChatClient (8 in flight, one attempt) of a server that answers with replies["status"]."""
    with FakeOpenAI(responder=lambda body, n: Reply(status=replies["status"], content="hi")) as srv:
        client = _ChatClient(APIConfig(url=srv.base_url, model="m", num_concurrent=8, max_retries=1,
                                      retry_base_delay=0.01))
        try:
            yield client
        finally:
            client.close()


def test_limiter_halves_on_throttling_and_grows_back():
    replies = {"status": 429}
    with client_of_throttling_server(replies) as client:
        assert client.limiter.limit == 8
        assert {o.status for o in send_at_once(client, PAYLOAD, 8)} == {"http_429"}
        assert client.limiter.limit == 1
        replies["status"] = 200
        history = []
        for _ in range(1 + 2 + 3):
            assert client.send_blocking(PAYLOAD).status == "ok"
            history.append(client.limiter.limit)
        assert history == [2, 2, 3, 3, 3, 4]  # +1 after `limit` successes
        for _ in range(4 + 5 + 6 + 7 + 5):
            client.send_blocking(PAYLOAD)
        assert client.limiter.limit == 8  # back to the maximum, never above
        replies["status"] = 503
        client.send_blocking(PAYLOAD)
        assert client.limiter.limit == 4


def send_at_once(client: _ChatClient, payload: bytes, n: int) -> list:
    """n requests in n threads at once, as the runner's workers send them."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: client.send_blocking(payload), range(n)))


def test_limiter_does_not_grow_on_errors():
    replies = {"status": 429}
    with client_of_throttling_server(replies) as client:
        send_at_once(client, PAYLOAD, 8)
        assert client.limiter.limit == 1
        replies["status"] = 500
        for _ in range(6):
            client.send_blocking(PAYLOAD)
        assert client.limiter.limit == 1


def test_limiter_never_exceeds_its_cap_under_threads():
    limiter = _AdaptiveLimiter(8)
    peak, lock, stop = [0], threading.Lock(), time.monotonic() + 1.0
    rnd = random.Random(1)

    def worker():
        while time.monotonic() < stop:
            assert limiter.acquire()
            with lock:
                peak[0] = max(peak[0], limiter._in_flight)
            time.sleep(0.0005)
            limiter.release(throttled=rnd.random() < 0.05, success=True)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)  # no lost wake-up while the cap moved
    assert limiter._in_flight == 0 and peak[0] <= 8 and 1 <= limiter.limit <= 8


def test_limiter_admits_no_more_than_a_lowered_cap():
    limiter = _AdaptiveLimiter(4)
    for _ in range(4):
        assert limiter.acquire()
    limiter.release(throttled=True)  # cap 2, 3 in flight
    admitted = []
    waiter = threading.Thread(target=lambda: admitted.append(limiter.acquire()))
    waiter.start()
    time.sleep(0.05)
    assert admitted == []  # 3 in flight >= cap 2: it waits
    limiter.release(success=True)  # 2 in flight: still waits
    time.sleep(0.05)
    assert admitted == []
    limiter.release(success=True)  # 1 in flight, and 2 successes at cap 2 grew it to 3: it goes
    waiter.join(5)
    assert admitted == [True] and limiter._in_flight == 2 and limiter.limit == 3
    limiter.close()
    assert limiter.acquire() is False


# --------------------------------------------------------------------------------------------
# The response size cap
# --------------------------------------------------------------------------------------------


BIG = "x" * (2 * 2 ** 20) + " The final answer is 0"  # a 2 MB answer


def big_on_row(row: int):
    """ByRow's right answers, except a 2 MB answer for `row`."""
    inner = ByRow()
    return lambda body, n: Reply(content=BIG) if gsm8k_row_of(body) == row else inner(body, n)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("max_fail_rate, expected", [("0.5", 0), ("0.05", 1)])
def test_a_response_over_the_cap_is_a_too_large_sample(isolated_env, tmp_path, chunked, max_fail_rate, expected):
    srv = FakeOpenAI(responder=big_on_row(1))
    if chunked:
        send_chunked(srv)
    log = tmp_path / "l"
    with srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 4, "--num_concurrent", 1,
                             "--max_response_mb", 1, "--max_fail_rate", max_fail_rate, "--log_samples", log)
        chat = len(srv.chat_requests)
    assert code == expected, err
    assert "Traceback" not in err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["failures"] == {"too_large": 1}
    assert result["num_ok"] == 3 and result["num_samples"] == 4  # the run went on
    records = read_log(log / "samples_gsm8k_cot_llama.jsonl")
    assert [r["status"] for r in records] == ["ok", "too_large", "ok", "ok"]
    assert records[1]["attempts"] == 1 and chat == 4  # not retried: it would be as large again
    assert "too large" in records[1]["error"] and "--max_response_mb" in records[1]["error"]
    assert records[1]["response"]["content"] is None
    log_file = log / "samples_gsm8k_cot_llama.jsonl"
    assert log_file.stat().st_size < 200_000
    assert max(len(line) for line in log_file.read_text("utf-8").splitlines()) < 50_000


def test_the_response_cap_in_process(isolated_env, tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(content=BIG)) as srv:
        _, (small_cap,) = run_inproc(srv, tmp_path, max_response_mb=1)
        _, (large_cap,) = run_inproc(srv, tmp_path, max_response_mb=4)
        _, (default_cap,) = run_inproc(srv, tmp_path)  # 16 MB
        srv.responder = lambda body, n: Reply(content="y" * (17 * 2 ** 20))
        _, (over_default,) = run_inproc(srv, tmp_path)
    assert small_cap["status"] == "too_large"
    assert large_cap["status"] == "ok" and default_cap["status"] == "ok"
    assert over_default["status"] == "too_large"  # a 17 MB body is over the default 16 MB
    with pytest.raises(UsageError, match="max_response_mb"):
        APIConfig(url="http://127.0.0.1:1/v1", max_response_mb=0)


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


TLS_WAYS = {
    "default": ([], {}, 3),
    "verify_certificate=false": (["--model_args", "verify_certificate=false"], {}, 0),
    "--insecure": (["--insecure"], {}, 0),
    "--ca_cert": (["--ca_cert", TLS_CERT], {}, 0),
    "ca_cert_path=": (["--model_args", f"ca_cert_path={TLS_CERT}"], {}, 0),
    "SSL_CERT_FILE": ([], {"SSL_CERT_FILE": str(TLS_CERT)}, 0),
}

VERIFICATION_OFF = "verification is off"


def env_with(**values) -> dict:
    """os.environ without any proxy or CA variable, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env.update(values)
    return env


@pytest.fixture
def https_fake():
    with serve_https(FakeOpenAI(responder=ByRow())) as srv:
        yield srv


@pytest.mark.parametrize("way", list(TLS_WAYS))
def test_tls_options_against_a_self_signed_server(isolated_env, https_fake, way):
    args, extra_env, expected = TLS_WAYS[way]
    assert https_fake.base_url.startswith("https://127.0.0.1:")
    code, out, err = cli(*GSM_ARGS, "--base_url", https_fake.base_url, "--max_samples", 3, *args,
                         env=env_with(**extra_env), timeout=30)
    chat = https_fake.chat_requests
    assert code == expected, err
    off = [line for line in err.splitlines() if VERIFICATION_OFF in line]
    if expected:
        (line,) = error_lines(err)
        assert "certificate" in line and "--insecure" in line and out == "" and chat == []
        return
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_ok"] == 3 and result["failures"] == {}
    assert sorted(gsm8k_row_of(r["body"]) for r in chat) == [0, 1, 2]
    if way in ("verify_certificate=false", "--insecure"):
        assert len(off) == 1 and off[0].startswith("nano-eval: warning:")
    else:
        assert off == []  # verified: nothing to warn about


def test_verification_off_is_warned_once_per_run(isolated_env, https_fake, tmp_path):
    """Two https servers (the same one twice), verification off: one warning line, not one per server."""
    code, out, err = cli(*GSM_ARGS, "--base_url", https_fake.base_url, "--base_url", https_fake.base_url + "/chat/completions",
                         "--max_samples", 2, "--insecure", "--log_samples", tmp_path / "l", env=env_with(), timeout=60)
    assert code == 0, err
    assert [run["results"]["gsm8k_cot_llama"]["num_ok"] for run in json.loads(out)["runs"]] == [2, 2]
    assert len([line for line in err.splitlines() if VERIFICATION_OFF in line]) == 1


def test_no_warning_for_plain_http_with_insecure(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1, "--insecure")
    assert code == 0, err
    assert VERIFICATION_OFF not in err


def test_a_missing_ca_file_is_a_usage_error(isolated_env, https_fake, tmp_path):
    code, out, err = cli(*GSM_ARGS, "--base_url", https_fake.base_url, "--max_samples", 1,
                         "--ca_cert", tmp_path / "nope.pem", env=env_with())
    assert code == 2, err
    (line,) = error_lines(err)
    assert "CA certificate file" in line and "nope.pem" in line and "does not exist" in line
    assert https_fake.requests == []


def _other_ca_pem() -> str:
    """Some CA certificate that is not the test one: the first of the system bundle, or skip."""
    import ssl
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            text = Path(candidate).read_text("ascii", "replace")
            start = text.find("-----BEGIN CERTIFICATE-----")
            end = text.find("-----END CERTIFICATE-----", start)
            if start >= 0 and end > start:
                return text[start:end + len("-----END CERTIFICATE-----")] + "\n"
    pytest.skip("no system CA bundle to take another CA certificate from")


def test_a_ca_that_did_not_sign_the_certificate_still_fails(isolated_env, https_fake, tmp_path):
    """--ca_cert replaces trust, it does not switch verification off: another CA is refused."""
    other = tmp_path / "other.pem"
    other.write_text(_other_ca_pem(), "ascii")
    code, out, err = cli(*GSM_ARGS, "--base_url", https_fake.base_url, "--max_samples", 1, "--ca_cert", other,
                         env=env_with(), timeout=30)
    assert code == 3, err
    assert "certificate" in error_lines(err)[0] and https_fake.chat_requests == []


@pytest.fixture
def no_ca_env(monkeypatch):
    """No CA bundle from the environment: the test certificate is not trusted unless a test says so."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def test_a_self_signed_certificate_is_named_with_the_ways_out(isolated_env, no_ca_env):
    with serve_https(FakeOpenAI(responder=ByRow())) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2, timeout=30)
        chat = len(srv.chat_requests)
    assert code == 3, err
    (line,) = error_lines(err)
    assert "certificate" in line and "failed verification" in line
    assert "--ca_cert" in line and "SSL_CERT_FILE" in line and "--insecure" in line
    assert "is the server running" not in line
    assert "Traceback" not in err and out == "" and chat == 0


def test_https_to_a_plain_http_port_says_so(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url.replace("http://", "https://"), "--max_samples", 2,
                             timeout=30)
    assert code == 3, err
    (line,) = error_lines(err)
    assert "plain http" in line and "http://" in line
    assert "WRONG_VERSION_NUMBER" not in line and "is the server running" not in line


# --------------------------------------------------------------------------------------------
# Proxies
# --------------------------------------------------------------------------------------------


@pytest.fixture
def proxy():
    with ForwardProxy() as px:
        yield px


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_plain_http_goes_through_the_proxy_in_absolute_form(isolated_env, proxy, variable):
    num_concurrent = 2
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 20, "--num_concurrent", num_concurrent,
                             env=env_with(**{variable: proxy.url}))
        direct = srv.requests
    assert code == 0, err
    assert json.loads(out)["results"]["gsm8k_cot_llama"]["num_ok"] == 20
    chat = [r for r in proxy.requests if r["path"] == "/v1/chat/completions"]
    assert len(chat) == 20 and all(r["method"] == "POST" for r in chat)
    assert all(r["url"] == srv.base_url + "/chat/completions" for r in chat)  # absolute form
    assert any(r["url"] == srv.base_url + "/models" for r in proxy.requests)
    assert len(proxy.requests) == len(direct)  # everything the server got came through the proxy
    assert proxy.tunnels == []
    # keep-alive on the client side: the 20 chat requests came on at most num_concurrent connections,
    # and all the run's connections (model, the 8 identity probes, chat) are few
    assert len({r["client"] for r in chat}) <= num_concurrent
    assert proxy.connections <= num_concurrent + 10, proxy.connections


def test_https_goes_through_a_connect_tunnel(isolated_env, proxy, https_fake):
    num_concurrent = 2
    code, out, err = cli(*GSM_ARGS, "--base_url", https_fake.base_url, "--max_samples", 20, "--num_concurrent",
                         num_concurrent, "--ca_cert", TLS_CERT, env=env_with(HTTPS_PROXY=proxy.url), timeout=30)
    assert code == 0, err
    assert json.loads(out)["results"]["gsm8k_cot_llama"]["num_ok"] == 20
    assert proxy.requests == []  # nothing in the clear
    assert proxy.tunnels and {t["target"] for t in proxy.tunnels} == {f"127.0.0.1:{https_fake.port}"}
    assert len(https_fake.chat_requests) == 20
    assert https_fake.connections == len(proxy.tunnels)  # every connection the server saw was a tunnel
    assert len(proxy.tunnels) <= num_concurrent + 10 < len(https_fake.requests)  # tunnels were kept alive


def test_no_proxy_bypasses_the_proxy(isolated_env, proxy):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 3,
                             env=env_with(HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, NO_PROXY="127.0.0.1"))
        chat = len(srv.chat_requests)
    assert code == 0, err
    assert chat == 3
    assert proxy.requests == [] and proxy.tunnels == [] and proxy.connections == 0


def test_the_datasets_server_goes_through_the_proxy(isolated_env, proxy, fake_hf):
    """chartqa is not shipped: its rows and images are fetched, through HTTP_PROXY."""
    with FakeOpenAI() as srv:
        code, out, err = cli("--tasks", "chartqa", "--no_progress", "--base_url", srv.base_url, "--max_samples", 2,
                             "--max_fail_rate", 1, env=env_with(HTTP_PROXY=proxy.url))
    assert code == 0, err
    assert json.loads(out)["results"]["chartqa"]["num_samples"] == 2
    rows = [r for r in proxy.requests if r["path"] == "/rows"]
    assert rows and len(rows) == len(fake_hf.rows_requests)
    assert all(r["url"].startswith(fake_hf.url + "/rows?") and "HuggingFaceM4%2FChartQA" in r["url"] for r in rows)
    assets = [r for r in proxy.requests if r["path"].startswith("/cached-assets/")]
    assert len(assets) == len(fake_hf.asset_requests) >= 1


def test_proxy_credentials_go_to_the_proxy_only(isolated_env, https_fake):
    import base64
    expected = "Basic " + base64.b64encode(b"proxy-user:pa@ss-s3cr3t").decode()
    proxy = ForwardProxy(credentials="proxy-user:pa@ss-s3cr3t").start()
    url = proxy.url.replace("http://", "http://proxy-user:pa%40ss-s3cr3t@")
    with FakeOpenAI(responder=ByRow()) as plain:
        code, out, err = cli(*GSM_ARGS, "--base_url", plain.base_url, "--max_samples", 2, env=env_with(HTTP_PROXY=url))
        origin_headers = [r["headers"] for r in plain.requests]
    assert code == 0, err
    assert proxy.requests and all(r["headers"].get("Proxy-Authorization") == expected for r in proxy.requests)
    assert origin_headers and not any("Proxy-Authorization" in h for h in origin_headers)
    code, out2, err2 = cli(*GSM_ARGS, "--base_url", https_fake.base_url, "--max_samples", 2, "--ca_cert", TLS_CERT,
                           env=env_with(HTTPS_PROXY=url), timeout=30)
    assert code == 0, err2
    assert proxy.tunnels and all(t["headers"].get("Proxy-Authorization") == expected for t in proxy.tunnels)
    assert not any("Proxy-Authorization" in r["headers"] for r in https_fake.requests)
    proxy.close()
    assert proxy.refused == []
    for text in (out, err, out2, err2):
        assert "pa@ss-s3cr3t" not in text and "pa%40ss-s3cr3t" not in text


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_wants_credentials_is_named_in_the_error(isolated_env, https_fake, scheme):
    """HTTP(S)_PROXY without user:password@ for a proxy that requires them: the error must say it is
    the proxy (407), not send the user after --model or --api_key."""
    with ForwardProxy(credentials="u:p") as proxy, FakeOpenAI(responder=ByRow()) as plain:
        target = plain if scheme == "http" else https_fake
        code, out, err = cli(*GSM_ARGS, "--base_url", target.base_url, "--max_samples", 2, "--ca_cert", TLS_CERT,
                             env=env_with(HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url), timeout=30)
        refused = len(proxy.refused)
    assert refused >= 1 and target.requests == []
    assert code == 3, err
    (line,) = error_lines(err)
    assert "407" in line and "proxy" in line.lower()
    assert "put them in the proxy URL" in line and "OSError" not in line and "Tunnel connection failed" not in line
    assert "--model" not in line and "--api_key" not in line


def test_a_proxy_that_is_down_is_named_not_the_server(isolated_env):
    """Issue 23, item 11: HTTP_PROXY at a closed port while the server is up."""
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2,
                             env=env_with(HTTP_PROXY="http://127.0.0.1:9"), timeout=60)
        assert srv.requests == []
    assert code == 3, err
    (line,) = error_lines(err)
    assert "cannot reach the HTTP proxy 127.0.0.1:9 (HTTP_PROXY): connection refused" in line
    assert "list it in NO_PROXY" in line and "is the server running" not in line


def test_no_proxy_with_a_port_bypasses_the_proxy_as_urllib_does(isolated_env, proxy):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2,
                             env=env_with(HTTP_PROXY=proxy.url, NO_PROXY=f"127.0.0.1:{srv.port}"))
        chat = len(srv.chat_requests)
    assert code == 0, err
    assert chat == 2 and proxy.requests == [] and proxy.connections == 0
    import urllib.request
    assert urllib.request.proxy_bypass_environment(f"127.0.0.1:{srv.port}", {"no": f"127.0.0.1:{srv.port}"})


def test_python_api_tls_and_headers(isolated_env, https_fake, tmp_path, monkeypatch):
    for name in PROXY_VARS[3:] + ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    task = TASKS["gsm8k_cot_llama"]

    def run(**config):
        cfg = APIConfig(url=https_fake.base_url, model="fake-model", max_retries=1, retry_base_delay=0.01, **config)
        return asyncio.run(run_task(task, cfg, max_samples=2, progress=False))

    before = len(https_fake.chat_requests)
    verified = run(ca_cert=str(TLS_CERT), headers={"X-Api-Gw": "gw-s3cr3t"})
    assert verified["num_ok"] == 2
    sent = https_fake.chat_requests[before:]
    assert len(sent) == 2 and all(r["headers"].get("X-Api-Gw") == "gw-s3cr3t" for r in sent)

    unverified = run(verify_certificate=False, headers=["X-From-List: listed"])
    assert unverified["num_ok"] == 2
    assert https_fake.chat_requests[-1]["headers"].get("X-From-List") == "listed"

    count = len(https_fake.chat_requests)
    refused = run()  # the default verifies, and the test certificate is not trusted
    assert refused["num_ok"] == 0 and refused["failures"] == {"connection": 2}
    assert len(https_fake.chat_requests) == count

    with pytest.raises(UsageError):
        APIConfig(url=https_fake.base_url, headers=["no colon"])
    with pytest.raises(UsageError):
        APIConfig(url=https_fake.base_url, ca_cert=str(tmp_path / "missing.pem"))
    assert "gw-s3cr3t" not in repr(APIConfig(url=https_fake.base_url, headers={"X-Api-Gw": "gw-s3cr3t"}))


# --------------------------------------------------------------------------------------------
# A body cut short (issue 23, item 6): a dropped connection, retried, never a short body accepted
# --------------------------------------------------------------------------------------------

import socket as _socket  # noqa: E402


def short_body_server(answers: list) -> tuple:
    """A raw HTTP server on 127.0.0.1 answering each connection's first request with the next of
    `answers` (bytes: the whole response, sent as is, then the connection is closed)."""
    listener = _socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    seen: list = []

    def serve():
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(next((l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(
                    b"content-length")), b"0"))
                while len(rest) < length:
                    rest += conn.recv(65536)
                seen.append(head.split(b"\r\n")[0])
                conn.sendall(answer)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", seen


def completion(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


@pytest.mark.parametrize("cap", [None, 16])
def test_a_body_cut_short_is_a_dropped_connection_and_retried(cap):
    whole = completion("The final answer is 18")
    short = whole[:19]
    valid_but_short = completion("The final answer is 1")  # valid JSON, shorter than it says
    answers = [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + short,
               b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (len(whole) + 5)
               + valid_but_short,
               b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(whole) + whole]
    url, seen = short_body_server(answers)
    config = nano_eval.APIConfig(url, model="m", retry_base_delay=0.01, max_response_mb=cap or 16)
    client = nano_eval._ChatClient(config)
    if cap is None:
        client.http.max_body = None  # the uncapped read path too
    outcome = client.send_blocking(b'{"messages": []}')
    client.close()
    assert (outcome.status, outcome.content, outcome.attempts) == ("ok", "The final answer is 18", 3)
    assert len(seen) == 3
    status, reason = nano_eval._describe_network_error(http.client.IncompleteRead(short, 981))
    assert (status, reason) == ("connection", "the connection closed mid-response (19 of 1,000 bytes)")


def test_a_content_length_of_other_digits_is_no_length_not_a_crash():
    """str.isdigit() takes a superscript two (a byte 0xb2 in a header), int() does not: the
    body is then read to the end of the connection, as http.client itself does."""
    whole = completion("The final answer is 18")
    url, seen = short_body_server([b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: \xb2\r\nConnection: close\r\n\r\n" + whole])
    client = nano_eval._ChatClient(nano_eval.APIConfig(url, model="m", max_retries=1))
    outcome = client.send_blocking(b'{"messages": []}')
    client.close()
    assert (outcome.status, outcome.content) == ("ok", "The final answer is 18"), outcome
