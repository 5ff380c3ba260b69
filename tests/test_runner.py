"""Runner: run_task sends every sample, logs it, and never loses work.

One complete sample-log line per sample (request, response, status, extracted answers, scores);
failed samples stay in the denominator; a server that dies or hangs is given up without claiming
samples it never sent; repeats are sent as repeated passes with seed + repeat at temperature > 0;
a rerun with the same log resends only what failed (after failures, kill -9, a torn last line or
SIGINT in any pass), and memory does not grow with the number of images.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fakes import GSM8K_ROWS, ROOT  # noqa: E402

import nano_eval as ne  # noqa: E402
from fakes import (ByRow, ByRowWithWrongRows, CHARTQA, FakeDatasetsServer, FakeOpenAI, FIXTURE_ROWS, GSM,  # noqa: E402
                   GSM8K_GOLD, GSM_ARGS, LOG_NAME, OTHER_RIGHT, Reply, WRONG, chart_row_of, cli, cli_env,
                   error_lines, gsm8k_args, gsm8k_first, gsm8k_row_of, image_of, image_url, interrupted_cli,
                   read_log, read_log_by_row, responder_for, right, run_chartqa, run_gsm8k_plain, run_inproc, sem,
                   synthetic_chartqa_dataset, warning_lines, run_main)
from nano_eval import APIConfig, TASKS, run_task  # noqa: E402


# --------------------------------------------------------------------------------------------
# run_task and the sample log
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


TIMINGS = ("elapsed", "total_seconds", "date", "latency_p50", "latency_p95", "output_tokens_per_second",
           "requests_per_second")


def timeless(document: dict) -> dict:
    """A results document without what differs between two runs of it: times, the date."""
    if isinstance(document, dict):
        return {k: timeless(v) for k, v in document.items() if k not in TIMINGS}
    if isinstance(document, list):
        return [timeless(v) for v in document]
    return document


@pytest.mark.parametrize("servers", [1, 2])
def test_python_api_evaluate_gives_the_cli_document_and_exit_code(isolated_env, tmp_path, capsys, servers):
    """evaluate(configs, RunOptions(...)): the same results document and exit code as the command
    line, without a Namespace; here with a failed sample (exit 1: more than --max_fail_rate) and,
    with two servers, their comparison."""
    right_answers = ByRow()

    def row_1_fails(body, n):
        return Reply(status=500) if gsm8k_row_of(body) == 1 else right_answers(body, n)

    with FakeOpenAI(responder=row_1_fails) as a, FakeOpenAI(responder=ByRow()) as b:
        urls = [a.base_url, b.base_url][:servers]
        argv = ["--tasks", GSM, "--max_samples", "4", "--no_progress", "--max_retries", "1", "--seed", "7"]
        argv += [arg for url in urls for arg in ("--base_url", url)]
        code, out, _ = run_main(argv + ["--log_samples", str(tmp_path / "cli")], capsys)
        options = ne.RunOptions(tasks=[TASKS[GSM]], max_samples=4, progress=False,
                                log_dir=tmp_path / "api")
        configs = [APIConfig(url=url, max_retries=1, seed=7) for url in urls]
        document, api_code = ne.evaluate(configs, options)
    assert code == api_code == 1
    cli_document = json.loads(out)
    as_cli = json.loads(json.dumps(document).replace(str(tmp_path / "api"), str(tmp_path / "cli")))
    import difflib
    a_, b_ = (json.dumps(timeless(d), indent=1, sort_keys=True).splitlines() for d in (as_cli, cli_document))
    assert a_ == b_, "\n".join(difflib.unified_diff(a_, b_, lineterm=""))




RECORD_KEYS = {"task", "row_idx", "doc_hash", "body_hash", "url", "request", "response", "status", "error",
               "target", "extracted", "scores", "group", "image", "latency", "attempts", "reasoning_flags"}

RESPONSE_KEYS = {"content", "reasoning_content", "finish_reason", "usage", "http_status"}


def log_lines(log_dir: Path) -> list[str]:
    path = Path(log_dir) / LOG_NAME
    return path.read_text("utf-8").splitlines() if path.exists() else []


def test_sample_log_has_one_complete_line_per_sample(isolated_env, tmp_path, raw_bodies):
    plan = {
        2: Reply(status=400),
        3: Reply(content=f"The final answer is {GSM8K_GOLD[3]}", finish_reason="length"),
        5: [Reply(status=500), None],  # ok on the second attempt
        6: Reply(content="The answer: $1,234.50 maybe. The final answer is 7",
                 reasoning_content="hmm", usage={"prompt_tokens": 11, "completion_tokens": 7}),
    }
    responder = ByRowWithWrongRows(plan, delay=0.05)
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=responder) as srv:
        code, out, err = cli(*gsm8k_args(srv, 8, "--max_fail_rate", 1, "--num_concurrent", 3, log_dir=log_dir))
        received = {gsm8k_row_of(r["body"]): r["body"] for r in srv.chat_requests}
    assert code == 0, err
    lines = log_lines(log_dir)
    assert len(lines) == 8  # one line per sample (the retry of row 5 is one line)
    recs = sorted((json.loads(line) for line in lines), key=lambda r: r["row_idx"])
    assert [r["row_idx"] for r in recs] == list(range(8))
    raw_by_row = {gsm8k_row_of(json.loads(raw)): raw for raw in raw_bodies}
    chat_url = srv.base_url + "/chat/completions"
    for rec in recs:
        row = rec["row_idx"]
        assert set(rec) >= RECORD_KEYS, RECORD_KEYS - set(rec)
        assert set(rec["response"]) >= RESPONSE_KEYS
        assert rec["task"] == "gsm8k_cot_llama" and rec["url"] == chat_url
        assert rec["target"] == GSM8K_GOLD[row]
        # the exact request: same JSON, same key order, same bytes, and body_hash is their sha256
        assert rec["request"] == received[row]
        assert json.dumps(rec["request"]).encode() == raw_by_row[row]
        assert rec["body_hash"] == hashlib.sha256(raw_by_row[row]).hexdigest()
        assert rec["request"]["messages"][-1]["content"].count(GSM8K_ROWS[row]["question"]) == 1
        assert isinstance(rec["latency"], (int, float)) and rec["latency"] >= 0.05  # the fake's delay
        assert rec["group"] is None and rec["image"] is None
        assert rec["reasoning_flags"] == []
    assert len({r["doc_hash"] for r in recs}) == 8 and len({r["body_hash"] for r in recs}) == 8
    by_row = {r["row_idx"]: r for r in recs}

    ok = by_row[0]
    assert ok["status"] == "ok" and ok["attempts"] == 1 and ok["error"] is None
    assert ok["response"]["content"] == "Let me think. The final answer is 18"
    assert ok["response"]["http_status"] == 200 and ok["response"]["finish_reason"] == "stop"
    assert ok["response"]["usage"]["completion_tokens"] == 8
    assert ok["extracted"] == {"strict-match": "18", "flexible-extract": "18"}
    assert ok["scores"] == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}

    wrong = by_row[1]
    assert wrong["extracted"] == {"strict-match": "0", "flexible-extract": "0"}
    assert wrong["scores"] == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.0}

    failed = by_row[2]
    assert failed["status"] == "http_400" and failed["attempts"] == 1
    assert failed["response"]["http_status"] == 400 and "fake error 400" in failed["error"]
    assert failed["extracted"] is None
    assert failed["scores"] == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.0}

    truncated = by_row[3]
    assert truncated["status"] == "truncated" and truncated["response"]["finish_reason"] == "length"
    assert truncated["scores"]["exact_match,strict-match"] == 1.0

    assert by_row[5]["status"] == "ok" and by_row[5]["attempts"] == 2

    mixed = by_row[6]  # reasoning_content and usage as the server sent them
    assert mixed["extracted"] == {"strict-match": "7", "flexible-extract": "7"}
    assert mixed["response"]["reasoning_content"] == "hmm"
    assert mixed["response"]["usage"] == {"prompt_tokens": 11, "completion_tokens": 7}


def records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in log_lines(log_dir)]


def test_log_extracted_answers_differ_per_filter(isolated_env, tmp_path):
    # strict-match needs "The final answer is N"; flexible-extract takes the last number
    responder = ByRowWithWrongRows({0: Reply(content="16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars"),
                       1: Reply(content="The final answer is 3 or maybe 4")})
    with FakeOpenAI(responder=responder) as srv:
        code, out, err = cli(*gsm8k_args(srv, 2, "--max_fail_rate", 1, log_dir=tmp_path / "logs"))
    assert code == 0, err
    recs = sorted(records(tmp_path / "logs"), key=lambda r: r["row_idx"])
    assert recs[0]["extracted"] == {"strict-match": "[invalid]", "flexible-extract": "18"}
    assert recs[0]["scores"] == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}
    assert GSM8K_GOLD[1] == "3"
    assert recs[1]["extracted"] == {"strict-match": "3", "flexible-extract": "4"}
    assert recs[1]["scores"] == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 0.0}
    metrics = json.loads(out)["results"]["gsm8k_cot_llama"]["metrics"]
    assert metrics["exact_match,strict-match"] == 0.5 and metrics["exact_match,flexible-extract"] == 0.5


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




@pytest.mark.parametrize("log_images", [False, True])
def test_sample_log_images(log_images, no_env, fake_hf, chart_server, tmp_path):
    run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 4, tmp_path / "data", fake_hf, log_dir=tmp_path / "log",
        log_images=log_images)
    log = read_log_by_row(tmp_path / "log")
    sent = {chart_row_of(r["body"]): r["body"] for r in chart_server.chat_requests}
    for i in range(4):
        data = image_of(i)
        digest = hashlib.sha256(data).hexdigest()
        rec = log[i]
        assert rec["image"] == {"sha256": digest, "bytes": len(data), "format": "png"}
        logged_url = image_url(rec["request"])
        if log_images:
            assert rec["request"] == sent[i]
        else:
            assert logged_url == f"<image sha256={digest} bytes={len(data)} format=png>"
            assert base64.b64encode(data).decode()[:200] not in json.dumps(rec)
            # everything but the image URL is the exact body sent
            stripped = json.loads(json.dumps(sent[i]).replace(image_url(sent[i]), logged_url))
            assert rec["request"] == stripped
        assert rec["status"] == "ok" and rec["target"] == FIXTURE_ROWS[i]["label"][0]
        assert rec["extracted"]["final_answer"] == FIXTURE_ROWS[i]["label"][0]
        assert rec["group"] == "human"
    size = (tmp_path / "log" / "samples_chartqa.jsonl").stat().st_size
    assert (size > 40_000) == log_images


def test_output_implies_a_sample_log_beside_it(isolated_env, tmp_path):
    output = tmp_path / "run" / "results.json"
    output.parent.mkdir()
    with FakeOpenAI(responder=ByRowWithWrongRows()) as srv:
        code, out, err = cli(*gsm8k_args(srv, 4, "--max_fail_rate", 1), "--output", output)
    assert code == 0, err
    document = json.loads(out)
    assert json.loads(output.read_text("utf-8")) == document
    log_dir = tmp_path / "run" / "results_samples"
    assert document["config"]["log_samples"] == str(log_dir)
    assert sorted(r["row_idx"] for r in records(log_dir)) == [0, 1, 2, 3]


def test_a_sample_log_holds_one_server(isolated_env, tmp_path):
    """Another server's answers are never reused, nor mixed into the same log (compare and replay
    read a log as one run)."""
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRowWithWrongRows()) as srv:
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    other = ByRowWithWrongRows()
    with FakeOpenAI(responder=other) as srv:  # another URL
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, log_dir=log_dir))
    lines = [line for line in err.splitlines() if line.startswith("nano-eval: error:")]
    assert code == 2 and len(lines) == 1 and "holds samples from" in lines[0], err
    assert other.rows == [] and len(log_lines(log_dir)) == 5


# --------------------------------------------------------------------------------------------
# Failed samples stay in the denominator
# --------------------------------------------------------------------------------------------


def test_failures_dict_and_headline_counts_failed_as_wrong(isolated_env, tmp_path):
    plan = {
        1: Reply(status=400),  # http_400
        2: Reply(content=None),  # empty
        3: Reply(raw=b"<html>oops</html>"),  # bad_response
        4: Reply(content=f"The final answer is {GSM8K_GOLD[4]}", finish_reason="length"),  # truncated, right
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


def test_failed_samples_score_zero_over_all_samples(isolated_env, tmp_path):
    """A failed sample (HTTP 400, not retried) counts as wrong; ",valid" excludes it."""
    rows = gsm8k_first(8)
    correct, failed = {0, 1, 2, 5}, {3}
    with FakeOpenAI(responder=responder_for(correct, rows, failed)) as server:
        config = APIConfig(url=server.base_url, model="fake-model", retry_base_delay=0.01)
        result = run_gsm8k_plain(config, 8, tmp_path)
        assert len(server.chat_requests) == 8  # 400 is never retried
    m = result["metrics"]
    values = [1.0 if i in correct else 0.0 for i in range(8)]
    assert m["exact_match"] == pytest.approx(4 / 8)
    assert m["exact_match_stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(8))
    assert m["exact_match,valid"] == pytest.approx(4 / 7)
    assert result["failures"] == {"http_400": 1}
    assert result["num_failed"] == 1 and result["num_ok"] == 7


def test_404_before_any_success_stops_the_run(isolated_env, tmp_path):
    """A wrong path or an unknown model: every request would fail the same way."""
    with FakeOpenAI(responder=lambda body, n: Reply(status=404)) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 20,
                             "--num_concurrent", 1, "--no_progress")
    assert code == 3, err
    assert "answered 404" in err and "check --base_url and --model" in err and "Traceback" not in err
    assert len(srv.chat_requests) == 1


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


def test_a_hung_server_is_given_up_like_a_dead_one(isolated_env):
    with FakeOpenAI(responder=lambda body, n: Reply(hang=True)) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 10, "--num_concurrent", 1,
                             "--timeout", "0.3", "--max_retries", 1, timeout=60)
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert code == 1 and result["num_samples"] == 10
    assert result["failures"] == {"connection": 6, "timeout": 4}  # 4 timeouts in a row, then not sent
    assert len(srv.chat_requests) == 4 and "stopped answering" in err


@pytest.mark.parametrize("retries", [5, 1])
def test_a_cancelled_run_ends_its_requests_in_flight(isolated_env, capsys, retries):
    """The Python API: cancelling run_task while its requests wait on a server that never
    answers (--timeout 600 s) ends them at once: no worker thread is left waiting, nothing more
    is sent, the requests are not resent on a fresh connection, and the cut requests are not
    taken for a server that stopped answering (even on their last attempt)."""
    def workers() -> list:
        return [t for t in threading.enumerate() if t.name.startswith("nano-eval-worker") and t.is_alive()]

    async def cancel_in_flight(srv) -> None:
        config = APIConfig(url=srv.base_url, num_concurrent=4, max_retries=retries)
        run = asyncio.ensure_future(run_task(TASKS[GSM], config, 8, progress=False))
        while len(srv.chat_requests) < 4:
            await asyncio.sleep(0.05)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    with FakeOpenAI(responder=lambda body, n: Reply(hang=True)) as srv:
        asyncio.run(cancel_in_flight(srv))
        deadline = time.monotonic() + 5
        while workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not workers(), workers()
        assert len(srv.chat_requests) == 4
    assert "stopped answering" not in capsys.readouterr().err


def hung_server_run(log_dir: Path, samples: int) -> tuple:
    """`samples` rows, 4 in flight, against a server that never answers (2 s timeout, one
    attempt): (exit code, the task's results, stderr, the chat requests the server saw)."""
    with FakeOpenAI(responder=lambda body, n: Reply(hang=True)) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", samples, "--num_concurrent", 4,
                             "--timeout", 2, "--max_retries", 1, "--log_samples", log_dir)
        chat = len(srv.chat_requests)
    return code, json.loads(out)["results"]["gsm8k_cot_llama"], err, chat


