"""Sphinx configuration of the effworkbench site. `make run` (effworkbench.pages.build_site) copies this folder next
to the processed notebooks and builds `_site/` with MyST-NB; nothing is executed here, the pages show the outputs of
the executed copies."""
project = "effworkbench"
author = "effworkbench contributors"
copyright = "effworkbench contributors"

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.mathjax"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "conf.py"]
suppress_warnings = ["myst.header", "myst.mathjax", "mystnb.unknown_mime_type", "myst.xref_missing", "toc.not_included"]

# MyST-NB: render the executed copies as they are; nothing reruns
nb_execution_mode = "off"
nb_merge_streams = True
nb_ipywidgets_js = {}  # no widget manager from a CDN: static pages show no live widget
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True  # `$$...$$` inside a sentence is display math, as in Jupyter
myst_update_mathjax = False  # its MathJax 3+ `window.MathJax = {options}` would replace the MathJax 2 configuration
nb_render_markdown_format = "myst"

# autodoc: every name in each module's __all__ (nbdev writes it), in source order
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True


def _foreign_bases() -> str:
    """Names of the classes outside effworkbench that its classes derive from (torch's Module, Mapping, Exception, ...).
    A class built from the workbench's own small classes (`Run` from `RunFiles`, `RunRecord`, ...; `Trainer`; `Explorer`)
    shows the members it inherits from them; members inherited from these foreign bases stay out of the reference."""
    import importlib, inspect, pkgutil
    import effworkbench
    names = {"object"}
    for m in pkgutil.walk_packages(effworkbench.__path__, "effworkbench."):
        try: mod = importlib.import_module(m.name)
        except Exception: continue          # an optional dependency missing: autodoc reports that module itself
        for obj in vars(mod).values():
            if inspect.isclass(obj) and obj.__module__.startswith("effworkbench"):
                names |= {b.__name__ for b in obj.__mro__[1:] if not b.__module__.startswith("effworkbench")}
    return ",".join(sorted(names))


autodoc_default_options = {"inherited-members": _foreign_bases()}

# MathJax 2 from the jupyter-server-mathjax wheel, copied to _static/mathjax by build_site (a path relative to _static)
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
mathjax2_config = {
    "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]], "processRefs": False,
                "processEnvironments": False},
    # the wheel ships only the STIX-Web fonts: name them, or MathJax asks for TeX font files that are not there
    # MathJax's blank probe font is `url('about:blank')`, which Chromium reports as a CORS error: an empty data: font
    "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web", "imageFont": None,
                 "styles": {"@font-face": {"font-family": "MathJax_Blank", "src": "url('data:font/woff;base64,')"}}},
    # the hidden MathML copy would ask for the TeX .otf fonts (NativeMML styles), which the wheel does not ship
    "menuSettings": {"assistiveMML": False},
    "messageStyle": "none",
    "showMathMenu": False,
}

html_theme = "sphinx_book_theme"
html_title = "effworkbench"
html_static_path = ["_static"]
html_css_files = ["effwb.css"]
html_last_updated_fmt = None
html_context = {"default_mode": "light"}  # else the theme logs "invalid theme mode" on a first visit
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
}


def _plotly_on_figure_pages(app, pagename, templatename, context, doctree):
    "Load the site's one plotly.js (copied to _static by build_site) on the pages that hold a figure."
    if "plotly-graph-div" in context.get("body", ""):
        app.add_js_file("plotly.min.js", priority=200)


def setup(app):
    app.connect("html-page-context", _plotly_on_figure_pages)
    _setup_docstrings(app)


# MyST-NB writes output files (images) to <outdir>/../jupyter_execute; keep them under _build/ beside the sources
import myst_nb.sphinx_ext  # noqa: E402

myst_nb.sphinx_ext.OUTPUT_FOLDER = "_build/jupyter_execute"

import re  # noqa: E402

_CODE = re.compile(r"(?<![`\w])`([^`\n]+)`(?![`\w])")


def _markdown_docstring(app, what, name, obj, options, lines):
    "The library's docstrings are Markdown (nbdev style): `code` spans become RST literals, a bare | is no substitution."
    for i, line in enumerate(lines):
        line = _CODE.sub(r"``\1``", line)
        lines[i] = re.sub(r"(?<![\\`])\|", r"\\|", line) if "``" not in line else line


def _setup_docstrings(app):
    app.connect("autodoc-process-docstring", _markdown_docstring)
