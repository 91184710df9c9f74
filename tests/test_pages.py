"""The page check: notebooks executed by papermill (PLOTLY_RENDERER=notebook) are rendered to HTML and opened offline
in headless Chromium. Browser tests skip only where Chromium is not installed; CI installs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from effworkbench import pages

needs_chromium = pytest.mark.skipif(pages.chromium_path() is None,
                                    reason="Chromium is not installed (apt-get install chromium); CI installs it")
md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell

NOTEBOOKS = {
    # math, an embedded plotly figure, a widget (its manager loads from a CDN: listed, not an error), a table
    "good": [md("# Good\n\nInline $a^2+b^2$ and display\n\n$$\\sum_i x_i$$\n\n"
                "AMS fonts, which once made MathJax's font probe fail on file:// pages: $x \\in \\mathbb{R}^{N}$, $\\mathcal{L}_z$"),
             code("import plotly.graph_objects as go\ngo.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2])).show()"),
             code("import ipywidgets as w\nw.IntSlider(3)"),
             code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")],
    # a script the page carries throws
    "bad_js": [md("# Bad script"), code("from IPython.display import HTML\nHTML(\"<script>throw new Error('boom')</script>\")")],
    # a figure div that nothing draws, and a figure whose TeX title stays blank under MathJax 2
    "bad_fig": [code("from IPython.display import HTML\n"
                     "HTML('<div id=\"broken-fig\" class=\"plotly-graph-div\" style=\"height:200px\"></div>')"),
                code("import plotly.graph_objects as go\n"
                     "go.Figure(go.Bar(y=[1, 2]), layout=dict(title=r'$\\alpha^2$')).show()")],
}


def _write(path: Path, cells, executed: bool = False) -> Path:
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    if executed:  # a hand-made executed notebook: outputs saved, no kernel needed
        for i, c in enumerate(x for x in nb.cells if x.cell_type == "code"): c.execution_count = i + 1
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    "The sample notebooks executed by papermill (in parallel) under PLOTLY_RENDERER=notebook, then rendered."
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    env = {**os.environ, "PLOTLY_RENDERER": "notebook", "EFFWB_QUIET": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "papermill", str(_write(src / f"{n}.ipynb", cells)),
                               str(out / f"{n}.ipynb"), "-k", "python3", "--log-level", "ERROR", "--no-progress-bar"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, cells in NOTEBOOKS.items()]
    for p in procs:
        log = p.communicate(timeout=120)[0]
        assert p.returncode == 0, log
    for n in NOTEBOOKS: pages.render_html(out / f"{n}.ipynb")
    return out


def test_count_math():
    m = lambda s: f'<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown">{s}</div>'
    assert pages.count_math(m(r"<p>$a$, $$b$$, \(c\), \[d\], \begin{align}e\end{align}</p>")) == 5
    assert pages.count_math(m("<p>costs $5</p><p>and $10</p><pre>$x$</pre><code>$y$</code>")) == 0
    assert pages.count_math("<p>$x$ is not in rendered Markdown</p>") == 0
    assert pages.count_math('<div class="jp-RenderedLatex">$\\displaystyle x$</div>') == 1


def test_render_html_is_standalone(site):
    good = (site / "good.html").read_text()
    assert "plotly.js v" in good and not any("plot.ly" in u for u in pages.outside_refs(good))  # plotly.js inline
    assert "tex-svg" not in good                                # plotly's per-figure MathJax 3 removed
    if pages.local_mathjax_url():
        assert f'<script src="{pages.local_mathjax_url()}">' in good and "cdnjs.cloudflare.com/ajax/libs/mathjax" not in good
        # with saved widget state, require.js stays for the widget manager; nothing else is fetched by a src/href
        assert pages.outside_refs(good) == ["https://cdnjs.cloudflare.com/ajax/libs/require.js/2.1.10/require.min.js"]
        assert pages.outside_refs((site / "bad_js.html").read_text()) == []
    assert pages.count_math(good) == 4
    assert pages.is_executed(nbformat.read(site / "good.ipynb", as_version=4))


def test_render_falls_back_to_cdn_mathjax(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFWB_MATHJAX_DIR", str(tmp_path))  # no MathJax there
    nbp = _write(tmp_path / "m.ipynb", [md("$x$")])
    with pytest.warns(UserWarning, match="no local MathJax"):
        html = pages.render_html(nbp, tmp_path / "out" / "m.html").read_text()
    assert pages.NBCONVERT_MATHJAX_URL in html


def test_write_index(tmp_path):
    idx = pages.write_index(tmp_path, [{"notebook": "01_data.ipynb", "status": "ok", "seconds": 12.345},
                                       {"notebook": "02_viz.ipynb", "status": "failed", "seconds": 3, "error": "x<y"}])
    text = idx.read_text()
    assert idx == tmp_path / "index.html"
    assert '<a href="01_data.html">01_data</a>' in text and ">12.3<" in text
    assert 'class="failed">failed' in text and "x&lt;y" in text and "1 of 2 ok" in text
    df = pd.DataFrame({"notebook": ["a.ipynb", "b.ipynb"], "status": ["ok", "ok"], "seconds": [1.0, float("nan")]})
    assert pages.write_index(tmp_path, df).read_text().count('href="') == 2
    with pytest.raises(ValueError, match="no 'notebook' key"):
        pages.write_index(tmp_path, [{"status": "ok"}])


@needs_chromium
def test_check_pages(site):
    df = pages.check_pages([site / f"{n}.html" for n in NOTEBOOKS], draw_timeout_s=3).set_index("page")
    good, bad_js, bad_fig = df.loc["good.html"], df.loc["bad_js.html"], df.loc["bad_fig.html"]
    # the good page: figure drawn offline, formulas typeset, only the widget CDN requests listed
    assert good.ok, good.problems
    assert (good.figures, good.figures_drawn) == (1, 1)
    assert good.math_ok and good.math_rendered >= good.math_expected == 4 and not good.console_errors
    assert good.page_errors == [] and good.console_errors == [] and good.local_failed == []
    assert {u.split("/")[2] for u in good.outside_requests} == {"cdnjs.cloudflare.com", "unpkg.com"}
    assert all("Failed to load resource" in e for e in good.outside_errors)  # listed, not failing
    # a script the page carries throws: the page fails
    assert not bad_js.ok and any("boom" in e for e in bad_js.page_errors) and "page error" in bad_js.problems
    assert bad_js.outside_requests == []
    # a figure that cannot draw fails the page, and so does a TeX label plotly leaves blank
    assert not bad_fig.ok and (bad_fig.figures, bad_fig.figures_drawn) == (2, 1)
    assert bad_fig.undrawn == ["broken-fig"] and bad_fig.figure_tex == ["$\\alpha^2$"]
    assert "1 of 2 figure(s) not drawn" in bad_fig.problems and bad_fig.page_errors == []


@needs_chromium
def test_cli(site, tmp_path):
    d = tmp_path / "site"; d.mkdir()
    (d / "bad_js.ipynb").write_text((site / "bad_js.ipynb").read_text())
    _write(d / "notes.ipynb", [md("# Notes\n\n$$\\eta = \\eta_0 / n$$"), code("1")], executed=True)
    _write(d / "draft.ipynb", [code("1")])                   # not executed: skipped
    _write(d / "index.ipynb", [code("1")], executed=True)    # the landing notebook's page is home.html
    run = lambda *a: subprocess.run([sys.executable, "-m", "effworkbench.pages", "check", *map(str, a)],
                                    capture_output=True, text=True, timeout=120)
    r = run(d, "--draw-timeout", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED bad_js.html" in r.stdout and "boom" in r.stdout and "skip draft.ipynb" in r.stderr
    report = json.loads((d / "page_check.json").read_text())
    assert report["ok"] is False and sorted(p["page"] for p in report["pages"]) == ["bad_js.html", "home.html", "notes.html"]
    assert not (d / "draft.html").exists() and not (d / "index.html").exists()   # index.html stays the site's index
    (d / "bad_js.ipynb").unlink(); (d / "bad_js.html").unlink()
    r = run(d, "--no-render")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "notes.html" in r.stdout and json.loads((d / "page_check.json").read_text())["ok"] is True


def test_cli_without_pages(tmp_path, capsys):
    assert pages.main(["check", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        pages.main(["check", str(tmp_path / "missing")])
