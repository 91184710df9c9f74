"Tests for effworkbench.viz: builders, static explorers (plotly sliders/dropdowns), the live Explorer and show()."
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest

ipywidgets = pytest.importorskip("ipywidgets")

from effworkbench import viz
from effworkbench.viz import (COLORWAY, TEMPLATE, ColumnError, Explorer, add_reference, bar, category_order,
                              configure_renderer, dropdown_figure, fmt, heatmap, is_live, is_static, line, log_ticks,
                              make_control, natural_key, natural_sorted, scatter, show, slider_figure, tick_label,
                              tidy_log_axes)


@pytest.fixture(scope="module")
def runs():
    "A small tidy sweep: 2 widths x 3 learning rates x 5 steps."
    rows = []
    for w in (64, 128):
        for lr in (1e-3, 1e-2, 1e-1):
            for s in (1, 10, 100, 1000, 5000):
                rows.append({"width": w, "lr": lr, "step": s, "loss": 2 + 100 / w + 1 / (1 + s * lr)})
    return pd.DataFrame(rows).sample(frac=1, random_state=0)  # shuffled: builders must sort


def visible_labels(fig, mask):
    return [t.meta["step"] for t, v in zip(fig.data, mask) if v]


# ---------------------------------------------------------------- style

def test_template_registered_and_applied(runs):
    assert TEMPLATE in pio.templates
    assert tuple(pio.templates[TEMPLATE].layout.colorway) == COLORWAY
    for fig in (line(runs, "step", "loss", "width"), scatter(runs, "lr", "loss"), bar(runs, "width", "loss", "lr"),
                heatmap(runs, "width", "lr", "loss"), slider_figure(runs, "step", "loss", "lr", "width"),
                dropdown_figure(runs, "step", "loss", "width", "lr")):
        assert isinstance(fig, go.Figure)
        assert tuple(fig.layout.template.layout.colorway) == COLORWAY
    assert pio.templates.default != TEMPLATE  # importing viz changes no global default


# ---------------------------------------------------------------- builders

def test_line_traces_names_and_log_axes(runs):
    one = runs[runs.width == 64]
    fig = line(one, "step", "loss", color="lr", log_x=True, log_y=True, title="t", labels={"loss": "train loss"})
    assert [t.name for t in fig.data] == ["0.001", "0.01", "0.1"]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.title.text == "train loss" and fig.layout.legend.title.text == "lr"
    assert fig.layout.title.text == "t"
    for t in fig.data:
        assert len(t.x) == 5 and np.all(np.diff(np.asarray(t.x)) > 0)  # sorted along x
    # the values went through unchanged
    sub = one[one.lr == 0.01].sort_values("step")
    np.testing.assert_allclose(np.asarray(fig.data[1].y), sub.loss.to_numpy())
    lin = line(runs, "step", "loss")
    assert len(lin.data) == 1 and lin.layout.xaxis.type is None and lin.layout.yaxis.type is None


def test_colours_follow_values(runs):
    fig = line(runs, "step", "loss", color="width")
    assert [t.line.color for t in fig.data] == list(COLORWAY[:2])


def test_scatter_and_bar(runs):
    fig = scatter(runs, "lr", "loss", color="width", text="step", log_x=True)
    assert len(fig.data) == 2 and all(t.mode == "markers" for t in fig.data)
    assert fig.layout.xaxis.type == "log"
    b = bar(runs[runs.step == 5000], "width", "loss", color="lr", barmode="stack")
    assert [t.name for t in b.data] == ["0.001", "0.01", "0.1"] and b.layout.barmode == "stack"
    assert b.layout.xaxis.type == "category" and list(b.layout.xaxis.categoryarray) == ["64", "128"]


