"""SGLang (issue 31), the third backend the user named, on the CPU, alone.

Server (conftest.py's session-scoped `sglang_server`, built by setup_sglang.sh, cached):
  SGLang 0.5.23 (CPU)  SmolLM2-135M-Instruct, setup_vllm.sh's float32 HF folder (the weights vLLM,
                       llama.cpp and MAX serve), `--dtype float32`, torch_native attention
The same server then runs in test_vllm.py's c=1 run of four backends on the float32 weights (one
SGLang start for both); SGLang bf16 against vLLM bf16 is test_bf16.py's.

SGLang runs with a stand-in for its CPU kernels (setup_sglang.sh, sgl_kernel_standin.py): every
op raises NotImplementedError naming itself. Each SGLang test ends by checking that its SGLang
server's log holds no such call, so a SGLang that calls one fails loudly here.

Chartqa is not asked of SGLang: it serves a text-only model here (the preflight's `image input`
WARNs); chartqa against a real multimodal server is test_vlm.py's (vLLM + tiny Idefics3).

Skipped unless run with `-m real_server` or NANO_EVAL_REAL_SERVER=1 (see conftest.py).
"""

from __future__ import annotations

import pytest

from conftest import sgl_kernel_calls
from helpers import describe, get
from test_vllm import run_alone

pytestmark = pytest.mark.real_server

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
    doc, proc, checks = run_alone(sglang_server, "SGLang", datasets_server, tmp_path, capsys, 4)
    assert doc["config"]["server"]["evidence"] == "/get_server_info", doc["config"]["server"]
    assert f"(SGLang {sglang_server.version})" in proc.stderr, describe(proc)
    assert {c for c, r in checks.items() if r != "PASS"} == EXPECTED_WARN, checks
    assert {c for c, r in checks.items() if r == "WARN"} == EXPECTED_WARN, checks
    status, info = get(sglang_server.root_url + "/get_server_info")
    assert status == 200 and info["version"] == sglang_server.version, info.get("version")
    assert_no_sgl_kernel_call(sglang_server)
