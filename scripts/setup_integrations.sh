#!/usr/bin/env bash
# Installs the real TRL and verl into the main venv (default ./.venv) for the integration tests (tests/integrations);
# scripts/test.sh runs it after scripts/setup.sh. Every version comes from pyproject.toml:
# - the `trl` extra (trl 1.16.0 with its own dependencies: accelerate, datasets; none of them asks for a new torch);
# - the `verl` extra's pin, installed with --no-deps: verl 0.9.1's full dependency set pins transformers < 5.11
#   (the train extra has 5.19) and pulls wandb, ray[default], pybind11, ...; the `verl-deps` extra then adds only the
#   packages its estimator, loss and checkpoint modules import on CPU.
# torch must be the same build afterwards (checked). ~1 min and ~500 MB the first time (ray is most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
# pip's own output goes to a log, shown only when a step fails.
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
quiet() { "$@" >"$LOG" 2>&1 || { cat "$LOG"; echo "failed: $*" >&2; exit 1; }; }
VENV=${HADW_VENV:-.venv}
# shellcheck disable=SC1091
. "$VENV/bin/activate"
torch_before=$(python -c "import torch; print(torch.__version__)")
VERL_PIN=$(python -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['verl'][0])")
quiet python -m pip install -e ".[trl,verl-deps]"
quiet python -m pip install --no-deps "$VERL_PIN"
torch_after=$(python -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
    echo "setup_integrations.sh: torch changed from $torch_before to $torch_after; pin the package that asked for it" >&2
    exit 1
fi
python -c "import importlib.metadata as m; print('trl', m.version('trl'), '| verl', m.version('verl'), '| torch', '$torch_after')"
