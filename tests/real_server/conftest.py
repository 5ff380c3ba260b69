"""Fixtures for nano-eval's end-to-end tests against a real llama.cpp server.

These tests are skipped unless asked for, because the first run builds llama.cpp
(~10 min on 2 cores). Enable them with either of:

    python -m pytest tests/real_server -m real_server
    NANO_EVAL_REAL_SERVER=1 python -m pytest tests/real_server

Optional environment:
    NANO_EVAL_REAL_SERVER_URL   use an already running OpenAI-compatible server
                                (e.g. http://127.0.0.1:8080/v1); nothing is built or started
    NANO_EVAL_LLAMA_SERVER_BIN  use this llama-server binary instead of building one
    NANO_EVAL_LLAMA_MODEL       use this GGUF instead of the pinned SmolLM2-135M-Instruct
    NANO_EVAL_CI_CACHE          cache root for the build (see setup_llama_server.sh)
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SETUP_SCRIPT = HERE / "setup_llama_server.sh"
MODEL_ALIAS = "smollm2-135m-instruct"
SLOTS = 2                 # -np: parallel slots (tests use --num_concurrent up to 2)
CTX_PER_SLOT = 4096       # 8-shot gsm8k prompt is ~1.1k tokens + 256 generated
HEALTH_TIMEOUT_S = 300
ENV_FLAG = "NANO_EVAL_REAL_SERVER"


def _enabled(config) -> bool:
    if os.environ.get(ENV_FLAG, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    markexpr = config.getoption("markexpr", default="") or ""
    return bool(re.search(r"\breal_server\b", markexpr)) and not re.search(
        r"\bnot\s+real_server\b", markexpr
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "real_server: end-to-end test against a real llama.cpp llama-server "
        f"(builds it on first use); run with `-m real_server` or {ENV_FLAG}=1",
    )


def pytest_collection_modifyitems(config, items):
    if _enabled(config):
        return
    skip = pytest.mark.skip(
        reason=(
            "real llama-server test (first run builds llama.cpp, 5-10 min): "
            f"run with `-m real_server` or {ENV_FLAG}=1"
        )
    )
    for item in items:
        if item.get_closest_marker("real_server"):
            item.add_marker(skip)


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _uncaptured(config):
    """Let build progress reach the terminal even though pytest captures output."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        yield


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def _http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def _llama_paths(config) -> tuple[str, str]:
    bin_env = os.environ.get("NANO_EVAL_LLAMA_SERVER_BIN")
    model_env = os.environ.get("NANO_EVAL_LLAMA_MODEL")
    if bin_env and model_env:
        return bin_env, model_env
    t0 = time.monotonic()
    with _uncaptured(config):
        print(f"\n[real_server] running {SETUP_SCRIPT.name} (cached: ~1 s; cold: 5-10 min build)", flush=True)
        # stderr (progress) goes to the terminal; stdout carries the KEY=VALUE paths.
        proc = subprocess.run(
            ["bash", str(SETUP_SCRIPT)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
        )
        print(f"[real_server] setup finished in {time.monotonic() - t0:.0f} s", flush=True)
    if proc.returncode != 0:
        pytest.fail(f"{SETUP_SCRIPT} failed with exit code {proc.returncode}:\n{proc.stdout}")
    paths = dict(  # KEY=VALUE lines, VALUE shell-quoted by bash's printf %q
        line.split("=", 1) for line in shlex.split(proc.stdout) if line.startswith("LLAMA_")
    )
    return bin_env or paths["LLAMA_SERVER"], model_env or paths["LLAMA_MODEL"]


def _jinja_flag(binary: str) -> list[str]:
    """`--jinja` is on by default in llama.cpp 11434, but pass it when the build knows it."""
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    return ["--jinja"] if "--jinja" in (out.stdout + out.stderr) else []


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def llama_server(pytestconfig, tmp_path_factory):
    """A running llama-server with SmolLM2-135M-Instruct. Yields a namespace with
    base_url ("http://127.0.0.1:PORT/v1"), root_url, log (Path) and model alias."""
    url = os.environ.get("NANO_EVAL_REAL_SERVER_URL")
    if url:
        url = url.rstrip("/")
        root = url[: -len("/v1")] if url.endswith("/v1") else url
        yield SimpleNamespace(base_url=root + "/v1", root_url=root, log=None, alias=None)
        return

    binary, model = _llama_paths(pytestconfig)
    logdir = tmp_path_factory.mktemp("llama_server")
    jinja = _jinja_flag(binary)
    last_error = ""
    for attempt in range(3):  # a free port can be taken between probe and bind
        port = _free_port()
        log_path = logdir / f"server-{attempt}.log"
        cmd = [
            binary, "-m", model, "-a", MODEL_ALIAS,
            "--host", "127.0.0.1", "--port", str(port),
            "-c", str(SLOTS * CTX_PER_SLOT), "-np", str(SLOTS), "-t", "2", *jinja,
        ]
        with open(log_path, "wb") as log:
            # A direct Popen (no shell) so proc.pid is the server itself.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _http_status(root + "/health") == 200:  # 503 while the model loads
                break
            time.sleep(0.5)
        if proc.poll() is None and _http_status(root + "/health") == 200:
            break
        last_error = log_path.read_text(errors="replace")[-3000:]
        proc.kill()
        proc.wait()
        if "bind" not in last_error:
            pytest.fail(f"llama-server did not become healthy: {' '.join(cmd)}\n{last_error}")
    else:
        pytest.fail(f"llama-server could not bind a port after 3 attempts:\n{last_error}")

    try:
        yield SimpleNamespace(base_url=root + "/v1", root_url=root, log=log_path, alias=MODEL_ALIAS)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def datasets_server(gsm8k_spec, chartqa_spec):
    """tests/fakes.py's datasets-server stand-in (real gsm8k test split, 40-row ChartQA slice
    with real chart PNGs), so nano-eval never reaches for the real one, which CI cannot reach.
    Yields the server object (.url, .rows_requests)."""
    from fakes import CHARTQA, GSM8K, FakeDatasetsServer

    with FakeDatasetsServer({GSM8K: gsm8k_spec, CHARTQA: chartqa_spec}) as server:
        yield server
