#!/usr/bin/env bash
# Many calibration seeds of `tfmq-video bench quality` on one CUDA GPU, several rows at a time.
#
# One row (a method at one calibration seed, N videos) takes 25 minutes on a 2-core CPU; on a GPU
# the toy model's kernels are tiny, so JOBS processes share the card (time-sliced, no MPS), each
# calibrating and sampling one row and writing its own JSON (a row that is cut off by LIMIT loses
# only itself). Everything lands in one archive, $OUT/quality_rows.tgz: rows/*.json (one
# `bench quality` record per row; merge them with `tfmq-video bench seeds`) and logs/*.log.
#
#   ROWS="tfmq:0 qdiffusion:0 tfmq:1 ..." JOBS=8 N=512 LIMIT=420 bash tools/gpu_quality_seeds.sh
#
# Measured on an H100 (session 12), JOBS=10, N=512, the W4A8 recipe: RTN and ViDiT-Q rows took 4
# minutes, Q-Diffusion rows 7.4, and TFMQ rows had not finished after 7.5 (nor 5 at a time after
# 5.6): the processes time-share the GPU (no MPS), so give TFMQ rows 10+ minutes, or fewer JOBS.
# On the lent device (tools/gpu_check.sh explains the carried wheels): carry .whl. Rows run in the
# order given, so put the ones that matter first. Every process scores against the same FP
# videos, kept in $WORK/fp_cache: rows that start before they exist generate them too (seconds on
# a GPU) and replace the file atomically with the same videos.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-out}"
WORK="${WORK:-/tmp/gpu_quality_seeds}"
ROWS="${ROWS:-tfmq:0 qdiffusion:0}"
JOBS="${JOBS:-8}"
N="${N:-512}"
LIMIT="${LIMIT:-420}"
SETTING="${SETTING:-W4A8}"
CONFIG="${CONFIG:-configs/toy_stdit3_w4a8.yaml}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT" "$WORK/rows" "$WORK/logs" "$WORK/fp_cache"

WHEELS="${WHEELS:-.whl}"  # wheels carried to a device without pydantic (see tools/gpu_check.sh)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

run_row() {  # METHOD:SEED
    local method="${1%%:*}" seed="${1##*:}"
    local name="${method}_seed${seed}"
    local start=$SECONDS
    python3 -m tfmq_video.cli bench quality --settings "$SETTING" --methods "$method" --calib-seeds "$seed" \
        --num-videos "$N" --fp-reseeds 1 --config "$CONFIG" --threads 1 --device "$DEVICE" \
        --fp-cache "$WORK/fp_cache" --json "$WORK/rows/$name.json" > "$WORK/logs/$name.log" 2>&1
    echo "$name rc $? $((SECONDS - start)) s"
}
export -f run_row
export SETTING N CONFIG DEVICE WORK

printf '%s\n' $ROWS | timeout "$LIMIT" xargs -P "$JOBS" -I{} bash -c 'run_row {}'
echo "rows finished: $(ls "$WORK/rows" | wc -l)"
tar czf "$OUT/quality_rows.tgz" -C "$WORK" rows logs