def test_heatmap_pivots_and_marks_best(runs):
    final = runs[runs.step == 5000]
    fig = heatmap(final, "width", "lr", "loss", best="min")
    hm, marks = fig.data
    assert np.shape(hm.z) == (3, 2)
    assert list(hm.x) == ["64", "128"] and list(hm.y) == ["0.001", "0.01", "0.1"]
    grid = final.pivot_table(index="lr", columns="width", values="loss")
    np.testing.assert_allclose(np.asarray(hm.z, dtype=float), grid.to_numpy())
    assert list(marks.y) == [fmt(grid[c].idxmin()) for c in grid.columns]
    assert fig.layout.xaxis.type == "category" and fig.layout.yaxis.type == "category"
    # duplicates are aggregated with `agg`
    dup = pd.DataFrame({"a": [1, 1], "b": [2, 2], "z": [1.0, 3.0]})
    assert np.asarray(heatmap(dup, "a", "b", "z").data[0].z).item() == 2.0
    assert np.asarray(heatmap(dup, "a", "b", "z", agg="max").data[0].z).item() == 3.0
    with pytest.raises(ValueError, match="best="):
        heatmap(final, "width", "lr", "loss", best="lowest")


@pytest.mark.parametrize("call, arg", [
    (lambda df: line(df, "step", "los"), "y='los'"),
    (lambda df: line(df, "stp", "loss"), "x='stp'"),
    (lambda df: scatter(df, "lr", "loss", color="wdth"), "color='wdth'"),
    (lambda df: heatmap(df, "width", "lr", "accuracy"), "z='accuracy'"),
    (lambda df: slider_figure(df, "step", "loss", slider="lrate"), "slider='lrate'"),
    (lambda df: dropdown_figure(df, "step", "loss", by="depth"), "by='depth'"),
])
def test_missing_column_is_named(runs, call, arg):
    with pytest.raises(ColumnError) as e:
        call(runs)
    msg = str(e.value)
    assert arg in msg and "no such column" in msg and "'loss'" in msg  # lists the columns there are
    assert isinstance(e.value, KeyError)


def test_bad_inputs(runs):
    with pytest.raises(ColumnError, match=r"did you mean 'loss'"):
        line(runs, "step", "Loss")
    with pytest.raises(ValueError, match="empty"):
        line(runs.iloc[:0], "step", "loss")
    with pytest.raises(TypeError, match="DataFrame"):
        line({"step": [1]}, "step", "loss")
    with pytest.raises(ValueError, match="values <= 0"):
        line(runs.assign(loss=runs.loss - 10), "step", "loss", log_y=True)


# ---------------------------------------------------------------- static explorers

def test_slider_figure_steps_and_visibility(runs):
    fig = slider_figure(runs, "step", "loss", slider="lr", color="width", log_x=True, active=1)
    (sl,) = fig.layout.sliders
    assert [s.label for s in sl.steps] == ["0.001", "0.01", "0.1"]
    assert len(fig.data) == 3 * 2
    assert sl.active == 1 and sl.currentvalue.prefix == "lr = "
    for s in sl.steps:
        mask = s.args[0]["visible"]
        assert len(mask) == len(fig.data)
        assert visible_labels(fig, mask) == [s.label, s.label]     # exactly this value's traces
        names = [t.name for t, v in zip(fig.data, mask) if v]
        assert names == ["64", "128"]
    # initial visibility is the active step's mask
    assert [bool(t.visible) for t in fig.data] == list(sl.steps[1].args[0]["visible"])
    # same width, same colour in every step; axes fixed over all steps
    assert {t.line.color for t in fig.data if t.name == "128"} == {COLORWAY[1]}
    lo, hi = fig.layout.xaxis.range
    assert lo < 0 < np.log10(5000) < hi                             # log10 units on a log axis
    assert fig.layout.yaxis.range[0] < runs.loss.min() and fig.layout.yaxis.range[1] > runs.loss.max()


def test_slider_figure_without_color_and_scatter_kind(runs):
    fig = slider_figure(runs, "lr", "loss", slider="step", kind="scatter", fixed_range=False)
    assert len(fig.data) == 5 and len(fig.layout.sliders[0].steps) == 5
    assert all(t.mode == "markers" for t in fig.data)
    assert fig.layout.xaxis.range is None
    for i, s in enumerate(fig.layout.sliders[0].steps):
        assert list(s.args[0]["visible"]) == [j == i for j in range(5)]
    with pytest.raises(ValueError, match="active=7"):
        slider_figure(runs, "step", "loss", slider="lr", active=7)
    with pytest.raises(ValueError, match="kind="):
        slider_figure(runs, "step", "loss", slider="lr", kind="area")


