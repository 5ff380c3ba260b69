"""The sample log, replay, resume (after failures, kill -9, a torn last line), and SIGINT/SIGTERM.

The CLI runs as a subprocess (``python nano_eval.py ...``); the fakes run in this process, so the exact
bytes nano-eval sent are captured by wrapping ``fakes._parse_body``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fakes
from fakes import FakeOpenAI, Reply, cli, cli_command, gsm8k_args, question_of

ROOT = Path(__file__).resolve().parent.parent
NANO_EVAL = ROOT / "nano_eval.py"
GSM8K_ROWS = [json.loads(line) for line in
              (Path(__file__).parent / "fixtures" / "gsm8k" / "test.jsonl").read_text("utf-8").splitlines()[:60]]
ROW_OF = {row["question"]: i for i, row in enumerate(GSM8K_ROWS)}
GOLD = [row["answer"].split("####")[-1].strip() for row in GSM8K_ROWS]
LOG_NAME = "samples_gsm8k_cot_llama.jsonl"
RECORD_KEYS = {"task", "row_idx", "doc_hash", "body_hash", "url", "request", "response", "status", "error",
               "target", "extracted", "scores", "group", "image", "latency", "attempts", "reasoning_flags"}
RESPONSE_KEYS = {"content", "reasoning_content", "finish_reason", "usage", "http_status"}
WRONG = {1, 4, 9, 13, 17, 22}  # rows the standard responder answers wrongly (so metrics are not trivial)


# --- helpers ---------------------------------------------------------------------------------


def row_of(body) -> int:
    return ROW_OF[question_of(body)[1]]


def ByRow(plan=None, delay=None):
    """fakes.ByRow with this file's WRONG rows."""
    return fakes.ByRow(plan, wrong=WRONG, delay=delay)


def log_lines(log_dir: Path) -> list[str]:
    path = Path(log_dir) / LOG_NAME
    return path.read_text("utf-8").splitlines() if path.exists() else []


def records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in log_lines(log_dir)]


def comparable(result: dict) -> dict:
    """The parts of a task result that must not depend on how the run was split up."""
    keep = ("metrics", "num_samples", "num_ok", "num_truncated", "num_failed", "failures", "complete",
            "finish_reasons", "usage")
    return {k: result[k] for k in keep}


def uninterrupted(tmp_path, n) -> dict:
    """The results of one clean run of the first n rows with the standard responder."""
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=tmp_path / "clean_log"))
    assert code == 0, err
    return json.loads(out)["results"]["gsm8k_cot_llama"]


def wait_for(predicate, timeout=20.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# --- the sample log --------------------------------------------------------------------------


def test_sample_log_has_one_complete_line_per_sample(isolated_env, tmp_path, raw_bodies):
    plan = {
        2: Reply(status=400),
        3: Reply(content=f"The final answer is {GOLD[3]}", finish_reason="length"),
        5: [Reply(status=500), None],  # ok on the second attempt
        6: Reply(content="The answer: $1,234.50 maybe. The final answer is 7",
                 reasoning_content="hmm", usage={"prompt_tokens": 11, "completion_tokens": 7}),
    }
    responder = ByRow(plan, delay=0.05)
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=responder) as srv:
        code, out, err = cli(*gsm8k_args(srv, 8, "--max_fail_rate", 1, "--num_concurrent", 3, log_dir=log_dir))
        received = {row_of(r["body"]): r["body"] for r in srv.chat_requests}
    assert code == 0, err
    lines = log_lines(log_dir)
    assert len(lines) == 8  # one line per sample (the retry of row 5 is one line)
    recs = sorted((json.loads(line) for line in lines), key=lambda r: r["row_idx"])
    assert [r["row_idx"] for r in recs] == list(range(8))
    raw_by_row = {row_of(json.loads(raw)): raw for raw in raw_bodies}
    chat_url = srv.base_url + "/chat/completions"
    for rec in recs:
        row = rec["row_idx"]
        assert set(rec) >= RECORD_KEYS, RECORD_KEYS - set(rec)
        assert set(rec["response"]) >= RESPONSE_KEYS
        assert rec["task"] == "gsm8k_cot_llama" and rec["url"] == chat_url
        assert rec["target"] == GOLD[row]
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


