"""Fixtures for nano-eval's end-to-end tests against a real llama.cpp server.

These tests are skipped unless asked for, because the first run builds llama.cpp
(~10-12 min on 2 cores). Enable them with either of:

    python -m pytest tests/real_server -m real_server
    NANO_EVAL_REAL_SERVER=1 python -m pytest tests/real_server

Optional environment:
    NANO_EVAL_REAL_SERVER_URL   use an already running OpenAI-compatible server
                                (e.g. http://127.0.0.1:8080/v1); nothing is built or started
    NANO_EVAL_LLAMA_SERVER_BIN  use this llama-server binary instead of building one
    NANO_EVAL_LLAMA_MODEL       use this GGUF instead of the pinned SmolLM2-135M-Instruct
    NANO_EVAL_CI_CACHE          cache root for the builds (see lib.sh's cache_dir)

test_vllm.py, test_numerics.py, test_bf16.py and test_vlm.py also start vLLM (setup_vllm.sh
builds its venv, ~4 min cold), test_vllm.py MAX too (setup_max.sh, ~5 min cold), and
test_sglang.py, test_vllm.py and test_bf16.py SGLang (setup_sglang.sh, ~2-4 min cold). Servers
are module-scoped but for the float32 SGLang one (session: shared by test_sglang.py and
test_vllm.py), so at most one vLLM, one MAX and two SGLang run at a time.
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
        "real_server: end-to-end test against a real llama.cpp llama-server or vLLM "
        f"(builds them on first use); run with `-m real_server` or {ENV_FLAG}=1",
    )


def pytest_collection_modifyitems(config, items):
    if _enabled(config):
        return
    skip = pytest.mark.skip(
        reason=(
            "real-server test (the first run builds llama.cpp, ~10-12 min, and the vLLM and MAX venvs, ~4 min each): "
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


def setup_paths(config, script: Path, what: str, cold: str) -> dict:
    """Run a setup script (its progress on the terminal) and return its KEY=value lines."""
    t0 = time.monotonic()
    with _uncaptured(config):
        print(f"\n[real_server] running {script.name} (cached: ~1 s; cold: {cold})", flush=True)
        proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        print(f"[real_server] {what} setup finished in {time.monotonic() - t0:.0f} s", flush=True)
    if proc.returncode != 0:
        pytest.fail(f"{script} failed with exit code {proc.returncode}:\n{proc.stdout}")
    return dict(line.split("=", 1) for line in shlex.split(proc.stdout) if "=" in line)  # values: bash %q


def _llama_paths(config) -> tuple[str, str]:
    bin_env = os.environ.get("NANO_EVAL_LLAMA_SERVER_BIN")
    model_env = os.environ.get("NANO_EVAL_LLAMA_MODEL")
    if bin_env and model_env:
        return bin_env, model_env
    paths = setup_paths(config, SETUP_SCRIPT, "llama-server", "~10-12 min build")
    return bin_env or paths["LLAMA_SERVER"], model_env or paths["LLAMA_MODEL"]


def _jinja_flag(binary: str) -> list[str]:
    """`--jinja` is on by default in llama.cpp 11434, but pass it when the build knows it."""
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    return ["--jinja"] if "--jinja" in (out.stdout + out.stderr) else []


# --------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def launch_server(name: str, make_cmd, logdir: Path, health_timeout: float = HEALTH_TIMEOUT_S,
                  env: dict | None = None):
    """Start `make_cmd(port)` on a free 127.0.0.1 port, wait for GET /health == 200, yield a
    namespace (root_url, base_url, log, port), and stop the server (and its children) after.
    A port taken between probe and bind is retried with another one."""
    last_error = ""
    for attempt in range(3):
        port = _free_port()
        log_path = logdir / f"{name}-{attempt}.log"
        cmd = [str(c) for c in make_cmd(port)]
        with open(log_path, "wb") as log:
            # No shell, and a new session, so the whole process group (vLLM's engine process
            # too) can be stopped by the server's own pid.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + health_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _http_status(root + "/health") == 200:  # 503 (llama.cpp) or refused while loading
                break
            time.sleep(0.5)
        if proc.poll() is None and _http_status(root + "/health") == 200:
            break
        last_error = log_path.read_text(errors="replace")[-3000:]
        _stop(proc)
        if "bind" not in last_error and "already in use" not in last_error:
            pytest.fail(f"{name} did not become healthy in {health_timeout:.0f} s: {' '.join(cmd)}\n{last_error}")
    else:
        pytest.fail(f"{name} could not bind a port after 3 attempts:\n{last_error}")
    try:
        yield SimpleNamespace(base_url=root + "/v1", root_url=root, log=log_path, port=port, cmd=cmd)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), then SIGKILL."""
    import signal

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind by a leader that exited


