"""The HTTP side of a run: requests in flight bounded by num_concurrent, keep-alive connections, and
the per-attempt timeout."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nano_eval  # noqa: E402
from fakes import FakeOpenAI, Reply  # noqa: E402
from nano_eval import TASKS, APIConfig, HTTPClient, run_task  # noqa: E402

GSM = TASKS["gsm8k_cot_llama"]


def run(config: APIConfig, n: int, tmp_path: Path, **kwargs) -> dict:
    return asyncio.run(run_task(GSM, config, max_samples=n, data_dir=str(tmp_path / "data"), progress=False,
                                **kwargs))


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("NANO_EVAL_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("NANO_EVAL_DATASETS_SERVER", "http://127.0.0.1:9")  # gsm8k ships in data/


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


# --------------------------------------------------------------------------------------------
# concurrency
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8])
def test_in_flight_reaches_but_never_exceeds_num_concurrent(n, tmp_path):
    counter = CountingResponder(delay=0.08)
    with FakeOpenAI(responder=counter) as server:
        result = run(APIConfig(url=server.base_url, model="m", num_concurrent=n), 3 * n, tmp_path)
        assert len(server.chat_requests) == 3 * n
        assert server.max_in_flight == n
    assert counter.peak == n
    assert result["num_ok"] == 3 * n


def test_less_work_than_workers(tmp_path):
    counter = CountingResponder(delay=0.05)
    with FakeOpenAI(responder=counter) as server:
        run(APIConfig(url=server.base_url, model="m", num_concurrent=8), 3, tmp_path)
        assert server.max_in_flight <= 3
    assert counter.peak <= 3


def test_cli_num_concurrent_bounds_in_flight(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANO_EVAL_DATA_DIR", str(tmp_path / "data"))
    with FakeOpenAI(delay=0.05) as server:
        code = nano_eval.main(["--tasks", "gsm8k_cot_llama", "--base_url", server.base_url, "--max_samples", "10",
                               "--num_concurrent", "2"])
        assert code == 0
        assert server.max_in_flight == 2
    assert json.loads(capsys.readouterr().out)["config"]["num_concurrent"] == 2


# --------------------------------------------------------------------------------------------
# keep-alive
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4])
def test_keep_alive_connections(n, tmp_path):
    with FakeOpenAI(delay=0.01) as server:
        result = run(APIConfig(url=server.base_url, model="m", num_concurrent=n), 40, tmp_path)
        assert len(server.chat_requests) == 40
        assert server.connections <= n  # one persistent connection per worker, not one per request
    assert result["num_ok"] == 40


def test_http_client_reuses_one_connection(tmp_path):
    with FakeOpenAI() as server:
        client = HTTPClient(timeout=5)
        for _ in range(10):
            resp = client.request("GET", server.base_url + "/models")
            assert resp.status == 200 and json.loads(resp.body)["data"][0]["id"] == "fake-model"
        assert server.connections == 1


# --------------------------------------------------------------------------------------------
# timeout
# --------------------------------------------------------------------------------------------


def test_hanging_server_times_out(tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(delay=15)) as server:
        start = time.monotonic()
        result = run(APIConfig(url=server.base_url, model="m", timeout=1, max_retries=1), 2, tmp_path,
                     log_dir=tmp_path / "log")
        elapsed = time.monotonic() - start
        assert len(server.chat_requests) == 2  # max_retries 1 = one attempt each
    assert result["failures"] == {"timeout": 2}
    assert result["num_ok"] == 0 and result["metrics"]["exact_match"] == 0.0
    assert elapsed < 30  # bounded by --timeout, not the 600 s default
    records = [json.loads(line) for line in (tmp_path / "log" / "samples_gsm8k_cot_llama.jsonl").open()]
    assert [(r["status"], r["attempts"]) for r in records] == [("timeout", 1), ("timeout", 1)]
    assert all(r["error"] for r in records)


def test_timeout_is_retried_up_to_max_retries(tmp_path):
    plan = {0: Reply(delay=15)}  # the first attempt hangs, the retry answers
    with FakeOpenAI(responder=lambda body, n: plan.get(n, "The final answer is 18")) as server:
        config = APIConfig(url=server.base_url, model="m", timeout=1, max_retries=2, num_concurrent=1,
                           retry_base_delay=0.01)
        result = run(config, 1, tmp_path, log_dir=tmp_path / "log")
        assert len(server.chat_requests) == 2
    assert result["num_ok"] == 1 and result["metrics"]["exact_match"] == 1.0
    record = json.loads((tmp_path / "log" / "samples_gsm8k_cot_llama.jsonl").read_text())
    assert record["attempts"] == 2 and record["status"] == "ok"


def test_cli_timeout_flag(tmp_path):
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
