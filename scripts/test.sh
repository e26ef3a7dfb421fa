#!/usr/bin/env bash
# One command, fresh machine to green: set up ./.venv (scripts/setup.sh, then TRL and verl: scripts/setup_integrations.sh)
# and ./.venv-vllm (scripts/setup_vllm.sh), lint, run the vLLM tests against the real engine, then the whole CPU suite.
# Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); GPU tests skip without CUDA.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${HADW_SKIP_INTEGRATIONS:-0}" = "0" ]; then
    # The real TRL and verl for tests/integrations (scripts/setup_integrations.sh, ~1 min the first time); with them
    # installed those tests must run, not skip. HADW_SKIP_INTEGRATIONS=1 skips both.
    bash scripts/setup_integrations.sh
    export HADW_REQUIRE_INTEGRATIONS=1
fi
if [ "${HADW_SKIP_VLLM:-0}" = "0" ]; then
    # The real vLLM engine (CPU build) in its own venv: the vLLM rollout tests, first, so that the main suite's
    # summary is the last line. HADW_SKIP_VLLM=1 skips this (those tests then skip in the main suite).
    bash scripts/setup_vllm.sh
    "${HADW_VLLM_VENV:-${HADW_VENV:-.venv}-vllm}/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_rollout.py
fi
# shellcheck disable=SC1091
. "${HADW_VENV:-.venv}/bin/activate"
ruff check .
# pytest exits 5 when it collects no test; set -e turns that (like any failure) into a failed run.
python -m pytest -q -p no:cacheprovider "$@"