def test_dropdown_figure_buttons_and_visibility(runs):
    fig = dropdown_figure(runs, "step", "loss", by="width", color="lr", active=-1)
    (menu,) = fig.layout.updatemenus
    assert menu.type == "dropdown" and menu.active == 1
    assert [b.label for b in menu.buttons] == ["width = 64", "width = 128"]
    assert len(fig.data) == 2 * 3
    for b in menu.buttons:
        value = b.label.split(" = ")[1]
        assert visible_labels(fig, b.args[0]["visible"]) == [value] * 3
    assert [bool(t.visible) for t in fig.data] == [False] * 3 + [True] * 3


def test_static_figures_serialise(runs):
    "The static forms must survive to_json (what the docs page embeds) with their steps."
    fig = slider_figure(runs, "step", "loss", slider="lr", color="width")
    back = pio.from_json(fig.to_json())
    assert len(back.layout.sliders[0].steps) == 3 and len(back.data) == 6


# ---------------------------------------------------------------- order: numbers sort as numbers

CAPS = ["19.0 kB", "0.5 kB", "2.4 kB", "9.5 kB", "0.9 kB", "4.7 kB"]      # as a notebook builds them, unsorted
CAPS_SORTED = ["0.5 kB", "0.9 kB", "2.4 kB", "4.7 kB", "9.5 kB", "19.0 kB"]
WIDTHS = ["d=128", "d=256", "d=32", "d=64"]
WIDTHS_SORTED = ["d=32", "d=64", "d=128", "d=256"]


@pytest.fixture(scope="module")
def labelled():
    "A sweep whose category columns are strings made from numbers, in a deliberately unsorted row order."
    rows = [{"cap": c, "d": d, "G": G, "tau": tau, "loss": 3 + 10 / float(d[2:]) + float(c.split()[0]) / 100 + G / 10 + tau}
            for c in CAPS for d in WIDTHS for G in (4, 1, 16, 2) for tau in (0.5, 0.05, 1.0)]
    return pd.DataFrame(rows).sample(frac=1, random_state=1)


def test_natural_sorted_examples():
    assert natural_sorted(CAPS) == CAPS_SORTED
    assert natural_sorted(WIDTHS) == WIDTHS_SORTED
    assert natural_sorted(["lr 1e-2", "lr 3e-3", "lr 1e-1"]) == ["lr 3e-3", "lr 1e-2", "lr 1e-1"]
    assert natural_sorted(["x=-1", "x=-10", "x=2"]) == ["x=-10", "x=-1", "x=2"]
    assert natural_sorted(["top-10", "top-2"]) == ["top-2", "top-10"]            # a hyphen in a word is no minus sign
    assert natural_sorted(["GELU base", "dense", "ReLU"]) == ["dense", "GELU base", "ReLU"]   # text: case-insensitive
    assert natural_sorted([10, "3", 2.5, None, np.int64(1)]) == [1, 2.5, "3", 10, None]
    assert natural_key("a") != natural_key("A")                                   # ties broken: a total order


def test_natural_sorted_matches_numeric_order_property():
    "Random numbers rendered in several label styles sort exactly as the numbers shown in the labels do."
    import re
    rng = np.random.default_rng(0)
    styles = ["{:.1f} kB", "d={:g}", "τ = {:.3g}", "E={:g}, top-1", "{:.2e}", "lr {:.0e} (warm-up)"]
    for trial in range(300):
        style = styles[trial % len(styles)]
        vals = rng.choice([-1, 1], 8) * 10 ** rng.uniform(-4, 6, 8)
        labels = list(dict.fromkeys(style.format(v) for v in vals))
        shown = {lab: float(re.search(r"-?[\d.]+(?:e[-+]\d+)?", lab).group()) for lab in labels}
        want = sorted(labels, key=lambda lab: (shown[lab], lab))
        assert natural_sorted(rng.permutation(labels).tolist()) == want, style