def test_log_extracted_answers_differ_per_filter(isolated_env, tmp_path):
    # strict-match needs "The final answer is N"; flexible-extract takes the last number
    responder = ByRow({0: Reply(content="16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars"),
                       1: Reply(content="The final answer is 3 or maybe 4")})
    with FakeOpenAI(responder=responder) as srv:
        code, out, err = cli(*gsm8k_args(srv, 2, "--max_fail_rate", 1, log_dir=tmp_path / "logs"))
    assert code == 0, err
    recs = sorted(records(tmp_path / "logs"), key=lambda r: r["row_idx"])
    assert recs[0]["extracted"] == {"strict-match": "[invalid]", "flexible-extract": "18"}
    assert recs[0]["scores"] == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}
    assert GOLD[1] == "3"
    assert recs[1]["extracted"] == {"strict-match": "3", "flexible-extract": "4"}
    assert recs[1]["scores"] == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 0.0}
    metrics = json.loads(out)["results"]["gsm8k_cot_llama"]["metrics"]
    assert metrics["exact_match,strict-match"] == 0.5 and metrics["exact_match,flexible-extract"] == 0.5


def test_output_implies_a_sample_log_beside_it(isolated_env, tmp_path):
    output = tmp_path / "run" / "results.json"
    output.parent.mkdir()
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*gsm8k_args(srv, 4, "--max_fail_rate", 1), "--output", output)
    assert code == 0, err
    document = json.loads(out)
    assert json.loads(output.read_text("utf-8")) == document
    log_dir = tmp_path / "run" / "results_samples"
    assert document["config"]["log_samples"] == str(log_dir)
    assert sorted(r["row_idx"] for r in records(log_dir)) == [0, 1, 2, 3]


# --- replay ----------------------------------------------------------------------------------


def logged_run(tmp_path, srv, n=3):
    log_dir = tmp_path / "logs"
    code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 1, log_dir=log_dir))
    assert code == 0, err
    return log_dir / LOG_NAME


@pytest.mark.parametrize("line", [1, 3])
def test_replay_resends_exactly_the_logged_body(isolated_env, tmp_path, raw_bodies, line):
    with FakeOpenAI(responder=ByRow()) as srv:
        log = logged_run(tmp_path, srv)
        record = json.loads(log.read_text("utf-8").splitlines()[line - 1])
        original = [raw for raw in raw_bodies if row_of(json.loads(raw)) == record["row_idx"]]
        assert len(original) == 1
        before = len(raw_bodies)
        code, out, err = cli("replay", f"{log}:{line}")
        assert code == 0, err
        assert raw_bodies[before:] == original  # exactly one request, byte-identical
        assert len(srv.chat_requests) == 4
    response = json.loads(out)
    assert response["choices"][0]["message"]["content"] == record["response"]["content"]
    assert "HTTP 200" in err


def test_replay_to_another_server(isolated_env, tmp_path, raw_bodies):
    with FakeOpenAI(responder=ByRow()) as first, FakeOpenAI(responder=ByRow()) as second:
        log = logged_run(tmp_path, first)
        record = json.loads(log.read_text("utf-8").splitlines()[1])
        code, out, err = cli("replay", f"{log}:2", "--base_url", second.base_url)
        assert code == 0, err
        assert len(first.chat_requests) == 3 and len(second.chat_requests) == 1
        assert second.chat_requests[0]["body"] == record["request"]
        assert raw_bodies[-1] == json.dumps(record["request"]).encode()


