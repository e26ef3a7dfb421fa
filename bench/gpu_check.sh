#!/usr/bin/env bash
# The whole GPU check in one script, under 5 minutes on an A100/H100/H200-class machine:
#   1. the GPU tests (compiled Triton kernels, TRITON_INTERPRET=0) and the kernel's targets
#      (bench/test_bench_hadw_loss.py::test_gpu_targets: fwd+bwd >= 85% of copy bandwidth, >= 8x eager, >= 1.5x compile);
#   2. the benchmark table (python -m bench --devices cuda) in fp32 at 16.8M tokens, then bf16 (full mode only).
# Everything goes to $OUT when it is set (a lent GPU machine returns that folder), else to bench/out/.
# Usage: bash bench/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
# Exit status: 0 when the tests and both tables ran clean, else the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then py=$VIRTUAL_ENV/bin/python
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log, keep the first failure
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee "$out/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/$name.log"
    [ "$status" -ne 0 ] || status=$rc
}

{
    date -u; git rev-parse HEAD 2>/dev/null || echo "commit unknown"; nvidia-smi 2>&1 | head -15
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1
} > "$out/env.txt"
cat "$out/env.txt"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible: nothing to check" | tee -a "$out/env.txt"
    exit 1
fi

step gpu_tests 130 "$py" -m pytest -q -p no:cacheprovider -rs -m gpu tests \
    bench/test_bench_hadw_loss.py::test_gpu_targets --benchmark-json="$out/gpu_targets.json"
step bench_fp32 100 "$py" -m bench --devices cuda --providers naive,reference,compiled,triton,liger \
    --json "$out/bench_cuda_fp32.json"
step bench_bf16 60 "$py" -m bench --devices cuda --dtype bf16 --modes full --providers naive,reference,compiled,triton \
    --reps 30 --json "$out/bench_cuda_bf16.json"
echo "gpu_check: exit $status; files in $out"
exit "$status"