def test_category_order_respects_ordered_categorical():
    s = pd.Series(pd.Categorical(["b", "a", "c"], categories=["c", "a", "b"], ordered=True))
    assert category_order(s) == ["c", "a", "b"]
    unordered = pd.Series(pd.Categorical(["d=64", "d=32", "d=128"]))             # pandas sorts these lexically
    assert category_order(unordered) == ["d=32", "d=64", "d=128"]
    assert category_order(pd.Series(["G=16", None, "G=2"])) == ["G=2", "G=16"]
    c = pd.Categorical(["b", "a", "c", "b"], categories=["c", "b", "a"], ordered=True)
    fig = line(pd.DataFrame({"x": [1, 1, 1, 2], "y": [1, 2, 3, 4], "c": c}), "x", "y", "c")
    assert [t.name for t in fig.data] == ["c", "b", "a"]                         # the legend follows the categories


def test_legend_order_is_numeric(labelled):
    one = labelled[(labelled.cap == "0.5 kB") & (labelled.tau == 0.5)]
    for fig in (line(one, "G", "loss", color="d"), scatter(one, "G", "loss", color="d")):
        assert [t.name for t in fig.data] == WIDTHS_SORTED
        assert [t.line.color for t in fig.data] == list(COLORWAY[:4])               # colours follow the order
    b = bar(one, "d", "loss", color="G")
    assert [t.name for t in b.data] == ["1", "2", "4", "16"]
    assert list(b.layout.xaxis.categoryarray) == WIDTHS_SORTED


def test_slider_steps_and_dropdown_buttons_are_numeric(labelled):
    sub = labelled[labelled.tau == 0.5]
    sf = slider_figure(sub, "G", "loss", slider="cap", color="d", log_x=True)
    steps = sf.layout.sliders[0].steps
    assert [s.label for s in steps] == CAPS_SORTED
    for s in steps:                                    # each step still shows its own traces, legend in order
        assert visible_labels(sf, s.args[0]["visible"]) == [s.label] * 4
        assert [t.name for t, v in zip(sf.data, s.args[0]["visible"]) if v] == WIDTHS_SORTED
    df_ = dropdown_figure(sub, "G", "loss", by="d", color="cap")
    assert [b.label for b in df_.layout.updatemenus[0].buttons] == [f"d = {w}" for w in WIDTHS_SORTED]
    for b in df_.layout.updatemenus[0].buttons:
        assert [t.name for t, v in zip(df_.data, b.args[0]["visible"]) if v] == CAPS_SORTED
    tau = slider_figure(sub.assign(tau=labelled.tau.astype(str)), "G", "loss", slider="cap", color="d")
    assert [s.label for s in tau.layout.sliders[0].steps] == CAPS_SORTED


def test_heatmap_axes_are_numeric(labelled):
    sub = labelled[labelled.tau == 0.5]
    fig = heatmap(sub, "cap", "d", "loss")
    assert list(fig.data[0].x) == CAPS_SORTED and list(fig.data[0].y) == WIDTHS_SORTED
    grid = sub.groupby(["d", "cap"]).loss.mean()
    assert np.asarray(fig.data[0].z)[0, -1] == pytest.approx(grid[("d=32", "19.0 kB")])   # values follow their labels


# ---------------------------------------------------------------- log axes and reference lines

