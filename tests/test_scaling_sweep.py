"Scaling sweeps: decay branches become (N, D) rows, fits on sweep tables, the memory-efficiency check can go either way."

import numpy as np
import pandas as pd
import pytest

from effworkbench.scaling.laws import PUBLISHED_DENSE, PUBLISHED_MOE, JointLaw, ModelShape
from effworkbench.core import config_from
from effworkbench.experiment import EXPERIMENTS, OutOfTime, publish, run_experiment
from effworkbench.scaling.joint import JointConfig, box_optimum, family_flops_act, fit_joint, memory_grid, total_ratios
from effworkbench.scaling.granularity import (FitSettings, GranularityConfig, ScalingGrid, TrainedBox, family_flops, fit_granularity_law,
                                              fits_from_tables, granularity_fits, grid_points, points_table)
from effworkbench.store import RunStore
from effworkbench.sweep import sweep
from effworkbench.train import train_run
from tests_common import finished_units, spend_budget_after


def test_points_table_turns_branches_into_points(tmp_path):
    sw = ScalingGrid(widths=[32], granularities=[2], steps=16, branches=[6, 10], warmup=2, batch_size=4, seq_len=32,
                     eval_batches=1, max_bytes=200_000)
    store = RunStore(tmp_path)
    pts = grid_points(sw)
    runs = sweep(train_run, [c for _, c in pts], store=store, executor="serial")
    assert (runs.status == "done").all()
    t = points_table(pts, store)
    assert len(t) == len(pts) * 3
    for (labels, c) in pts:
        rows = t[t.run == store.key(train_run, c)].sort_values("D")
        assert list(rows.steps) == [6, 10, 16] and list(rows.D) == [s * 4 * 32 for s in (6, 10, 16)]
        m = store.get(store.key(train_run, c)).metrics().dropna(subset=["branch_val_loss"])
        assert sorted(m.branch_val_loss) == sorted(rows.val_loss.iloc[:2])
        s = ModelShape.from_gpt(c.model)
        assert (rows.flops == rows.D * s.flops_per_token()).all() and (rows.N == s.law_params.non_embedding).all()
    assert set(t.kind) == {"dense", "moe"}