def llama_cmd(binary: str, model: str, alias: str, slots: int = SLOTS, threads: int = 1, extra=(),
              jinja: bool = True):
    flags = _jinja_flag(binary) if jinja else []
    return lambda port: [
        binary, "-m", model, "-a", alias, "--host", "127.0.0.1", "--port", str(port),
        "-c", str(slots * CTX_PER_SLOT), "-np", str(slots), "-t", str(threads), *flags, *extra,
    ]


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
    with launch_server("llama-server", llama_cmd(binary, model, MODEL_ALIAS), logdir) as server:
        server.alias = MODEL_ALIAS
        yield server


# --------------------------------------------------------------------------- vLLM

VLLM_SETUP_SCRIPT = HERE / "setup_vllm.sh"
VLLM_HEALTH_TIMEOUT_S = 900   # ~30 s on an idle machine; CPU contention can make it minutes
TEXT_ALIAS = "smollm2-135m-instruct"   # the same served name on both backends
VLM_ALIAS = "tiny-idefics3"
# One thread for the float32 llama-servers: with -t 2, any other busy process on a 2-core
# machine stalls llama.cpp's thread barrier (measured: 1.7 generated tok/s with -t 2 under
# load vs 17 tok/s with -t 1, same load).
F32_THREADS = 1


@pytest.fixture(scope="session")
def vllm_paths(pytestconfig) -> dict:
    """setup_vllm.sh's KEY=value lines: VLLM_PYTHON, VLLM_VERSION, VLLM_MODEL,
    LLAMA_F32_MODEL, VLLM_VLM_MODEL, VLLM_BF16_MODEL, LLAMA_BF16_MODEL."""
    return setup_paths(pytestconfig, VLLM_SETUP_SCRIPT, "vLLM", "~4 min")


def vllm_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "NANO_EVAL_"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    return env


def vllm_cmd(python: str, model: str, alias: str, extra=(), dtype: str = "float32"):
    # The `vllm` console script of vllm-cpu 0.32.0 dies (PackageNotFoundError: vllm): run the
    # module. --enforce-eager: healthy in ~30 s instead of 90-140 s of torch.compile.
    # dtype: float32 everywhere but test_bf16.py (bfloat16, float16).
    return lambda port: [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--served-model-name", alias, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--max-model-len", "4096", "--enforce-eager", "--seed", "0", *extra,
    ]


@pytest.fixture(scope="module")
def vllm_server(vllm_paths, tmp_path_factory):
    """vLLM (CPU) serving SmolLM2-135M-Instruct dequantized to float32 (an HF folder)."""
    logdir = tmp_path_factory.mktemp("vllm_server")
    cmd = vllm_cmd(vllm_paths["VLLM_PYTHON"], vllm_paths["VLLM_MODEL"], TEXT_ALIAS)
    with launch_server("vllm", cmd, logdir, VLLM_HEALTH_TIMEOUT_S, vllm_env()) as server:
        server.alias, server.version = TEXT_ALIAS, vllm_paths["VLLM_VERSION"]
        yield server


