#!/usr/bin/env bash
# Everything this project checks on a GPU, in one device call, within BUDGET seconds (default 540: a lent GPU has 15
# minutes per task, the machine's start included). The sections, in the default order: the kernels first (the MoE
# models of the full runs train through them, and no CUDA path of theirs had run when this script was written), then
# the MoE benchmarks with the anchors they are compared with, then the DP and GPT steps (each decides its issue in one
# measurement), then the full runs (which need many calls whatever comes first). One call may not reach all of them,
# so a later session names the rest, e.g. SECTIONS="anchors gpt dp full" (anchors in every call that benchmarks:
# ratios are taken side by side, on the same card).
#   kernels  the Triton MoE kernel tests, compiled (EFFWB_TEST_CUDA=1)
#   moe      bench/moe.py (speed against dense at uniform and skewed routing, the layer with its router, the plan by
#            counting and by sort, peak memory, sync-debug and CUDA-graph checks), then bench/d2dmoe.py (dynamic-k inference)
#   anchors  ../shared/bench/anchors.py, copied to .carry/anchors.py (the card's GEMM peak, grouped GEMM, naive loop,
#            lean vmap DP step, plain GPT step: the baselines, measured in the same session as the benches)
#   full     the next chunk of the `full` runs (`effwb full`, RLRS's MoE pair first), starting from the finished runs of
#            results/full_store.tar.gz and packing every finished run back into $OUT/full_store.tar.gz. Up to FULL_TIMEOUT
#            s (default 240; with SECTIONS=full the whole budget). Only finished units travel (a checkpoint of these
#            models is hundreds of MB), so a unit longer than the section never finishes: once the benchmarks are
#            measured, give the full runs calls of their own (SECTIONS=full BUDGET=540).
#   gpt      bench/gpt.py (MFU at the GPT-2-small shape: reference, reference + rotary + clipping, model, trainer; compiled:
#            the reference and the trainer only, GPT_COMPILED to change it: every compiled row is a compile of its own)
#   dp       the CUDA tests of tests/test_dp.py, then bench/dp.py (book-keeping DP step, eager and from CUDA graphs, vs vmap,
#            Opacus hooks and ghost clipping, beside a plain step)
#   tune     bench/moe.py --tune (tiles tuned per shape against the default tiles)
# A section starts only with at least 45 s of the budget left and gets at most what is left; SECTIONS picks and orders.
# FULL_WORKERS (default 4): processes sharing the GPU for the full runs' independent units (the full presets' models are
# small: one process leaves the card mostly idle, waiting on Python and kernel launches; the machine has 16 cores).
#
# Before the device call, here: `bash bench/gpu_prep.sh` (a clean tree; .git_manifest, since the device's copy has no
# .git and runs made there record the commit through it; .carry/anchors.py; .whl/, wheels of what the device image lacks)
# and call:   run(command="OUT=$OUT bash bench/gpu_session.sh", carry=[".git_manifest", ".carry", ".whl", "data"], timeout_s=600)
# After it:   cp <files_at>/full_store.tar.gz results/ && effwb runs unpack --archive results/full_store.tar.gz
#             effwb publish NAME --preset full     (each experiment `effwb full` reports done; from the clean checkout)
#             git add results/ && git commit       (the archive carries the finished runs to the next GPU session)
# What lands in $OUT, the 8 files a device call returns at most: session.log (with the kernel tests' result),
# full_store.tar.gz, bench_moe.log (bench/moe.py, bench/d2dmoe.py and the tuning), d2dmoe_speed_<card>.csv and .env.json
# (the dynamic-k table, for results/), bench_anchors.log, bench_gpt.log, bench_dp.log.
# Then `python bench/gpu_report.py <that folder>` here: the tables measured against the issues' targets.
set -u
OUT=${OUT:-/tmp/effwb_gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EFFWB_QUIET=1 EFFWB_DATA=$PWD/data
export EFFWB_RUNS=/tmp/effwb_runs EFFWB_CACHE=/tmp/effwb_cache EFFWB_RESULTS=/tmp/effwb_results
mkdir -p "$EFFWB_RESULTS" && cp results/*.csv results/*.env.json "$EFFWB_RESULTS"/ 2>/dev/null
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then     # carried wheels (gpu_prep.sh) of packages the device image lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
SECTIONS=${SECTIONS:-"kernels moe anchors dp gpt full tune"}
BUDGET=${BUDGET:-540}; T0=$(date +%s)
LOG="$OUT/session.log"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# start NAME MAX_SECONDS TITLE: prints the section header; sets T (the section's timeout) or returns 1 (too little left)
start() {
  local l; l=$(left)
  if (( l < 45 )); then echo "=== $1: skipped, ${l} s of the budget left" | tee -a "$LOG"; return 1; fi
  T=$(( $2 < l - 10 ? $2 : l - 10 ))
  echo; echo "=== $3 ($(date -u +%H:%M:%S), timeout ${T} s, ${l} s of the budget left)" | tee -a "$LOG"
}

echo "=== environment" | tee "$LOG"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  $PY -c "from effworkbench.core import git_info; print('code', git_info())"
  $PY - <<'PYEOF'
import importlib   # every module a section imports, so that a missing package shows here and not half-way
mods = ["effworkbench.experiment", "effworkbench.cli", "effworkbench.moe.kernels", "effworkbench.moe.layers",
        "effworkbench.nn.gpt", "effworkbench.train", "effworkbench.privacy.dp_prune", "effworkbench.compress.d2dmoe",
        "effworkbench.vision.adaglimpse", "effworkbench.rlrs", "effworkbench.viz", "opacus", "plotly", "pytest"]
bad = []
for m in mods:
    try: importlib.import_module(m)
    except Exception as e: bad.append(f"{m}: {type(e).__name__}: {e}")
print("imports: all", len(mods), "load" if not bad else "FAILED\n  " + "\n  ".join(bad))
PYEOF
} 2>&1 | tee -a "$LOG"

sec_full() {
  local cap=240; [ "$(echo $SECTIONS)" = "full" ] && cap=$BUDGET    # a full-only call gives the runs all of its budget
  start full "${FULL_TIMEOUT:-$cap}" "full runs: the next chunk" || return 0
  $PY - <<'PYEOF' 2>&1 | tee -a "$LOG"
from pathlib import Path
from effworkbench.store import RunStore
arc = Path("results/full_store.tar.gz")
out = RunStore().unpack(arc) if arc.is_file() else {}
print(f"{sum(v == 'added' for v in out.values())} finished runs taken from {arc}" if out else f"no {arc}: starting afresh")
PYEOF
  minutes=$(awk "BEGIN { r = $T / 3; if (r > 60) r = 60; print ($T - r) / 60 }")   # the chunk stops itself (leaving time to pack); the timeout is the backstop
  timeout "$T" $PY -c "import sys; from effworkbench.cli import main; sys.exit(main(['full', '--max-minutes', '$minutes', '--workers', '${FULL_WORKERS:-4}']))" 2>&1 | tee -a "$LOG"
  $PY -c "from effworkbench.store import RunStore; print('packed', len(RunStore().pack('$OUT/full_store.tar.gz')), 'finished runs into full_store.tar.gz')" 2>&1 | tee -a "$LOG"
}

sec_kernels() {
  start kernels 150 "Triton MoE kernel tests, compiled" || return 0
  # left out: the sm_90 compile without a GPU, and a test of the interpreter in CPU-only subprocesses (CPU work, which
  # CI does)
  EFFWB_TEST_CUDA=1 timeout "$T" $PY -m pytest tests/test_moe_kernels.py -q -x -p no:cacheprovider \
    -k "not compile_for_hopper and not interpreter_chosen_too_late" 2>&1 | tail -25 > /tmp/effwb_kernels.log
  cat /tmp/effwb_kernels.log >> "$LOG"; tail -3 /tmp/effwb_kernels.log
}

sec_moe() {
  start moe 270 "bench/moe.py, then bench/d2dmoe.py" || return 0
  timeout $(( T * 4 / 7 )) $PY bench/moe.py --skip loop > "$OUT/bench_moe.log" 2>&1
  echo "=== bench/d2dmoe.py" >> "$OUT/bench_moe.log"
  timeout $(( T * 3 / 7 )) $PY bench/d2dmoe.py >> "$OUT/bench_moe.log" 2>&1   # and d2dmoe_speed_<card>.csv, .env.json in $OUT
  tail -5 "$OUT/bench_moe.log"
}

sec_anchors() {
  [ -f "${ANCHORS:-.carry/anchors.py}" ] || { echo "=== anchors: skipped, no ${ANCHORS:-.carry/anchors.py}" | tee -a "$LOG"; return 0; }
  start anchors 120 "anchors (the baselines on this card)" || return 0
  timeout "$T" $PY "${ANCHORS:-.carry/anchors.py}" > "$OUT/bench_anchors.log" 2>&1; tail -12 "$OUT/bench_anchors.log"
}

sec_gpt() {
  start gpt 300 "bench/gpt.py" || return 0
  timeout "$T" $PY bench/gpt.py --compiled-rows "${GPT_COMPILED:-reference,workbench trainer}" > "$OUT/bench_gpt.log" 2>&1
  tail -12 "$OUT/bench_gpt.log"
}

sec_dp() {
  start dp 150 "DP: the CUDA tests of tests/test_dp.py (no host sync; the graphed step), then bench/dp.py" || return 0
  local tt=$(( T < 180 ? T / 3 : 60 ))                # the tests' share of the section: at most 60 s
  timeout "$tt" $PY -m pytest tests/test_dp.py -q -p no:cacheprovider -k cuda 2>&1 | tail -15 > "$OUT/bench_dp.log"
  cat "$OUT/bench_dp.log" >> "$LOG"; tail -2 "$OUT/bench_dp.log"
  timeout $(( T - tt )) $PY bench/dp.py --repeats 15 >> "$OUT/bench_dp.log" 2>&1; tail -12 "$OUT/bench_dp.log"
}

sec_tune() {
  start tune 150 "bench/moe.py --tune" || return 0
  echo "=== bench/moe.py --tune" >> "$OUT/bench_moe.log"
  timeout "$T" $PY bench/moe.py --tune --no-check --routing uniform --skip loop,triton_atomic,triton_dh128,triton_tma,triton_persistent > /tmp/effwb_tune.log 2>&1
  cat /tmp/effwb_tune.log >> "$OUT/bench_moe.log"; tail -12 /tmp/effwb_tune.log
}

for s in $SECTIONS; do                               # in the order SECTIONS names them
  if declare -F "sec_$s" >/dev/null; then "sec_$s"; else echo "=== $s: no such section" | tee -a "$LOG"; fi
done
echo "=== done ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"
