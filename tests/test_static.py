"Static check: pyflakes' rules (ruff `--select F`) over the library, the tests and the benchmarks: unused imports, undefined names."
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_pyflakes_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed: pip install -c constraints.txt -e '.[dev]' (or pip install -c constraints.txt ruff)")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--output-format", "concise", "--no-cache",
                        "effworkbench", "tests", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ruff check --select F effworkbench tests bench found problems:\n{r.stdout}{r.stderr}"


# Third-party packages the library and the benchmarks import when a module loads. A lent GPU machine runs a fixed image
# (torch, triton, numpy, pandas, scipy, tokenizers, safetensors, ... but not plotly or opacus), and bench/gpu_prep.sh
# carries wheels only for the packages named in its DEVICE_LACKS: a new import here must be in the image or carried.
MODULE_LEVEL_PACKAGES = {"numpy", "pandas", "plotly", "tokenizers", "torch", "triton"}


def module_level_imports(path: Path) -> set[str]:
    "Top-level package names imported by `path` when it loads (body and `if` blocks; a `try` import is optional)."
    import ast
    names = set()
    for node in ast.parse(path.read_text()).body:
        for n in ast.walk(node) if isinstance(node, ast.If) else [node]:
            if isinstance(n, ast.Import): names |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module: names.add(n.module.split(".")[0])
    return names


def test_module_level_imports_are_known():
    local = {"effworkbench", "heap"} | {p.stem for p in (ROOT / "bench").glob("*.py")}
    found = {}
    for f in [*(ROOT / "effworkbench").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for name in module_level_imports(f) - set(sys.stdlib_module_names) - local:
            found.setdefault(name, []).append(str(f.relative_to(ROOT)))
    new = {k: v for k, v in found.items() if k not in MODULE_LEVEL_PACKAGES}
    assert not new, (f"new module-level imports {new}: import them where they are used, or make sure a lent GPU has them "
                     "(../.library/device/KINDS.md; else add them to DEVICE_LACKS in bench/gpu_prep.sh) and list them here")
    assert {"plotly"} <= set((ROOT / "bench/gpu_prep.sh").read_text().split('DEVICE_LACKS=${DEVICE_LACKS:-"')[1].split('"')[0].split())