@pytest.fixture(scope="module")
def llama_f32_server(pytestconfig, vllm_paths, tmp_path_factory):
    """llama-server serving the SAME float32 weights as vllm_server (the dequantized folder
    converted back by llama.cpp's convert_hf_to_gguf.py), 4 slots for --num_concurrent 4."""
    binary, _ = _llama_paths(pytestconfig)
    logdir = tmp_path_factory.mktemp("llama_f32")
    cmd = llama_cmd(binary, vllm_paths["LLAMA_F32_MODEL"], TEXT_ALIAS, slots=4, threads=F32_THREADS)
    with launch_server("llama-server-f32", cmd, logdir) as server:
        server.alias = TEXT_ALIAS
        yield server


@pytest.fixture(scope="module")
def vlm_server(vllm_paths, tmp_path_factory):
    """vLLM serving the tiny Idefics3 model with seeded random weights (make_tiny_vlm.py)."""
    logdir = tmp_path_factory.mktemp("vlm_server")
    cmd = vllm_cmd(vllm_paths["VLLM_PYTHON"], vllm_paths["VLLM_VLM_MODEL"], VLM_ALIAS,
                   extra=("--limit-mm-per-prompt", '{"image": 1}'))
    with launch_server("vllm-idefics3", cmd, logdir, VLLM_HEALTH_TIMEOUT_S, vllm_env()) as server:
        server.alias, server.version = VLM_ALIAS, vllm_paths["VLLM_VERSION"]
        yield server


# --------------------------------------------------------------------------- MAX

MAX_SETUP_SCRIPT = HERE / "setup_max.sh"
MAX_HEALTH_TIMEOUT_S = 1800  # a warm compile cache: ~20 s; a cold one: minutes (setup_max.sh fills it)


@pytest.fixture(scope="session")
def max_paths(pytestconfig) -> dict:
    """setup_max.sh's KEY=value lines: MAX_PYTHON, MAX_VERSION, MAX_MODEL, MAX_SERVE, MAX_CACHE."""
    return setup_paths(pytestconfig, MAX_SETUP_SCRIPT, "MAX", "~5 min")


def max_env(cache: str) -> dict:
    """Telemetry and crash reports off, the compile cache in the CI cache, nothing from a hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAX_", "MODULAR_", "NANO_EVAL_"))}
    env.update(HF_HUB_OFFLINE="1", MAX_SERVE_DISABLE_TELEMETRY="1", MODULAR_TELEMETRY_ENABLED="0",
               MODULAR_CRASH_REPORTING_ENABLED="0", MODULAR_DERIVED_PATH=cache,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


@pytest.fixture(scope="module")
def max_server(max_paths, tmp_path_factory):
    """MAX (CPU) serving the SAME float32 SmolLM2 HF folder as vllm_server, on 127.0.0.1 only."""
    logdir = tmp_path_factory.mktemp("max_server")
    cmd = lambda port: [max_paths["MAX_SERVE"], "serve", "--model-path", max_paths["MAX_MODEL"],  # noqa: E731
                        "--devices", "cpu", "--host", "127.0.0.1", "--port", str(port),
                        "--served-model-name", TEXT_ALIAS, "--max-length", "4096"]
    with launch_server("max", cmd, logdir, MAX_HEALTH_TIMEOUT_S, max_env(max_paths["MAX_CACHE"])) as server:
        server.alias, server.version = TEXT_ALIAS, max_paths["MAX_VERSION"]
        yield server


# --------------------------------------------------------------------------- SGLang

SGLANG_SETUP_SCRIPT = HERE / "setup_sglang.sh"
SGLANG_HEALTH_TIMEOUT_S = 900  # 25-65 s after start here; minutes on 2 busy cores
# What a call into setup_sglang.sh's sgl_kernel stand-in leaves in a server's log (its own
# marker, and the NotImplementedError it raises), and what a call into a torch op of the
# sgl_kernel library (none is registered) would leave. At start SGLang skips, with "Ignore import
# error when loading sglang.srt.models.<name>", the ~11 model families whose modules reach for
# such a torch op at import (grok, qwen3_5, minicpmv, ...): not a call, and not this model's.
SGL_KERNEL_CALLED = re.compile(r"sgl_kernel stand-in called|NotImplementedError|sgl_kernel::|'sgl_kernel' object has no")
SGL_MODEL_SKIPPED = "Ignore import error when loading sglang.srt.models."


@pytest.fixture(scope="session")
def sglang_paths(pytestconfig) -> dict:
    """setup_sglang.sh's KEY=value lines: SGLANG_PYTHON, SGLANG_VERSION, SGLANG_MODEL, SGLANG_BF16_MODEL."""
    return setup_paths(pytestconfig, SGLANG_SETUP_SCRIPT, "SGLang", "~2-4 min")


