"""Issue 11: nothing the user ran is ever lost. One test (or a few) per numbered defect, each
reproducing it against a fake server: several servers with one unreachable (1), a later task's
failure after one finished (2), a stdout that is not UTF-8 (3), long Retry-After waits (4),
reasoning accounting (5), oversized responses (6), and error texts that name the real cause (7).

The CLI runs as a subprocess (``python nano_eval.py ...``) where exit codes, stdout and stderr
matter; in-process runs use ``run_task`` with a small ``retry_base_delay``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fakes import cli, error_lines, read_log, run_inproc, warning_lines
from fakes import (GSM8K, ByRow, FakeDatasetsServer, FakeOpenAI, Reply, free_port, gsm8k_row_of, question_of,
                   send_chunked, serve_https)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nano_eval  # noqa: E402
from nano_eval import APIConfig, TASKS, UsageError  # noqa: E402

NANO_EVAL = ROOT / "nano_eval.py"
GSM = ["--tasks", "gsm8k_cot_llama", "--no_progress"]
TASK = TASKS["gsm8k_cot_llama"]






@pytest.fixture
def no_ca_env(monkeypatch):
    """No CA bundle from the environment: the test certificate is not trusted unless a test says so."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


# --- 1. several --base_url, one unreachable ---------------------------------------------------


@pytest.mark.parametrize("closed_first", [True, False], ids=["unreachable-first", "unreachable-last"])
def test_an_unreachable_server_does_not_stop_the_others(isolated_env, tmp_path, closed_first):
    port = free_port()
    closed = f"http://127.0.0.1:{port}/v1"
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=ByRow()) as srv:
        urls = [closed, srv.base_url] if closed_first else [srv.base_url, closed]
        code, out, err = cli(*GSM, "--base_url", urls[0], "--base_url", urls[1], "--max_samples", 5,
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


# --- 2. a later step's failure does not discard earlier results ------------------------------


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
    init = nano_eval.DatasetsClient.__init__
    monkeypatch.setattr(nano_eval.DatasetsClient, "__init__",
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


# --- 3. a stdout that is not UTF-8 -----------------------------------------------------------


def test_results_reach_a_cp1252_stdout(isolated_env, tmp_path):
    instruction = "请一步一步思考"
    model = "fake-model-\U0001f680-ü"
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=ByRow()) as srv:
        proc = subprocess.run([sys.executable, str(NANO_EVAL), *GSM, "--base_url", srv.base_url, "--max_samples", "2",
                               "--system_instruction", instruction, "--model", model, "--output", str(output)],
                              capture_output=True, timeout=60, env={**os.environ, "PYTHONIOENCODING": "cp1252"})
        chat = srv.chat_requests
    err = proc.stderr.decode("cp1252", "replace")
    assert proc.returncode == 0, err
    assert "internal error" not in err and "Traceback" not in err
    document = json.loads(proc.stdout.decode("cp1252"))
    assert document["config"]["system_instruction"] == instruction
    assert document["config"]["model"] == model
    assert document["results"]["gsm8k_cot_llama"]["num_ok"] == 2
    assert json.loads(output.read_text("utf-8")) == document  # the file is UTF-8 whatever stdout is
    assert instruction in output.read_text("utf-8")
    assert [r["body"]["messages"][0] for r in chat] == [{"role": "system", "content": instruction}] * 2
    assert all(r["body"]["model"] == model for r in chat)
    table = [line for line in err.splitlines() if line.startswith("task ") or line.startswith("gsm8k_cot_llama ")]
    assert len(table) >= 2 and "metric" in table[0] and "exact_match" in table[1]


# --- 4. long waits are announced, and Ctrl-C still stops at once ------------------------------


def interrupt_while_waiting(cmd: list) -> tuple:
    """Starts `cmd`, waits for its "waiting ..." notice on stderr, sends SIGINT: (the process,
    its stderr lines, the notice, stdout, seconds from SIGINT to exit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    announced = threading.Event()

    def read_stderr():
        for raw in proc.stderr:
            lines.append(raw.decode("utf-8", "replace"))
            if "waiting" in lines[-1]:
                announced.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert announced.wait(20), "".join(lines)
        notice = next(line for line in lines if "waiting" in line)
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)  # not communicate(): the reader thread owns stderr
        out = proc.stdout.read()
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    return proc, lines, notice, out, elapsed


def test_a_long_retry_after_is_announced_and_ctrl_c_stops_the_wait(isolated_env, tmp_path):
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=lambda body, n: Reply(status=429, headers={"Retry-After": "3600"})) as srv:
        proc, lines, notice, out, elapsed = interrupt_while_waiting(
            [sys.executable, str(NANO_EVAL), *GSM, "--base_url", srv.base_url, "--max_samples", "2",
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


def test_a_long_retry_after_from_the_datasets_server_is_announced_and_interruptible(isolated_env, fake_hf):
    """chartqa's rows are throttled with Retry-After: 3600: said on stderr, and Ctrl-C stops the wait."""
    fake_hf.faults.append({"path": "/rows", "status": 429, "headers": {"Retry-After": "3600"}, "times": 100})
    with FakeOpenAI() as srv:
        proc, lines, notice, out, elapsed = interrupt_while_waiting(
            [sys.executable, str(NANO_EVAL), "--tasks", "chartqa", "--no_progress", "--base_url", srv.base_url,
             "--max_samples", "2"])
        chat = len(srv.chat_requests)
    assert "datasets-server" in notice and "429" in notice
    assert "waiting 300 s" in notice and "Retry-After: 3600 s, capped at 300 s" in notice
    assert proc.returncode == 130, "".join(lines)
    assert elapsed < 5, elapsed
    assert len(fake_hf.rows_requests) == 1 and chat == 0
    document = json.loads(out)
    assert document["complete"] is False and document["interrupted"] is True


def test_short_waits_are_not_announced(isolated_env):
    with FakeOpenAI(responder=lambda body, n: Reply(status=429, headers={"Retry-After": "1"})) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 1, "--max_retries", 2,
                             "--max_fail_rate", 1)
    assert code == 0, err
    assert len(srv.chat_requests) == 2
    assert "waiting" not in err


