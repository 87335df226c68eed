#!/usr/bin/env bash
# One GPU session in one call, under 9 minutes: the GPU tests, the fused LM head beside torch's matrix
# products, the unfused path and the peers at the target shape (N=16384, D=4096, V=151936), the logits
# path at the quick shape (both in bench/results/<device>.json), then the policy-loss pytest-benchmark
# suite if time is left. Every log and result is copied to $OUT when it is set (the device machine
# returns $OUT).
#   usage, from the repository root:  PYTHONPATH=. bash bench/gpu_session.sh
# Needs torch >= 2.6, triton >= 3.2 and pytest-benchmark; no network. Each step has its own time limit,
# and a step that fails or runs out of time does not stop the next one; the exit status is the first
# failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
LOGS="$(mktemp -d)"
BUDGET_S=520  # 8 min 40 s of steps, leaving time to copy the results
start=$SECONDS
status=0

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc at $((SECONDS - start))s" | tee -a "$LOGS/summary.txt"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

left() { echo $((BUDGET_S - (SECONDS - start))); }

step environment 60 python - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
PY
step gpu_tests 200 python -m pytest tests -m gpu -q -p no:cacheprovider
# The bench rewrites its JSON after every row: a run stopped by the limit keeps what it measured.
# LM head first (the first run of the session writes a fresh file); the first case pays the peers' JIT
# compilation and autotuning, so the budget allows for it.
step bench_lm_head "$(( $(left) < 200 ? $(left) : 200 ))" python -m bench --quick \
    --ops linear_fwd,linear_fwd_bwd --max-minutes 2
step bench_quick "$(( $(left) < 220 ? $(left) : 220 ))" python -m bench --quick --ops fwd,fwd_bwd \
    --max-minutes 2.5 --merge
if [ "$(left)" -gt 60 ]; then
    # torch.compile of the whole loss takes minutes per method: left to a longer session.
    step bench_policy_loss "$(( $(left) - 10 ))" python -m pytest bench/test_bench_policy_loss.py -q \
        -p no:cacheprovider --bench-mode quick -k "not compiled_ref" -rs \
        --benchmark-json "$LOGS/policy_loss_benchmark.json"
else
    echo "=== bench_policy_loss: skipped, $(left)s left" | tee -a "$LOGS/summary.txt"
fi

cp bench/results/*.json "$LOGS/" 2>/dev/null || echo "no results JSON written" | tee -a "$LOGS/summary.txt"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp -r "$LOGS"/. "$OUT/"
    echo "logs and results copied to $OUT"
fi
echo "=== done in $((SECONDS - start))s; logs in $LOGS"
cat "$LOGS/summary.txt"
exit "$status"
