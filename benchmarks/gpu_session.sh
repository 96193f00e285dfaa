#!/usr/bin/env bash
# What a lent CUDA machine should check; logs (and BENCHMARKS.md after a bench) land in $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh [tests|bench|profile|sweep|groups|all] [BENCH_BUDGET_S]
#
# Always builds the native core (CUDA sources included, ~20 s). `tests`: every test that uses the GPU
# (the `gpu` ones: real sizes and the CUDA log-mel; and at the same time the kernel and triton-backend
# tests compiled instead of interpreted), in parallel workers when pytest-xdist is there.
# `bench`: the CUDA frontend and bench_gpu.py, which
# starts no new case once BENCH_BUDGET_S (default 200) seconds are spent. `profile`: the triton
# backend's time per kernel at wav2vec2-base:64, wav2vec2-large:16 and whisper-large-v3:16 (or CASES),
# in a graph replay and eagerly (a few minutes). `sweep`:
# every attention config timed alone (sweep_attention.py, about three minutes). `groups`: lists of mixed
# lengths at several per-call costs of the encoder's GPU grouping (bench_gpu_groups.py, a few minutes).
# `all` (default) does tests and bench; on a lease of 10-minute calls, run them as two calls, or cap the
# parts with TESTS_S and BENCH_S (whole-run seconds) and skip the frontend bench with SKIP_FRONTEND=1.
# A 15-minute lease fit `TESTS_S=200 BENCH_S=330 SKIP_FRONTEND=1 CASES=(two cases) ... all 240` (549 s with
# the build). CASES=NAME:BATCH,... limits the
# bench to those cases (e.g. the ones an earlier lease did not reach: bench_gpu.py --cases); NO_MICRO=1
# skips the kernels-alone benchmarks.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/audioenc-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
part=${1:-all}
budget=${2:-200}
tests_s=${TESTS_S:-420}  # whole-run limits, so a short lease still gets the later parts
bench_s=${BENCH_S:-$((budget + 240))}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())"; } | tee "$OUT/env.txt"

t0=$SECONDS
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
echo "build: $((SECONDS - t0)) s"

if [ "$part" = tests ] || [ "$part" = all ]; then
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    # openai-whisper is the CUDA log-mel's reference (test_mel.py imports it); -m gpu picks its CUDA tests.
    mel_test=$(python3 -c "import whisper" 2>/dev/null && echo "tests/test_mel.py")
    # SIGINT at the cap, so pytest still reports what ran and the slowest tests.
    run_tests() {  # log name, seconds, pytest arguments
        local log=$1 limit=$2 t0=$SECONDS
        shift 2
        timeout -s INT -k 30 "$limit" python3 -m pytest -v -rfE --tb=short -p no:cacheprovider --durations=15 \
            $workers "$@" >"$OUT/$log.log" 2>&1
        echo "$log: rc $? in $((SECONDS - t0)) s"
        grep -E "^(FAILED|ERROR)|^=+ .*(passed|failed|error|skipped)|^[0-9.]+s (call|setup)" "$OUT/$log.log" |
            cut -c1-300 | tail -25
    }
    # At the same time, each with the whole time: the real sizes, autotuned as users run them, and the
    # kernel and backend tests at small odd shapes with one config per kernel (AUDIOENC_AUTOTUNE=0):
    # there, tuning every new shape only costs time. Their summaries print in that order. Their own
    # Triton cache: autotuning under 16 test processes must not leave its choices (kept on disk) to
    # the benchmarks.
    (
        export TRITON_CACHE_DIR=/tmp/triton-cache-tests
        run_tests tests_real_sizes "$tests_s" -m gpu tests/test_kernels.py tests/test_triton_backend.py $mel_test \
            >/tmp/tests_real_sizes.summary &
        AUDIOENC_AUTOTUNE=0 run_tests tests_small "$tests_s" -m "not gpu" tests/test_kernels.py \
            tests/test_triton_backend.py >/tmp/tests_small.summary &
        wait
    )
    cat /tmp/tests_real_sizes.summary /tmp/tests_small.summary
fi

if [ "$part" = bench ] || [ "$part" = all ]; then
    # openai-whisper is the frontend's peer; carry it (e.g. on PYTHONPATH) where it is not installed.
    if [ -z "${SKIP_FRONTEND:-}" ]; then
        timeout 90 python3 benchmarks/bench_frontend_gpu.py --runs 20 >"$OUT/bench_frontend_gpu.log" 2>&1
        tail -8 "$OUT/bench_frontend_gpu.log"
    fi
    timeout "$bench_s" python3 benchmarks/bench_gpu.py --budget "$budget" ${CASES:+--cases "$CASES"} ${NO_MICRO:+--no-micro} \
        >"$OUT/bench_gpu.log" 2>&1
    echo "bench_gpu: rc $?"
    grep -E "^\||failed|budget" "$OUT/bench_gpu.log" | cut -c1-250 | tail -40
    cp BENCHMARKS.md "$OUT/"
fi

if [ "$part" = sweep ]; then
    (cd benchmarks && timeout 300 python3 sweep_attention.py >"$OUT/sweep_attention.log" 2>&1)
    echo "sweep_attention: rc $?"
    grep -E "^(###|\| (torch|autotuned))" "$OUT/sweep_attention.log"
fi

if [ "$part" = profile ]; then
    # A CUDA-graph replay (what users run) and an eager forward of each case: stop 26 saw them differ.
    cases=${CASES:-wav2vec2-base:64,wav2vec2-large:16,whisper-large-v3:16}
    for mode in --graphs ""; do
        timeout 200 python3 benchmarks/profile_gpu.py --cases "$cases" --top 10 $mode >>"$OUT/profile_gpu.log" 2>&1
        echo "profile_gpu $mode: rc $?"
    done
    grep -E "^(###|\| [^k-])" "$OUT/profile_gpu.log" | cut -c1-160
fi

if [ "$part" = groups ]; then
    timeout 300 python3 benchmarks/bench_gpu_groups.py --budget 200 >"$OUT/bench_gpu_groups.log" 2>&1
    echo "bench_gpu_groups: rc $?"
    grep -E "^\||budget" "$OUT/bench_gpu_groups.log"
fi
