#!/usr/bin/env bash
# Prepare the tree for one device call of bench/gpu_session.sh; run here, in the repository root, with no device time.
#  1. the tree must be clean (runs made on the device record the commit through the manifest, and a dirty tree cannot
#     be published);
#  2. .git_manifest: HEAD and the tracked files' blobs (the device's copy has no .git);
#  3. .carry/anchors.py: the baselines' script, run in the same call as the benches;
#  4. .whl/: wheels of the packages the device's image lacks (its python3 has torch, triton, pandas, scipy, safetensors,
#     tokenizers, ... but not plotly or opacus: ../.library/device/KINDS.md), pinned to this venv's versions.
#     gpu_session.sh installs them into /tmp/site when .whl/ is there.
# Then:  run(command="OUT=$OUT bash bench/gpu_session.sh", carry=[".git_manifest", ".carry", ".whl", "data"], timeout_s=600)
set -eu
PY=${PYTHON:-.venv/bin/python}
ANCHORS=${ANCHORS:-../shared/bench/anchors.py}
DEVICE_LACKS=${DEVICE_LACKS:-"plotly opacus"}     # the device image's missing packages that the sections import
if [ -n "$(git status --short --untracked-files=no)" ]; then
  echo "the tree has uncommitted changes: commit first (git status --short)"; exit 1
fi
$PY -c "from effworkbench.core import write_git_manifest; print('manifest:', write_git_manifest())"
mkdir -p .carry
if [ -f "$ANCHORS" ]; then cp "$ANCHORS" .carry/anchors.py; echo "anchors: $ANCHORS -> .carry/anchors.py"
else echo "no $ANCHORS: the anchors section will be skipped"; fi
rm -rf .whl && mkdir -p .whl
pins=$($PY - $DEVICE_LACKS <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PYEOF
)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins 2>&1 | grep -v "^WARNING" || true
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels downloaded into .whl/ for: $pins"; exit 1; }
echo "wheels: $(ls .whl | tr '\n' ' ')($(du -sh .whl | cut -f1))"
# what travels: the tracked files (and untracked ones git does not ignore) and the carried paths
tree=$( { git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null; \
          find .git_manifest .carry .whl data -type f -printf '%s\n' 2>/dev/null; } | awk '{ s += $1 } END { printf "%.1f", s / 2^20 }')
echo "carry: .git_manifest .carry .whl data   (${tree} MiB with the tree; the limit is 64 MiB)"
