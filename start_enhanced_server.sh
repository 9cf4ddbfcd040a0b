#!/usr/bin/env bash
# Start SGLang with mixed-precision loading and expert tracking, or run the test suite.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SGLANG_ENHANCED_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
GPU_CONSTRAINTS="$ROOT/constraints-gpu.txt"
PLAN_ONLY=0

usage() {
    cat <<'EOF'
Usage:
  ./start_enhanced_server.sh                      set up .venv, build the demo checkpoints, serve the demo
  ./start_enhanced_server.sh -m MODEL -c CONFIG [-p PORT] [--host HOST] [--device cuda|cpu] [-- SGLANG_ARGS...]
  ./start_enhanced_server.sh --test [PYTEST_ARGS...]   set up what is missing and run the whole test suite
  ./start_enhanced_server.sh --install-plan       print the commands a first run installs with, run nothing
  ./start_enhanced_server.sh --help

Options:
  -m, --model MODEL     folder of the unquantized (fp16/bf16) release: config.json, tokenizer, weights
  -c, --config CONFIG   mixed-precision YAML (see mixed_precision_config.yaml)
  -p, --port PORT       HTTP port (default: the YAML's server.port, else 8080)
      --host HOST       bind address (default: the YAML's server.host, else 127.0.0.1)
      --device DEVICE   cuda or cpu (default: cuda where an NVIDIA GPU is visible, else cpu)
      --no-tracking     do not enable expert activation tracking (on by default here)
  --                    everything after it goes to SGLang's server unchanged

The first run creates .venv/ in the repository (the 'gpu' extra where an NVIDIA GPU is
visible, else 'cpu') and installs this package into it; later runs reuse it and only
reinstall the package when its sources changed.

Environment:
  SGLANG_ENHANCED_VENV             the environment to use (default: .venv in the repository)
  SGLANG_ENHANCED_EXTRA            gpu or cpu: which install to make, whatever the machine has
  SGLANG_ENHANCED_TORCH_INDEX_URL  package index for torch 2.7.1 built for your CUDA version
                                   (the gpu install; default: PyPI's build, CUDA 12.6)
  PYTHON                           the Python that creates the environment (default: python3)
EOF
}

log() { printf '[start_enhanced_server] %s\n' "$*" >&2; }

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

source_hash() {
    (cd "$ROOT" && find python pyproject.toml -type f \( -name '*.py' -o -name '*.pth' -o -name '*.toml' -o -name '*.html' \) \
        -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

# The extra to install: SGLANG_ENHANCED_EXTRA=gpu|cpu forces it, else 'gpu' where an NVIDIA GPU is visible.
choose_extra() {
    case "${SGLANG_ENHANCED_EXTRA:-}" in
        gpu|cpu) printf '%s\n' "$SGLANG_ENHANCED_EXTRA" ;;
        "") if has_nvidia_gpu; then echo gpu; else echo cpu; fi ;;
        *) log "SGLANG_ENHANCED_EXTRA must be gpu or cpu, not '$SGLANG_ENHANCED_EXTRA'"; exit 2 ;;
    esac
}

# Run a set-up command, or with --install-plan print it (shell-quoted, one a line) instead.
step() {
    if [ "$PLAN_ONLY" = 1 ]; then
        printf '%q' "$1"; shift; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

pip_in_venv() { step "$VENV/bin/python" -m pip "$@"; }

# NAME==VERSION as constraints-gpu.txt pins it.
gpu_pin() {
    local line
    line="$(grep -E "^$1==" "$GPU_CONSTRAINTS" || true)"
    if [ -z "$line" ]; then log "$GPU_CONSTRAINTS pins no $1"; exit 2; fi
    printf '%s\n' "$line"
}

# flashinfer-python 0.2.6.post1 is a source distribution whose build pins torch to the version it
# was built against; in pip's isolated build that is the newest torch, which then conflicts with
# SGLang's torch==2.7.1. So torch goes in first and flashinfer is built against it
# (--no-build-isolation); every step holds the pins of constraints-gpu.txt.
install_gpu_deps() {
    local wheels="$VENV/.sglang-enhanced-wheels" index=()
    if [ -n "${SGLANG_ENHANCED_TORCH_INDEX_URL:-}" ]; then index=(--index-url "$SGLANG_ENHANCED_TORCH_INDEX_URL"); fi
    pip_in_venv install -q -c "$GPU_CONSTRAINTS" ${index[@]+"${index[@]}"} \
        "$(gpu_pin torch)" "$(gpu_pin torchvision)" "$(gpu_pin torchaudio)"
    pip_in_venv install -q -c "$GPU_CONSTRAINTS" "setuptools>=77" "packaging>=24" wheel ninja numpy requests
    require_nvcc
    pip_in_venv wheel -q --no-deps --no-build-isolation -c "$GPU_CONSTRAINTS" -w "$wheels" \
        "$(gpu_pin flashinfer-python)"
    pip_in_venv install -q -c "$GPU_CONSTRAINTS" --find-links "$wheels" "$ROOT[gpu,test]"
}

create_venv() {
    step "$PYTHON_BIN" -m venv "$VENV"
    pip_in_venv install -q --upgrade pip
}

# flashinfer's build reads the CUDA version from nvcc (and its kernels are compiled with it when first used).
require_nvcc() {
    if [ "$PLAN_ONLY" = 1 ] || command -v nvcc >/dev/null 2>&1 \
        || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
        return 0
    fi
    log "the gpu install needs the CUDA toolkit's nvcc (for flashinfer-python): put it on PATH or set CUDA_HOME"
    exit 1
}

install_deps() {
    if [ "$1" = gpu ]; then
        install_gpu_deps
    else
        pip_in_venv install -q "$ROOT[$1,test]"
    fi
}

ensure_env() {
    local extra deps_stamp src_stamp
    extra="$(choose_extra)"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtual environment $VENV"
        create_venv
    fi
    deps_stamp="$VENV/.sglang-enhanced-deps-$extra-$(cat "$ROOT/pyproject.toml" "$GPU_CONSTRAINTS" | sha256sum | cut -c1-16)"
    if [ ! -f "$deps_stamp" ]; then
        log "installing sglang-enhanced[$extra,test] and its dependencies (first run takes a few minutes)"
        install_deps "$extra"
        rm -f "$VENV"/.sglang-enhanced-deps-* "$VENV"/.sglang-enhanced-src-*
        touch "$deps_stamp"
    fi
    src_stamp="$VENV/.sglang-enhanced-src-$(source_hash)"
    if [ ! -f "$src_stamp" ]; then
        log "installing the current sources of sglang-enhanced"
        "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$ROOT"
        rm -f "$VENV"/.sglang-enhanced-src-*
        touch "$src_stamp"
    fi
}

# What a first run on this machine installs, printed and not run.
print_install_plan() {
    local extra
    extra="$(choose_extra)"
    PLAN_ONLY=1
    create_venv
    install_deps "$extra"
}

build_demo() {
    "$VENV/bin/python" -m sglang.srt.enhanced.tools.demo --out "$ROOT/demo" >/dev/null
}

# The browser tests drive Debian's headless Chromium; install it where it is missing and we may.
ensure_browser() {
    if command -v chromium >/dev/null 2>&1; then return 0; fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "chromium not found (and cannot install it here): the browser tests will be skipped"
        return 0
    fi
    log "installing Debian's chromium for the browser tests"
    apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q chromium >/dev/null
}

run_tests() {
    ensure_env
    ensure_browser
    cd "$ROOT"
    log "ruff check"
    "$VENV/bin/python" -m ruff check .
    log "pytest"
    local status=0
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        log "no tests were collected"
        return 1
    fi
    return "$status"
}

MODEL="" CONFIG="" PORT="" HOST="" DEVICE="" TRACKING=1 MODE=serve
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --test) MODE=test; shift; break ;;
        --install-plan) print_install_plan; exit 0 ;;
        -m|--model) MODEL="$2"; shift 2 ;;
        -c|--config) CONFIG="$2"; shift 2 ;;
        -p|--port) PORT="$2"; shift 2 ;;
        --host) HOST="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --no-tracking) TRACKING=0; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) log "unknown argument: $1"; usage >&2; exit 2 ;;
    esac
