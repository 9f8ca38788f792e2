#!/usr/bin/env bash
# The GPU checks of issue #3 in one call, for a lent H100/H200 (the workplace's `device` tool) or any
# CUDA machine with torch and triton: the Triton kernel tests compiled for the GPU, the kernel-only
# sweep (tools/gpu_kernel_sweep.py), the kernel benchmark and the full-sampling benchmark, each
# writing JSON (and a log) into $OUT (default: out/); see the stages below.
#
#   here, once per checkout (needs the package registry):  bash tools/gpu_check.sh --download-wheels
#   on the device, carrying .whl:                          bash tools/gpu_check.sh
#
# The device image has torch, triton, einops, safetensors, scipy, yaml, tqdm and matplotlib, but not
# pydantic or diffusers: --download-wheels fetches those (Python 3.12, manylinux) into .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 diffusers==0.42.1 importlib-metadata==10.2.0"

if [[ "${1:-}" == "--download-wheels" ]]; then
    mkdir -p .whl
    for spec in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec" || exit 1
    done
    ls -la .whl
    exit 0
fi

OUT="${OUT:-out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"

# Stages (arguments; default: tests sweep model xl, at most 10 minutes by the timeouts below):
#   tests    the Triton kernel and runtime tests compiled for the GPU, on the default tiles
#            (autotuning every tiny test shape would take minutes)
#   sweep    tools/gpu_kernel_sweep.py: kernels alone, tile and load-form choices
#   kernels  tfmq-video bench kernels (every layer shape at 4k and 16k tokens)
#   model    tfmq-video bench model on the toy and mid-size models
#   xl       tfmq-video bench model on STDiT3-XL layer sizes at 480p (4 block pairs, 2 steps)
STAGES="${*:-tests sweep model xl}"
status=0
run_stage() {
    case "$1" in
    tests) TFMQ_VIDEO_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
               tests/test_runtime_model.py tests/test_export_conv_uint8.py 2>&1 | tee "$OUT/tests.log" ;;
    sweep) timeout 130 python3 tools/gpu_kernel_sweep.py --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1 ;;
    kernels) timeout 180 python3 -m tfmq_video.cli bench kernels --device cuda --tokens 4096 16384 --repeat 10 \
               --no-torchao --json "$OUT/bench_kernels_gpu.json" 2>&1 | tee "$OUT/bench_kernels.log" ;;
    model) timeout 150 python3 -m tfmq_video.cli bench model --device cuda --models mid toy --repeat 3 \
               --json "$OUT/bench_model_gpu.json" 2>&1 | tee "$OUT/bench_model.log" ;;
    xl) timeout 200 python3 -m tfmq_video.cli bench model --device cuda --models xl --steps 2 --repeat 2 \
               --schemes w8a8 w4a8 w8a8_static --json "$OUT/bench_model_xl_gpu.json" 2>&1 | tee "$OUT/bench_model_xl.log" ;;
    *) echo "unknown stage $1 (tests sweep kernels model xl)"; return 2 ;;
    esac
}
for stage in $STAGES; do
    run_stage "$stage" || status=1
done
exit $status
