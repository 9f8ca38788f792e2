#!/usr/bin/env bash
# Install tfmq-video (editable) into the current Python environment.
#
#   bash tools/setup.sh            # runtime + video I/O + OpenCV flow (for `tfmq-video demo`)
#   bash tools/setup.sh dev        # + test, lint and kernel-interpreter tools
#
# torch: an installed torch (a CUDA build on a GPU box, say) is kept as it is. Without one,
# a GPU machine gets the default (CUDA) build, and a CPU-only machine gets torch 2.13.0, the
# CPU wheel on this project's reference machines; elsewhere set TORCH_INDEX_URL (for example
# https://download.pytorch.org/whl/cpu) so that pip does not fetch a multi-GB CUDA build.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
EXTRAS="video,flow"
if [[ "${1:-}" == "dev" ]]; then
    EXTRAS="video,flow,dev,kernels"
fi
cd "$(dirname "$0")/.."

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        TORCH_SPEC="${TORCH_SPEC_GPU:-torch}"
    fi
    echo "setup: installing $TORCH_SPEC"
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
        "$PYTHON" -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
    else
        "$PYTHON" -m pip install --quiet "$TORCH_SPEC"
    fi
fi

echo "setup: installing tfmq-video[$EXTRAS] (editable)"
"$PYTHON" -m pip install --quiet -e ".[$EXTRAS]"
# pyenv only exposes new console scripts after a rehash.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi
"$PYTHON" -c "import torch, tfmq_video; print(f'setup: ok (torch {torch.__version__}, tfmq-video {tfmq_video.__version__})')"
