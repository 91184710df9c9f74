"The wheel builds and installs non-editable in a fresh venv; every module imports from there and `effwb` runs."
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_in_fresh_venv(tmp_path):
    dist, src = tmp_path / "dist", tmp_path / "src"
    # build from a copy: setuptools writes effworkbench.egg-info into the source folder, and a stale one in the checkout
    # would shadow the installed package's entry points (the registries' lookups) for anything run from there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "_site", "_build", "data", "results",
                                                             "*.egg-info", "__pycache__", ".ray", "dist", "build"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    assert not (ROOT / "effworkbench.egg-info").exists() or (ROOT / "effworkbench.egg-info").stat().st_mtime < src.stat().st_mtime
    wheel = next(dist.glob("effworkbench-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # install the wheel itself (not editable, no dependencies: those are this environment's, reached through a .pth)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, capture_output=True, text=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pkg = ROOT / "effworkbench"      # every module, subpackages (moe/, scaling/, ...) included
    modules = sorted(".".join(p.relative_to(pkg).with_suffix("").parts) for p in pkg.rglob("*.py") if not p.stem.startswith("_"))
    assert "moe.layers" in modules and "vision.early_exit" in modules
    code = ("import importlib, effworkbench, sys; "
            f"mods = [importlib.import_module('effworkbench.' + m) for m in {modules!r}]; "
            "print(effworkbench.__file__); print(len(mods))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, n = r.stdout.split()
    assert Path(where).is_relative_to(venv) and int(n) == len(modules)      # imported from the wheel, not the checkout
    r = subprocess.run([str(venv / "bin" / "effwb"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "runs" in r.stdout