def test_a_hung_server_does_not_claim_unsent_samples_when_there_are_none(isolated_env, tmp_path):
    """Four samples, four in flight, all time out: the server is marked as not answering, but
    nothing was left unsent, so nothing may be said to be counted as unsent."""
    code, result, err, chat = hung_server_run(tmp_path / "l", 4)
    assert code == 1, err
    assert result["failures"] == {"timeout": 4} and chat == 4
    assert "num_not_sent" not in result
    assert "were not sent" not in err
    stopped = [line for line in warning_lines(err) if "stopped answering" in line]
    assert len(stopped) == 1 and "no more requests are sent" in stopped[0], err


def test_a_hung_server_counts_the_samples_it_did_not_send(isolated_env, tmp_path):
    code, result, err, chat = hung_server_run(tmp_path / "l", 16)
    assert code == 1, err
    records = read_log(tmp_path / "l" / "samples_gsm8k_cot_llama.jsonl")
    unsent = [r for r in records if r["attempts"] == 0]
    assert unsent and len(unsent) == 16 - chat
    assert result["num_not_sent"] == len(unsent)
    assert all(r["status"] == "connection" and "not sent" in r["error"] for r in unsent)
    told = [line for line in warning_lines(err) if "were not sent" in line]
    assert len(told) == 1 and f"{len(unsent)} samples were not sent" in told[0]
    assert len([line for line in warning_lines(err) if "no more requests are sent" in line]) == 1