def sglang_env(store_dir: Path) -> dict:
    """SGLang's CPU engine, one OpenMP thread (2 threads on 2 busy cores: 1.2 tok/s), oneDNN kept
    off AMX (SGLang's own AMX paths are off: the sgl_kernel stand-in registers no torch op),
    nothing from a hub, no tracking; torch.distributed's rendezvous in a file of store_dir (its
    default, a TCP store, listens on every interface, not only 127.0.0.1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_", "NANO_EVAL_"))}
    store = Path(store_dir) / "torch-dist-store"
    store.unlink(missing_ok=True)  # a stale store file would hang the next start
    env.update(SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1", ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16",
               SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE=f"file://{store}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def sglang_cmd(python: str, model: str, alias: str, dtype: str = "float32"):
    """The command of setup_sglang.sh's header (torch_native attention: no AMX backend)."""
    return lambda port: [
        python, "-m", "sglang.launch_server", "--model-path", model, "--served-model-name", alias,
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", dtype,
        "--context-length", "4096", "--max-total-tokens", "16384", "--attention-backend", "torch_native",
        "--disable-overlap-schedule", "--disable-cuda-graph", "--sleep-on-idle", "--random-seed", "0",
    ]


def sgl_kernel_calls(log: Path) -> list[str]:
    """The lines of a SGLang server's log that say it called into sgl_kernel (none expected)."""
    return [line for line in log.read_text(errors="replace").splitlines()
            if SGL_KERNEL_CALLED.search(line) and SGL_MODEL_SKIPPED not in line]


@pytest.fixture(scope="session")
def sglang_server(sglang_paths, tmp_path_factory):
    """SGLang (CPU) serving the SAME float32 SmolLM2 HF folder as vllm_server, on 127.0.0.1 only.
    Session-scoped: test_sglang.py and test_vllm.py (run one after the other) share one start."""
    logdir = tmp_path_factory.mktemp("sglang_server")
    cmd = sglang_cmd(sglang_paths["SGLANG_PYTHON"], sglang_paths["SGLANG_MODEL"], TEXT_ALIAS)
    with launch_server("sglang", cmd, logdir, SGLANG_HEALTH_TIMEOUT_S, sglang_env(logdir)) as server:
        server.alias, server.version = TEXT_ALIAS, sglang_paths["SGLANG_VERSION"]
        yield server


@pytest.fixture(scope="session")
def datasets_server(gsm8k_spec, chartqa_spec):
    """tests/fakes.py's datasets-server stand-in (real gsm8k test split, 40-row ChartQA slice
    with real chart PNGs), so nano-eval never reaches for the real one, which CI cannot reach.
    Yields the server object (.url, .rows_requests)."""
    from fakes import CHARTQA, GSM8K, FakeDatasetsServer

    with FakeDatasetsServer({GSM8K: gsm8k_spec, CHARTQA: chartqa_spec}) as server:
        yield server
