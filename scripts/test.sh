#!/usr/bin/env bash
# One command, fresh machine to green: set up ./.venv (scripts/setup.sh), lint, run the whole CPU test suite.
# Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); GPU tests skip without CUDA.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HADW_VENV:-.venv}/bin/activate"
ruff check .
# pytest exits 5 when it collects no test; set -e turns that (like any failure) into a failed run.
python -m pytest -q -p no:cacheprovider "$@"