def test_log_ticks_and_labels():
    assert log_ticks(1e-4, 0.5) == [1e-4, 1e-3, 1e-2, 0.1]
    assert log_ticks(1e2, 1e14) == [10.0 ** k for k in range(2, 15, 2)]
    assert log_ticks(64, 1024) == [100, 200, 500, 1000]
    assert log_ticks(0.12, 0.9) == [0.2, 0.3, 0.5]
    assert log_ticks(3.2, 4.5) == [3.5, 4.0, 4.5]
    for lo, hi in [(1e-9, 1e9), (0.02, 0.03), (5, 5), (7e14, 3e16), (0.3, 2.0)]:
        t = log_ticks(lo, hi)
        assert 1 <= len(t) <= 10 and all(lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9) for v in t) and t == sorted(t)
    with pytest.raises(ValueError, match="0 < lo"):
        log_ticks(-1, 1)
    assert [tick_label(v) for v in (0.002, 5000, 2e15, 1e-5, 0.3, 128)] == ["0.002", "5000", "2×10¹⁵", "10⁻⁵", "0.3", "128"]


def test_builders_put_full_labels_on_log_axes(runs):
    fig = line(runs, "step", "loss", color="width", log_x=True, log_y=True)
    x, y = fig.layout.xaxis, fig.layout.yaxis
    assert x.tickmode == "array" and list(x.ticktext) == ["1", "10", "100", "1000"]      # steps 1 … 5000: decades
    assert y.tickmode == "array" and len(y.tickvals) >= 3                                  # loss 2.6 … 3.9: inside a decade
    assert all(runs.loss.min() <= v <= runs.loss.max() for v in y.tickvals)
    assert line(runs, "step", "loss").layout.xaxis.tickvals is None                       # linear axes untouched
    grid = pd.DataFrame({"width": [256, 32, 128, 64], "lr": [2.0 ** -8, 2.0 ** -6, 2.0 ** -7, 2.0 ** -5]})
    g = line(grid, "width", "lr", log_x=True, log_y=True)
    assert list(g.layout.xaxis.ticktext) == ["32", "64", "128", "256"]                     # a swept grid: its own values
    assert list(g.layout.yaxis.ticktext) == ["0.005", "0.01", "0.02"]                      # long values: 1-2-5 steps
    sf = slider_figure(runs, "step", "loss", slider="lr", log_x=True)                     # fixed range: ticks over it
    lo, hi = (10 ** r for r in sf.layout.xaxis.range)
    assert all(lo <= v <= hi for v in sf.layout.xaxis.tickvals)
    hand = go.Figure(go.Scatter(x=[1e12, 1e15], y=[1, 2])).update_xaxes(type="log", tickvals=[1e13])
    assert list(tidy_log_axes(hand).layout.xaxis.tickvals) == [1e13]                       # ticks set by hand stay


def test_add_reference_goes_to_the_legend(runs):
    fig = line(runs[runs.lr == 0.01], "step", "loss", color="width")
    add_reference(fig, 2.5, "dense GELU base"); add_reference(fig, 2.52, "dense ReLU + Hoyer", dash="dash")
    assert [t.name for t in fig.data] == ["64", "128", "dense GELU base", "dense ReLU + Hoyer"]
    assert len(fig.layout.annotations) == 0 and len(fig.layout.shapes) == 0                # no labels inside the plot
    assert list(fig.data[-1].x) == [1, 5000] and fig.data[-1].line.dash == "dash"
    with pytest.raises(ValueError, match="numeric x data"):
        add_reference(go.Figure(), 1.0, "x")


# ---------------------------------------------------------------- live explorer

def curves(runs):
    calls = []

    def fn(width: int = 64, min_lr: float = 0.0, log_y: bool = False):
        calls.append((width, min_lr, log_y))
        sub = runs[(runs.width == width) & (runs.lr >= min_lr)]
        return line(sub, "step", "loss", color="lr", log_y=log_y, title=f"width {width}")
    return fn, calls