# --- 5. reasoning accounting -----------------------------------------------------------------


def cli_one_sample(tmp_path, reply: Reply) -> tuple[int, dict, dict, str]:
    """(exit code, result, the sample record, stderr) of a one-sample CLI run answered with `reply`."""
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 1, "--log_samples", tmp_path / "l")
    (record,) = read_log(tmp_path / "l" / "samples_gsm8k_cot_llama.jsonl")
    return code, json.loads(out)["results"]["gsm8k_cot_llama"], record, err


def test_truncated_reasoning_without_an_answer_is_a_budget_problem(isolated_env, tmp_path):
    code, result, record, err = cli_one_sample(
        tmp_path, Reply(content="", reasoning_content="thinking... hmm", finish_reason="length"))
    assert code == 1  # the one sample is empty: a failure
    assert record["status"] == "empty"
    assert record["reasoning_flags"] == ["budget_ran_out_in_reasoning"]
    assert "answer_only_in_reasoning" not in result.get("reasoning", {})
    assert result["reasoning"] == {"budget_ran_out_in_reasoning": 1}
    assert result["finish_reasons"] == {"length": 1}
    assert result["num_truncated"] == 1
    budget = [line for line in warning_lines(err) if "ran out of tokens" in line]
    assert len(budget) == 1 and "max_tokens" in budget[0]
    assert not [line for line in warning_lines(err) if "reasoning channel" in line]


def test_null_content_keeps_its_finish_reason(isolated_env, tmp_path):
    code, result, record, err = cli_one_sample(tmp_path, Reply(content=None, finish_reason="stop"))
    assert record["status"] == "empty" and record["response"]["finish_reason"] == "stop"
    assert result["finish_reasons"] == {"stop": 1}
    assert result["num_truncated"] == 0
    assert record["reasoning_flags"] == [] and "reasoning" not in result


def test_an_answer_only_in_the_reasoning_is_flagged_without_max_tokens_advice(isolated_env, tmp_path):
    code, result, record, err = cli_one_sample(
        tmp_path, Reply(content="", reasoning_content="The final answer is 18", finish_reason="stop"))
    assert record["reasoning_flags"] == ["answer_only_in_reasoning"]
    assert result["reasoning"] == {"answer_only_in_reasoning": 1}
    assert result["finish_reasons"] == {"stop": 1} and result["num_truncated"] == 0
    advice = [line for line in warning_lines(err) if "reasoning channel" in line]
    assert len(advice) == 1 and "max_tokens" not in advice[0]
    assert not [line for line in warning_lines(err) if "ran out of tokens" in line]


# --- 6. oversized responses ------------------------------------------------------------------

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
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 4, "--num_concurrent", 1,
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


# --- 7. error texts that name the cause ------------------------------------------------------


def test_a_hung_server_does_not_claim_unsent_samples_when_there_are_none(isolated_env, tmp_path):
    """Four samples, four in flight, all time out: the server is marked as not answering, but
    nothing was left unsent, so nothing may be said to be counted as unsent."""
    with FakeOpenAI(responder=lambda body, n: Reply(hang=True)) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 4, "--num_concurrent", 4,
                             "--timeout", 2, "--max_retries", 1, "--log_samples", tmp_path / "l")
        chat = len(srv.chat_requests)
    assert code == 1, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["failures"] == {"timeout": 4} and chat == 4
    assert "num_not_sent" not in result
    assert "remaining samples are counted" not in err
    assert "were not sent" not in err
    stopped = [line for line in warning_lines(err) if "stopped answering" in line]
    assert len(stopped) <= 1
    assert all("no more requests are sent" in line for line in stopped)


def test_a_hung_server_counts_the_samples_it_did_not_send(isolated_env, tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(hang=True)) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 16, "--num_concurrent", 4,
                             "--timeout", 2, "--max_retries", 1, "--log_samples", tmp_path / "l")
        chat = len(srv.chat_requests)
    assert code == 1, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    records = read_log(tmp_path / "l" / "samples_gsm8k_cot_llama.jsonl")
    unsent = [r for r in records if r["attempts"] == 0]
    assert unsent and len(unsent) == 16 - chat
    assert result["num_not_sent"] == len(unsent)
    assert all(r["status"] == "connection" and "not sent" in r["error"] for r in unsent)
    told = [line for line in warning_lines(err) if "were not sent" in line]
    assert len(told) == 1 and f"{len(unsent)} samples were not sent" in told[0]
    assert len([line for line in warning_lines(err) if "no more requests are sent" in line]) == 1


def test_a_self_signed_certificate_is_named_with_the_ways_out(isolated_env, no_ca_env):
    with serve_https(FakeOpenAI(responder=ByRow())) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 2, timeout=30)
        chat = len(srv.chat_requests)
    assert code == 3, err
    (line,) = error_lines(err)
    assert "certificate" in line and "failed verification" in line
    assert "--ca_cert" in line and "SSL_CERT_FILE" in line and "--insecure" in line
    assert "is the server running" not in line
    assert "Traceback" not in err and out == "" and chat == 0


def test_https_to_a_plain_http_port_says_so(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url.replace("http://", "https://"), "--max_samples", 2,
                             timeout=30)
    assert code == 3, err
    (line,) = error_lines(err)
    assert "plain http" in line and "http://" in line
    assert "WRONG_VERSION_NUMBER" not in line and "is the server running" not in line
