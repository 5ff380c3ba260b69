"""The setup scripts' promises (issue 21): a server is cached only once it has served a real
completion here, a crash says what to try, and the llama.cpp build holds no AMX code (the
tile instructions trap in the VMs of some Intel AVX-512/AMX machines this project runs on).

The prove_server.py tests run in the plain `pytest` (no real server: a fake one, a process that
dies of SIGILL); the build check is a real-server test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROVE = HERE / "prove_server.py"
FAKE_SERVER = (  # FakeOpenAI on the given port until killed
    "import sys, time; sys.path.insert(0, {tests!r}); from fakes import FakeOpenAI; "
    "s = FakeOpenAI(models=['tiny'], port=int(sys.argv[1])); s.start(); time.sleep(600)"
)


def prove(log: Path, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROVE), "server", str(log), str(timeout), "--", *cmd],
                          capture_output=True, text=True, timeout=120)


def test_prove_server_accepts_a_server_that_answers(tmp_path):
    code = FAKE_SERVER.format(tests=str(HERE.parent))
    proc = prove(tmp_path / "log", sys.executable, "-c", code, "{port}")
    assert proc.returncode == 0, proc.stderr
    assert "[prove_server] server serves tiny: " in proc.stderr


def test_prove_server_names_an_illegal_instruction_and_what_to_try(tmp_path):
    proc = prove(tmp_path / "log", "bash", "-c", "kill -ILL $$")
    assert proc.returncode == 1
    assert "server died of SIGILL: Illegal instruction" in proc.stderr
    assert "NANO_EVAL_LLAMA_NATIVE=0" in proc.stderr and "--no-repack" in proc.stderr


def test_prove_server_gives_up_on_a_server_that_never_answers(tmp_path):
    proc = prove(tmp_path / "log", "sleep", "60", timeout=2)
    assert proc.returncode == 1 and "did not answer /v1/models within 2 s" in proc.stderr


@pytest.mark.real_server
def test_the_llama_server_build_holds_no_amx_code(pytestconfig):
    """-march=native minus -mno-amx-*: not one AMX tile instruction in the cached binary, on any CPU
    (on an AMD machine there are none either way; the check is what keeps an Intel one safe)."""
    from conftest import _llama_paths

    if not shutil.which("objdump"):
        pytest.skip("objdump is not installed (binutils)")
    binary, _ = _llama_paths(pytestconfig)
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True,
                             timeout=600).stdout
    assert len(listing) > 1_000_000, "objdump gave no listing"
    assert not re.search(r"\s(tilezero|ldtilecfg|tileloadd|tdpb[a-z]*)\s", listing)
