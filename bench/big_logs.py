#!/usr/bin/env python3
"""The tools on big sample logs: `nano-eval compare` and `nano-eval report` of two N-sample
gsm8k logs (default 100,000 each), timed side by side for the nano_eval.py beside bench/ and
any other copy (e.g. an older commit: `git show ba4077c:nano_eval.py > /tmp/old.py`).

    python bench/big_logs.py                          # this nano_eval.py, 100,000 samples a side
    python bench/big_logs.py --baseline /tmp/old.py   # and an older one, in the same run
    python bench/big_logs.py --samples 20000 --skip report

Each figure is one child process (`python NANO compare A B --json`, `python NANO report A B`),
timed with os.wait4: wall seconds, CPU seconds, peak RSS. The logs are the real format: each
record holds the full 8-shot request body (~5.6 KB), half the samples right, and B differs from
A on a third of them. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_logs(folder: Path, n: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    import nano_eval as ne

    task, config = ne.TASKS["gsm8k_cot_llama"], ne.APIConfig(url="http://127.0.0.1:1/v1", model="m")
    rows = [json.loads(line) for line in (ROOT / "data/openai__gsm8k/main/test/rows-00000.jsonl").open()]
    rng = random.Random(0)
    paths = folder / "a.jsonl", folder / "b.jsonl"
    right_a = [rng.random() < 0.5 for _ in range(n)]
    right_b = [r if rng.random() < 0.67 else not r for r in right_a]
    for path, right in zip(paths, (right_a, right_b)):
        with path.open("w", encoding="utf-8") as f:
            for i in range(n):
                sample = task.build({"row_idx": i, "row": rows[i % len(rows)]["row"]}, config)
                answer = sample.target if right[i] else "0"
                f.write(json.dumps({
                    "task": task.name, "row_idx": i, "repeat": 0, "doc_hash": f"{i:064x}", "body_hash": sample.body_hash,
                    "url": "http://127.0.0.1:1/v1/chat/completions", "request": sample.body,
                    "response": {"content": f"Step by step, row {i}. The final answer is {answer}", "finish_reason": "stop",
                                 "usage": {"prompt_tokens": 1254, "completion_tokens": 40, "total_tokens": 1294},
                                 "reasoning_content": None, "http_status": 200},
                    "status": "ok", "error": None, "target": sample.target,
                    "extracted": {"strict-match": answer, "flexible-extract": answer},
                    "scores": {"exact_match,strict-match": float(right[i]), "exact_match,flexible-extract": float(right[i])},
                    "group": None, "image": None, "latency": 1.0, "attempts": 1, "reasoning_flags": []}) + "\n")
    return paths


def timed(cmd: list) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "exit": os.waitstatus_to_exitcode(status),
            "error": err.strip().splitlines()[-1] if os.waitstatus_to_exitcode(status) else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--baseline", help="another nano_eval.py to time beside this one")
    parser.add_argument("--skip", choices=("compare", "report"), action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nano-eval-big-logs-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        a, b = write_logs(folder, args.samples)
        print(f"two logs of {args.samples:,} samples ({a.stat().st_size / 1e6:,.0f} MB each) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        copies = [("this", ROOT / "nano_eval.py")] + ([("baseline", Path(args.baseline))] if args.baseline else [])
        for label, nano in copies:
            for tool in ("compare", "report"):
                if tool in args.skip:
                    continue
                extra = ["--json"] if tool == "compare" else ["-o", str(folder / f"{label}.html")]
                figures = timed([sys.executable, str(nano), tool, str(a), str(b), *extra])
                print(f"{label:8s} {tool:8s} {json.dumps(figures)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