# --------------------------------------------------------------------------------------------
# Repeats, as the runner sends them
# --------------------------------------------------------------------------------------------


STRICT, FLEX = "exact_match,strict-match", "exact_match,flexible-extract"


def test_repeats_deterministic_server(isolated_env, tmp_path):
    # 6 rows, rows 1 and 4 wrong, 3 repeats: every pass scores 4/6
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow(wrong={1, 4})) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 6, "--repeats", 3, "--log_samples", log_dir))
        bodies = [(gsm8k_row_of(r["body"]), r["body"]) for r in srv.chat_requests]
    assert rc == 0, err
    document = json.loads(out)
    assert document["config"]["repeats"] == 3
    result = document["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 18 and result["num_documents"] == 6 and result["num_ok"] == 18
    assert result["complete"] is True
    # the metrics are over the 6 documents (each the mean of its 3 repeats), not over 18 samples
    doc_scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert result["metrics"]["exact_match"] == pytest.approx(4 / 6)
    assert result["metrics"]["exact_match_stderr"] == pytest.approx(sem(doc_scores))
    assert sem(doc_scores) == pytest.approx(math.sqrt(4 / 90))  # var (4/3)/5 = 4/15, / 6
    repeats = result["repeats"]
    assert repeats["k"] == 3 and repeats["temperature"] == 0
    for name in (STRICT, FLEX):
        m = repeats["metrics"][name]
        assert m["per_repeat"] == pytest.approx([4 / 6] * 3)
        assert m["mean"] == pytest.approx(4 / 6) and m["sem"] == pytest.approx(0.0, abs=1e-12)
    assert repeats["self_agreement"] == {"documents": 6, "responses": 1.0, "scores": 1.0}
    assert "not deterministic" not in err
    # every row sent 3 times, with the very same body (temperature 0: same seed too)
    assert sorted(row for row, _ in bodies) == sorted(list(range(6)) * 3)
    for row in range(6):
        sent = [body for r, body in bodies if r == row]
        assert len(sent) == 3 and sent[0] == sent[1] == sent[2] and sent[0]["seed"] == 1234
    records = read_log(log_dir, sort=False)
    assert sorted((r["row_idx"], r["repeat"]) for r in records) == [(row, k) for row in range(6) for k in range(3)]




# Per-row script over 3 repeats (R right, W wrong, R' right with other text):
#   row 0: W R W     row 1: W W W     row 2: R W R     row 3: R W R
#   row 4: R R W     row 5: R R' R    rows 6-9: R R R
# pass 0 wrong {0, 1} -> 0.8; pass 1 wrong {1, 2, 3} -> 0.7; pass 2 wrong {0, 1, 4} -> 0.7
# mean 2.2 / 3 = 0.73333; SEM: deviations +1/15, -1/30, -1/30 -> var (1/225 + 2/900) / 2 = 1/300,
#   SEM = sqrt(1/300 / 3) = 1/30
# identical responses: rows 1, 6-9 -> 5/10; identical scores: rows 1, 5-9 -> 6/10
# document means: 1/3, 0, 2/3, 2/3, 2/3, 1, 1, 1, 1, 1 -> 7.3333 / 10 = 0.73333
FLAKY_PLAN = {0: [WRONG, right(0), WRONG], 1: [WRONG] * 3, 2: [right(2), WRONG, right(2)],
              3: [right(3), WRONG, right(3)], 4: [right(4), right(4), WRONG],
              5: [right(5), OTHER_RIGHT.format(GSM8K_GOLD[5]), right(5)]}


def test_repeats_flaky_server(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow(FLAKY_PLAN)) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10, "--repeats", 3, "--num_concurrent", 1))
        assert len(srv.chat_requests) == 30
    assert rc == 0, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 30 and result["num_documents"] == 10
    repeats = result["repeats"]
    strict = repeats["metrics"][STRICT]
    assert strict["per_repeat"] == pytest.approx([0.8, 0.7, 0.7])
    assert strict["mean"] == pytest.approx(2.2 / 3)
    assert strict["sem"] == pytest.approx(1 / 30)
    assert repeats["metrics"][FLEX]["per_repeat"] == pytest.approx([0.8, 0.7, 0.7])
    assert repeats["self_agreement"] == {"documents": 10, "responses": 0.5, "scores": 0.6}
    doc_means = [1 / 3, 0, 2 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1, 1]
    assert result["metrics"]["exact_match"] == pytest.approx(2.2 / 3)
    assert result["metrics"]["exact_match_stderr"] == pytest.approx(sem(doc_means))
    warnings = [line for line in err.splitlines() if "not deterministic" in line]
    assert warnings == ["nano-eval: warning: gsm8k_cot_llama: at temperature 0, only 50.0% of documents got the "
                        "same response in all 3 repeats: this backend is not deterministic at this concurrency; "
                        "read any comparison against this floor"]