done

if [ "$MODE" = test ]; then
    run_tests "$@"
    exit $?
fi

ensure_env
DEMO=0
if [ -z "$MODEL" ] && [ -z "$CONFIG" ]; then
    DEMO=1
    log "building the demo checkpoints in $ROOT/demo (once)"
    build_demo
    MODEL="$ROOT/demo/bf16"
    CONFIG="$ROOT/mixed_precision_config.yaml"
elif [ -z "$MODEL" ] || [ -z "$CONFIG" ]; then
    log "-m MODEL and -c CONFIG go together (or give neither to serve the demo)"
    exit 2
fi

ARGS=(--model "$MODEL" --config "$CONFIG")
[ -n "$PORT" ] && ARGS+=(--port "$PORT")
[ -n "$HOST" ] && ARGS+=(--host "$HOST")
[ -n "$DEVICE" ] && ARGS+=(--device "$DEVICE")
[ "$TRACKING" = 1 ] && ARGS+=(--enable-expert-tracking)

if [ "$DEMO" = 1 ]; then
    URL="http://${HOST:-127.0.0.1}:${PORT:-8080}"
    cat >&2 <<EOF
[start_enhanced_server] serving the demo model on $URL once it is up. Try:
  curl $URL/health
  curl $URL/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'
  curl "$URL/expert_stats?top_k=5"
  curl -o expert_stats.png "$URL/expert_stats/export?format=png"
  open $URL/expert_stats/dashboard in a browser (the live expert-load page)
EOF
fi
cd "$ROOT"
exec "$VENV/bin/python" "$ROOT/launch_enhanced_server.py" "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