def synthetic_table(law_moe, law_dense, seed=0, noise=0.002):
    rng = np.random.default_rng(seed)
    rows = []
    for w in (32, 64, 128, 256, 512):
        for kind, G in [("dense", 1), ("moe", 1), ("moe", 2), ("moe", 4), ("moe", 8)]:
            N = (72 if kind == "moe" else 24) * w * w * 1e3
            for D in (1e8, 3e8, 1e9, 3e9):
                law = law_moe if kind == "moe" else law_dense
                rows.append({"kind": kind, "G": G, "width": w, "N": N, "D": D,
                             "val_loss": float(law(N, D, G)) * (1 + noise * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_fit_granularity_law_on_a_table_with_holdout():
    df = synthetic_table(PUBLISHED_MOE, PUBLISHED_DENSE)
    fits = fit_granularity_law(df, max_starts=8, holdout_width=512)
    assert fits["moe"]["law"].alpha == pytest.approx(PUBLISHED_MOE.alpha, rel=0.15)
    assert fits["dense"]["law"].beta == pytest.approx(PUBLISHED_DENSE.beta, rel=0.15)
    assert fits["moe"]["rmse_holdout"] < 0.01 and fits["moe"]["n_fit"] == 4 * 4 * 4


def test_family_flops_inverts_the_shape():
    sw = GranularityConfig.for_preset("medium").grid
    for labels, c in grid_points(sw):
        s = ModelShape.from_gpt(c.model)
        assert family_flops(sw, labels["E"])(s.law_params.non_embedding, labels["G"]) == pytest.approx(s.flops_per_token(), rel=1e-9)


@pytest.mark.parametrize("delta,moe_should_win", [(-0.3, True), (0.6, False)])
def test_memory_efficiency_check_can_go_either_way(delta, moe_should_win):
    # delta < 0: more experts lower the N term (MoE helps); delta > 0: experts only cost memory
    law = JointLaw(a=30.0, alpha=-0.2, delta=delta, gamma=0.0, b=40.0, beta=-0.25, omega=0.0, zeta=0.0, c=1.0)
    grid = ScalingGrid(widths=[32, 64, 128, 256], expansions=[2, 4, 8], granularities=[1])
    rows = []
    for labels, c in grid_points(grid):                           # the sweep's box: its shapes at three token counts
        s = ModelShape.from_gpt(c.model)
        for D in (1e6, 1e7, 1e8):
            rows.append({**labels, "width": c.model.d_model, "N": s.law_params.non_embedding, "N_act": s.law_params.active,
                         "D": D, "flops": s.flops_per_token() * D})
    table = pd.DataFrame(rows)
    g = memory_grid(law, table, grid)
    assert len(g) >= 10
    assert (g.gain_over_dense > 0).all() == moe_should_win and (g.gain_over_dense < 0).all() != moe_should_win
    box = TrainedBox.of(table, "E", "N_act")
    for r in g.itertuples():                                      # every optimum inside the box and under its cap
        t = box_optimum(law, r.flops, r.memory_bytes, box, total_ratios(table), family_flops_act(grid))
        assert (t.D >= 1e6 * (1 - 1e-9)).all() and (t.D <= 1e8 * (1 + 1e-9)).all()
        assert all(box.n_range[a][0] <= n <= box.n_range[a][1] * (1 + 1e-9) for a, n in zip(t.arm, t.N_act))
        assert (t.N_act * t.arm.map(total_ratios(table)) * 2 <= r.memory_bytes * (1 + 1e-9)).all()


def test_joint_sweep_shares_runs_with_the_granularity_sweep():
    store = RunStore("/nonexistent-but-unused")
    a = {store.key(train_run, c) for _, c in grid_points(GranularityConfig.for_preset("medium").grid)}
    b = {store.key(train_run, c) for _, c in grid_points(JointConfig.for_preset("medium").grid)}
    assert len(a & b) == 3 * 5 and len(b) == 3 * (5 * 4 + 2 * 2)     # the dense runs shared; E = 16, 32 at two widths


def test_fit_joint_recovers_planted_exponents():
    law = JointLaw(a=40.0, alpha=-0.2, delta=0.1, gamma=-0.01, b=50.0, beta=-0.25, omega=0.05, zeta=-0.005, c=1.2)
    rng = np.random.default_rng(1)
    rows = [{"width": w, "E": E, "N_act": 12 * w * w * 100.0, "D": D,
             "val_loss": float(law(12 * w * w * 100.0, D, E)) * (1 + 0.002 * rng.standard_normal())}
            for w in (32, 64, 128, 256, 512, 1024) for E in (1, 2, 4, 8, 16) for D in (1e8, 1e9, 1e10, 1e11)]
    f = fit_joint(pd.DataFrame(rows), max_starts=8, holdout_width=1024)
    assert f["law"].alpha == pytest.approx(-0.2, rel=0.15) and f["law"].beta == pytest.approx(-0.25, rel=0.15)
    assert f["rmse_holdout"] < 0.01


def test_fits_round_trip_through_their_tables():
    df = synthetic_table(PUBLISHED_MOE, PUBLISHED_DENSE)
    tabs = granularity_fits(df, FitSettings(max_starts=8, n_boot=0))
    back = fits_from_tables(tabs["fit"], tabs["errors"])
    assert set(back) == {"moe", "dense"}
    assert back["moe"]["law"].alpha == pytest.approx(PUBLISHED_MOE.alpha, rel=0.15) and back["moe"]["rmse_holdout"] < 0.01
    assert (tabs["fit"][tabs["fit"].kind == "moe"].published == [getattr(PUBLISHED_MOE, n) for n in back["moe"]["ci"].coef]).all()


@pytest.mark.parametrize("name,cls", [("scaling.granularity", GranularityConfig), ("scaling.joint", JointConfig)])
def test_equal_configs_give_equal_keys(name, cls):
    store = RunStore("/nonexistent-but-unused")
    key = lambda c: store.key(f"experiment.{name}", c)
    a = EXPERIMENTS[name].config_for("medium")
    b = EXPERIMENTS[name].config_for("medium", ["grid.lr=0.0078125", "grid.max_bytes=1000000", "fit.n_boot=100", "fit.seed=0"])
    assert a == b and key(a) == key(b)
    assert key(a) != key(EXPERIMENTS[name].config_for("medium", ["grid.steps=601"]))
    assert config_from(cls, "smoke", ["grid.widths=[16]"]).grid.expansions == cls().grid.expansions   # an override keeps the rest


TINY = ["grid.widths=[16, 32]", "grid.steps=4", "grid.branches=[2]", "grid.warmup=1", "grid.batch_size=2", "grid.seq_len=8",
        "grid.max_bytes=20000", "grid.eval_batches=1", "grid.n_heads=2", "fit.max_starts=2", "fit.n_boot=0"]


@pytest.mark.filterwarnings("ignore:.*the checkout is")   # publish from a dirty test checkout
@pytest.mark.parametrize("name,extra", [("scaling.granularity", ["grid.granularities=[1, 2]", "grid.expansions=[2]"]),
                                        ("scaling.joint", ["grid.expansions=[2]"])])
def test_a_killed_sweep_resumes_without_recomputing(tmp_path, monkeypatch, name, extra):
    "The time budget runs out after some units (serially, one unit per check); the same call finishes, nothing retrained."
    store, cfg = RunStore(tmp_path), EXPERIMENTS[name].config_for("smoke", TINY + extra)
    n = len(grid_points(cfg.grid))
    spend_budget_after(monkeypatch, 2, one_check_per_unit=True)
    with pytest.raises(OutOfTime): run_experiment(name, cfg, store=store)
    first = finished_units(store)
    assert len(first) == 2 < n
    monkeypatch.undo()
    tables = run_experiment(name, cfg, store=store)
    after = finished_units(store)
    assert {k: after[k] for k in first} == first and len(after) == n
    extra = {"seed_fit", "frontier"} if name == "scaling.granularity" else {"seed_fit", "gains"}
    assert len(tables["sweep"]) == n * 2 and set(tables) == {"sweep", "fit", "errors"} | extra
    monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path / "results"))
    paths = publish(name, cfg, store=store, allow_dirty=True)
    prefix = name.replace(".", "_")
    assert sorted(p.name for p in paths) == sorted(f"{prefix}_{t}_smoke.csv" for t in {"sweep", "fit", "errors"} | extra)
