#!/usr/bin/env bash
# One prepared GPU check, run from the repo root on a CUDA machine (`bash bench/device_check.sh`).
# Stages, most important first, each with its own time cap and its own output file, so a stage that runs
# long or fails never costs the figures of the stages before it:
#   1. install adaface without network (--no-deps --no-build-isolation), compiling the CUDA extension for
#      this GPU's architecture only;
#   2. the tests marked `gpu` (CUDA kernels against the references and against the Triton kernels), then
#      tests/test_gpu_configs.py (every CUDA launch configuration of the Triton kernels, natively);
#   3. the C++/CUDA extension benchmarks (CUDA vs Triton vs eager) at paper scale;
#   4. the Triton kernel benchmarks at paper scale (eager, SDPA, Triton; torch.compile is stage 6);
#   5. one full-size stage-1 training step (steps/s, peak memory) when diffusers and prodigyopt import;
#   6. the torch.compile rows of the kernel benchmarks (compile time dominates, so they come last);
# then one table of every benchmark, and the soft-warp rows' times beside bench/roofline.py's model.
# DEADLINE (seconds, default 520) bounds the whole script: a stage starts only with time left and is cut
# at the deadline. Packages the machine lacks can be put as wheels in .whl/ (e.g. diffusers, prodigyopt, and a
# setuptools new enough for pyproject's license field); they are installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/adaface-device-check}
mkdir -p "$OUT_DIR"
t0=$(date +%s)
DEADLINE=${DEADLINE:-520}
export PYTHONUNBUFFERED=1
status=0  # any failed stage makes the script exit non-zero, after the later stages have still run

elapsed() { echo $(( $(date +%s) - t0 )); }
# cap SECONDS: the smaller of SECONDS and the time left before the deadline (0 when none is left)
cap() { local left=$(( DEADLINE - $(elapsed) )); (( left < $1 )) && echo $(( left > 0 ? left : 0 )) || echo "$1"; }
# run_stage NAME CAP CMD...: runs CMD under `timeout`, logs to $LOG_DIR/NAME.log, records failure.
# Full logs go to $LOG_DIR; their tails are printed, and the install and test logs are copied to $OUT_DIR.
LOG_DIR=/tmp/adaface-device-logs
mkdir -p "$LOG_DIR"
run_stage() {
    local name=$1 limit; limit=$(cap "$2"); shift 2
    if (( limit < 15 )); then echo "== $name: skipped, deadline reached ($(elapsed) s)"; return; fi
    echo "== $name (cap ${limit} s, at $(elapsed) s)"
    timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$LOG_DIR/$name.log"
    if (( rc != 0 )); then echo "== $name: exit $rc"; status=1; fi
}

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
# Only this GPU's architecture: compiling all four release targets would take most of the deadline.
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} ADAFACE_REQUIRE_EXT=1
run_stage install 240 python3 -m pip install -v --no-deps --no-build-isolation -e .
python3 -c "import torch, triton, adaface.ops._backend as b; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, 'ext', b.extension_available(), 'ext cuda', b.extension_has_cuda())"

xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 8)  # parallel Triton JIT compiles across test workers
run_stage gpu_tests 170 python3 -m pytest -q -m gpu "${xdist[@]}" -p no:cacheprovider \
    tests/test_extension.py tests/test_soft_warp.py tests/test_delta_cosine.py tests/test_expanded_attention.py

# every CUDA launch configuration of the Triton kernels, natively (the CPU suite runs them interpreted)
run_stage gpu_configs 120 python3 -m pytest -q "${xdist[@]}" -p no:cacheprovider tests/test_gpu_configs.py

bench_opts=(-q -p no:cacheprovider --benchmark-min-rounds=5 --benchmark-max-time=0.25 --benchmark-warmup=on
            --benchmark-disable-gc)
run_stage bench_ext 100 python3 -m pytest "${bench_opts[@]}" -m gpu bench/test_bench_cpp.py \
    --benchmark-json="$OUT_DIR/bench_ext.json"
run_stage bench_triton 130 python3 -m pytest "${bench_opts[@]}" -k "not compile" \
    bench/test_bench_soft_warp.py bench/test_bench_delta_cosine.py bench/test_bench_expanded_attention.py \
    --benchmark-json="$OUT_DIR/bench_triton.json"
if python3 -c "import diffusers, prodigyopt" 2>/dev/null; then
    run_stage stage1_step 100 python3 bench/bench_stage1_step.py --json "$OUT_DIR/stage1_step.json"
else
    echo "stage-1 step benchmark skipped: diffusers and prodigyopt are not installed (wheels in .whl/ are)"
fi
run_stage bench_compile 200 python3 -m pytest "${bench_opts[@]}" -k "compile" \
    bench/test_bench_soft_warp.py bench/test_bench_delta_cosine.py bench/test_bench_expanded_attention.py \
    --benchmark-json="$OUT_DIR/bench_compile.json"

jsons=()
for j in bench_ext bench_triton bench_compile; do [ -s "$OUT_DIR/$j.json" ] && jsons+=("$OUT_DIR/$j.json"); done
(( ${#jsons[@]} )) && python3 bench/summarize.py "${jsons[@]}" | tee "$OUT_DIR/table.txt"
# the soft-warp rows' measured times beside bench/roofline.py's predictions (model estimates at published peaks)
[ -s "$OUT_DIR/bench_triton.json" ] && python3 bench/roofline.py --measured "$OUT_DIR/bench_triton.json" \
    | tee "$OUT_DIR/model_vs_measured.txt"
cp "$LOG_DIR/install.log" "$LOG_DIR/gpu_tests.log" "$OUT_DIR/" 2>/dev/null
echo "total: $(elapsed) s, exit $status"
exit "$status"