def test_a_failed_request_is_not_reported_as_nondeterminism(isolated_env):
    # 4 rows x 2 repeats; every answer that comes back is the same text both times, but the second
    # request of row 0 fails (HTTP 500, no retry). The failure is reported as a failure; it says
    # nothing about whether the backend is deterministic, so the temperature-0 warning must not fire.
    with FakeOpenAI(responder=ByRow({0: [right(0), Reply(status=500)]})) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 4, "--repeats", 2, "--max_retries", 1, "--max_fail_rate", 1))
    assert rc == 0, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["failures"] == {"http_500": 1}
    assert "1 of 8 samples failed (http_500: 1)" in err
    assert [line for line in err.splitlines() if "not deterministic" in line] == []


def test_repeats_at_temperature_above_0_use_seed_plus_repeat(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    plan = {0: [right(0), WRONG, right(0)]}  # different answers, but sampling: no warning
    with FakeOpenAI(responder=ByRow(plan)) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 2, "--repeats", 3, "--gen_kwargs", "temperature=0.7", "--num_concurrent", 1, "--log_samples", log_dir))
        sent = [(gsm8k_row_of(r["body"]), r["body"]) for r in srv.chat_requests]
    assert rc == 0, err
    for row in (0, 1):
        bodies = [body for r, body in sent if r == row]
        assert [b["seed"] for b in bodies] == [1234, 1235, 1236]
        assert {b["temperature"] for b in bodies} == {0.7}
        # nothing else differs between the repeats
        assert [{k: v for k, v in b.items() if k != "seed"} for b in bodies] == \
            [{k: v for k, v in bodies[0].items() if k != "seed"}] * 3
    records = read_log(log_dir, sort=False)
    assert sorted((r["row_idx"], r["repeat"], r["request"]["seed"]) for r in records) == \
        [(row, k, 1234 + k) for row in (0, 1) for k in range(3)]
    assert len({r["body_hash"] for r in records}) == 6  # each repeat its own body
    repeats = json.loads(out)["results"]["gsm8k_cot_llama"]["repeats"]
    assert repeats["temperature"] == 0.7
    assert repeats["self_agreement"] == {"documents": 2, "responses": 0.5, "scores": 0.5}
    assert "not deterministic" not in err


