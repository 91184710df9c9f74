"The effwb command: list, run (parameter checks, failures, --all with an index), runs ls/show/rm."
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from effworkbench.cli import main, notebook_params, run_notebook
from effworkbench.store import RunStore

EFFWB = [str(Path(sys.executable).parent / "effwb")]  # the installed console script


def _nb(path, params_src, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    p = nbformat.v4.new_code_cell(params_src); p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Toy\n\n$$e^{i\\pi} + 1 = 0$$"), p,
                *[nbformat.v4.new_code_cell(c) for c in cells]]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def nbs(tmp_path, monkeypatch):
    d = tmp_path / "nbs"; d.mkdir()
    _nb(d / "10_toy.ipynb", "preset = 'smoke'\nsteps = 3\nlr = 0.5",
        "import os\nresult = steps * lr\nprint('result', result, os.environ['EFFWB_STATIC'])")
    _nb(d / "11_broken.ipynb", "preset = 'smoke'", "x = 1", "raise ValueError('the broken cell')")
    monkeypatch.setenv("EFFWB_NBS", str(d))
    monkeypatch.chdir(tmp_path)
    return d


def _effwb(*args, env=None):
    return subprocess.run([*EFFWB, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_list_shows_parameters_and_defaults(nbs):
    r = _effwb("list")
    assert r.returncode == 0, r.stderr
    assert "10_toy" in r.stdout and "steps=3" in r.stdout and "lr=0.5" in r.stdout and "11_broken" in r.stdout


def test_unknown_parameter_is_rejected_before_running(nbs, tmp_path):
    r = _effwb("run", "toy", "-p", "stepz", "4")
    assert r.returncode == 2
    assert "no parameter(s) ['stepz']" in r.stderr and "steps=3" in r.stderr
    assert not (tmp_path / "_site").exists()                      # nothing ran


@pytest.mark.parametrize("args,msg", [(["-p", "steps", "four"], "expected int"), (["--preset", "huge"], "invalid choice")])
def test_bad_values_are_rejected(nbs, args, msg):
    r = _effwb("run", "toy", *args)
    assert r.returncode == 2 and msg in r.stderr


def test_run_injects_typed_parameters(nbs, tmp_path):
    r = _effwb("run", "10_toy", "--preset", "medium", "-p", "steps", "4", "-p", "lr", "1", "--no-html")
    assert r.returncode == 0, r.stderr
    out = nbformat.read(tmp_path / "_site" / "10_toy.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert "result 4.0 1" in text                                 # steps * lr with int and float overrides; static mode
    injected = [c for c in out.cells if "injected-parameters" in c.metadata.get("tags", [])][0].source
    assert "preset = \"medium\"" in injected and "lr = 1.0" in injected


def test_failure_exits_nonzero_and_shows_the_cell(nbs, tmp_path):
    r = _effwb("run", "broken", "--no-html")
    assert r.returncode == 1
    assert "raise ValueError('the broken cell')" in r.stderr and "ValueError: the broken cell" in r.stderr
    assert (tmp_path / "_site" / "11_broken.ipynb").exists()      # the partly executed copy is kept


def test_run_all_writes_pages_and_index(nbs, tmp_path):
    r = _effwb("run", "--all")
    assert r.returncode == 1                                      # one notebook fails, the other still runs
    site = tmp_path / "_site"
    assert (site / "10_toy.html").exists() and (site / "11_broken.html").exists()
    index = (site / "index.html").read_text()
    assert "10_toy.html" in index and "11_broken.html" in index


def test_notebook_timeout_is_enforced(nbs):
    slow = _nb(nbs / "12_slow.ipynb", "preset = 'smoke'", "import time; time.sleep(5)")
    with pytest.raises(Exception, match="budget is 1"):
        run_notebook(slow, timeout=1, out_dir="_site", html=False)


def test_runs_ls_show_rm(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.run(lambda c, r: (r.log(step=0, loss=1.0), {"y": c["x"]})[1], {"x": 7})
    key = store.runs()[0].key
    env = {"EFFWB_RUNS": str(tmp_path / "runs")}
    r = _effwb("runs", "ls", env=env)
    assert r.returncode == 0 and key in r.stdout and "done" in r.stdout
    r = _effwb("runs", "show", key[:5], env=env)
    shown = r.stdout.split("metrics:")[0]
    assert r.returncode == 0 and json.loads(shown)["config"] == {"x": 7} and "metrics: 1 records" in r.stdout
    assert _effwb("runs", "show", "nope", env=env).returncode == 2
    r = _effwb("runs", "rm", key[:5], env=env)
    assert r.returncode == 0 and f"removed {key}" in r.stdout and store.runs() == []
