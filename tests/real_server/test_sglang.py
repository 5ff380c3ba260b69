"""SGLang (issue 31), the third backend the user named, on the CPU: alone, and in bf16 against vLLM.

Servers (conftest.py; built by setup_sglang.sh and setup_vllm.sh, cached):
  SGLang 0.5.23 (CPU)  SmolLM2-135M-Instruct, setup_vllm.sh's float32 HF folder (the weights vLLM,
                       llama.cpp and MAX serve), `--dtype float32`, torch_native attention
  SGLang bf16          the bf16 folder of setup_vllm.sh (the float32 one rounded to nearest even),
                       `--dtype bfloat16`
  vLLM bf16            the same bf16 folder, `--dtype bfloat16` (test_bf16.py's reference)
SGLang in the c=1 run of four backends on the float32 weights is in test_vllm.py.

SGLang runs with a stand-in for its CPU kernels (setup_sglang.sh, sgl_kernel_standin.py): every
op raises NotImplementedError naming itself. Each test here ends by checking that its SGLang
server's log holds no such call, so a SGLang that calls one fails loudly here.

Chartqa is not asked of SGLang: it serves a text-only model here (the preflight's `image input`
WARNs); chartqa against a real multimodal server is test_vlm.py's (vLLM + tiny Idefics3).

Skipped unless run with `-m real_server` or NANO_EVAL_REAL_SERVER=1 (see conftest.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import (SGLANG_HEALTH_TIMEOUT_S, TEXT_ALIAS, VLLM_HEALTH_TIMEOUT_S, launch_server, sgl_kernel_calls,
                      sglang_cmd, sglang_env, vllm_cmd, vllm_env)
from helpers import REPO_ROOT, describe, get, read_samples, results_of, run_cli
from test_numerics import compared, logprob_run
from test_vllm import TASK, check_run_samples

pytestmark = pytest.mark.real_server

N_BF16 = 6  # samples of the SGLang bf16 vs vLLM bf16 pair (equivalent from n=1 on, measured)
# The --check grid against SGLang 0.5.23 serving the text-only model, as recorded: every check
# passes but the image one, which warns (the model has no vision).
EXPECTED_WARN = {"image input"}


def assert_no_sgl_kernel_call(server) -> None:
    calls = sgl_kernel_calls(server.log)
    assert not calls, "SGLang called into sgl_kernel (the stand-in has no implementation):\n" + "\n".join(calls[:20])


def test_sglang_alone(sglang_server, datasets_server, tmp_path, capsys):
    """nano-eval against SGLang alone, no --model: the model is autodetected from /v1/models, the
    server is named SGLang with its version (/get_server_info), the --check grid is the recorded
    one (all PASS but `image input`: WARN, a text-only model), 10 gsm8k samples are all answered
    and scored with metrics equal to the means of the sample log, and the server's log holds no
    call into the sgl_kernel stand-in.

    Measured here (2026-12-07, 2 cores shared with other test runs): 12 PASS, 1 WARN (HTTP 400:
    "Model only supports text input"); the 10 samples at --num_concurrent 4 in 99 s."""
    n = 10
    log_dir = tmp_path / "samples"
    proc = run_cli(["--check", "--tasks", TASK, "--max_samples", n, "--num_concurrent", 4,
                    "--base_url", sglang_server.base_url, "--log_samples", log_dir], datasets_server)
    doc = results_of(proc)
    grid = [line for line in proc.stderr.splitlines() if line.startswith(("PASS", "WARN", "FAIL"))]
    with capsys.disabled():
        print(f"\n[real_server] --check against SGLang {sglang_server.version} (exit {proc.returncode}):")
        print("\n".join(grid))
        print(f"[real_server] SGLang alone: {doc['results'][TASK].get('metrics')}, "
              f"elapsed {doc['results'][TASK].get('elapsed')} s")
    assert proc.returncode == 0, describe(proc)

    config = doc["config"]
    assert config["model"] == sglang_server.alias, config
    assert (config["server"]["name"], config["server"]["version"]) == ("SGLang", sglang_server.version), \
        config["server"]
    assert config["server"]["evidence"] == "/get_server_info", config["server"]
    assert f"(SGLang {sglang_server.version})" in proc.stderr, describe(proc)

    checks = {c["check"]: c["result"] for c in doc["results"]["api_conformance"]["checks"]}
    assert {c for c, r in checks.items() if r != "PASS"} == EXPECTED_WARN, checks
    assert {c for c, r in checks.items() if r == "WARN"} == EXPECTED_WARN, checks

    res = doc["results"][TASK]
    assert res["num_samples"] == n and res["num_ok"] + res.get("num_truncated", 0) == n, res
    assert not res["failures"], res
    samples = read_samples(log_dir, TASK)
    check_run_samples(samples, n)
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        mean = sum(s["scores"][key] for s in samples) / n
        assert math.isclose(res["metrics"][key], mean, abs_tol=1e-9), (key, res["metrics"], mean)
    status, info = get(sglang_server.root_url + "/get_server_info")
    assert status == 200 and info["version"] == sglang_server.version, info.get("version")
    assert_no_sgl_kernel_call(sglang_server)


# --------------------------------------------------------------------------- bf16


@pytest.fixture(scope="module")
def sglang_bf16_server(sglang_paths, tmp_path_factory):
    """SGLang serving the bf16 folder with --dtype bfloat16 (skipped if setup_vllm.sh has none)."""
    model = sglang_paths.get("SGLANG_BF16_MODEL")
    if not model:
        pytest.skip("setup_vllm.sh printed no VLLM_BF16_MODEL (no bf16 folder to serve)")
    logdir = tmp_path_factory.mktemp("sglang_bf16")
    cmd = sglang_cmd(sglang_paths["SGLANG_PYTHON"], model, TEXT_ALIAS, dtype="bfloat16")
    with launch_server("sglang-bf16", cmd, logdir, SGLANG_HEALTH_TIMEOUT_S, sglang_env(logdir)) as server:
        server.alias, server.version = TEXT_ALIAS, sglang_paths["SGLANG_VERSION"]
        yield server


@pytest.fixture(scope="module")
def vllm_bf16_server(vllm_paths, tmp_path_factory):
    """vLLM serving the same bf16 folder with --dtype bfloat16 (as test_bf16.py does)."""
    if not vllm_paths.get("VLLM_BF16_MODEL"):
        pytest.skip("setup_vllm.sh printed no VLLM_BF16_MODEL (no bf16 folder to serve)")
    logdir = tmp_path_factory.mktemp("vllm_bf16")
    cmd = vllm_cmd(vllm_paths["VLLM_PYTHON"], vllm_paths["VLLM_BF16_MODEL"], TEXT_ALIAS, dtype="bfloat16")
    with launch_server("vllm-bf16", cmd, logdir, VLLM_HEALTH_TIMEOUT_S, vllm_env()) as server:
        yield server


def test_sglang_bf16_vs_vllm_bf16(vllm_bf16_server, sglang_bf16_server, datasets_server, tmp_path, capsys):
    """The GPU use case in miniature: the same bf16 weights on SGLang and on vLLM, both with
    `--dtype bfloat16`, 10 gsm8k samples each at c=1 with --logprobs 5, compared by
    `nano-eval compare --json`: prompt tokens equal on every sample, and the numerics
    `equivalent` (two correct bf16 backends: their logits lie on the bf16 grid and part by a
    step here and there, which the bf16-aware verdict of issue 30 knows).

    Measured here (2026-12-07, 10 samples, Intel Xeon: vLLM's bf16 matmuls on oneDNN's AMX
    kernels, SGLang's on avx512_core_bf16; README.md here): identical text 8/10, prompt tokens
    10/10, `equivalent` within bf16 resolution (tolerance 0.1875, both sides bf16-like), p99
    |delta logprob| 0.121, max 0.283, 1,162 shared tokens, 2 partings, both near-ties. The test
    prints these as a BF16-SGLANG line."""
    logs = {"vllm": tmp_path / "vllm_bf16", "sglang": tmp_path / "sglang_bf16"}
    logprob_run(datasets_server, vllm_bf16_server, logs["vllm"], N_BF16, 1)
    logprob_run(datasets_server, sglang_bf16_server, logs["sglang"], N_BF16, 1)
    proc = subprocess.run([sys.executable, "nano_eval.py", "compare", "--json", str(logs["vllm"]), str(logs["sglang"])],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    c = json.loads(proc.stdout)["comparison"][TASK]
    nm = c["numerics"]
    figures = {"n": c["n"], "identical_text": round(c["response_agreement"], 3),
               "prompt_tokens_equal": f"{c['prompt_tokens_equal']}/{c['n']}", "numerics": nm["verdict"],
               "p99_abs_logprob_diff": nm.get("p99_abs_logprob_diff"),
               "max_abs_logprob_diff": nm.get("max_abs_logprob_diff"),
               "median_sample_max": nm.get("median_sample_max_abs_logprob_diff"),
               "partings": nm.get("divergences"), "confident": nm.get("unexplained"),
               "precision": {side: p.get("label") for side, p in (nm.get("precision") or {}).items()},
               "tolerance": nm.get("tolerance"), "evidence": nm.get("evidence"),
               "verdict_settled_at_n": compared(logs["vllm"], logs["sglang"], N_BF16)["settled_at"]}
    with capsys.disabled():
        print(f"\nBF16-SGLANG {json.dumps(figures)}")
    assert c["n"] == N_BF16 and c["prompt_tokens_equal"] == N_BF16, figures
    assert nm["verdict"] == "equivalent", figures
    assert_no_sgl_kernel_call(sglang_bf16_server)