def test_repeats_with_an_explicit_seed(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 1, "--repeats", 2, "--gen_kwargs", "temperature=1", "--seed", 7, "--num_concurrent", 1))
        assert [r["body"]["seed"] for r in srv.chat_requests] == [7, 8]
    assert rc == 0, err


def test_no_repeats_records_repeat_0_and_no_summary(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        result = run_inproc(srv, None, 3, log_dir=tmp_path / "logs")[0]
    assert "repeats" not in result and "num_documents" not in result
    assert [r["repeat"] for r in read_log(tmp_path / "logs", sort=False)] == [0, 0, 0]


def test_repeats_must_be_positive(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        with pytest.raises(ne.UsageError):
            run_inproc(srv, None, 3, log_dir=tmp_path / "logs", repeats=0)[0]
        rc, out, err = cli(*gsm8k_args(srv, 3, "--repeats", 0))
        assert srv.chat_requests == []
    assert rc == 2 and len(error_lines(err)) == 1


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def comparable(result: dict) -> dict:
    """The parts of a task result that must not depend on how the run was split up."""
    keep = ("metrics", "num_samples", "num_ok", "num_truncated", "num_failed", "failures", "complete",
            "finish_reasons", "usage")
    return {k: result[k] for k in keep}


def uninterrupted(tmp_path, n) -> dict:
    """The results of one clean run of the first n rows with the standard responder."""
    with FakeOpenAI(responder=ByRowWithWrongRows()) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=tmp_path / "clean_log"))
    assert code == 0, err
    return json.loads(out)["results"]["gsm8k_cot_llama"]


def test_resume_sends_only_failed_samples_and_matches_a_clean_run(isolated_env, tmp_path):
    n = 12
    log_dir = tmp_path / "logs"
    faulty = ByRowWithWrongRows({2: Reply(status=500), 5: Reply(raw=b"<html>busy</html>"), 9: Reply(content=None),
                    10: Reply(status=400)})
    with FakeOpenAI(responder=faulty) as srv:
        port = srv.port  # the reruns restart "the same server": resume is per server URL
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--max_retries", 1, log_dir=log_dir))
    assert code == 0, err  # --max_fail_rate 1
    first = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert first["failures"] == {"bad_response": 1, "empty": 1, "http_400": 1, "http_500": 1}
    assert len(log_lines(log_dir)) == n

    healthy = ByRowWithWrongRows()
    with FakeOpenAI(responder=healthy, port=port) as srv:  # restarted, now healthy: the bodies are the same
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--max_retries", 1, log_dir=log_dir))
    assert code == 0, err
    assert sorted(healthy.rows) == [2, 5, 9, 10]  # only the failed samples were sent again
    assert "resuming" in err
    resumed = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert comparable(resumed) == comparable(uninterrupted(tmp_path, n))
    assert resumed["failures"] == {} and resumed["complete"] is True
    assert len(log_lines(log_dir)) == n + 4  # the new records were appended

    again = ByRowWithWrongRows()
    with FakeOpenAI(responder=again, port=port) as srv:  # everything answered: nothing is sent
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    assert again.rows == []
    assert comparable(json.loads(out)["results"]["gsm8k_cot_llama"]) == comparable(resumed)


def logged_run(log_dir: Path, port: int = 0, *extra) -> tuple:
    """Five rows (some answered wrong) logged in log_dir, by a fresh server on `port` (the same
    URL as an earlier run): (the server, its responder, exit code, stdout, stderr)."""
    responder = ByRowWithWrongRows()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, *extra, log_dir=log_dir))
    return srv, responder, code, out, err


def test_resume_with_other_settings_sends_everything(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    srv, _, code, _, err = logged_run(log_dir)
    assert code == 0, err
    srv, responder, code, _, err = logged_run(log_dir, srv.port, "--seed", 99)
    assert code == 0, err
    assert sorted(responder.rows) == [0, 1, 2, 3, 4]  # a different body is a different request
    assert all(body["seed"] == 99 for body in (r["body"] for r in srv.chat_requests))


def test_resume_skips_a_torn_last_line(isolated_env, tmp_path):
    n = 6
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRowWithWrongRows()) as srv:
        port = srv.port
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 1, log_dir=log_dir))
    assert code == 0, err
    lines = log_lines(log_dir)
    torn_row = json.loads(lines[-1])["row_idx"]
    path = log_dir / LOG_NAME
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")
    responder = ByRowWithWrongRows()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    assert responder.rows == [torn_row]
    assert comparable(json.loads(out)["results"]["gsm8k_cot_llama"]) == comparable(uninterrupted(tmp_path, n))
    # the torn line was ended, not glued to the record appended after it (issue 23, item 3):
    # every other line parses, and a third run sends nothing
    lines = path.read_text("utf-8").splitlines()
    assert len(lines) == n + 1 and sum(1 for line in lines if not line.startswith("{") or not line.endswith("}")) == 1
    assert [json.loads(line)["row_idx"] for line in lines[n:]] == [torn_row]
    responder = ByRowWithWrongRows()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0 and responder.rows == [], err


def test_a_sample_log_ends_a_torn_line_only(tmp_path):
    """A new or empty log gets no blank first line; a torn last line is ended before the next record."""
    for before in (None, b"", b'{"a": 1}\n'):
        path = tmp_path / "samples_x.jsonl"
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)
        log = ne._SampleLog(path)
        log.write_lines(['{"c": 3}\n'])
        log.close()
        assert path.read_bytes() == (before or b"") + b'{"c": 3}\n'
    path.write_bytes(b'{"a": 1}\n{"b"')
    log = ne._SampleLog(path)
    log.write_lines(['{"c": 3}\n'])
    log.close()
    assert path.read_bytes() == b'{"a": 1}\n{"b"\n{"c": 3}\n'


