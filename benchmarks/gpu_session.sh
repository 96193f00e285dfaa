#!/usr/bin/env bash
# Everything a lent CUDA machine should check, in one call; logs and BENCHMARKS.md land in $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh [BENCH_BUDGET_S]
#
# Builds the native core (CUDA sources included), runs every test that uses the GPU (the kernel and
# triton-backend tests compiled instead of interpreted, the real-size `gpu` tests, the CUDA log-mel),
# then the GPU benchmarks; bench_gpu.py starts no new case once BENCH_BUDGET_S seconds are spent.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/audioenc-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
budget=${1:-200}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__)"; } | tee "$OUT/env.txt"

t0=$SECONDS
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
echo "build: $((SECONDS - t0)) s"

t0=$SECONDS
timeout 300 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -n 8 \
    tests/test_kernels.py tests/test_triton_backend.py "tests/test_mel.py::test_cuda_matches_reference" \
    >"$OUT/tests.log" 2>&1
echo "tests: rc $? in $((SECONDS - t0)) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | cut -c1-300 | tail -30

timeout 90 python3 benchmarks/bench_frontend_gpu.py --runs 20 >"$OUT/bench_frontend_gpu.log" 2>&1
tail -8 "$OUT/bench_frontend_gpu.log"

timeout $((budget + 240)) python3 benchmarks/bench_gpu.py --budget "$budget" >"$OUT/bench_gpu.log" 2>&1
echo "bench_gpu: rc $?"
grep -vE "^\s*$" "$OUT/bench_gpu.log" | cut -c1-250 | tail -40
cp BENCHMARKS.md "$OUT/"
