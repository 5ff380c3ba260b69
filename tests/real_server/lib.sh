# What the setup scripts (llama.cpp, vLLM, MAX) share. Sourced by each, after they set
#   SETUP_NAME   the prefix of their log lines
#   HELP_LINES   the line range of their header comment that --help prints (e.g. 2,20)
# and PYTHON (any python3: it only computes hashes and unpacks files).

log() { printf '[%s %s] %s\n' "$SETUP_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# MODE from the one optional argument: ensure (none), print (--print-paths), smoke (--smoke)
parse_mode() {
  MODE=ensure
  case "${1:-}" in
    "") ;;
    --print-paths) MODE=print ;;
    --smoke) MODE=smoke ;;
    -h|--help) sed -n "${HELP_LINES}p" "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --print-paths, --smoke or nothing)" >&2; exit 2 ;;
  esac
}

sha256_of() {  # portable: sha256sum may be missing on macOS; python is always here
  "$PYTHON" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""):
        h.update(b)
print(h.hexdigest())
PY
}

# DIR, the cache folder named $1 under NANO_EVAL_CI_CACHE (default ~/.cache/nano-eval-ci)
cache_dir() { DIR="${NANO_EVAL_CI_CACHE:-$HOME/.cache/nano-eval-ci}/$1"; }

# LOCK_SHA (of $LOCK, the pinned requirements), DIR (cache_dir "$1_lock-<its hash>_$2") and VPY,
# the python of the venv built there from the lock
locked_venv_dir() {
  LOCK_SHA=$(sha256_of "$LOCK")
  cache_dir "$1_lock-${LOCK_SHA:0:10}_$2"
  VPY="$DIR/venv/bin/python"
}

verify() {  # verify FILE EXPECTED_SHA
  local got; got=$(sha256_of "$1")
  [ "$got" = "$2" ] || die "sha256 mismatch for $1: got $got, want $2"
}

# One setup at a time per cache folder: a second caller waits, then finds it ready.
# The lock is file descriptor 9, held until the script exits.
lock_cache() {  # lock_cache DIR
  exec 9>"$1/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 3600 9 || die "timed out waiting for the lock on $1/.lock"
  fi
}

# begin_setup DIR, after the caller defined is_ready and print_paths: --print-paths prints
# and exits; otherwise takes the lock, and is true when DIR is ready (a cache hit), else
# makes an empty $WORK (removed at exit) and is false. T0 is the start time.
begin_setup() {
  if [ "$MODE" = print ]; then
    if is_ready; then print_paths; exit 0; fi
    echo "not built yet: $1 (run $0 without arguments)" >&2; exit 1
  fi
  mkdir -p "$1"
  T0=$(date +%s)
  lock_cache "$1"
  if is_ready; then log "cache hit: $1"; return 0; fi
  WORK="$1/work"
  rm -rf "$WORK"; mkdir -p "$WORK/dl"
  trap 'rm -rf "$WORK"' EXIT
  return 1
}

# python311 LOCK_NAME OVERRIDE_VAR: the CPython 3.11 a locked venv is made with (the locks are
# resolved for CPython 3.11 on x86_64 Linux): $OVERRIDE_VAR if set, else python3.11 or python3.
python311() {
  local p=${!2:-}
  if [ -z "$p" ]; then
    for p in python3.11 python3 ""; do
      [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 \
        && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' && break
    done
  fi
  [ -n "$p" ] || die "no Python 3.11 found ($1 is for CPython 3.11; set $2)"
  [ "$(uname -m)" = x86_64 ] || die "$1 is for x86_64 Linux, this is $(uname -m)"
  echo "$p"
}

# locked_venv LOCK_NAME OVERRIDE_VAR WHAT: a new venv in $DIR/venv (VPY) made by python311 and
# holding exactly the packages of $LOCK (--no-deps: the lock is the complete, hash-pinned set,
# so nothing is resolved); the stamps of what was built from an older one are removed. T1 is the
# start time.
locked_venv() {
  local base; base=$(python311 "$1" "$2")
  log "creating the venv with $base and installing $3"
  rm -rf "$DIR/venv" "$DIR/venv.stamp" "$DIR/proved.stamp"
  "$base" -m venv "$DIR/venv"
  T1=$(date +%s)
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r "$LOCK" >&2 \
    || die "pip install -r $LOCK failed"
}
