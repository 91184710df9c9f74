"""The documentation site: sample notebooks executed by papermill (one with the `notebook` plotly renderer, as the notebook
test runs them, one with `plotly_mimetype`, as `make run` does) are built into a Sphinx + MyST-NB site, which must read
like documentation and be portable; then headless Chromium checks it, served by a plain static file server. Browser tests
skip only where Chromium is not installed; CI installs it."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from effworkbench import pages

needs_chromium = pytest.mark.skipif(pages.chromium_path() is None,
                                    reason=f"Chromium is not installed ({pages.CHROMIUM_INSTALL}); CI installs it")
md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell

SLIDER_FIG = """import plotly.graph_objects as go
xs = [1, 2, 3]
fig = go.Figure([go.Scatter(x=xs, y=[k * x for x in xs], visible=(k == 1), name=f"k={k}") for k in (1, 2, 3)])
fig.update_layout(sliders=[dict(active=0, steps=[dict(method="update", label=f"k={k}",
                  args=[{"visible": [j == k for j in (1, 2, 3)]}]) for k in (1, 2, 3)])])
fig.show()"""

NOTEBOOKS = {  # name -> (cells, plotly renderer)
    "10_good": ([md("# Good page\n\n> A sample.\n\nInline $a^2+b^2$, a Hoyer penalty, and display\n\n$$\\sum_i x_i$$\n\n"
                    "AMS fonts: $x \\in \\mathbb{R}^{N}$, $\\mathcal{L}_z$"),
                 code("#| default_exp core"),
                 code("#| hide\nhidden_name = 'a hidden cell'"),
                 code("#| export\ndef set_seed(seed: int) -> int:\n    'Doc of the exported function.'\n    return seed"),
                 md("## Figures"),
                 code(SLIDER_FIG),
                 code("import ipywidgets as w\nw.IntSlider(3)"),
                 code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")], "notebook"),
    "11_other": ([md("# Other page\n\n$$e^{i\\pi} + 1 = 0$$"),
                  code("import plotly.graph_objects as go\ngo.Figure(go.Bar(y=[1, 2])).show()")], "plotly_mimetype"),
    "12_bad_js": ([md("# Bad script"), code("from IPython.display import HTML\nHTML(\"<script>throw new Error('boom')</script>\")")],
                  "plotly_mimetype"),
    "13_outside": ([md("# Outside"), code("from IPython.display import HTML\nHTML('<img src=\"https://example.com/x.png\">')")],
                   "plotly_mimetype"),
    "14_tex_label": ([md("# TeX label"), code("import plotly.graph_objects as go\n"
                                               "go.Figure(go.Bar(y=[1, 2]), layout=dict(title=r'$\\alpha^2$')).show()")],
                     "plotly_mimetype"),
}
GOOD = ["10_good", "11_other"]
MODULES = ["effworkbench.core"]  # the API reference of one module keeps the test build short


def _write(path: Path, cells) -> Path:
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    p = nbformat.v4.new_code_cell("preset = 'smoke'"); p.metadata["tags"] = ["parameters"]
    nb.cells.insert(1, p)
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> Path:
    """The sample notebooks executed in parallel by `effwb run` (papermill, injected parameters included). Its kernels
    talk over IPC sockets: parallel kernels on TCP ports race for them ("Address already in use", papermill#511)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("executed")
    procs = [subprocess.Popen([sys.executable, "-c", "from effworkbench.cli import main; main()", "run",
                               str(_write(src / f"{n}.ipynb", cells)), "--out", str(out), "--no-html",
                               "--timeout", "120"],
                              env={**os.environ, "PLOTLY_RENDERER": renderer, "EFFWB_QUIET": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, (cells, renderer) in NOTEBOOKS.items()]
    for p in procs:
        log = p.communicate(timeout=180)[0]
        assert p.returncode == 0, log
    return out


def _build(executed: Path, dest: Path, names, runs=None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for n in names: shutil.copy(executed / f"{n}.ipynb", dest)
    pages.build_site(dest, runs, work_dir=dest.parent / f"{dest.name}-build", modules=MODULES)
    return dest


@pytest.fixture(scope="module")
def site(executed, tmp_path_factory) -> Path:
    "The site of the good pages, with a run-status table in which one notebook failed."
    runs = pd.DataFrame([{"notebook": "10_good.ipynb", "preset": "smoke", "seconds": 1.25, "status": "ok"},
                         {"notebook": "11_other.ipynb", "preset": "smoke", "seconds": 2.0, "status": "failed",
                          "error": "11_other.ipynb failed in cell 3:\nValueError: <the whole error>\nline two"}])
    return _build(executed, tmp_path_factory.mktemp("good") / "_site", GOOD, runs)


def test_pages_read_like_documentation(site):
    good = (site / "10_good.html").read_text()
    assert "#|" not in good and "default_exp" not in good and "hidden_name" not in good   # directives applied
    assert "injected" not in good.lower() and "preset = &#39;smoke&#39;" not in good     # papermill's cell dropped
    assert "In [" not in good and "In&nbsp;[" not in good                               # no prompts
    assert re.search(r'class="[^"]*tag_hide-input', good)                                  # exported code behind a toggle
    assert "Doc of the exported function." in good                                       # show_doc rendered after it
    assert "live widget" in good and "widget-view" not in good                           # no widget manager
    # navigation by part, a table of contents, previous / next, search, the API reference and the run status
    index = (site / "index.html").read_text()
    assert "Language models" in index and 'href="10_good.html"' in index and 'href="status.html"' in index
    assert "page-toc" in good and 'class="left-prev"' in good and 'class="right-next"' in good
    assert (site / "search.html").is_file() and "Hoyer".lower() in (site / "searchindex.js").read_text().lower()
    api = (site / "api" / "core.html").read_text()
    assert 'id="effworkbench.core.set_seed"' in api and "sig-param" in api
    status = (site / "status.html").read_text()
    assert 'href="10_good.html"' in status and "1 of 2 notebooks" in status and "1.2" in status
    assert "ValueError: &lt;the whole error&gt;\nline two" in status


def test_site_is_portable_and_light(site):
    assert (site / "_static" / "mathjax" / "MathJax.js").is_file() and (site / "_static" / "plotly.min.js").is_file()
    htmls = [p for p in site.rglob("*.html") if "_static" not in p.parts]
    for p in htmls:
        text = p.read_text()
        assert p.stat().st_size < 1.5 * 2**20, f"{p.name} is {p.stat().st_size} bytes"
        assert "plotly.js v" not in text, p.name                                      # no inlined plotly.js
        assert "file://" not in text and str(site) not in text, p.name                 # relative links only
        srcs = re.findall(r'<(?:script|link|img|iframe)\b[^>]*?\s(?:src|href)="([^"]+)"', text)
        assert not [u for u in srcs if pages.is_outside(u)], (p.name, srcs)
    good = (site / "10_good.html").read_text()
    assert '_static/plotly.min.js' in good and "_static/mathjax/MathJax.js" in good
    assert good.count("Plotly.newPlot") == 1 and (site / "11_other.html").read_text().count("Plotly.newPlot") == 1


def test_rebuild_only_rewrites_changed_sources(site, executed):
    work = site.parent / "_site-build" / "src"
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*.ipynb")}
    pages.build_site(site, work_dir=work.parent, modules=MODULES)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.ipynb")} == before


def test_check_without_chromium_skips(site, monkeypatch, capsys):
    monkeypatch.setattr(pages, "chromium_path", lambda: None)
    assert pages.main(["check", str(site), "--no-build"]) == 0
    assert pages.CHROMIUM_INSTALL in capsys.readouterr().out
    assert pages.main(["check", str(site), "--no-build", "--require-browser"]) == 1
    empty = site.parent / "empty"; empty.mkdir()
    assert pages.main(["build", str(empty)]) == 2                                   # no executed notebooks: says so


@needs_chromium
def test_browser_check_passes_on_good_pages(site):
    df, checks = pages.check_site(site, search=("Hoyer", "10_good.html"), draw_timeout_s=20)
    bad = df[~df.ok]
    assert bad.empty, bad[["page", "problems", "page_errors", "console_errors", "outside_requests"]].to_dict("records")
    good = df.set_index("page").loc["10_good.html"]
    assert (good.figures, good.figures_drawn, good.sliders) == (1, 1, 1)
    assert good.math_expected == 4 and good.math_rendered == 4 and good.mathjax.startswith("2.")
    assert set(df.page) >= {"index.html", "10_good.html", "11_other.html", "status.html", "api/core.html"}
    assert checks.ok.all(), checks.to_dict("records")
    assert set(checks.check) == {"search 'Hoyer'", "navigation", "slider"}


@needs_chromium
def test_browser_check_fails_bad_pages(executed, tmp_path):
    site = _build(executed, tmp_path / "_site", ["12_bad_js", "13_outside", "14_tex_label"])
    df, _ = pages.check_site(site, [site / f"{n}.html" for n in ("12_bad_js", "13_outside", "14_tex_label")],
                             draw_timeout_s=5, search=None)
    r = df.set_index("page")
    assert not r.loc["12_bad_js.html"].ok and any("boom" in e for e in r.loc["12_bad_js.html"].page_errors)
    out = r.loc["13_outside.html"]
    assert not out.ok and out.outside_requests == ["https://example.com/x.png"] and "outside hosts" in out.problems
    tex = r.loc["14_tex_label.html"]
    assert not tex.ok and tex.figure_tex == ["$\\alpha^2$"]


@needs_chromium
def test_cli_check_writes_report(site):
    r = subprocess.run([sys.executable, "-m", "effworkbench.pages", "check", str(site), "--no-build"],
                       capture_output=True, text=True, timeout=300)
    report = json.loads((site / "page_check.json").read_text())
    # the search target of the real site (the D2DMoE notebook) is absent here: that check is left out, the rest pass
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["ok"] and {c["check"] for c in report["checks"]} == {"navigation", "slider"}
