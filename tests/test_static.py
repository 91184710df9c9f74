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