def test_make_control_specs():
    W = ipywidgets
    assert isinstance(make_control("a", [1, 2]), W.Dropdown) and make_control("a", [1, 2]).value == 1
    assert make_control("a", [("small", 64), ("big", 128)]).value == 64
    s = make_control("n", (2, 10, 2))
    assert isinstance(s, W.IntSlider) and (s.min, s.max, s.step, s.value) == (2, 10, 2, 2)
    f = make_control("p", (0, 1.0), value=0.5)
    assert isinstance(f, W.FloatSlider) and f.value == 0.5 and f.step == pytest.approx(0.01)
    assert isinstance(make_control("b", True), W.Checkbox) and make_control("b", True).value is True
    assert isinstance(make_control("t", "relu"), W.Text)
    w = W.FloatLogSlider(value=1e-3, min=-5, max=-1)
    assert make_control("lr", w) is w
    with pytest.raises(TypeError, match="control 'x'"):
        make_control("x", {"a": 1})
    with pytest.raises(ValueError, match="min < max"):
        make_control("x", (5, 1))
    with pytest.raises(ValueError, match="must be > 0"):
        make_control("x", (0, 1, 0))
    with pytest.raises(ValueError, match="empty"):
        make_control("x", [])


def test_explorer_recomputes_on_control_change(runs):
    fn, calls = curves(runs)
    ex = Explorer(fn, width=[64, 128], min_lr=(0.0, 0.1, 0.005), log_y=False)
    assert set(ex.controls) == {"width", "min_lr", "log_y"}
    assert isinstance(ex.controls["width"], ipywidgets.Dropdown)
    assert isinstance(ex.controls["min_lr"], ipywidgets.FloatSlider)
    assert isinstance(ex.controls["log_y"], ipywidgets.Checkbox)
    assert isinstance(ex.widget, ipywidgets.Box) and ex.output in ex.widget.children
    assert ex.values == {"width": 64, "min_lr": 0.0, "log_y": False}
    first = ex.figure
    assert first.layout.title.text == "width 64" and len(first.data) == 3 and len(calls) == 1

    ex.controls["width"].value = 128
    assert ex.figure is not first and ex.figure.layout.title.text == "width 128"
    assert calls[-1] == (128, 0.0, False)
    np.testing.assert_allclose(np.asarray(ex.figure.data[0].y),
                               runs[(runs.width == 128) & (runs.lr == 1e-3)].sort_values("step").loss.to_numpy())

    ex.controls["min_lr"].value = 0.05
    assert [t.name for t in ex.figure.data] == ["0.1"]
    ex.controls["log_y"].value = True
    assert ex.figure.layout.yaxis.type == "log"
    assert ex.n_updates == 4 and len(calls) == 4

    fig = ex.update(width=64, min_lr=0.0, log_y=False)       # several values, one call
    assert len(calls) == 5 and fig is ex.figure and len(fig.data) == 3 and fig.layout.yaxis.type is None
    assert ex.update() is not fig and len(calls) == 6         # plain update recomputes
    with pytest.raises(ValueError, match="no control"):
        ex.update(depth=3)
    ex.close()


def test_explorer_initial_and_errors(runs):
    fn, calls = curves(runs)
    ex = Explorer(fn, {"width": [64, 128]}, initial={"width": 128})
    assert ex.values == {"width": 128} and ex.figure.layout.title.text == "width 128" and len(calls) == 1
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['widht'\]"):
        Explorer(fn, widht=[64])
    with pytest.raises(ValueError, match="needs"):
        Explorer(lambda a, b: go.Figure(), a=[1])
    with pytest.raises(ValueError, match="at least one control"):
        Explorer(fn)
    with pytest.raises(ValueError, match="unknown controls"):
        Explorer(fn, width=[64], initial={"depth": 2})

    def bad(k: int = 0):
        if k == 2: raise RuntimeError("boom")
        return go.Figure() if k == 0 else "not a figure"
    ex = Explorer(bad, k=(0, 3))
    good = ex.figure
    ex.controls["k"].value = 2                       # a failing recompute in a callback: kept, not raised
    assert isinstance(ex.error, RuntimeError) and ex.figure is good
    ex.controls["k"].value = 1
    assert isinstance(ex.error, TypeError) and "expected a plotly" in str(ex.error)
    with pytest.raises(TypeError, match="expected a plotly"):
        ex.update()
    ex.controls["k"].value = 0
    assert ex.error is None and ex.figure is not good


