#!/usr/bin/env bash
# One prepared GPU check, run from the repo root on a CUDA machine (`bash bench/device_check.sh`):
#   1. installs adaface there without network (--no-deps --no-build-isolation), compiling the CUDA extension;
#   2. runs the tests marked `gpu` (CUDA kernels against the references and against each other);
#   3. runs the benchmarks at paper scale and prints one compact table (median, ratios, GB/s, TFLOP/s,
#      peak memory, device);
#   4. measures one full-size stage-1 training step (steps/s, peak memory) when diffusers and prodigyopt
#      are importable.
# Budget: under 8 minutes on an H100. Packages the machine lacks (diffusers, prodigyopt) travel as wheels
# in .whl/ (see the device tool's README); they are installed to /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/adaface-device-check}
mkdir -p "$OUT_DIR"
t0=$(date +%s)
export PYTHONUNBUFFERED=1
status=0  # any failed step makes the script exit non-zero, after the later steps have still run

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Only the machine's own architecture: compiling all four release targets would eat the time budget.
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} ADAFACE_REQUIRE_EXT=1 timeout 180 \
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/install.log" 2>&1 \
    || { echo "install failed, see $OUT_DIR/install.log"; tail -20 "$OUT_DIR/install.log"; status=1; }
python3 -c "import torch, triton, adaface.ops._backend as b; print('torch', torch.__version__, 'triton', \
triton.__version__, 'ext', b.extension_available(), 'ext cuda', b.extension_has_cuda())"
echo "install: $(( $(date +%s) - t0 )) s"

timeout 100 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu tests: $(( $(date +%s) - t0 )) s"

timeout 200 python3 -m pytest -q bench/ -p no:cacheprovider --benchmark-json="$OUT_DIR/bench.json" \
    --benchmark-min-rounds=5 --benchmark-max-time=0.25 --benchmark-warmup=on --benchmark-disable-gc \
    2>&1 | tee "$OUT_DIR/bench.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 bench/summarize.py "$OUT_DIR/bench.json" | tee "$OUT_DIR/table.txt"

if python3 -c "import diffusers, prodigyopt" 2>/dev/null; then
    timeout 100 python3 bench/bench_stage1_step.py --json "$OUT_DIR/stage1_step.json" 2>&1 | tail -8
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "stage-1 step benchmark skipped: carry diffusers and prodigyopt wheels in .whl/"
fi
echo "total: $(( $(date +%s) - t0 )) s"
exit "$status"
