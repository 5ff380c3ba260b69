"""Replay: `nano-eval replay LOG[:LINE]` resends exactly the logged body.

Byte for byte, to the logged server or another one, with the headers of the run (never printed),
the seed of its repeat; `--curl` prints a runnable command; bad locations and files that are not
sample logs are usage errors.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest


from fakes import (ByRow, ByRowWithWrongRows, FakeOpenAI, GSM_ARGS, LOG_NAME, Reply, cli, gsm8k_args,  # noqa: E402
                   gsm8k_row_of, one_error, read_log)


def logged_run(tmp_path, srv, n=3):
    log_dir = tmp_path / "logs"
    code, out, err = cli(*gsm8k_args(srv, n, "--max_fail_rate", 1, "--num_concurrent", 1, log_dir=log_dir))
    assert code == 0, err
    return log_dir / LOG_NAME


@pytest.mark.parametrize("line", [1, 3])
def test_replay_resends_exactly_the_logged_body(isolated_env, tmp_path, raw_bodies, line):
    with FakeOpenAI(responder=ByRowWithWrongRows()) as srv:
        log = logged_run(tmp_path, srv)
        record = json.loads(log.read_text("utf-8").splitlines()[line - 1])
        original = [raw for raw in raw_bodies if gsm8k_row_of(json.loads(raw)) == record["row_idx"]]
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
    with FakeOpenAI(responder=ByRowWithWrongRows()) as first, FakeOpenAI(responder=ByRowWithWrongRows()) as second:
        log = logged_run(tmp_path, first)
        record = json.loads(log.read_text("utf-8").splitlines()[1])
        code, out, err = cli("replay", f"{log}:2", "--base_url", second.base_url)
        assert code == 0, err
        assert len(first.chat_requests) == 3 and len(second.chat_requests) == 1
        assert second.chat_requests[0]["body"] == record["request"]
        assert raw_bodies[-1] == json.dumps(record["request"]).encode()


def test_replay_a_later_repeat_resends_its_own_seed(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 1, "--repeats", 2, "--gen_kwargs", "temperature=0.5", "--log_samples", log_dir))
        assert rc == 0, err
        records = read_log(log_dir, sort=False)
        line = 1 + next(i for i, r in enumerate(records) if r["repeat"] == 1)
        rc, out, err = cli("replay", f"{log_dir / LOG_NAME}:{line}")
        assert rc == 0, err
        assert len(srv.chat_requests) == 3 and srv.chat_requests[-1]["body"]["seed"] == 1235
        assert srv.chat_requests[-1]["body"] == records[line - 1]["request"]


def test_replay_sends_the_header(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1, "--log_samples", tmp_path / "l")
        assert code == 0, err
        code, out, err = cli("replay", f"{tmp_path / 'l' / 'samples_gsm8k_cot_llama.jsonl'}:1",
                             "--header", "X-Gateway-Token: s3cr3t-value")
        last = srv.chat_requests[-1]
    assert code == 0, err
    assert last["headers"].get("X-Gateway-Token") == "s3cr3t-value"
    assert "s3cr3t-value" not in out + err


def test_replay_does_not_print_a_header_value_the_server_echoes(isolated_env, tmp_path):
    """Header values are never printed: not even when a gateway quotes the token in its error."""
    value = "replayed-gateway-s3cr3t"
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1, "--log_samples", tmp_path / "l")
        assert code == 0, err
        srv.responder = lambda body, n: Reply(status=401, json_body={"error": {"message": f"bad token {value}"}})
        code, out, err = cli("replay", f"{tmp_path / 'l' / 'samples_gsm8k_cot_llama.jsonl'}:1",
                             "--header", f"X-Gateway-Token: {value}")
        got = srv.chat_requests[-1]["headers"].get("X-Gateway-Token")
    assert got == value  # it was sent
    assert "bad token" in out + err  # the server's answer is shown
    assert value not in out and value not in err


def test_replay_reports_a_failing_server(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRowWithWrongRows()) as srv:
        log = logged_run(tmp_path, srv)
        srv.responder = lambda body, n: Reply(status=503)
        code, out, err = cli("replay", f"{log}:1")
    assert code == 3
    assert "HTTP 503" in err
    assert "fake error 503" in out


def test_replay_curl_prints_a_runnable_command(isolated_env, tmp_path, raw_bodies, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    key = "sk-CURL-SECRET-42"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with FakeOpenAI(responder=ByRowWithWrongRows(), api_key=key) as srv:
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


@pytest.mark.parametrize("where", ["{log}:0", "{log}:99", "{log}", "{log}:x", "{log}:\u00b2", "{tmp}/nope.jsonl:1"])
def test_replay_bad_locations_are_usage_errors(isolated_env, tmp_path, where):
    with FakeOpenAI(responder=ByRowWithWrongRows()) as srv:
        log = logged_run(tmp_path, srv)
        code, out, err = cli("replay", where.format(log=log, tmp=tmp_path))
        assert len(srv.chat_requests) == 3  # nothing sent
    assert code == 2
    assert len([ln for ln in err.splitlines() if ln.startswith("nano-eval: error:")]) == 1
    assert "Traceback" not in err


def test_replay_of_a_non_utf8_file(isolated_env, tmp_path):
    path = tmp_path / "samples_gsm8k_cot_llama.jsonl"
    path.write_bytes(b"\xff\xfe\x00{not a record}\n")
    code, out, err = cli("replay", f"{path}:1")
    one_error(code, err, 2)


def test_replay_of_a_line_that_is_not_a_record(isolated_env, tmp_path):
    path = tmp_path / "samples_gsm8k_cot_llama.jsonl"
    path.write_text('{"task": "gsm8k_cot_llama"}\n[1, 2]\nnot json\n', encoding="utf-8")
    for line in (1, 2, 3):
        code, out, err = cli("replay", f"{path}:{line}")
        one_error(code, err, 2, "not a sample record")
