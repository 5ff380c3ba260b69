#!/usr/bin/env bash
# Build (once) Modular MAX (`modular==26.7.0`: max 26.7.0 + mojo 1.2.0) in its own Python 3.11
# venv from the Python package index only, and prove that it serves, on CPU, the SAME float32
# SmolLM2-135M-Instruct HF folder that vLLM serves (made by setup_vllm.sh, which this runs).
#
#   bash tests/real_server/setup_max.sh               # ensure ready, print paths
#   bash tests/real_server/setup_max.sh --print-paths # print paths if cached; exit 1 if not
#   bash tests/real_server/setup_max.sh --smoke       # ensure ready, then start MAX on the
#                                                     # model, one request, stop it
#
# stdout is exactly these lines (shell-quoted, so `eval "$(bash ...)"` sets them):
#   MAX_PYTHON=/abs/venv/bin/python
#   MAX_VERSION=26.7.0
#   MAX_MODEL=/abs/.../smollm2-135m-instruct-f32-hf     (setup_vllm.sh's VLLM_MODEL)
#   MAX_SERVE=/abs/venv/bin/max                         (the `max` executable)
#   MAX_CACHE=/abs/modular                              (MODULAR_DERIVED_PATH: compiled graphs)
# Start a server (the env vars are required: without them MAX sends telemetry to an outside
# host, keeps its compile cache in ~/.cache/modular and recompiles for minutes):
#   HF_HUB_OFFLINE=1 MAX_SERVE_DISABLE_TELEMETRY=1 MODULAR_TELEMETRY_ENABLED=0 \
#   MODULAR_CRASH_REPORTING_ENABLED=0 MODULAR_DERIVED_PATH=$MAX_CACHE \
#   $MAX_SERVE serve --model-path $MAX_MODEL --devices cpu --host 127.0.0.1 --port P \
#     --served-model-name smollm2-135m-instruct --max-length 4096
# (--host defaults to 0.0.0.0. MAX_SERVE_DISABLE_TELEMETRY=1 also turns off the Prometheus
# metrics server, which otherwise listens on port 8001 (MAX_SERVE_METRICS_ENDPOINT_PORT).)
# Progress and timings go to stderr.
#
# Cache: ${NANO_EVAL_CI_CACHE:-$HOME/.cache/nano-eval-ci}/<key>/{venv,modular} where <key>
# names the modular version, the hash of max-lock.txt and the arch; compiled graphs live in
# modular/cache/.max_cache. The ready stamp is written only after MAX has served a real
# completion (prove_server.py), which also fills that compile cache (78 MB). Idempotent and
# safe to run concurrently (flock). Cold: ~5 min (venv ~2 min: 115 packages, 2.0 GB; first
# completion ~3 min after start, nearly all graph compile; 12 min on a heavily loaded machine);
# warm: ~1 s; a warm server answers ~25 s after start (--smoke: ~30 s).
# MAX also reads MAX_SERVE_* settings from a .env file in its working directory, if any.
# The whole script is one { ... } block: bash parses it completely before running it.
{
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- pins -------------------------------------------------------------------
MAX_PKG=modular
MAX_VER=26.7.0
LOCK="$HERE/max-lock.txt"             # every package of the venv, ==version + sha256
SERVED_NAME=smollm2-135m-instruct
PROVE_TIMEOUT=1800                    # the first graph compile is slow on 2 busy cores
# -----------------------------------------------------------------------------

PYTHON=${PYTHON:-python3}
SETUP_NAME=setup_max
HELP_LINES=2,35
# shellcheck source=lib.sh
source "$HERE/lib.sh"
parse_mode "$@"

# The model: setup_vllm.sh's float32 HF folder (the same weights vLLM and llama.cpp serve).
# --print-paths must not build anything, so it only asks setup_vllm.sh for cached paths.
VLLM_MODEL=
if [ "$MODE" = print ]; then
  VLLM_OUT=$(bash "$HERE/setup_vllm.sh" --print-paths 2>/dev/null) || VLLM_OUT=
else
  VLLM_OUT=$(bash "$HERE/setup_vllm.sh") || die "setup_vllm.sh failed (it makes the model MAX serves)"
fi
eval "$VLLM_OUT"
MODEL_DIR=$VLLM_MODEL

locked_venv_dir "modular-${MAX_VER}" "$(uname -m)"
MAX_BIN="$DIR/venv/bin/max"
MAX_CACHE="$DIR/modular"

# The environment every MAX server here runs in (see the header).
max_env() {
  env HF_HUB_OFFLINE=1 MAX_SERVE_DISABLE_TELEMETRY=1 MODULAR_TELEMETRY_ENABLED=0 \
    MODULAR_CRASH_REPORTING_ENABLED=0 MODULAR_DERIVED_PATH="$MAX_CACHE" "$@"
}
# The server command for prove_server.py, which fills in {port}.
SERVE_CMD=("$MAX_BIN" serve --model-path "$MODEL_DIR" --devices cpu --host 127.0.0.1 \
  --port '{port}' --served-model-name "$SERVED_NAME" --max-length 4096)

# stamps: what each artifact was made from (a changed pin or model redoes that step)
venv_stamp() { printf '%s %s\n' "$LOCK_SHA" "$MAX_VER"; }
proved_stamp() {  # the venv, the model folder and what made it (setup_vllm.sh's stamp)
  printf '%s %s %s\n' "$(venv_stamp)" "$MODEL_DIR" "$(cat "$MODEL_DIR.stamp" 2>/dev/null || echo none)"
}
stamp_ok() { [ -f "$1.stamp" ] && [ "$(cat "$1.stamp")" = "$2" ]; }

print_paths() {
  printf 'MAX_PYTHON=%q\nMAX_VERSION=%q\nMAX_MODEL=%q\nMAX_SERVE=%q\nMAX_CACHE=%q\n' \
    "$VPY" "$MAX_VER" "$MODEL_DIR" "$MAX_BIN" "$MAX_CACHE"
}
is_ready() {
  [ -n "$MODEL_DIR" ] && stamp_ok "$DIR/venv" "$(venv_stamp)" && stamp_ok "$DIR/proved" "$(proved_stamp)"
}

if ! begin_setup "$DIR"; then
  [ -n "$MODEL_DIR" ] && [ -f "$MODEL_DIR/config.json" ] || die "setup_vllm.sh printed no usable VLLM_MODEL"

  # 1. the venv ----------------------------------------------------------------
  if ! stamp_ok "$DIR/venv" "$(venv_stamp)"; then
    # (pip 23's resolver cannot even resolve modular==26.7.0: the lock needs no resolution)
    locked_venv max-lock.txt NANO_EVAL_MAX_BASE_PYTHON "$MAX_PKG==$MAX_VER (~2 min, 2.0 GB)"
    "$VPY" -m pip check >&2 || die "the venv's requirements are broken"
    max_env "$VPY" -c 'import max.serve, max.pipelines' || die "the venv does not import max.serve"
    [ -x "$MAX_BIN" ] || die "no max executable in the venv"
    log "venv ready in $(( $(date +%s) - T1 )) s"
    venv_stamp > "$DIR/venv.stamp"
  fi

  # 2. prove it serves a completion (also compiles the graphs into $MAX_CACHE) ---
  if ! stamp_ok "$DIR/proved" "$(proved_stamp)"; then
    mkdir -p "$MAX_CACHE"
    rm -f "$DIR/proved.stamp"
    log "proving MAX serves $MODEL_DIR on CPU (the first graph compile takes minutes; log: $DIR/prove-server.log)"
    T1=$(date +%s)
    max_env "$PYTHON" "$HERE/prove_server.py" max-serve "$DIR/prove-server.log" "$PROVE_TIMEOUT" -- "${SERVE_CMD[@]}" \
      || { tail -n 30 "$DIR/prove-server.log" >&2; die "MAX did not serve a completion"; }
    log "MAX served its first completion $(( $(date +%s) - T1 )) s after start (compile cache: $MAX_CACHE)"
    proved_stamp > "$DIR/proved.stamp"
  fi

  rm -rf "$WORK"
  trap - EXIT
  log "setup done in $(( $(date +%s) - T0 )) s: $DIR"
fi

if [ "$MODE" = smoke ]; then
  log "smoke: starting MAX on a free 127.0.0.1 port, one chat completion, stop (~30 s)"
  T1=$(date +%s)
  max_env "$PYTHON" "$HERE/prove_server.py" max-serve "$DIR/smoke-server.log" "$PROVE_TIMEOUT" -- "${SERVE_CMD[@]}" \
    || { tail -n 30 "$DIR/smoke-server.log" >&2; die "smoke test failed"; }
  log "smoke OK in $(( $(date +%s) - T1 )) s"
fi

print_paths
exit
}
