#!/usr/bin/env bash
# Build (once) SGLang 0.5.23 in its own Python 3.11 venv from the Python package index only, and
# prove that it serves, on CPU, the SAME float32 SmolLM2-135M-Instruct HF folder that vLLM serves
# (made by setup_vllm.sh, which this runs).
#
#   bash tests/real_server/setup_sglang.sh               # ensure ready, print paths
#   bash tests/real_server/setup_sglang.sh --print-paths # print paths if cached; exit 1 if not
#   bash tests/real_server/setup_sglang.sh --smoke       # ensure ready, then start SGLang on the
#                                                        # model, one request, stop it
#
# stdout is exactly these lines (shell-quoted, so `eval "$(bash ...)"` sets them):
#   SGLANG_PYTHON=/abs/venv/bin/python
#   SGLANG_VERSION=0.5.23
#   SGLANG_MODEL=/abs/.../smollm2-135m-instruct-f32-hf       (setup_vllm.sh's VLLM_MODEL)
#   SGLANG_BF16_MODEL=/abs/.../smollm2-135m-instruct-bf16-hf (its VLLM_BF16_MODEL; empty if none)
# Start a server (the environment is required: see tests/real_server/README.md):
#   SGLANG_USE_CPU_ENGINE=1 OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 HF_HUB_OFFLINE=1 \
#   TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE=file:///tmp/F \
#   $SGLANG_PYTHON -m sglang.launch_server \
#     --model-path $SGLANG_MODEL --served-model-name smollm2-135m-instruct --host 127.0.0.1 \
#     --port P --device cpu --dtype float32 --context-length 4096 --max-total-tokens 16384 \
#     --attention-backend torch_native --disable-overlap-schedule --disable-cuda-graph --sleep-on-idle
# (--sleep-on-idle: an idle SGLang scheduler otherwise keeps ~half a core busy polling. The
# override: torch.distributed's rendezvous in a file F that does not exist yet; by default it is a
# TCP store listening on every interface.)
# Progress and timings go to stderr.
#
# No CPU build of SGLang's kernels (sgl_kernel) is on any registry: the venv gets a stand-in
# (sgl_kernel_standin.py) whose every op raises NotImplementedError naming itself. It registers
# no torch op, so SGLang's AMX paths stay off (checked here: cpu_has_amx_support() is False);
# ONEDNN_MAX_CPU_ISA keeps torch's own oneDNN matmuls off AMX too (bf16), on every CPU.
#
# Cache: ${NANO_EVAL_CI_CACHE:-$HOME/.cache/nano-eval-ci}/<key>/venv where <key> names the
# sglang version, the hash of sglang-lock.txt and the arch. The ready stamp is written only
# after SGLang has served a real completion (prove_server.py). Idempotent and safe to run
# concurrently (flock). Cold: 2-4 min (venv 1.5-3 min: 128 packages, 6.2 GB, torch from this
# machine's disk; first completion 30-60 s after start); warm: ~1 s.
# The whole script is one { ... } block: bash parses it completely before running it.
{
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- pins -------------------------------------------------------------------
SGLANG_PKG=sglang
SGLANG_VER=0.5.23
LOCK="$HERE/sglang-lock.txt"          # every package of the venv, ==version + sha256
STANDIN="$HERE/sgl_kernel_standin.py" # becomes the venv's sgl_kernel/__init__.py
SERVED_NAME=smollm2-135m-instruct
PROVE_TIMEOUT=900                     # ready in 35-100 s; minutes on 2 busy cores
# -----------------------------------------------------------------------------

PYTHON=${PYTHON:-python3}
SETUP_NAME=setup_sglang
HELP_LINES=2,37
# shellcheck source=lib.sh
source "$HERE/lib.sh"
parse_mode "$@"

# The model: setup_vllm.sh's float32 HF folder (the same weights vLLM, llama.cpp and MAX serve).
# --print-paths must not build anything, so it only asks setup_vllm.sh for cached paths.
VLLM_MODEL=
VLLM_BF16_MODEL=
if [ "$MODE" = print ]; then
  VLLM_OUT=$(bash "$HERE/setup_vllm.sh" --print-paths 2>/dev/null) || VLLM_OUT=
else
  VLLM_OUT=$(bash "$HERE/setup_vllm.sh") || die "setup_vllm.sh failed (it makes the model SGLang serves)"
fi
eval "$VLLM_OUT"
MODEL_DIR=$VLLM_MODEL

locked_venv_dir "sglang-${SGLANG_VER}" "$(uname -m)"

# The environment every SGLang server here runs in (see the header). The rendezvous of
# torch.distributed goes through a fresh file: its default, a TCP store, listens on every
# interface, not only on 127.0.0.1.
sglang_env() {
  local store="$DIR/torch-dist-store.$$"
  rm -f "$store"
  env SGLANG_USE_CPU_ENGINE=1 OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE="file://$store" "$@"
  local rc=$?
  rm -f "$store"
  return $rc
}
# The server command for prove_server.py, which fills in {port}.
SERVE_CMD=("$VPY" -m sglang.launch_server --model-path "$MODEL_DIR" --served-model-name "$SERVED_NAME" \
  --host 127.0.0.1 --port '{port}' --device cpu --dtype float32 --context-length 4096 \
  --max-total-tokens 16384 --attention-backend torch_native --disable-overlap-schedule --disable-cuda-graph \
  --sleep-on-idle --random-seed 0)

# stamps: what each artifact was made from (a changed pin, stand-in or model redoes that step)
venv_stamp() { printf '%s %s %s\n' "$LOCK_SHA" "$SGLANG_VER" "$(sha256_of "$STANDIN")"; }
proved_stamp() {  # the venv, the model folder and what made it (setup_vllm.sh's stamp)
  printf '%s %s %s\n' "$(venv_stamp)" "$MODEL_DIR" "$(cat "$MODEL_DIR.stamp" 2>/dev/null || echo none)"
}
stamp_ok() { [ -f "$1.stamp" ] && [ "$(cat "$1.stamp")" = "$2" ]; }

print_paths() {
  printf 'SGLANG_PYTHON=%q\nSGLANG_VERSION=%q\nSGLANG_MODEL=%q\nSGLANG_BF16_MODEL=%q\n' \
    "$VPY" "$SGLANG_VER" "$MODEL_DIR" "$VLLM_BF16_MODEL"
}
is_ready() {
  [ -n "$MODEL_DIR" ] && stamp_ok "$DIR/venv" "$(venv_stamp)" && stamp_ok "$DIR/proved" "$(proved_stamp)"
}

# A server log that holds the stand-in's marker or a NotImplementedError: SGLang called an op
# of sgl_kernel (the tests check their servers' logs the same way).
standin_called() { grep -q -e 'sgl_kernel stand-in called' -e 'NotImplementedError' "$1"; }

if ! begin_setup "$DIR"; then
  [ -n "$MODEL_DIR" ] && [ -f "$MODEL_DIR/config.json" ] || die "setup_vllm.sh printed no usable VLLM_MODEL"

  # 1. the venv, and the sgl_kernel stand-in -------------------------------------
  if ! stamp_ok "$DIR/venv" "$(venv_stamp)"; then
    # (sglang's declared dependencies are CUDA-only packages: no pip check, it would name them
    # all as missing)
    locked_venv sglang-lock.txt NANO_EVAL_SGLANG_BASE_PYTHON \
      "$SGLANG_PKG==$SGLANG_VER (~1.5-3 min, 6.2 GB)"
    SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ ! -e "$SITE/sgl_kernel" ] || die "a real sgl_kernel got installed: $SITE/sgl_kernel"
    mkdir -p "$SITE/sgl_kernel"
    cp "$STANDIN" "$SITE/sgl_kernel/__init__.py"
    # The plain paths: SGLang's AMX code needs torch.ops.sgl_kernel, which the stand-in does not
    # register. Checked here, where it is decided (sglang.srt.utils.common.cpu_has_amx_support).
    sglang_env "$VPY" - >&2 <<'PY' || die "the venv does not import SGLang's CPU path, or would take its AMX path"