def test_replay_reports_a_failing_server(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        log = logged_run(tmp_path, srv)
        srv.responder = lambda body, n: Reply(status=503)
        code, out, err = cli("replay", f"{log}:1")
    assert code == 3
    assert "HTTP 503" in err
    assert "fake error 503" in out


@pytest.mark.parametrize("where", ["{log}:0", "{log}:99", "{log}", "{log}:x", "{tmp}/nope.jsonl:1"])
def test_replay_bad_locations_are_usage_errors(isolated_env, tmp_path, where):
    with FakeOpenAI(responder=ByRow()) as srv:
        log = logged_run(tmp_path, srv)
        code, out, err = cli("replay", where.format(log=log, tmp=tmp_path))
        assert len(srv.chat_requests) == 3  # nothing sent
    assert code == 2
    assert len([ln for ln in err.splitlines() if ln.startswith("nano-eval: error:")]) == 1
    assert "Traceback" not in err


def test_replay_curl_prints_a_runnable_command(isolated_env, tmp_path, raw_bodies, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    key = "sk-CURL-SECRET-42"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with FakeOpenAI(responder=ByRow(), api_key=key) as srv:
        log = logged_run(tmp_path, srv)
        record = json.loads(log.read_text("utf-8").splitlines()[0])
        before = len(srv.chat_requests)
        code, out, err = cli("replay", f"{log}:1", "--curl")
        assert code == 0, err
        assert len(srv.chat_requests) == before  # --curl sends nothing
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("curl ")
        assert record["url"] in lines[0]
        assert key not in out and key not in err  # the key is referenced as $OPENAI_API_KEY
        assert "$OPENAI_API_KEY" in lines[0]
        # the body file the command points at holds exactly the logged body
        words = shlex.split(lines[0])
        body_file = next(w[1:] for w in words if w.startswith("@"))
        assert Path(body_file).read_bytes() == json.dumps(record["request"]).encode()
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed: the command was checked but not run")
        n = len(raw_bodies)
        proc = subprocess.run(["sh", "-c", lines[0]], capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert raw_bodies[n:] == [json.dumps(record["request"]).encode()]
        assert srv.chat_requests[-1]["status"] == 200  # the key was accepted
    reply = json.loads(proc.stdout)
    assert reply["choices"][0]["message"]["content"] == record["response"]["content"]


# --- resume ----------------------------------------------------------------------------------


def test_resume_sends_only_failed_samples_and_matches_a_clean_run(isolated_env, tmp_path):
    n = 12
    log_dir = tmp_path / "logs"
    faulty = ByRow({2: Reply(status=500), 5: Reply(raw=b"<html>busy</html>"), 9: Reply(content=None),
                    10: Reply(status=400)})
    with FakeOpenAI(responder=faulty) as srv:
        port = srv.port  # the reruns restart "the same server": resume is per server URL
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--max_retries", 1, log_dir=log_dir))
    assert code == 0, err  # --max_fail_rate 1
    first = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert first["failures"] == {"bad_response": 1, "empty": 1, "http_400": 1, "http_500": 1}
    assert len(log_lines(log_dir)) == n

    healthy = ByRow()
    with FakeOpenAI(responder=healthy, port=port) as srv:  # restarted, now healthy: the bodies are the same
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--max_retries", 1, log_dir=log_dir))
    assert code == 0, err
    assert sorted(healthy.rows) == [2, 5, 9, 10]  # only the failed samples were sent again
    assert "resuming" in err
    resumed = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert comparable(resumed) == comparable(uninterrupted(tmp_path, n))
    assert resumed["failures"] == {} and resumed["complete"] is True
    assert len(log_lines(log_dir)) == n + 4  # the new records were appended

    again = ByRow()
    with FakeOpenAI(responder=again, port=port) as srv:  # everything answered: nothing is sent
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    assert again.rows == []
    assert comparable(json.loads(out)["results"]["gsm8k_cot_llama"]) == comparable(resumed)


def test_resume_with_other_settings_sends_everything(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        port = srv.port
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    responder = ByRow()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, "--seed", 99, log_dir=log_dir))
    assert code == 0, err
    assert sorted(responder.rows) == [0, 1, 2, 3, 4]  # a different body is a different request
    assert all(body["seed"] == 99 for body in (r["body"] for r in srv.chat_requests))


def test_resume_skips_a_torn_last_line(isolated_env, tmp_path):
    n = 6
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        port = srv.port
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 1, log_dir=log_dir))
    assert code == 0, err
    lines = log_lines(log_dir)
    torn_row = json.loads(lines[-1])["row_idx"]
    path = log_dir / LOG_NAME
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")
    responder = ByRow()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    assert responder.rows == [torn_row]
    assert comparable(json.loads(out)["results"]["gsm8k_cot_llama"]) == comparable(uninterrupted(tmp_path, n))


