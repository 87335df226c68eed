#!/usr/bin/env bash
# One GPU session in one call, under 9 minutes, on the H200 machine (torch 2.11, triton 3.6, no network):
#   1. the peers' wheels from .whl/ (bench/fetch_wheels.sh fetches them where there is network) installed
#      with --no-deps beside the repository, each peer reported by name when it cannot load;
#   2. the static roofline of the kernels (bench/sass.py) under this machine's Triton;
#   3. compute-sanitizer memcheck over one small launch of every kernel (bench/sanitize.py);
#   4. the GPU tests (N * V > 2^31 included);
#   5. the benchmarks at N = 16384, V = 151936 bf16 (fwd, fwd+bwd, AEnt) and the LM head at D = 4096, each
#      beside the peers, a device-to-device copy and a bf16 matrix product measured in the same run
#      (results in bench/results/<device>.json); then, with what time is left, the policy loss and the
#      entropy-change op (covkernels and the eager reference only).
# Every log and result goes to $OUT when it is set (the device machine returns $OUT).
#   usage, from the repository root:  bash bench/gpu_session.sh
# Without a GPU it says so, checks that the wheels install and import, and stops.
# Each step has its own time limit; a step that fails or runs out of time does not stop the next one; the
# exit status is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="$(mktemp -d)"
BUDGET_S=520  # 8 min 40 s of steps, leaving time to copy the results
start=$SECONDS
status=0

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -le 0 ]; then  # timeout 0 would mean no limit at all
        echo "=== $name: skipped, the session's budget is spent" | tee -a "$LOGS/summary.txt"
        return
    fi
    echo "=== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc at $((SECONDS - start))s" | tee -a "$LOGS/summary.txt"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

left() { echo $((BUDGET_S - (SECONDS - start))); }
cap() { local want=$1 l; l=$(left); echo $(( l < want ? l : want )); }

finish() {
    cp bench/results/*.json "$LOGS/" 2>/dev/null || echo "no results JSON written" | tee -a "$LOGS/summary.txt"
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        cp -r "$LOGS"/. "$OUT/"
        echo "logs and results copied to $OUT"
    fi
    echo "=== done in $((SECONDS - start))s; logs in $LOGS"
    cat "$LOGS/summary.txt"
    exit "$status"
}

PEERS=/tmp/covkernels-peers
if ls .whl/*.whl >/dev/null 2>&1; then
    step wheels 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$PEERS" .whl/*.whl
else
    echo "=== wheels: no .whl/ here (run bench/fetch_wheels.sh where there is network)" | tee -a "$LOGS/summary.txt"
fi
export PYTHONPATH=".:$PEERS${PYTHONPATH:+:$PYTHONPATH}"

step environment 120 python3 - <<'PY'
import importlib
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE: no GPU on this machine")
for peer, module in [("liger-kernel", "liger_kernel.transformers"), ("trl", "trl.trainer.utils"),
                     ("cut-cross-entropy", "cut_cross_entropy"), ("verl fused kernel", "verl.utils.kernel.kernels")]:
    try:
        importlib.import_module(module)
        print(f"peer {peer}: loads")
    except Exception as e:  # a missing dependency of the peer: it is left out of the comparison
        print(f"peer {peer}: cannot load ({type(e).__name__}: {e})")
PY

if ! python3 -c "import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)"; then
    echo "=== no GPU on this machine: the wheels were checked, nothing was timed" | tee -a "$LOGS/summary.txt"
    finish
fi

step sass "$(cap 90)" env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 python3 -m bench.sass --json "$LOGS/sass.json"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$SANITIZER" ]; then
    step memcheck "$(cap 120)" "$SANITIZER" --tool memcheck --error-exitcode 1 python3 -m bench.sanitize
else
    echo "=== memcheck: compute-sanitizer not found" | tee -a "$LOGS/summary.txt"
fi
step gpu_tests "$(cap 120)" python3 -m pytest tests -m gpu -q -p no:cacheprovider
# The bench rewrites its JSON after every row: a run stopped by the limit keeps what it measured. The first
# case of each pays the peers' JIT compilation and autotuning, so the limits allow for it.
step bench_logits "$(cap 150)" python3 -m bench --quick --ops fwd,fwd_bwd --max-minutes 2
step bench_lm_head "$(cap 150)" python3 -m bench --quick --ops linear_fwd,linear_fwd_bwd --max-minutes 2 --merge
step bench_losses "$(cap 90)" python3 -m bench --quick --ops policy_loss,entropy_change \
    --providers covkernels,python_ref --merge
finish
