"""Every notebook once, at the smoke preset, through papermill into _site/ (PLOTLY_RENDERER=notebook).

A papermill per-cell timeout enforces each notebook's budget (15 s library, 60 s method notebook); the total is
asserted too. The page check (`make pages`) then renders these executed copies and opens them in a browser."""
import shutil
import time

import pytest

from conftest import NOTEBOOK_TIMES, ROOT, SITE
from effworkbench.cli import find_notebooks, notebook_budget, notebook_params, run_notebook

NOTEBOOKS = find_notebooks(ROOT / "nbs")


@pytest.fixture(scope="module", autouse=True)
def fresh_site(tmp_path_factory):
    "A clean _site/ and a fresh run store shared by the notebooks of this session (cold caches, as in CI)."
    for p in SITE.glob("*.ipynb"): p.unlink()
    runs = SITE / ".runs"
    shutil.rmtree(runs, ignore_errors=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("EFFWB_RUNS", str(runs))
    mp.setenv("PLOTLY_RENDERER", "notebook")
    yield
    mp.undo()


def test_every_notebook_has_a_preset_parameter():
    assert NOTEBOOKS, "no notebooks found"
    for nb in NOTEBOOKS:
        assert notebook_params(nb)["preset"] == "smoke", nb.name


def test_papermill_reads_every_parameter():
    "papermill's own parser (its injection and `--help-notebook`) finds each parameter: a comment holding `=` hides one"
    import nbformat
    from papermill.translators import PythonTranslator
    for nb in NOTEBOOKS:
        cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assert {p.name for p in PythonTranslator.inspect(cell)} == set(notebook_params(nb)), nb.name


@pytest.mark.notebooks
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke(nb):
    budget = notebook_budget(nb)
    t0 = time.time()
    status = "failed"
    try:
        r = run_notebook(nb, "smoke", out_dir=SITE, timeout=budget, html=False)
        status = "ok"
    finally:
        NOTEBOOK_TIMES.append({"notebook": nb.name, "seconds": round(time.time() - t0, 2), "budget": budget,
                               "status": status})
    assert r["seconds"] <= budget, f"{nb.name} took {r['seconds']:.1f} s, over its {budget:.0f} s smoke budget"
    assert (SITE / nb.name).exists()