def test_kill_9_then_rerun_gives_the_uninterrupted_metrics(isolated_env, tmp_path):
    n = 24
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRowWithWrongRows(delay=0.15)) as srv:
        port = srv.port
        killed, _ = interrupted_cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 2, log_dir=log_dir),
                                    when=lambda: len(log_lines(log_dir)) >= 6, what="no samples were logged",
                                    sig=signal.SIGKILL)  # no handler, no cleanup
    assert killed.code == -signal.SIGKILL
    before = records(log_dir)  # every line is complete JSON: lines are written whole and flushed
    done = {r["row_idx"] for r in before if r["status"] in ("ok", "truncated")}
    assert 6 <= len(done) < n

    responder = ByRowWithWrongRows()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    assert sorted(responder.rows) == sorted(set(range(n)) - done)  # every sample accounted for, none twice
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == n and result["complete"] is True
    assert comparable(result) == comparable(uninterrupted(tmp_path, n))


def test_no_resume_sends_everything_again(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    srv, _, code, _, err = logged_run(log_dir)
    assert code == 0, err
    _, again, code, _, err = logged_run(log_dir, srv.port, "--no_resume")
    assert code == 0, err
    assert sorted(again.rows) == [0, 1, 2, 3, 4]
    _, resumed, code, out, err = logged_run(log_dir, srv.port)
    assert code == 0, err
    assert resumed.rows == [] and json.loads(out)["results"]["gsm8k_cot_llama"]["num_reused"] == 5


def test_requests_per_second_counts_only_what_was_sent(isolated_env, tmp_path):
    with FakeOpenAI() as srv:
        port = srv.port
        cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 5, "--log_samples", tmp_path / "l")
    with FakeOpenAI(port=port) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 5, "--log_samples", tmp_path / "l")
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert code == 0 and result["num_reused"] == 5 and srv.chat_requests == []
    assert result["requests_per_second"] == 0 and result["latency_p50"] is None


# 10 rows x 2 repeats, one at a time. Row 0 always wrong; repeat 1 of rows 2 and 7 wrong.
# pass 0: 9/10 = 0.9; pass 1: 7/10 = 0.7 -> mean 0.8, SEM |0.9 - 0.7| / 2 = 0.1
# document means 0, 1, 0.5, 1, 1, 1, 1, 0.5, 1, 1 -> 0.8; identical responses and scores: 8/10
RESUME_DOCS = [0, 1, 0.5, 1, 1, 1, 1, 0.5, 1, 1]


def check_resume_result(result):
    assert result["num_samples"] == 20 and result["num_documents"] == 10 and result["num_ok"] == 20
    assert result["num_failed"] == 0 and result["complete"] is True
    assert result["metrics"]["exact_match"] == pytest.approx(0.8)
    assert result["metrics"]["exact_match_stderr"] == pytest.approx(sem(RESUME_DOCS))
    strict = result["repeats"]["metrics"][STRICT]
    assert strict["per_repeat"] == pytest.approx([0.9, 0.7])
    assert strict["mean"] == pytest.approx(0.8) and strict["sem"] == pytest.approx(0.1)
    assert result["repeats"]["self_agreement"] == {"documents": 10, "responses": 0.8, "scores": 0.8}


