#!/usr/bin/env bash
# The whole GPU check in one script, under 6 minutes on an H100/H200-class machine, using only what such a machine
# has preinstalled (python3 with torch, triton 3.6 or 3.7, pytest, pytest-benchmark) and no network: no install step;
# the package is used from this checkout (PYTHONPATH), not installed.
#   1. gpu_tests: the compiled Triton kernels (TRITON_INTERPRET=0) against the reference at >= 16M tokens: the fused
#      loss, the policy loss on precomputed advantages, the advantages by group id (tests/test_triton_loss_gpu.py),
#      and the fused kernel's targets (bench/test_bench_hadw_loss.py::test_gpu_targets: fwd+bwd >= 85% of copy
#      bandwidth, >= 8x eager, >= 1.5x compile);
#   2. bench_fp32 / bench_bf16 / bench_policy: the tables (python -m bench --devices cuda) at N=16384, T=1024, G=8:
#      hadw_loss in fp32 and bf16, hadw_policy_loss (precomputed advantages + truncated IS weights) in bf16;
#   3. the loss-from-hidden kernels' tests and table: the marked place below.
# Optional pure-Python packages (liger-kernel, for the `liger` providers) are taken from bench/vendor/ when it exists:
# `bash bench/vendor_gpu_deps.sh` fills it where pip works; it is gitignored, so ship it with the working tree. Without
# it those providers are listed as skipped.
# Output, in $OUT when it is set, else bench/out/ (at most 8 files, so that all of them come back from a lent machine):
#   summary.txt      the environment, then one line per step: exit status, seconds, limit (read this first)
#   gpu_check.log    every step's output
#   *.json           the pytest-benchmark and python -m bench reports
# Each step runs under its own time limit and all of them under GPU_CHECK_BUDGET_S (default 340 s of steps, plus the
# environment probe): a step whose time has run out is skipped and reported, and the exit status says so.
# Usage: bash bench/gpu_check.sh     PYTHON=/path/to/python picks the interpreter; GPU_CHECK_DRY_RUN=1 prints the
#        steps without running them (no GPU needed).
# Exit status: 0 when every step ran clean, else the first failure's (124: a time limit; 3: skipped for time).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then py=$VIRTUAL_ENV/bin/python
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
dry=${GPU_CHECK_DRY_RUN:-0}
budget=${GPU_CHECK_BUDGET_S:-340}
vendor=$PWD/bench/vendor
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d "$vendor" ] && export PYTHONPATH=$PYTHONPATH:$vendor
summary=$out/summary.txt
log=$out/gpu_check.log
status=0
start=$SECONDS

step() {  # step NAME SECONDS CMD...: run with a time limit (cut to what the budget has left), log, keep the first failure
    local name=$1 limit=$2 left rc t0; shift 2
    left=$((budget - (SECONDS - start)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$dry" != "0" ]; then
        echo "step $name (limit ${limit}s): $*" | tee -a "$summary"
        return
    fi
    if [ "$limit" -lt 15 ]; then
        echo "step $name: skipped, ${left}s of the ${budget}s budget left" | tee -a "$summary"
        [ "$status" -ne 0 ] || status=3
        return
    fi
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
    t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$log"
    echo "step $name: exit $rc in $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$summary"
    [ "$status" -ne 0 ] || status=$rc
}

: > "$summary"
{
    date -u; git rev-parse HEAD 2>/dev/null || echo "commit unknown"
    git status --porcelain 2>/dev/null | grep -q . && echo "(working tree differs from the commit)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -4
    "$py" -c "import sys, torch, triton
ok = torch.cuda.is_available()
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
print('cuda', ok, torch.cuda.get_device_name() if ok else '')" 2>&1
    "$py" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 \
        | tail -1
    echo "budget ${budget}s; vendor folder: $([ -d "$vendor" ] && echo present || echo absent)"
} >> "$summary" 2>&1
cat "$summary"
if [ "$dry" = "0" ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible: nothing to check" | tee -a "$summary"
    exit 1
fi
targets=(bench/test_bench_hadw_loss.py::test_gpu_targets "--benchmark-json=$out/gpu_targets.json")
if ! "$py" -c "import pytest_benchmark" 2>/dev/null; then
    echo "pytest-benchmark is not installed: test_gpu_targets is left out" | tee -a "$summary"
    targets=()
fi

# -- the loss kernels: ~110 s of tests (each test compiles its kernel variants, ~1-2 s each), then three tables --------
step gpu_tests 110 "$py" -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_triton_loss_gpu.py "${targets[@]}"
step bench_fp32 70 "$py" -m bench --op hadw_loss --devices cuda --providers naive,reference,compiled,triton,liger \
    --reps 30 --json "$out/bench_cuda_fp32.json"
step bench_bf16 45 "$py" -m bench --op hadw_loss --devices cuda --dtype bf16 --modes full \
    --providers naive,reference,compiled,triton --reps 30 --json "$out/bench_cuda_bf16.json"
step bench_policy 35 "$py" -m bench --op policy_loss --devices cuda --dtype bf16 --modes full \
    --providers reference,compiled,triton --reps 30 --json "$out/bench_cuda_policy_bf16.json"

# -- LOSS FROM HIDDEN STATES (hadw_kernels/ops/triton_linear_logprobs.py): its GPU tests and its from-hidden table ---
# ~80 s of the budget (the four steps above take at most 260 s); one more file under $out.
#   hidden_tests: the compiled stats / dlogits kernels at V = 151,936 in bf16 and fp32 against materialised fp32
#     logits (log-probs, entropy, gradients of hidden, weight, bias; whole vocabulary and vocabulary blocks), and the
#     loss from hidden states at 16k tokens, H = 2560, bf16, one pass and two passes, Triton against the torch path.
#     HADW_KERNELS_NO_COMPILE=1: the torch path's chunk helpers run eagerly there (no Inductor compile in this step).
#   bench_hidden: the from-hidden table in bf16 at 16k tokens (16 x 1024), H = 2560 (Qwen3-4B), V = 151,936:
#     naive, torch.compile(naive), Liger's LigerFusedLinearGRPOLoss (from bench/vendor) and ours (Triton), fwd+bwd
#     time, tokens/s, peak memory (max_memory_allocated) and the targets; few reps: a call takes ~0.1 s, the first
#     calls (two torch.compile's, Liger's compile, the Triton kernels) take most of the step.
step hidden_tests 35 env HADW_KERNELS_NO_COMPILE=1 "$py" -m pytest -q -p no:cacheprovider -rs -m gpu \
    tests/test_triton_linear_logprobs_gpu.py
step bench_hidden 45 "$py" -m bench --op from_hidden --devices cuda --dtype bf16 --shape 16 1024 2560 \
    --providers naive,naive_compiled,liger,ours --reps 10 --warmup 2 --json "$out/bench_cuda_hidden_bf16.json"
# -- end of the loss-from-hidden steps ----------------------------------------------------------------------------------

echo "gpu_check: exit $status in $((SECONDS - start))s; files in $out" | tee -a "$summary"
exit "$status"
