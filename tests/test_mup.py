"μP: per-group init, multipliers and LRs on dense and MoE models, the trainer's one-flag switch, the coordinate check (μP under the threshold, SP and the work-in-progress router rule over it), LR-sweep helpers."
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from effworkbench.core import ConfigError
from effworkbench.nn.gpt import GPT, GPTConfig, make_parameterization
from effworkbench.core import config_from
from effworkbench.experiment import EXPERIMENTS, Context, OutOfTime, run_experiment
from effworkbench.mup import (SLOPE_THRESHOLD, CoordSettings, LRSettings, MuP, MuPConfig, MuPOptions, coord_frame, coord_slopes, coord_table,
                              hp_table, lr_panels, lr_points, max_growth, optimal_lr, plot_coord, plot_lr)
from effworkbench.store import RunStore
from effworkbench.train import TrainConfig, Trainer
from tests_common import finished_units, spend_budget_after


def cfg(d, ffn="moe", G=2, E=4, **kw):
    return GPTConfig(vocab_size=256, seq_len=16, d_model=d, n_layers=2, n_heads=4, ffn=ffn,
                     ffn_kwargs={"expansion": E, "granularity": G} if ffn == "moe" else {}, **kw)


def table(d, param="mup", **kw):
    torch.manual_seed(0)
    return hp_table(GPT(cfg(d, **{k: v for k, v in kw.items() if k in ("ffn", "G", "E", "tie_weights")}),
                        make_parameterization(param, **{k: v for k, v in kw.items() if k not in ("ffn", "G", "E", "tie_weights")}))
                    ).set_index("name")


def named(model):
    return dict(model.named_parameters())


def test_moe_rules_scale_with_width():
    t = {d: table(d) for d in (64, 128, 256)}
    hidden = ["blocks.0.attn.q.weight", "blocks.1.attn.v.weight", "blocks.0.attn.o.weight", "blocks.0.ffn.w_in", "blocks.1.ffn.w_out"]
    for n in hidden + ["blocks.0.ffn.router.weight"]:
        assert t[128].lr_mult[n] == pytest.approx(t[64].lr_mult[n] / 2)     # LR ∝ 1/m
        assert t[256].lr_mult[n] == pytest.approx(t[64].lr_mult[n] / 4)
    for n in ["blocks.0.attn.q.weight", "blocks.0.ffn.w_in"]:                # init var ∝ 1/m
        assert t[256].init_std[n] == pytest.approx(t[64].init_std[n] / 2)
    # router: output layer: init var ∝ 1/m², LR ∝ 1/m, no multiplier
    assert t[256].init_std["blocks.0.ffn.router.weight"] == pytest.approx(0.02 / 4)
    assert t[256].lr_mult["blocks.0.ffn.router.weight"] == pytest.approx(1 / 4)
    assert t[256].mult["blocks.0.ffn.router.weight"] == 1.0
    # head: multiplier α_out/m, width-independent init and LR
    assert t[256].mult["head.weight"] == pytest.approx(1 / 4) and t[256].lr_mult["head.weight"] == 1.0
    assert t[256].init_std["head.weight"] == pytest.approx(0.02)
    # embedding: input layer
    assert t[256].lr_mult["tok_emb.weight"] == 1.0 and t[256].init_std["tok_emb.weight"] == pytest.approx(0.02)
    # expert output matrices: fan-in d_ff/G, so ×G on LR and init variance (depth factor 1/(2L) as in SP)
    assert t[64].lr_mult["blocks.0.ffn.w_out"] == pytest.approx(2.0)
    assert t[256].init_std["blocks.0.ffn.w_out"] == pytest.approx(0.02 * math.sqrt(2 / (4 * 4)))
    assert t[64].fan_in["blocks.0.ffn.w_out"] == 4 * 64 // 2
    for d in t:                                                              # the init really has those stds
        assert ((t[d]["std"] / t[d].init_std - 1).abs() < 0.15).all(), t[d]