def test_resume_in_the_middle_of_a_repeated_run(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    # the first run: the second pass fails (HTTP 500) from row 5 on
    first_plan = {2: [right(2), WRONG], **{r: [right(r), Reply(status=500)] for r in range(5, 10)}}
    with FakeOpenAI(responder=ByRow(first_plan, wrong={0})) as srv:
        port = srv.port
        first = run_inproc(srv, None, 10, log_dir=log_dir, repeats=2, num_concurrent=1, max_retries=1)[0]
        assert len(srv.chat_requests) == 20
    assert first["num_samples"] == 20 and first["num_failed"] == 5 and first["failures"] == {"http_500": 5}
    assert first["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([0.9, 0.3])  # wrong 0, 2, 5-9
    logged = read_log(log_dir, sort=False)
    assert sorted((r["row_idx"], r["repeat"]) for r in logged if r["status"] != "ok") == \
        [(r, 1) for r in range(5, 10)]

    # the rerun sends only repeat 1 of rows 5-9; row 7 now answers wrong there
    responder = ByRow({7: WRONG}, wrong={0})
    with FakeOpenAI(responder=responder, port=port) as srv:  # the same URL: the log is this server's
        again = run_inproc(srv, None, 10, log_dir=log_dir, repeats=2, num_concurrent=1, max_retries=1)[0]
        assert len(srv.chat_requests) == 5
    assert sorted(responder.rows) == [5, 6, 7, 8, 9]
    assert again["num_reused"] == 15
    check_resume_result(again)
    records = read_log(log_dir, sort=False)
    assert len(records) == 25 and all("repeat" in r for r in records)
    last = {(r["row_idx"], r["repeat"]): r for r in records}
    assert sorted(last) == [(row, k) for row in range(10) for k in range(2)]
    assert all(r["status"] == "ok" for r in last.values())

    # the same numbers as a run that was never interrupted
    with FakeOpenAI(responder=ByRow({2: [right(2), WRONG], 7: [right(7), WRONG]}, wrong={0})) as srv:
        whole = run_inproc(srv, None, 10, log_dir=tmp_path / "whole", repeats=2, num_concurrent=1)[0]
    check_resume_result(whole)
    assert whole["num_reused"] == 0
    assert again["metrics"] == pytest.approx(whole["metrics"])
    assert again["repeats"] == whole["repeats"]


def test_sigint_in_the_second_pass_then_resume(isolated_env, tmp_path):
    # 6 rows x 2 repeats, 2 at a time; row 1 always wrong. The second requests of rows 3-5 hang, so at
    # the signal pass 0 is done (rows 0-5) and pass 1 has rows 0-2: 9 samples of 12.
    log_dir = tmp_path / "logs"
    hang = Reply(hang=True)
    responder = ByRow({r: [right(r), hang] for r in (3, 4, 5)}, wrong={1})
    with FakeOpenAI(responder=responder) as srv:
        port = srv.port
        (code, out, err), _ = interrupted_cli(
            *gsm8k_args(srv, 6, "--repeats", 2, "--num_concurrent", 2, log_dir=log_dir),
            when=lambda: (log_dir / LOG_NAME).exists() and len(read_log(log_dir, sort=False)) >= 9 and srv.in_flight >= 2,
            what="the run did not reach the second pass")
    assert code == 130, err
    partial = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert partial["complete"] is False and partial["num_samples"] == 9 and partial["num_planned"] == 12
    # pass 0: 5/6; pass 1 so far (rows 0-2): 2/3; only rows 0-2 have both repeats
    assert partial["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([5 / 6, 2 / 3])
    assert partial["repeats"]["self_agreement"] == {"documents": 3, "responses": 1.0, "scores": 1.0}
    assert sorted((r["row_idx"], r["repeat"]) for r in read_log(log_dir, sort=False)) == \
        [(row, k) for row in range(6) for k in range(2) if (row, k) not in {(3, 1), (4, 1), (5, 1)}]

    again = ByRow(wrong={1})
    with FakeOpenAI(responder=again, port=port) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 6, "--repeats", 2, "--num_concurrent", 2, log_dir=log_dir))
    assert rc == 0, err
    assert sorted(again.rows) == [3, 4, 5]
    final = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert final["complete"] is True and final["num_samples"] == 12 and final["num_reused"] == 9
    assert final["metrics"]["exact_match"] == pytest.approx(5 / 6)
    assert final["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([5 / 6, 5 / 6])
    assert final["repeats"]["self_agreement"] == {"documents": 6, "responses": 1.0, "scores": 1.0}


def test_resume_a_smaller_run_with_more_rows_and_repeats(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow(wrong={1})) as srv:
        port = srv.port
        rc, out, err = cli(*gsm8k_args(srv, 4, "--log_samples", log_dir))
        assert len(srv.chat_requests) == 4
    assert rc == 0, err
    # 6 rows x 2 repeats: rows 0-3 of repeat 0 are in the log; 12 - 4 = 8 requests remain
    responder = ByRow(wrong={1})
    with FakeOpenAI(responder=responder, port=port) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 6, "--log_samples", log_dir, "--repeats", 2))
        assert len(srv.chat_requests) == 8
    assert rc == 0, err
    assert responder.attempts == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2}
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_reused"] == 4 and result["num_samples"] == 12 and result["num_documents"] == 6
    records = read_log(log_dir, sort=False)
    assert sorted((r["row_idx"], r["repeat"]) for r in records) == [(row, k) for row in range(6) for k in range(2)]
    # equal to an uninterrupted run: 5/6 each pass
    with FakeOpenAI(responder=ByRow(wrong={1})) as srv:
        rc, out2, err2 = cli(*gsm8k_args(srv, 6, "--log_samples", tmp_path / "whole", "--repeats", 2))
    assert rc == 0, err2
    whole = json.loads(out2)["results"]["gsm8k_cot_llama"]
    assert result["metrics"] == whole["metrics"]
    assert result["metrics"]["exact_match"] == pytest.approx(5 / 6)
    assert result["repeats"] == whole["repeats"]
    assert result["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([5 / 6, 5 / 6])


def test_resume_a_log_written_before_repeats_existed(isolated_env, tmp_path):
    # an older log has no "repeat" in its records: they are repeat 0
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        port = srv.port
        run_inproc(srv, None, 3, log_dir=log_dir)[0]
    path = log_dir / LOG_NAME
    old = [{k: v for k, v in r.items() if k != "repeat"} for r in read_log(log_dir, sort=False)]
    path.write_text("".join(json.dumps(r) + "\n" for r in old), "utf-8")
    responder = ByRow()
    with FakeOpenAI(responder=responder, port=port) as srv:
        result = run_inproc(srv, None, 3, log_dir=log_dir, repeats=2)[0]
    assert sorted(responder.rows) == [0, 1, 2]
    assert result["num_reused"] == 3 and result["num_samples"] == 6


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_exits_130_with_partial_results(isolated_env, tmp_path, sig):
    n = 20
    log_dir = tmp_path / "logs"
    output = tmp_path / "results.json"
    # rows 0-3 answer at once; every later request hangs (requests stay in flight)
    responder = ByRowWithWrongRows({row: Reply(hang=True) for row in range(4, n)})
    with FakeOpenAI(responder=responder) as srv:
        port = srv.port
        (code, out, err), elapsed = interrupted_cli(
            *gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 4, "--output", output, log_dir=log_dir),
            when=lambda: len(log_lines(log_dir)) >= 4 and srv.in_flight >= 4, what="run did not start", sig=sig)
    assert code == 130, err
    assert elapsed < 10, elapsed  # requests in flight on a hanging server do not hold the exit
    assert "Traceback" not in err
    document = json.loads(out)
    assert document["complete"] is False
    assert json.loads(output.read_text("utf-8")) == document
    result = document["results"]["gsm8k_cot_llama"]
    assert result["complete"] is False
    assert result["num_samples"] == 4 and result["num_planned"] == n
    assert result["num_ok"] == 4 and result["failures"] == {}
    assert sorted(r["row_idx"] for r in records(log_dir)) == [0, 1, 2, 3]

    # the same command again resumes: only the 16 unfinished samples are sent
    responder = ByRowWithWrongRows()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 4, "--output", output, log_dir=log_dir))
    assert code == 0, err
    assert sorted(responder.rows) == list(range(4, n))
    final = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert final["complete"] is True and final["num_samples"] == n
    assert comparable(final) == comparable(uninterrupted(tmp_path, n))


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


DRIVER = r"""
import contextlib, io, json, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
import nano_eval
tracemalloc.start()
with contextlib.redirect_stdout(io.StringIO()):
    code = nano_eval.main(sys.argv[2:])
print("PEAK", json.dumps({"code": code, "peak": tracemalloc.get_traced_memory()[1]}), file=sys.stderr)
"""