# ---------------------------------------------------------------- show() and the environment

@pytest.fixture
def shown(monkeypatch):
    out = []
    monkeypatch.setattr(viz, "display", lambda *objs, **kw: out.extend(objs))
    return out


@pytest.mark.parametrize("value, static", [("1", True), ("true", True), (" 1 ", True), ("0", False), ("", False)])
def test_is_static(monkeypatch, value, static):
    monkeypatch.setenv("EFFWB_STATIC", value)
    assert is_static() is static
    monkeypatch.setattr(viz, "_in_kernel", lambda: True)
    assert is_live() is (not static)


def test_show_static_displays_only_the_figure(runs, shown, monkeypatch):
    fn, _ = curves(runs)
    ex = Explorer(fn, width=[64, 128])
    fig = slider_figure(runs, "step", "loss", slider="lr")
    monkeypatch.setattr(viz, "_in_kernel", lambda: True)      # even inside a kernel
    monkeypatch.setenv("EFFWB_STATIC", "1")
    assert show(fig, ex) is None
    assert len(shown) == 1 and shown[0] is fig
    assert not ex._live and ex.output.outputs == ()          # nothing was drawn into the Output either
    ex.controls["width"].value = 128
    assert len(shown) == 1                                    # changes do not display anything


def test_show_live_displays_figure_and_explorer(runs, shown, monkeypatch):
    fn, _ = curves(runs)
    ex = Explorer(fn, width=[64, 128])
    fig = line(runs, "step", "loss")
    monkeypatch.setattr(viz, "_in_kernel", lambda: True)
    monkeypatch.delenv("EFFWB_STATIC", raising=False)
    show(fig, ex)
    assert len(shown) == 3 and shown[0] is fig and shown[1] is ex.figure and shown[2] is ex.widget
    ex.controls["width"].value = 128                          # live: each change redraws the new figure
    assert len(shown) == 4 and shown[-1] is ex.figure and shown[-1].layout.title.text == "width 128"
    monkeypatch.setenv("EFFWB_STATIC", "0")                   # "0" means not static
    shown.clear(); show(fig, ex)
    assert len(shown) == 3


def test_show_outside_a_kernel_and_explicit_live(runs, shown, monkeypatch):
    fn, _ = curves(runs)
    ex = Explorer(fn, width=[64])
    fig = line(runs, "step", "loss")
    monkeypatch.delenv("EFFWB_STATIC", raising=False)
    monkeypatch.setattr(viz, "_in_kernel", lambda: False)
    show(fig, ex)
    assert shown == [fig]
    shown.clear(); show(fig, ex, live=True)
    assert len(shown) == 3
    with pytest.raises(TypeError, match="Figure"):
        show(ex)


def test_configure_renderer_respects_env(monkeypatch):
    saved = pio.renderers.default
    try:
        monkeypatch.setattr(viz, "_in_kernel", lambda: True)
        monkeypatch.setenv("PLOTLY_RENDERER", "notebook")
        pio.renderers.default = "notebook"
        assert configure_renderer() == "notebook"                      # set: left alone
        pio.renderers.default = "plotly_mimetype"
        assert configure_renderer() == "plotly_mimetype"
        monkeypatch.delenv("PLOTLY_RENDERER")
        assert configure_renderer() == viz.NOTEBOOK_RENDERER           # unset, in a kernel: small + readable
        pio.renderers.default = "vscode"
        assert configure_renderer() == "vscode"                        # plotly's pick for another frontend stands
        monkeypatch.setattr(viz, "_in_kernel", lambda: False)
        pio.renderers.default = "plotly_mimetype"
        assert configure_renderer() == "plotly_mimetype"               # not in a kernel: untouched
    finally:
        pio.renderers.default = saved


def test_import_keeps_env_renderer():
    "End to end: with PLOTLY_RENDERER set, importing the module keeps it as plotly's default."
    code = "import effworkbench.viz, plotly.io as pio; print(pio.renderers.default)"
    env = {**os.environ, "PLOTLY_RENDERER": "json"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "json"