def test_multipliers_on_the_modules_and_attention_scale():
    for d in (64, 256):
        m = GPT(cfg(d), make_parameterization("mup", alpha_in=2.0, alpha_out=0.5))
        assert m.head.group_mult["head"] == pytest.approx(0.5 * 64 / d)
        assert m.tok_emb.group_mult["embedding"] == 2.0
        assert m.blocks[0].ffn.group_mult["ffn_in"] == 1.0 and m.blocks[0].ffn.router.group_mult["router"] == 1.0
        d_head = d // 4
        assert m.blocks[0].attn.scale == pytest.approx(math.sqrt(64 / 4) / d_head)   # √d_h0 / d_head
        assert GPT(cfg(d), make_parameterization("mup", attn_mult=1.0)).blocks[0].attn.scale == pytest.approx(1 / d_head)
        x = torch.randint(0, 256, (2, 16))
        h = m.norm_f(m.blocks[1](m.blocks[0](m.tok_emb(x))))
        torch.testing.assert_close(m(x), torch.nn.functional.linear(h, m.head.weight) * (0.5 * 64 / d))


def test_dense_model_and_mup_equals_sp_at_base_width():
    t = {d: table(d, ffn="dense") for d in (64, 128)}
    for n in ["blocks.0.ffn.w_in.weight", "blocks.0.ffn.w_out.weight", "blocks.0.attn.k.weight"]:
        assert t[128].lr_mult[n] == pytest.approx(t[64].lr_mult[n] / 2)
    # μP coincides with SP at d = d₀ (G = 1): same init std, multiplier, LR and attention scale in every group
    sp, mup = table(64, param="sp", ffn="dense"), t[64]
    pd.testing.assert_series_equal(sp.init_std, mup.init_std)
    pd.testing.assert_series_equal(sp.mult, mup.mult)
    pd.testing.assert_series_equal(sp.lr_mult, mup.lr_mult)
    moe_sp, moe_mup = table(64, param="sp", G=1), table(64, G=1)
    pd.testing.assert_series_equal(moe_sp.lr_mult, moe_mup.lr_mult)
    assert GPT(cfg(64), make_parameterization("mup")).blocks[0].attn.scale == pytest.approx(1 / math.sqrt(16))
    # SP: no width dependence at all
    sp256 = table(256, param="sp")
    assert (sp256.lr_mult == 1).all() and (sp256.mult == 1).all()


def test_router_variant_and_expert_rule():
    wip, der = table(256, param="mup_wip_router"), table(256)
    r = "blocks.0.ffn.router.weight"
    assert wip.lr_mult[r] == 1.0 and wip.init_std[r] == pytest.approx(0.02)           # LR ×1, width-independent init
    assert table(64, param="mup_wip_router").init_std[r] == wip.init_std[r]
    others = [n for n in der.index if "router" not in n]
    pd.testing.assert_series_equal(wip.lr_mult[others], der.lr_mult[others])
    width = table(256, expert_rule="width")
    assert width.lr_mult["blocks.0.ffn.w_out"] == pytest.approx(1 / 4)                 # 1/m only, no ×G
    assert width.lr_mult["blocks.0.ffn.w_in"] == der.lr_mult["blocks.0.ffn.w_in"]


def test_tied_head_keeps_the_readout_rule():
    m = GPT(cfg(256, tie_weights=True), make_parameterization("mup"))
    t = hp_table(m).set_index("name")
    assert "head.weight" not in t.index and t.lr_mult["tok_emb.weight"] == 1.0
    assert m.head.group_mult["head"] == pytest.approx(1 / 4)


