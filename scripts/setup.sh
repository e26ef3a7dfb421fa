#!/usr/bin/env bash
# Creates ./.venv (once) and installs the project with the extras named in $HADW_EXTRAS (default: dev,triton,train).
# torch 2.13.0 is installed first and on its own: on CPU machines it resolves to the CPU wheel, and every later
# requirement (torch>=2.5,<2.14) is then already satisfied, so no multi-GB CUDA build is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HADW_VENV:-.venv}
EXTRAS=${HADW_EXTRAS:-dev,triton,train}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$EXTRAS]"
python -c "import torch, hadw_kernels; print(f'hadw-kernels {hadw_kernels.__version__}, torch {torch.__version__}')"