def test_kill_9_then_rerun_gives_the_uninterrupted_metrics(isolated_env, tmp_path):
    n = 24
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow(delay=0.15)) as srv:
        port = srv.port
        proc = subprocess.Popen(cli_command(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 2, log_dir=log_dir)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: len(log_lines(log_dir)) >= 6), "no samples were logged"
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = records(log_dir)  # every line is complete JSON: lines are written whole and flushed
    done = {r["row_idx"] for r in before if r["status"] in ("ok", "truncated")}
    assert 6 <= len(done) < n

    responder = ByRow()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    assert sorted(responder.rows) == sorted(set(range(n)) - done)  # every sample accounted for, none twice
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == n and result["complete"] is True
    assert comparable(result) == comparable(uninterrupted(tmp_path, n))


# --- SIGINT / SIGTERM ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_exits_130_with_partial_results(isolated_env, tmp_path, sig):
    n = 20
    log_dir = tmp_path / "logs"
    output = tmp_path / "results.json"
    # rows 0-3 answer at once; every later request hangs (requests stay in flight)
    responder = ByRow({row: Reply(hang=True) for row in range(4, n)})
    with FakeOpenAI(responder=responder) as srv:
        port = srv.port
        proc = subprocess.Popen(cli_command(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 4, "--output", output, log_dir=log_dir)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: len(log_lines(log_dir)) >= 4 and srv.in_flight >= 4), "run did not start"
            start = time.monotonic()
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=20)
            elapsed = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    assert proc.returncode == 130, err
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
    responder = ByRow()
    with FakeOpenAI(responder=responder, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 4, "--output", output, log_dir=log_dir))
    assert code == 0, err
    assert sorted(responder.rows) == list(range(4, n))
    final = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert final["complete"] is True and final["num_samples"] == n
    assert comparable(final) == comparable(uninterrupted(tmp_path, n))


def test_a_sample_log_holds_one_server(isolated_env, tmp_path):
    """Another server's answers are never reused, nor mixed into the same log (compare and replay
    read a log as one run)."""
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    other = ByRow()
    with FakeOpenAI(responder=other) as srv:  # another URL
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, log_dir=log_dir))
    lines = [line for line in err.splitlines() if line.startswith("nano-eval: error:")]
    assert code == 2 and len(lines) == 1 and "holds samples from" in lines[0], err
    assert other.rows == [] and len(log_lines(log_dir)) == 5


def test_no_resume_sends_everything_again(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        port = srv.port
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    again = ByRow()
    with FakeOpenAI(responder=again, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, "--no_resume", log_dir=log_dir))
    assert code == 0, err
    assert sorted(again.rows) == [0, 1, 2, 3, 4]
    resumed = ByRow()
    with FakeOpenAI(responder=resumed, port=port) as srv:
        code, out, err = cli(*gsm8k_args(srv, 5, "--max_fail_rate", 1, log_dir=log_dir))
    assert code == 0, err
    assert resumed.rows == [] and json.loads(out)["results"]["gsm8k_cot_llama"]["num_reused"] == 5
