"""bench/run.py runs end to end on a tiny input (`--quick`) and prints its table.

Speed is not asserted here (the bench itself judges its targets on a full run); this only
checks that the bench works: nginx starts, every section runs, the table comes out. Skipped
when nginx is not installed (the test installs nothing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "run.py"


def _nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(path, os.X_OK):
            return path
    return None


pytestmark = pytest.mark.skipif(_nginx() is None, reason="nginx is not installed (apt-get install nginx)")


def test_quick_bench_prints_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANO_EVAL_")}
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out_json)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("nano-eval bench --quick:")
    assert lines[1].startswith("load average ")
    assert lines[2].split() == ["measure", "value", "target", "result", "notes"]
    for section in ("1. client overhead", "2. latency-bound", "3. startup", "4. cache", "5. memory", "6. scaling"):
        assert any(line.startswith(section) for line in lines), section
    assert lines[-1] == "targets: not judged with --quick (tiny input)"

    figures = json.loads(out_json.read_text())
    assert figures["quick"] is True and figures["samples"] == 50
    nano = figures["overhead"]["8"]["nano-eval"]
    assert nano["rc"] == 0 and nano["n"] == 50 and nano["wall"] > 0 and nano["rss_mb"] > 0
    assert figures["overhead"]["8"]["stdlib-threads"]["n"] == figures["overhead"]["8"]["stdlib-asyncio"]["n"] == 50
    assert 0 < figures["latency"]["efficiency"] <= figures["latency"]["best_possible"] * 1.05
    assert figures["cache"]["rows"] == 1319
    assert figures["memory"]["warm_fetches"] == 0  # the warm chartqa runs read only the cache
    assert figures["scaling"]["10"]["n"] == 10 * figures["scaling"]["1"]["n"] == 500


def test_bench_says_how_to_install_nginx_when_it_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--nginx", str(tmp_path / "no-nginx")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "nginx is not installed" in proc.stderr and "apt-get install" in proc.stderr
    assert proc.stdout == ""
