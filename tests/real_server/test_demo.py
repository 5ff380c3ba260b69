"""The README's first command, `bash tests/real_server/demo.sh`, works as written: it builds (or
finds cached) llama-server + SmolLM2, serves on a free 127.0.0.1 port, prints nano-eval's results
JSON on stdout, and stops the server when it is done.

Skipped unless run with `-m real_server` or NANO_EVAL_REAL_SERVER=1 (see conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from helpers import REPO_ROOT

pytestmark = pytest.mark.real_server


def test_demo_runs_and_stops_its_server(tmp_path):
    n = 2
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NANO_EVAL_") or k == "NANO_EVAL_CI_CACHE"}
    env["TMPDIR"] = str(tmp_path)  # the server log goes there
    proc = subprocess.run(["bash", "tests/real_server/demo.sh", str(n)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    where = f"exit {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, where
    doc = json.loads(proc.stdout)
    res = doc["results"]["gsm8k_cot_llama"]
    assert res["num_samples"] == n and not res["failures"], res
    assert doc["config"]["server"]["name"] == "llama.cpp", doc["config"]["server"]
    stopped = re.search(r"\[demo\] stopping llama-server \(pid (\d+)\)", proc.stderr)
    assert stopped, where
    pid = int(stopped.group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (tmp_path / "nano-eval-demo-server.log").is_file()
