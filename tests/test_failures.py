"""Failure taxonomy, retries, backoff, adaptive concurrency, fail-rate exit, auth, dead servers, and
reasoning models: nano-eval against FakeOpenAI with injected faults.

In-process runs use ``run_task`` with ``APIConfig(retry_base_delay=0.01)`` so retries are fast; the CLI is
run as a subprocess (``python nano_eval.py ...``) where exit codes and stderr matter.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest

from fakes import cli, error_lines, read_log, run_inproc
from fakes import ByRow, FakeOpenAI, Reply, fault_plan, free_port

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nano_eval import APIConfig, AuthError, ChatClient, TASKS  # noqa: E402

NANO_EVAL = ROOT / "nano_eval.py"
GSM8K_ROWS = [json.loads(line) for line in
              (Path(__file__).parent / "fixtures" / "gsm8k" / "test.jsonl").read_text("utf-8").splitlines()[:60]]
ROW_OF = {row["question"]: i for i, row in enumerate(GSM8K_ROWS)}
GOLD = [row["answer"].split("####")[-1].strip() for row in GSM8K_ROWS]
TASK = TASKS["gsm8k_cot_llama"]
METRICS = ["exact_match,strict-match", "exact_match,flexible-extract"]

assert GOLD[0] == "18"  # Janet's ducks: the examples below rely on it


# --- helpers ---------------------------------------------------------------------------------


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# --- every status ----------------------------------------------------------------------------


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


def test_dropped_connection(isolated_env, tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(drop=True)) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=3)
    assert rec["status"] == "connection"
    assert rec["attempts"] == 3 and len(srv.chat_requests) == 3
    assert rec["response"]["http_status"] is None and rec["error"]
    assert result["failures"] == {"connection": 1}


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


def test_404_before_any_success_stops_the_run(isolated_env, tmp_path):
    """A wrong path or an unknown model: every request would fail the same way."""
    with FakeOpenAI(responder=lambda body, n: Reply(status=404)) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 20,
                             "--num_concurrent", 1, "--no_progress")
    assert code == 3, err
    assert "answered 404" in err and "check --base_url and --model" in err and "Traceback" not in err
    assert len(srv.chat_requests) == 1


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


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_honoured(isolated_env, tmp_path, code):
    responder = fault_plan({0: Reply(status=code, headers={"Retry-After": "1"})}, ByRow())
    with FakeOpenAI(responder=responder) as srv:
        result, (rec,) = run_inproc(srv, tmp_path, max_retries=3, retry_base_delay=0.01)
        times = [r["time"] for r in srv.chat_requests]
    assert rec["status"] == "ok" and rec["attempts"] == 2
    assert len(times) == 2
    assert times[1] - times[0] >= 0.95  # waited Retry-After, not the 0.01 s backoff


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


# --- results: failures dict, headline vs valid -----------------------------------------------


def test_failures_dict_and_headline_counts_failed_as_wrong(isolated_env, tmp_path):
    plan = {
        1: Reply(status=400),  # http_400
        2: Reply(content=None),  # empty
        3: Reply(raw=b"<html>oops</html>"),  # bad_response
        4: Reply(content=f"The final answer is {GOLD[4]}", finish_reason="length"),  # truncated, right
        5: Reply(status=422),  # http_422
    }
    responder = ByRow(plan, wrong={6})
    with FakeOpenAI(responder=responder) as srv:
        result, records = run_inproc(srv, tmp_path, n=8, num_concurrent=3)
    statuses = [r["status"] for r in records]
    assert statuses == ["ok", "http_400", "empty", "bad_response", "truncated", "http_422", "ok", "ok"]
    assert result["failures"] == {"bad_response": 1, "empty": 1, "http_400": 1, "http_422": 1}
    assert result["num_samples"] == 8 and result["num_ok"] == 3 and result["num_truncated"] == 1
    assert result["num_failed"] == 4
    # correct: rows 0, 4 (truncated), 7; wrong: row 6; failed: 1, 2, 3, 5
    per_sample = [1, 0, 0, 0, 1, 0, 0, 1]
    m = result["metrics"]
    assert m["exact_match"] == pytest.approx(3 / 8)
    assert m["exact_match,strict-match"] == pytest.approx(3 / 8)
    assert m["exact_match,valid"] == pytest.approx(3 / 4)  # over ok/truncated only
    assert m["exact_match,strict-match,valid"] == pytest.approx(3 / 4)
    assert m["exact_match,flexible-extract,valid"] == pytest.approx(3 / 4)
    mean = 3 / 8
    stderr = math.sqrt(sum((x - mean) ** 2 for x in per_sample) / 7) / math.sqrt(8)
    assert m["exact_match_stderr"] == pytest.approx(stderr)
    assert m["exact_match_stderr,strict-match"] == pytest.approx(stderr)
    assert "exact_match_stderr,valid" not in m


def test_fail_rate_at_the_limit_exits_0(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow({3: Reply(status=400)})) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 20,
                             "--max_fail_rate", 0.05, "--no_progress")
    assert code == 0, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_failed"] == 1 and result["failures"] == {"http_400": 1}
    assert error_lines(err) == []


def test_fail_rate_above_the_limit_exits_1_after_writing_results(isolated_env, tmp_path):
    output = tmp_path / "res.json"
    with FakeOpenAI(responder=ByRow({3: Reply(status=400), 11: Reply(content="")})) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 20,
                             "--max_fail_rate", 0.05, "--output", output, "--no_progress")
    assert code == 1
    document = json.loads(out)
    assert json.loads(output.read_text("utf-8")) == document
    result = document["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 20 and result["num_failed"] == 2
    assert result["failures"] == {"empty": 1, "http_400": 1}
    assert document["complete"] is True
    assert result["metrics"]["exact_match"] == pytest.approx(18 / 20)
    assert result["metrics"]["exact_match,valid"] == 1.0
    lines = error_lines(err)
    assert len(lines) == 1 and "2 of 20" in lines[0] and "max_fail_rate" in lines[0]
    assert "Traceback" not in err


# --- authentication --------------------------------------------------------------------------


def assert_auth_failure(code, out, err, secret):
    assert code == 4, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "authentication failed" in lines[0] and "--api_key" in lines[0]
    assert "Traceback" not in err
    assert secret not in err and secret not in out


def test_wrong_api_key_exits_4(isolated_env):
    with FakeOpenAI(api_key="sk-right-key", responder=ByRow()) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 5,
                             "--api_key", "sk-wrong-key", "--no_progress")
        chat = len(srv.chat_requests)
    assert_auth_failure(code, out, err, "sk-wrong-key")
    assert chat <= 8


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


# --- unreachable and dying servers -----------------------------------------------------------


def test_server_not_there_exits_3_quickly(isolated_env):
    port = free_port()
    start = time.monotonic()
    code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", f"http://127.0.0.1:{port}/v1",
                         "--max_samples", 5, "--no_progress", timeout=30)
    elapsed = time.monotonic() - start
    assert code == 3, err
    lines = error_lines(err)
    assert len(lines) == 1 and str(port) in lines[0]
    assert "Traceback" not in err and out == ""
    assert elapsed < 5


def test_server_dying_mid_run_is_not_retried_forever(isolated_env, tmp_path, capsys):
    holder = {}

    def responder(body, n):
        if n >= 5:  # the server dies: stops listening, drops everything open
            if n == 5:
                threading.Thread(target=holder["srv"].close, daemon=True).start()
            return Reply(drop=True)
        return ByRow()(body, n)

    srv = FakeOpenAI(responder=responder)
    holder["srv"] = srv
    with srv:
        start = time.monotonic()
        result, records = run_inproc(srv, tmp_path, n=40, num_concurrent=4, max_retries=3)
        elapsed = time.monotonic() - start
    statuses = {r["status"] for r in records}
    assert statuses <= {"ok", "connection"}
    assert result["num_samples"] == 40
    assert result["num_ok"] <= 5
    assert result["failures"]["connection"] == 40 - result["num_ok"]
    not_sent = [r for r in records if r["status"] == "connection" and r["attempts"] == 0]
    sent_failed = [r for r in records if r["status"] == "connection" and r["attempts"] > 0]
    # after max(4, num_concurrent) connection failures in a row the rest are not sent
    assert len(sent_failed) <= 4 + 3 + 5
    assert len(not_sent) >= 40 - 5 - len(sent_failed)
    assert all(r["attempts"] <= 3 for r in records)
    assert "stopped answering" in capsys.readouterr().err
    assert elapsed < 30  # generous; would be minutes if every sample were retried with real backoff


# --- adaptive concurrency --------------------------------------------------------------------


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


def test_limiter_halves_on_throttling_and_grows_back():
    replies = {"status": 429}

    with FakeOpenAI(responder=lambda body, n: Reply(status=replies["status"], content="hi")) as srv:
        async def scenario():
            client = ChatClient(APIConfig(url=srv.base_url, model="m", num_concurrent=8, max_retries=1,
                                          retry_base_delay=0.01))
            payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
            try:
                assert client.limiter.limit == 8
                outcomes = await asyncio.gather(*(client.send(payload) for _ in range(8)))
                assert {o.status for o in outcomes} == {"http_429"}
                assert client.limiter.limit == 1
                replies["status"] = 200
                history = []
                for _ in range(1 + 2 + 3):
                    outcome = await client.send(payload)
                    assert outcome.status == "ok"
                    history.append(client.limiter.limit)
                assert history == [2, 2, 3, 3, 3, 4]  # +1 after `limit` successes
                for _ in range(4 + 5 + 6 + 7 + 5):
                    await client.send(payload)
                assert client.limiter.limit == 8  # back to the maximum, never above
                replies["status"] = 503
                await client.send(payload)
                assert client.limiter.limit == 4
            finally:
                client.close()

        asyncio.run(scenario())


def test_limiter_does_not_grow_on_errors():
    replies = {"status": 429}
    with FakeOpenAI(responder=lambda body, n: Reply(status=replies["status"], content="hi")) as srv:
        async def scenario():
            client = ChatClient(APIConfig(url=srv.base_url, model="m", num_concurrent=8, max_retries=1,
                                          retry_base_delay=0.01))
            payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
            try:
                await asyncio.gather(*(client.send(payload) for _ in range(8)))
                assert client.limiter.limit == 1
                replies["status"] = 500
                for _ in range(6):
                    await client.send(payload)
                assert client.limiter.limit == 1
            finally:
                client.close()

        asyncio.run(scenario())


# --- reasoning models ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_fields_are_logged(isolated_env, tmp_path, field):
    reply = Reply(content="The final answer is 18", **{field: "Janet sells 16 - 3 - 4 = 9 eggs; 9 * 2 = 18."})
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        result, (rec,) = run_inproc(srv, tmp_path)
    assert rec["status"] == "ok"
    assert rec["response"]["reasoning_content"] == "Janet sells 16 - 3 - 4 = 9 eggs; 9 * 2 = 18."
    assert rec["response"]["content"] == "The final answer is 18"
    assert rec["reasoning_flags"] == []
    assert "reasoning" not in result


def test_think_block_is_stripped_before_scoring(isolated_env, tmp_path):
    content = "<think>Maybe 7? The final answer is 7. No: 16-3-4=9, 9*2=18.</think> The final answer is 18"
    with FakeOpenAI(responder=lambda body, n: Reply(content=content)) as srv:
        result, (rec,) = run_inproc(srv, tmp_path)
    assert rec["status"] == "ok"
    assert rec["extracted"] == {"strict-match": "18", "flexible-extract": "18"}
    assert rec["scores"] == {m: 1.0 for m in METRICS}
    assert rec["response"]["content"] == content  # logged raw


@pytest.mark.parametrize("keep_think", [False, True])
def test_keep_think_scores_the_raw_content(isolated_env, keep_think):
    # the answer is only inside the think block: right with --keep_think, wrong without
    content = "<think>16-3-4=9 and 9*2=18. The final answer is 18</think>\nI am not sure."
    with FakeOpenAI(responder=lambda body, n: Reply(content=content)) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 1,
                             "--no_progress", *(["--keep_think"] if keep_think else []))
    assert code == 0, err
    document = json.loads(out)
    assert document["config"]["keep_think"] is keep_think
    metrics = document["results"]["gsm8k_cot_llama"]["metrics"]
    assert metrics["exact_match,strict-match"] == (1.0 if keep_think else 0.0)
    assert metrics["exact_match,flexible-extract"] == (1.0 if keep_think else 0.0)


def test_answer_only_in_reasoning(isolated_env, tmp_path):
    reply = Reply(content="", reasoning_content="9 eggs at $2: The final answer is 18", finish_reason="stop")
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 3,
                             "--log_samples", tmp_path / "logs", "--no_progress")
    assert code == 1  # 3 of 3 failed
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["failures"] == {"empty": 3}
    assert result["reasoning"] == {"answer_only_in_reasoning": 3}
    records = read_log(tmp_path / "logs")
    assert [r["status"] for r in records] == ["empty"] * 3
    assert all(r["reasoning_flags"] == ["answer_only_in_reasoning"] for r in records)
    assert all(r["response"]["reasoning_content"] == "9 eggs at $2: The final answer is 18" for r in records)
    warning = [line for line in err.splitlines() if "reasoning channel" in line]
    # not truncated: raising max_tokens would not help, the reasoning parser is what to check
    assert len(warning) == 1 and "3 samples" in warning[0] and "reasoning parser" in warning[0]
    assert "max_tokens" not in warning[0]


def test_budget_ran_out_inside_think(isolated_env, tmp_path):
    reply = Reply(content="<think>Janet has 16 eggs. She eats three, so 13 remain. Then she bakes",
                  finish_reason="length")
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 2,
                             "--log_samples", tmp_path / "logs", "--no_progress")
    assert code == 0, err  # truncated samples are scored, not failures
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_truncated"] == 2 and result["num_failed"] == 0
    assert result["reasoning"] == {"budget_ran_out_in_reasoning": 2}
    records = read_log(tmp_path / "logs")
    assert all(r["status"] == "truncated" for r in records)
    assert all(r["reasoning_flags"] == ["budget_ran_out_in_reasoning"] for r in records)
    assert any("ran out of tokens" in line and "max_tokens" in line for line in err.splitlines())


def test_budget_ran_out_in_reasoning_channel(isolated_env, tmp_path):
    reply = Reply(content=None, reasoning_content="Janet has 16 eggs. She eats", finish_reason="length")
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        result, (rec,) = run_inproc(srv, tmp_path)
    assert rec["status"] == "empty"
    # the reasoning holds no "The final answer is N": no answer is only in the reasoning channel
    assert rec["reasoning_flags"] == ["budget_ran_out_in_reasoning"]
    assert result["reasoning"] == {"budget_ran_out_in_reasoning": 1}
    assert result["num_truncated"] == 1 and result["finish_reasons"] == {"length": 1}
