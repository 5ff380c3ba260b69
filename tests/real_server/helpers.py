"""Shared helpers of the real-server tests: run nano-eval's CLI as a user would, read its logs,
and talk to a server directly (stdlib only, no proxy: every server here is on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 3600  # generous: a shared 2-core machine can be 10x slower than a quiet one
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run_cli(args, datasets_server, timeout=CLI_TIMEOUT_S, data_dir: Path | None = None):
    """`python nano_eval.py ARGS` from the repo root, with a clean NANO_EVAL_* environment and the
    loopback datasets-server stand-in (CI cannot reach the real one). data_dir: NANO_EVAL_DATA_DIR
    (default: the data/ beside nano_eval.py, which ships the gsm8k split)."""
    script = REPO_ROOT / "nano_eval.py"
    if not script.is_file():
        pytest.fail(f"{script} does not exist")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NANO_EVAL_") and k not in ("OPENAI_API_KEY", "HF_TOKEN")}
    env["NANO_EVAL_DATASETS_SERVER"] = datasets_server.url
    if data_dir is not None:
        env["NANO_EVAL_DATA_DIR"] = str(data_dir)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    cmd = [sys.executable, "nano_eval.py", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    proc.cmd = cmd
    return proc


def describe(proc) -> str:
    return (
        f"command: {' '.join(proc.cmd)}\nexit code: {proc.returncode}\n"
        f"--- stdout (last 4000 chars) ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr (last 6000 chars) ---\n{proc.stderr[-6000:]}"
    )


def results_of(proc) -> dict:
    assert "Traceback (most recent call last)" not in proc.stderr, describe(proc)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        pytest.fail(f"stdout is not one JSON document ({e})\n{describe(proc)}")


def read_samples(log_dir: Path, task: str) -> list[dict]:
    path = Path(log_dir) / f"samples_{task}.jsonl"
    assert path.is_file(), f"no sample log at {path}; files there: {sorted(p.name for p in Path(log_dir).glob('*'))}"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["row_idx"])


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


def get(url: str, timeout: float = 30) -> tuple[int, object]:
    try:
        with _OPENER.open(url, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def metrics_line(res: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in res["metrics"].items()
                     if "," in k and "stderr" not in k and "valid" not in k and isinstance(v, (int, float)))