def test_bad_options_are_rejected():
    for kw in ({"router": "learned"}, {"expert_rule": "granular"}, {"base_width": 0}):
        with pytest.raises(ConfigError): make_parameterization("mup", **kw)
    with pytest.raises(ConfigError, match="fixes router"): make_parameterization("mup_wip_router", router="derived")
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['base'\]; valid options: \['base_width'"):
        make_parameterization("mup", base=64)


@pytest.mark.parametrize("G", [1, 4])
def test_weight_decay_keeps_lr_times_decay_width_independent(G):
    "microsoft/mup's MuAdamW rule: a matrix whose LR is divided by a factor has its weight decay multiplied by it, so every matrix decays by η·λ per step."
    seen = {}
    for d in (64, 128, 512):
        m = GPT(cfg(d, E=4, G=G), make_parameterization("mup"))
        groups = m.parameterization.optimizer_groups(m, 1e-2, 0.1)
        by_name = {n: g for g in groups for n, p in m.named_parameters() if any(p is q for q in g["params"])}
        for n, g in by_name.items():
            if g["weight_decay"] == 0: assert g["group"] == "norm" or n.endswith("bias"); continue
            assert g["lr"] * g["weight_decay"] == pytest.approx(1e-2 * 0.1, rel=1e-12), (d, n)
        seen[d] = by_name["blocks.0.attn.q.weight"]["weight_decay"]
    assert seen[512] == pytest.approx(seen[64] * 8)                      # λ·m on a hidden matrix
    sp = GPT(cfg(128, E=4, G=G), make_parameterization("sp"))
    assert {g["weight_decay"] for g in sp.parameterization.optimizer_groups(sp, 1e-2, 0.1)} == {0.0, 0.1}


def fake_corpus(vocab=256, n=20_000):
    g = np.random.default_rng(0)
    return SimpleNamespace(train=g.integers(0, vocab, n).astype(np.uint16), val=g.integers(0, vocab, 2_000).astype(np.uint16),
                           vocab_size=vocab)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_one_flag_switches_the_trainer(ffn):
    lrs = {}
    for param in ("sp", "mup"):
        c = TrainConfig(model=cfg(256, ffn=ffn).to_dict(), param=param, param_kwargs={"base_width": 64} if param == "mup" else {},
                        lr=1e-2, steps=1, batch_size=2, warmup=0)
        t = Trainer(c, corpus=fake_corpus())
        assert isinstance(t.model.parameterization, MuP) == (param == "mup")
        lr_of = {id(p): g["lr"] for g in t.opt.param_groups for p in g["params"]}
        lrs[param] = {n: lr_of[id(p)] for n, p in t.model.named_parameters()}
        t.train_step()
    assert set(lrs["sp"].values()) == {1e-2}
    assert lrs["mup"]["blocks.0.attn.q.weight"] == pytest.approx(1e-2 / 4)
    assert lrs["mup"]["head.weight"] == pytest.approx(1e-2)
    if ffn == "moe":
        assert lrs["mup"]["blocks.0.ffn.router.weight"] == pytest.approx(1e-2 / 4)
        assert lrs["mup"]["blocks.0.ffn.w_out"] == pytest.approx(2e-2 / 4)


def test_registered_in_a_fresh_process():
    "A fresh interpreter (an `effwb train`, a spawned sweep worker) must find `mup` without importing effworkbench.mup."
    code = "from effworkbench.nn.gpt import make_parameterization as m; print(type(m('mup')).__name__, type(m('mup_wip_router')).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["MuP", "MuPWipRouter"]


@pytest.fixture(scope="module")
def moe_coords(tmp_path_factory):
    ctx = Context(RunStore(tmp_path_factory.mktemp("runs")))
    return coord_table(CoordSettings(dense_widths=0), ctx)     # MoE, widths 64…512, 6 Adam steps, SP / μP / wip router


def test_coordinate_check_mup_passes_sp_and_wip_router_fail(moe_coords):
    assert sorted(moe_coords.width.unique()) == [64, 128, 256, 512]
    s = coord_slopes(moe_coords)
    g = max_growth(s)
    assert g["mup"] < SLOPE_THRESHOLD < g["sp"], g                         # the same threshold separates them
    r = max_growth(s, "router logits")
    assert r["mup"] < SLOPE_THRESHOLD < r["mup_wip_router"], r
    assert r["sp"] > SLOPE_THRESHOLD
    # the wip rule differs only in the router: everything else passes as under μP
    assert s[(s.param == "mup_wip_router") & (s.quantity != "router logits")].slope.max() < 1.0
    assert {"attn logits", "attn out", "ffn out", "router logits", "logits", "residual", "embedding"} <= set(s.quantity)


def test_coordinate_check_dense(tmp_path):
    d = coord_table(CoordSettings(params=[], widths=[64, 128, 256], dense_widths=3), Context(RunStore(tmp_path)))
    assert set(d.model) == {"dense"} and set(d.param) == {"sp", "mup"}
    assert "router logits" not in set(d.quantity)
    g = max_growth(coord_slopes(d))
    assert g["mup"] < SLOPE_THRESHOLD < g["sp"], g


def test_coord_plot_and_explorer(moe_coords):
    from effworkbench.viz import Explorer
    f = coord_frame(moe_coords)
    ex = Explorer(lambda param, layer, width: plot_coord(f, param, layer, width), param=["sp", "mup", "mup_wip_router"],
                  layer=sorted(f.name.unique()), width=[64, 128, 256, 512],
                  initial={"param": "mup", "layer": "block 0 · router logits", "width": 512})
    assert "mup: block 0 · router logits" in ex.figure.layout.title.text
    ex.controls["width"].value = 128                                         # fewer widths: fewer points per line
    assert ex.n_updates == 2 and len(ex.figure.data[0].x) == 2
    ex.controls["param"].value = "mup_wip_router"
    assert ex.figure.layout.title.text.startswith("mup_wip_router")


def test_optimal_lr_and_sweep_points():
    x = np.arange(-10, -4)
    df = pd.DataFrame({"p": "a", "lr": 2.0 ** x, "val_loss": (x + 6.6) ** 2})
    o = optimal_lr(df, ["p"]).iloc[0]
    assert o.best_lr == 2.0 ** -7 and np.log2(o.opt_lr) == pytest.approx(-6.6) and not o.at_edge
    edge = optimal_lr(df.assign(val_loss=-x), ["p"]).iloc[0]
    assert edge.at_edge and edge.best_lr == 2.0 ** -5
    s = LRSettings()
    pts = lr_points(s)
    assert len(pts) == len(s.lr_exps) * (len(s.params) * len(s.widths) + len(s.experts) + len(s.granularities))
    labels = {(lab["sweep"], c.param, c.model.d_model, c.model.ffn_kwargs["expansion"], c.model.ffn_kwargs["granularity"])
              for lab, c in pts}
    assert ("granularity", "mup", 64, 4, 2) in labels and ("width", "sp", 32, 4, 1) in labels
    m = LRSettings.for_preset("medium")
    wide = [c for lab, c in lr_points(m) if lab["sweep"] == "granularity" and lab["expert_rule"] == "width"]
    assert all(c.param_kwargs["expert_rule"] == ("width" if c.model.ffn_kwargs["granularity"] > 1 else "fan_in") for c in wide)
    assert all(set(c.param_kwargs) == set(MuPOptions.__dataclass_fields__) for c in wide)     # all options, defaults filled in


def test_lr_plot_and_panels():
    rows = [{"sweep": "width", "param": p, "expert_rule": "-", "width": w, "experts": 4, "granularity": 1, "lr": 2.0 ** e,
             "val_loss": (e + 7 + (w == 64) * (p == "sp")) ** 2 + 3} for p in ("sp", "mup") for w in (32, 64) for e in range(-9, -4)]
    rows += [{"sweep": "granularity", "param": "mup", "expert_rule": r, "width": 64, "experts": 4, "granularity": G,
              "lr": 2.0 ** e, "val_loss": (e + 7) ** 2 + 3} for r in ("fan_in", "width") for G in (1, 2) for e in range(-9, -4)]
    df = pd.DataFrame(rows)
    panels = lr_panels(df[df.sweep == "width"], df[df.sweep != "width"])
    assert {"SP: width", "μP: width", "μP: granularity G, fan-in rule", "μP: granularity G, width-only rule"} == set(panels.panel)
    fig = plot_lr(panels, "SP: width")
    assert [t.name for t in fig.data] == ["d=32", "d=64", "optimum (parabola)"]
    assert list(fig.data[-1].x) == pytest.approx([2.0 ** -7, 2.0 ** -8])
    with pytest.raises(ValueError, match="panels"): plot_lr(panels, "SP: experts")


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_biases_keep_the_base_lr_under_mup(ffn):
    "μP for Adam: hidden matrices get η/m, their biases (vector-like) keep η; checked at m = 4, so a 1/m slip shows."
    lr, m = 3e-3, 4
    model = GPT(cfg(32 * m, ffn=ffn, bias=True), make_parameterization("mup", base_width=32))
    lr_of = {id(p): g["lr"] for g in model.parameterization.optimizer_groups(model, lr, 0.1) for p in g["params"]}
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    hidden = [n for n in biases if ".attn." in n or ".ffn." in n]
    assert len(hidden) >= 4                                               # q, k, v, o (and the dense FFN's) biases exist
    for n, p in biases.items():
        assert lr_of[id(p)] == pytest.approx(lr, rel=1e-12), n
    for n in ("blocks.0.attn.q.weight", "blocks.1.attn.o.weight"):
        assert lr_of[id(named(model)[n])] == pytest.approx(lr / m, rel=1e-12), n


def test_equal_configs_give_equal_keys():
    store = RunStore("/nonexistent-but-unused")
    key = lambda c: store.key("experiment.mup", c)
    a = EXPERIMENTS["mup"].config_for("medium")
    b = EXPERIMENTS["mup"].config_for("medium", ["coord.lr=0.01", "lr.steps=200", "coord.expansion=4", "lr.moe_width=64"])
    assert a == b and key(a) == key(b) and a.coord.widths[-1] == 1024 and a.lr.steps == 200
    assert key(a) != key(EXPERIMENTS["mup"].config_for("medium", ["lr.steps=201"]))
    assert config_from(MuPConfig, "medium", ["coord.steps=3"]).coord.widths == a.coord.widths      # an override keeps the rest


TINY = ["coord.widths=[16, 32]", "coord.steps=2", "coord.params=['sp', 'mup']", "coord.dense_widths=1", "coord.seq_len=8",
        "coord.batch_size=2", "coord.max_bytes=20000", "coord.n_heads=2", "lr.lr_exps=[-7]", "lr.widths=[16]", "lr.params=['mup']",
        "lr.experts=[2]", "lr.granularities=[1]", "lr.steps=3", "lr.batch_size=2", "lr.seq_len=8", "lr.max_bytes=20000",
        "lr.eval_batches=1", "lr.moe_width=16", "lr.n_heads=2"]


def test_a_killed_experiment_resumes_without_recomputing(tmp_path, monkeypatch):
    "The time budget runs out after two units; the same call finishes, no stored unit trained again."
    store, cfg = RunStore(tmp_path), EXPERIMENTS["mup"].config_for("smoke", TINY)
    spend_budget_after(monkeypatch, 2, one_check_per_unit=True)
    with pytest.raises(OutOfTime): run_experiment("mup", cfg, store=store)
    first = finished_units(store, None)
    assert len(first) == 2
    monkeypatch.undo()
    tables = run_experiment("mup", cfg, store=store)
    after = finished_units(store, None)
    assert {k: after[k] for k in first} == first and len(after) == 2 + 2 * 2 + 2   # LR runs (2) + MoE (2 × 2) + dense (SP, μP)
    assert set(tables) == {"coord", "lr_transfer", "lr_moe"} and set(tables["coord"].model) == {"MoE", "dense"}
