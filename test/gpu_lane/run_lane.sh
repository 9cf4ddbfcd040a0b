#!/usr/bin/env bash
# The GPU lane on a CUDA machine without sgl-kernel, flashinfer or a package index.
#
#   test/gpu_lane/run_lane.sh WHEEL_DIR OUT_DIR [STAGES]     STAGES: env,e2e,bench (default: all three)
#
# env   installs WHEEL_DIR's wheels into /tmp/lane-site (ahead of the machine's own packages on
#       PYTHONPATH), the product wheel over them, puts the stand-ins on PYTHONPATH and checks imports;
#       nothing else runs if it fails.
# e2e   the GPU-sensible e2e tests through the launcher, CUDA graphs on, files in parallel
#       (LANE_E2E_ONLY: a regular expression naming the jobs to run, e.g. 'demo|packed-.*').
# bench benchmarks/bench_served_gpu.py.
# Logs and results go to OUT_DIR; a summary table is printed last.
set -uo pipefail
LANE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$LANE/../.." && pwd)"
WHEELS="$(cd "${1:?wheel folder}" && pwd)"
OUT="${2:?output folder}"
STAGES="${3:-env,e2e,bench}"
SITE=/tmp/lane-site
E2E_LIMIT="${LANE_E2E_LIMIT:-240}"     # seconds; then SIGINT, so fixtures stop their servers
BENCH_LIMIT="${LANE_BENCH_LIMIT:-330}"
PY=python3
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }
stamp() { printf '[lane %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$SITE:$LANE/standins${PYTHONPATH:+:$PYTHONPATH}"

stamp "env: installing wheels"
t0=$SECONDS
deps=()
for w in "$WHEELS"/*.whl; do case "$(basename "$w")" in sglang_enhanced-*) ;; *) deps+=("$w") ;; esac; done
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${deps[@]}" \
    >"$OUT/pip.log" 2>&1 || { note "env: pip install failed (see pip.log)"; tail -20 "$OUT/pip.log"; exit 1; }
# The product is laid over SGLang's sglang/srt tree, as its wheel installs it.
$PY -m zipfile -e "$WHEELS"/sglang_enhanced-*.whl "$SITE" || { note "env: product wheel failed"; exit 1; }
stamp "env: installed in $((SECONDS - t0)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if ! $PY "$LANE/check_env.py" 2>&1 | tee "$OUT/env.log"; then
    note "env: FAILED (see env.log)"
    exit 1
fi
note "env: ok ($(grep -E '^  (sgl_kernel|vllm._custom_ops|flashinfer):' "$OUT/env.log" | tr -s ' ' | tr '\n' ';'))"

if [[ ",$STAGES," == *,e2e,* ]]; then
    stamp "e2e: starting"
    t0=$SECONDS
    E2E="$OUT/e2e"
    mkdir -p "$E2E" /tmp/lane-e2e
    # One pytest per file (per architecture for the heavy ones), all at once on the one GPU.
    jobs=(
        "standins:test/gpu_lane/test_standins.py test/gpu"
        "demo:test/e2e/test_serve_demo.py"
        "tracking_server:test/e2e/test_tracking_server.py"
        "packed-demo:test/e2e/test_packed_serving.py -k demo"
    )
    for arch in qwen2_moe qwen3_moe mixtral olmoe; do
        jobs+=("equivalence-$arch:test/e2e/test_load_equivalence.py -k $arch")
        jobs+=("counts-$arch:test/e2e/test_tracking_counts.py -k $arch")
        [ "$arch" != qwen2_moe ] && jobs+=("packed-$arch:test/e2e/test_packed_serving.py -k $arch")
    done
    if [ -n "${LANE_E2E_ONLY:-}" ]; then  # a regular expression over the job names
        kept=()
        for job in "${jobs[@]}"; do [[ "${job%%:*}" =~ ^(${LANE_E2E_ONLY})$ ]] && kept+=("$job"); done
        jobs=("${kept[@]}")
    fi
    pids=()
    if [[ ",$STAGES," == *,bench,* ]]; then
        # The benchmark's checkpoints are built meanwhile (nothing is measured while building).
        mkdir -p "$OUT/bench"
        (cd "$ROOT" && $PY benchmarks/bench_served_gpu.py --workdir /tmp/lane-bench --out "$OUT/bench" \
            --build-only ${LANE_BENCH_ARGS:-} >"$OUT/bench/build.log" 2>&1) &
        BUILD_PID=$!
    fi
    for job in "${jobs[@]}"; do
        name="${job%%:*}"
        (cd "$ROOT" && SGLANG_ENHANCED_E2E_DEVICE=cuda timeout -s INT -k 20 "$E2E_LIMIT" \
            $PY -m pytest -q -p no:cacheprovider -o addopts="" --basetemp="/tmp/lane-e2e/$name" \
            -rA ${job#*:} >"$E2E/$name.log" 2>&1; echo $? >"$E2E/$name.rc") &
        pids+=($!)
    done
    wait "${pids[@]}"
    for job in "${jobs[@]}"; do
        name="${job%%:*}"
        note "e2e $name: rc=$(cat "$E2E/$name.rc") $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error).* =+$' "$E2E/$name.log" | tail -1)"
    done
    find /tmp/lane-e2e -name '*.log' -size -8M -exec cp --parents {} "$E2E/" \; 2>/dev/null
    tar -czf "$OUT/e2e.tar.gz" -C "$OUT" e2e && rm -rf "$E2E"
    stamp "e2e: done in $((SECONDS - t0)) s"
fi

if [[ ",$STAGES," == *,bench,* ]]; then
    stamp "bench: starting"
    t0=$SECONDS
    [ -n "${BUILD_PID:-}" ] && wait "$BUILD_PID"
    (cd "$ROOT" && timeout -s INT -k 20 "$BENCH_LIMIT" $PY benchmarks/bench_served_gpu.py --workdir /tmp/lane-bench \
        --out "$OUT/bench" ${LANE_BENCH_ARGS:-}) 2>&1 | tee "$OUT/bench.log"
    note "bench: rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s"
    cp "$OUT/bench/bench_served_gpu.json" "$OUT/" 2>/dev/null
    tar -czf "$OUT/bench.tar.gz" -C "$OUT" bench && rm -rf "$OUT/bench"
    sed -n '/^Qwen3-30B-A3B-shaped/,$p' "$OUT/bench.log" >>"$SUMMARY"
fi
stamp "summary"
cat "$SUMMARY"
