#!/usr/bin/env bash
# Install the repo's requirements into the active Python environment, choosing the torch build:
#   - a torch already installed in the supported range (e.g. the CUDA build of a GPU machine) is kept;
#   - else, with an NVIDIA GPU (nvidia-smi lists one), pip's default torch build, which is the CUDA one;
#   - else the CPU build, pinned: torch==2.13.0. Where pip finds only PyPI, that pin is the CUDA build
#     too; set TORCH_INDEX=https://download.pytorch.org/whl/cpu to take the CPU build from PyTorch's index.
# Then requirements.txt, which leaves torch alone. PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
TORCH_RANGE=">=2.4,<2.15"
TORCH_CPU="2.13.0"

in_range() {
    "$PY" - <<'PY' 2>/dev/null
import sys
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (2, 4) <= (major, minor) < (2, 15) else 1)
PY
}

if in_range; then
    echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch$TORCH_RANGE (CUDA build)"
    "$PY" -m pip install "torch$TORCH_RANGE"
else
    echo "setup: no GPU found, installing the CPU build torch==$TORCH_CPU${TORCH_INDEX:+ from $TORCH_INDEX}"
    "$PY" -m pip install "torch==$TORCH_CPU" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
"$PY" -m pip install -r requirements.txt
"$PY" -c "import torch; print(f'setup: done, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
