#!/usr/bin/env bash
# One command, fresh machine to a trained model: set up ./.venv (scripts/setup.sh), then run the main job,
# `tiny-arith` (GRPO + HA-DW on synthetic arithmetic, a 1M-parameter model, ~5 min on 2 CPU cores).
# Extra arguments go to hadw-train, e.g. `bash scripts/train.sh --seed 1 --output-dir runs/seed1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HADW_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
exec hadw-train --recipe tiny-arith --output-dir runs/tiny-arith "$@"
