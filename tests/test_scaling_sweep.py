"Scaling sweeps: decay branches become (N, D) rows, fits on sweep tables, the memory-efficiency check can go either way."

import numpy as np
import pandas as pd
import pytest

from effworkbench.scaling.laws import PUBLISHED_DENSE, PUBLISHED_MOE, JointLaw, ModelShape
from effworkbench.scaling.joint import fit_joint, joint_sweep, memory_grid
from effworkbench.scaling.granularity import ScalingSweep, family_flops, fit_granularity_law, scaling_table
from effworkbench.store import RunStore
from effworkbench.sweep import sweep
from effworkbench.train import train_run


def test_scaling_table_turns_branches_into_points(tmp_path):
    sw = ScalingSweep(widths=[32], granularities=[2], steps=16, branches=[6, 10], warmup=2, batch_size=4, seq_len=32,
                      eval_batches=1, max_bytes=200_000)
    store = RunStore(tmp_path)
    pts = sw.points()
    runs = sweep(train_run, [c for _, c in pts], store=store, executor="serial")
    assert (runs.status == "done").all()
    t = scaling_table(pts, store)
    assert len(t) == len(pts) * 3
    for (labels, c) in pts:
        rows = t[t.run == store.key(train_run, c)].sort_values("D")
        assert list(rows.steps) == [6, 10, 16] and list(rows.D) == [s * 4 * 32 for s in (6, 10, 16)]
        m = store.get(store.key(train_run, c)).metrics().dropna(subset=["branch_val_loss"])
        assert sorted(m.branch_val_loss) == sorted(rows.val_loss.iloc[:2])
        s = ModelShape.from_gpt(c.model)
        assert (rows.flops == rows.D * s.flops_per_token()).all() and (rows.N == s.params()["total"]).all()
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
    sw = ScalingSweep.for_preset("medium")
    for labels, c in sw.points():
        s = ModelShape.from_gpt(c.model)
        assert family_flops(sw, labels["E"])(s.params()["total"], labels["G"]) == pytest.approx(s.flops_per_token(), rel=1e-9)


@pytest.mark.parametrize("delta,moe_should_win", [(-0.3, True), (0.6, False)])
def test_memory_efficiency_check_can_go_either_way(delta, moe_should_win):
    # delta < 0: more experts lower the N term (MoE helps); delta > 0: experts only cost memory
    law = JointLaw(a=30.0, alpha=-0.2, delta=delta, gamma=0.0, b=40.0, beta=-0.25, omega=0.0, zeta=0.0, c=1.0)
    g = memory_grid(law, [1e15, 1e17], [2e6, 2e8], experts=(1, 2, 4, 8))
    wins = (g.best_E > 1) & (g.gain_over_dense > 0)
    assert wins.any() == moe_should_win
    assert (g.gain_over_dense >= -1e-12).all()                  # the best over E includes E = 1


def test_joint_sweep_shares_runs_with_the_granularity_sweep():
    store = RunStore("/nonexistent-but-unused")
    a = {store.key(train_run, c) for _, c in ScalingSweep.for_preset("medium").points()}
    b = {store.key(train_run, c) for _, c in joint_sweep("medium").points()}
    assert len(a & b) == 2 * 5 and len(b) == 4 * 5


def test_fit_joint_recovers_planted_exponents():
    law = JointLaw(a=40.0, alpha=-0.2, delta=0.1, gamma=-0.01, b=50.0, beta=-0.25, omega=0.05, zeta=-0.005, c=1.2)
    rng = np.random.default_rng(1)
    rows = [{"width": w, "E": E, "N_act": 12 * w * w * 100.0, "D": D,
             "val_loss": float(law(12 * w * w * 100.0, D, E)) * (1 + 0.002 * rng.standard_normal())}
            for w in (32, 64, 128, 256, 512, 1024) for E in (1, 2, 4, 8, 16) for D in (1e8, 1e9, 1e10, 1e11)]
    f = fit_joint(pd.DataFrame(rows), max_starts=8, holdout_width=1024)
    assert f["law"].alpha == pytest.approx(-0.2, rel=0.15) and f["law"].beta == pytest.approx(-0.25, rel=0.15)
    assert f["rmse_holdout"] < 0.01
