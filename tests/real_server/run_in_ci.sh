#!/usr/bin/env bash
# CI entry for nano-eval's real-server tests: llama.cpp llama-server + SmolLM2-135M
# (setup_llama_server.sh), vLLM CPU + the same weights in float32 + a tiny Idefics3 VLM
# (setup_vllm.sh), MAX CPU on the same float32 weights (setup_max.sh, after setup_vllm.sh),
# SGLang CPU on the same float32 weights (setup_sglang.sh, after setup_max.sh).
#
#   bash tests/real_server/run_in_ci.sh --prepare-bg   # start both setups in the background, return at once
#   ...run the other test suites...
#   bash tests/real_server/run_in_ci.sh [pytest args]  # wait for / finish the setups, then run the tests
#
# The setups cache under ${NANO_EVAL_CI_CACHE:-$HOME/.cache/nano-eval-ci}; a warm cache
# makes them take ~1 s. A cold one builds llama-server (~10-12 min on 2 cores), the vLLM
# venv (~4 min), then the MAX venv and its compiled graphs (~5 min), then the SGLang venv
# (~4 min: one chain beside the llama.cpp build, so that 2 cores run two setups); in the background
# they run under `nice`, so the tests in the foreground keep priority. Each setup proves its
# server answers a real completion on this machine before it marks itself ready. A foreground call after --prepare-bg blocks on each setup's
# lock until its background job is done, then finds the cache ready; if a background job
# failed it retries.
# The whole script is one { ... } block: bash parses it completely before running it, so
# editing or checking out this file while it runs (a long build) cannot derail it.
{
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
BG_LOG=${NANO_EVAL_SETUP_LOG:-${TMPDIR:-/tmp}/nano-eval-llama-setup.log}
VLLM_BG_LOG=${NANO_EVAL_VLLM_SETUP_LOG:-${TMPDIR:-/tmp}/nano-eval-vllm-setup.log}

ensure_toolchain() {
  local missing=""
  for t in cmake make c++; do command -v "$t" >/dev/null 2>&1 || missing="$missing $t"; done
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[run_in_ci] installing build tools (missing:$missing)" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake build-essential >&2
  else
    echo "[run_in_ci] missing build tools:$missing (need cmake and a C++ compiler)" >&2
    return 1
  fi
}

if [ "${1:-}" = "--prepare-bg" ]; then
  ensure_toolchain
  # setsid + nohup: survives the caller's shell; the setup's flock serializes with later calls.
  nohup setsid nice -n 10 bash "$HERE/setup_llama_server.sh" >"$BG_LOG" 2>&1 </dev/null &
  echo "[run_in_ci] llama-server setup started in the background (pid $!, log $BG_LOG)" >&2
  # MAX and SGLang serve setup_vllm.sh's float32 folder: their setups run setup_vllm.sh first
  # (which waits on the lock of the vLLM setup above), then build their own venvs. One chain,
  # beside the llama.cpp build: a third setup in parallel would only share the same 2 cores.
  nohup setsid nice -n 10 bash -c 'bash "$1/setup_vllm.sh" && bash "$1/setup_max.sh" && bash "$1/setup_sglang.sh"' \
    _ "$HERE" >"$VLLM_BG_LOG" 2>&1 </dev/null &
  echo "[run_in_ci] vLLM, then MAX, then SGLang, setup started in the background (pid $!, log $VLLM_BG_LOG)" >&2
  exit 0
fi

T0=$(date +%s)
ensure_toolchain
if [ -f "$BG_LOG" ]; then
  echo "[run_in_ci] waiting for the background setup if it is still running (log: $BG_LOG)" >&2
fi
if ! bash "$HERE/setup_llama_server.sh" >/dev/null; then
  [ -f "$BG_LOG" ] && { echo "--- background setup log ---" >&2; tail -n 40 "$BG_LOG" >&2; }
  exit 1
fi
echo "[run_in_ci] llama-server ready after $(( $(date +%s) - T0 )) s" >&2
if ! bash "$HERE/setup_vllm.sh" >/dev/null; then
  [ -f "$VLLM_BG_LOG" ] && { echo "--- background vLLM setup log ---" >&2; tail -n 40 "$VLLM_BG_LOG" >&2; }
  exit 1
fi
echo "[run_in_ci] vLLM ready after $(( $(date +%s) - T0 )) s" >&2
if ! bash "$HERE/setup_max.sh" >/dev/null; then
  [ -f "$VLLM_BG_LOG" ] && { echo "--- background vLLM/MAX setup log ---" >&2; tail -n 40 "$VLLM_BG_LOG" >&2; }
  exit 1
fi
echo "[run_in_ci] MAX ready after $(( $(date +%s) - T0 )) s" >&2
if ! bash "$HERE/setup_sglang.sh" >/dev/null; then
  [ -f "$VLLM_BG_LOG" ] && { echo "--- background vLLM/MAX/SGLang setup log ---" >&2; tail -n 40 "$VLLM_BG_LOG" >&2; }
  exit 1
fi
echo "[run_in_ci] SGLang ready after $(( $(date +%s) - T0 )) s" >&2

cd "$ROOT"
set +e
"$PYTHON" -m pytest tests/real_server -m real_server -q -rA -p no:cacheprovider --durations=0 "$@"
rc=$?
set -e
echo "[run_in_ci] real-server tests finished with exit code $rc after $(( $(date +%s) - T0 )) s" >&2
exit $rc
}
