#!/usr/bin/env bash
# Runs on the lent GPU machine (the `device` tool of this workplace): the GPU test suites and, optionally, the
# benchmark, over a build made on the CPU machine and carried along (build/ with libflash_kda.so).
#   bash scripts/device_gpu_suite.sh [tests,bench,profile | all] [pytest args...]   (all = tests,bench)
# Logs go to $OUT (at most 8 files come back, so logs are grouped); a short summary is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what=${1:-all}
shift || true
[ "$what" = all ] && what=tests,bench
wants() { [[ ",$what," == *",$1,"* ]]; }
out=${OUT:-/tmp/flash_kda_out}
mkdir -p "$out"
build=${FLASH_KDA_BUILD_DIR:-build}

# FLA (pure Python) travels as wheels in .whl/; .whl_layer/ may hold flash-linear-attention and transformers
# with their dependencies, for the KimiDeltaAttention layer test (too large to carry on every call).
wheels=$(ls .whl/*.whl .whl_layer/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export FLASH_KDA_LIBRARY="$PWD/$build/libflash_kda.so"
export PYTHONUNBUFFERED=1
# FLA's Triton autotuning takes minutes per new shape. TRITON_CACHE_AUTOTUNING keeps its results as small
# *.autotune.json files in the cache; only those travel back ($OUT/triton_autotune.tgz, ~25 KB, where the whole
# cache of compiled kernels is ~45 MB): copy it to .tc/ and carry .tc, and the next call compiles only the
# chosen configurations instead of timing every one (FLA's bench of all cases: ~100 s instead of > 400 s).
export TRITON_CACHE_DIR="$PWD/.triton_cache" TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
[ -f .tc/triton_autotune.tgz ] && tar xzf .tc/triton_autotune.tgz -C "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader | tee "$out/cpp.log"

summary=()
if wants tests; then
  for exe in "$build"/tests/cpp/test_* "$build"/examples/cpp/flash_kda_example; do
    [ -x "$exe" ] || continue
    "$exe" > /tmp/one.log 2>&1
    rc=$?
    cat /tmp/one.log >> "$out/cpp.log"
    summary+=("$(basename "$exe"): rc=$rc $(tail -n 1 /tmp/one.log)")
  done
  # Bounded (FLASH_KDA_TEST_TIMEOUT seconds) so that the bench and the logs still fit in one call; -v names
  # every test as it finishes, so a cut-off run still says how far it got.
  timeout "${FLASH_KDA_TEST_TIMEOUT:-400}" python3 -m pytest ${FLASH_KDA_PYTEST_PATHS:-tests/python} -v -rfEs -n 8 --durations=15 "$@" \
    > "$out/pytest.log" 2>&1
  summary+=("pytest rc=$?: $(tail -n 1 "$out/pytest.log")")
fi
if wants bench; then
  # Bounded, so that the cache below still comes back when FLA's first tuning runs long.
  timeout "${FLASH_KDA_BENCH_TIMEOUT:-540}" python3 -m flash_kda.bench --results "$out" ${FLASH_KDA_BENCH_ARGS:-} \
    > "$out/bench.log" 2>&1
  summary+=("bench rc=$?")
fi
if wants profile; then
  ncu --clock-control none -k regex:kda_forward -c 1 --set full --import-source yes -o /tmp/prof -f \
    python3 benchmarks/profile_case.py ${FLASH_KDA_PROFILE_ARGS:-} > /tmp/ncu_run.log 2>&1
  summary+=("ncu rc=$?")
  cuobjdump -sass "$build/libflash_kda.so" > "$out/sass.txt" 2>&1
  ncu -i /tmp/prof.ncu-rep --print-details all > "$out/ncu_details.txt" 2>&1
  ncu -i /tmp/prof.ncu-rep --page source --csv --print-source sass > "$out/ncu_source.csv" 2>&1
  grep -E "Duration|Registers|Achieved Occupancy|Warp Cycles Per Issued|No Eligible" "$out/ncu_details.txt" | head -20
fi
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$out/triton_autotune.tgz" -T -)
ls -la "$out" | tail -n +2
echo "==== summary ===="
grep -E "^(FAILED|ERROR)|passed|failed|error" "$out/pytest.log" 2>/dev/null | grep -v "PASSED" | tail -n 40
[ -f "$out/bench.log" ] && grep -E "^\|" "$out/bench.log"
printf '%s\n' "${summary[@]}"