import torch, sgl_kernel, sglang.launch_server
from sglang.srt.utils import common
assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed"), "torch.ops.sgl_kernel has ops"
assert not common.cpu_has_amx_support(), "SGLang would take its AMX paths"
print(f"[setup_sglang] torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
      f"AMX tiles on this CPU: {torch.cpu._is_amx_tile_supported()}; SGLang's AMX paths: off")
PY
    log "venv ready in $(( $(date +%s) - T1 )) s ($(du -sh "$DIR/venv" | cut -f1))"
    venv_stamp > "$DIR/venv.stamp"
  fi

  # 2. prove it serves a completion, and that it called no stand-in op ------------
  if ! stamp_ok "$DIR/proved" "$(proved_stamp)"; then
    rm -f "$DIR/proved.stamp"
    log "proving SGLang serves $MODEL_DIR on CPU (ready in 30-100 s; log: $DIR/prove-server.log)"
    T1=$(date +%s)
    sglang_env "$PYTHON" "$HERE/prove_server.py" SGLang "$DIR/prove-server.log" "$PROVE_TIMEOUT" -- "${SERVE_CMD[@]}" \
      || { tail -n 30 "$DIR/prove-server.log" >&2; die "SGLang did not serve a completion"; }
    ! standin_called "$DIR/prove-server.log" \
      || die "SGLang called an op of the sgl_kernel stand-in (see $DIR/prove-server.log): not marked ready"
    log "SGLang served its first completion $(( $(date +%s) - T1 )) s after start"
    proved_stamp > "$DIR/proved.stamp"
  fi

  rm -rf "$WORK"
  trap - EXIT
  log "setup done in $(( $(date +%s) - T0 )) s: $DIR"
fi

if [ "$MODE" = smoke ]; then
  log "smoke: starting SGLang on a free 127.0.0.1 port, one chat completion, stop (~1 min)"
  T1=$(date +%s)
  sglang_env "$PYTHON" "$HERE/prove_server.py" SGLang "$DIR/smoke-server.log" "$PROVE_TIMEOUT" -- "${SERVE_CMD[@]}" \
    || { tail -n 30 "$DIR/smoke-server.log" >&2; die "smoke test failed"; }
  ! standin_called "$DIR/smoke-server.log" || die "SGLang called an op of the sgl_kernel stand-in ($DIR/smoke-server.log)"
  log "smoke OK in $(( $(date +%s) - T1 )) s"
fi

print_paths
exit
}