def peak_memory(n: int, tmp_path: Path, hf, oa, log: bool) -> int:
    args = ["--tasks", "chartqa", "--base_url", oa.base_url, "--max_samples", str(n), "--no_progress",
            "--max_fail_rate", "1"]
    if log:
        args += ["--log_samples", tmp_path / f"log{n}"]
    env = cli_env(tmp_path, hf)
    env["NANO_EVAL_DATA_DIR"] = str(tmp_path / f"data{n}")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK ")]
    assert line, proc.stderr
    report = json.loads(line[0][5:])
    assert report["code"] == 0, proc.stderr
    return report["peak"]


@pytest.mark.parametrize("log", [False, True], ids=["no_log", "log_samples"])
def test_peak_memory_does_not_grow_with_images(log, tmp_path):
    spec = synthetic_chartqa_dataset(300, 128, 128, noise=True)
    assert len(spec.rows[0]["image"]) > 45_000  # ~48 KB per image, ~14 MB for 300
    with FakeDatasetsServer({CHARTQA: spec}) as hf, FakeOpenAI() as oa:
        peak_100 = peak_memory(100, tmp_path, hf, oa, log)
        peak_300 = peak_memory(300, tmp_path, hf, oa, log)
    assert peak_300 < peak_100 * 1.5 + 1_500_000, (peak_100, peak_300)


# --------------------------------------------------------------------------------------------
# --logprobs K (issue 22): asked for after lm-eval's own fields, logged compactly, resumed
# --------------------------------------------------------------------------------------------

from fakes import LogprobModel  # noqa: E402


def test_logprobs_are_asked_for_after_lm_evals_fields_and_logged(tmp_path):
    with FakeOpenAI(responder=LogprobModel(seed=1)) as srv:
        proc = cli("--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 3, "--no_progress",
                   "--log_samples", tmp_path / "log", "--logprobs", 2)
        bodies = [r["body"] for r in srv.chat_requests]
    assert proc.returncode == 0, proc.stderr
    assert list(bodies[0]) == ["messages", "model", "max_tokens", "temperature", "stop", "seed", "logprobs",
                               "top_logprobs"]
    assert all(b["logprobs"] is True and b["top_logprobs"] == 2 for b in bodies)
    records = read_log(tmp_path / "log")
    first = records[0]["response"]["logprobs"]
    assert first[0] == ["Let", first[0][1], [["Let", first[0][1]], ["Letx", first[0][1] - 1.0]]]
    assert first[-1][0] == "<|im_end|>" and len(first) == 10
    assert json.loads(proc.stdout)["config"]["logprobs"] == 2


def test_logprobs_resume_on_the_same_server_sends_nothing_again(tmp_path):
    model = LogprobModel(seed=1)
    with FakeOpenAI(responder=model) as srv:
        args = ["--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 4, "--no_progress",
                "--log_samples", tmp_path / "log", "--logprobs", 3]
        assert cli(*args).returncode == 0
        assert len(srv.chat_requests) == 4
        proc = cli(*args)
        assert proc.returncode == 0 and len(srv.chat_requests) == 4, proc.stderr
        # without --logprobs the bodies differ: those samples are sent again, not mixed up
        proc = cli(*args[:-2])
        assert proc.returncode == 0 and len(srv.chat_requests) == 8
    records = read_log(tmp_path / "log")
    assert sum(1 for r in records if "logprobs" in r["response"]) == 4


@pytest.mark.parametrize("k", ["0", "21", "x", "2.5", "true"])
def test_logprobs_k_out_of_range_is_a_usage_error(k):
    proc = cli("--tasks", GSM, "--base_url", "http://127.0.0.1:9/v1", "--logprobs", k)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(error_lines(proc.stderr)) == 1 and "from 1 to 20" in proc.stderr, proc.stderr
    proc = cli("--tasks", GSM, "--model_args", f"base_url=http://127.0.0.1:9/v1,logprobs={k}")
    assert proc.returncode == 2 and "logprobs: expected an integer from 1 to 20" in proc.stderr, proc.stderr


def test_logprobs_as_a_model_arg(tmp_path):
    with FakeOpenAI(responder=LogprobModel(seed=1)) as srv:
        proc = cli("--tasks", GSM, "--max_samples", 2, "--no_progress",
                   "--model_args", f"base_url={srv.base_url},logprobs=4")
        assert [r["body"]["top_logprobs"] for r in srv.chat_requests] == [4, 4]
    assert proc.returncode == 0, proc.stderr


def test_a_server_that_ignores_logprobs_is_reported_once_and_the_run_goes_on(tmp_path):
    with FakeOpenAI(responder=LogprobModel(seed=1, send_logprobs=False)) as srv:
        proc = cli("--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 5, "--no_progress",
                   "--log_samples", tmp_path / "log", "--logprobs", 5, "--num_concurrent", 2)
    assert proc.returncode == 0, proc.stderr
    warnings = [w for w in warning_lines(proc.stderr) if "logprobs" in w]
    assert warnings == [f"nano-eval: warning: {srv.base_url}/chat/completions answered without logprobs although "
                        "asked for them: this run's numerics verdict will be 'unknown'"]
    assert json.loads(proc.stdout)["results"][GSM]["num_samples"] == 5
    assert all("logprobs" not in r["response"] for r in read_log(tmp_path / "log"))


def test_a_server_that_refuses_logprobs_is_asked_without_them(tmp_path):
    model = LogprobModel(seed=1)

    def refusing(body, n):
        if body.get("logprobs"):
            return Reply(status=400, json_body={"error": {"message": "logprobs is not supported", "code": 400}})
        return model(body, n)

    with FakeOpenAI(responder=refusing) as srv:
        proc = cli("--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 6, "--no_progress",
                   "--log_samples", tmp_path / "log", "--logprobs", 5, "--num_concurrent", 1)
        sent = [bool(r["body"].get("logprobs")) for r in srv.chat_requests]
    assert proc.returncode == 0, proc.stderr
    assert sent == [True, False, False, False, False, False, False]  # the refused one, resent without
    warnings = [w for w in warning_lines(proc.stderr) if "logprobs" in w]
    assert len(warnings) == 1 and "refused logprobs (logprobs is not supported)" in warnings[0], proc.stderr
    records = read_log(tmp_path / "log")
    assert [r["status"] for r in records] == ["ok"] * 6
    assert all("logprobs" not in r["request"] for r in records)
