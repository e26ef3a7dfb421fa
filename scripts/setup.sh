#!/usr/bin/env bash
# Creates ./.venv (once) and installs the project with the extras named in $HADW_EXTRAS (default: dev,triton,train).
# torch 2.13.0 is installed first and on its own: on CPU machines it resolves to the CPU wheel, and every later
# requirement (torch>=2.5,<2.14) is then already satisfied, so no multi-GB CUDA build is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip's own output (build-backend warnings included) goes to a log, shown only when a step fails.
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
quiet() { "$@" >"$LOG" 2>&1 || { cat "$LOG"; echo "failed: $*" >&2; exit 1; }; }
VENV=${HADW_VENV:-.venv}
EXTRAS=${HADW_EXTRAS:-dev,triton,train}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
quiet python -m pip install --upgrade pip
python -c "import torch" 2>/dev/null || quiet python -m pip install "torch==2.13.0"
quiet python -m pip install -e ".[$EXTRAS]"
python -c "import torch, hadw_kernels; print(f'hadw-kernels {hadw_kernels.__version__}, torch {torch.__version__}')"
