"Relative LR schedules: the trainer reproduces the per-group formula, every parameter has one group, the search, the committed tuned multipliers."
import json
import math
import random

import pandas as pd
import pytest
import torch

from effworkbench.core import ConfigError, load_table, results_dir
from effworkbench.nn.gpt import GPT, GPTConfig, GROUPS, make_parameterization, param_groups
from effworkbench.core import config_from
from effworkbench.experiment import EXPERIMENTS, OutOfTime, publish, run_experiment
from effworkbench.rlrs import (RELATIVE_GROUPS, TUNED_GROUPS, KindTuning, RelativeLR, RLRSConfig, Search, Tuned, committed_tuning,
                               coordinate_search, final_multipliers, relative_group, relative_lr, speedups, steps_to_reach,
                               steps_saved, train_config, tuned_multipliers, verdicts_at)
from effworkbench.claims import decide, published_tables, verdicts
from effworkbench.store import RunStore
from effworkbench.train import TrainConfig, Trainer, lr_at
from tests_common import finished_units, spend_budget_after


def trainer(ffn="moe", param_kwargs=None, schedule="cosine", steps=17, warmup=4, d=64):
    cfg = TrainConfig(model=GPTConfig(vocab_size=512, seq_len=16, d_model=d, n_layers=2, n_heads=2, ffn=ffn,
                                      ffn_kwargs={"expansion": 4, "granularity": 2} if ffn == "moe" else {}),
                      max_bytes=200_000, steps=steps, warmup=warmup, batch_size=2, lr=3e-3, final_frac=0.07,
                      schedule=schedule, param="rlrs", param_kwargs=param_kwargs or {})
    return Trainer(cfg)


def random_multipliers(rng, groups=TUNED_GROUPS):
    return {g: [rng.choice([0.2, 2 / 3, 1.5, 5.0, 0.3, 7.0]), rng.choice([0.2, 2 / 3, 1.5, 5.0, 0.444])] for g in groups}


@pytest.mark.parametrize("base,ffn", [("sp", "moe"), ("mup", "moe"), ("mup", "dense"), ("sp", "dense")])
def test_trainer_lr_is_the_formula_at_every_step(base, ffn):
    rng = random.Random(hash((base, ffn)) % 1000)
    mult = random_multipliers(rng)
    t = trainer(ffn, {"base": base, "base_kwargs": {"base_width": 32} if base == "mup" else {}, "multipliers": mult})
    P, cfg = t.model.parameterization, t.cfg
    ref = make_parameterization(base, **({"base_width": 32} if base == "mup" else {}))
    m_g = {g: ref.group_hp(g, t.model).lr_mult for g in GROUPS}                 # the base's width factor
    for step in range(cfg.steps + 3):                                          # past T too: the end value holds
        t.set_lr(step)
        for g in t.opt.param_groups:
            rg = relative_group(g["group"])
            r, f = mult.get(rg, (1.0, 1.0))
            scale = g["base_lr"] / (cfg.lr * m_g[g["group"]])                   # μP's per-matrix fan-in ratio (else 1)
            want = relative_lr(step, cfg.lr * m_g[g["group"]] * scale, r, f, cfg.final_frac, cfg.warmup, cfg.steps)
            assert g["lr"] == pytest.approx(want, rel=1e-14, abs=0), (step, g["group"])
            assert (g["lr_start"], g["lr_end"]) == (r, f) and P.rf(g["group"]) == (r, f)
    # the schedule's landmarks: s_g at the end of warm-up, e_g from T on
    t.set_lr(cfg.warmup - 1)
    emb = next(g for g in t.opt.param_groups if g["group"] == "embedding")
    assert emb["lr"] == pytest.approx(mult["embedding"][0] * cfg.lr, rel=1e-14)
    t.set_lr(cfg.steps)
    assert emb["lr"] == pytest.approx(cfg.final_frac * mult["embedding"][1] * cfg.lr, rel=1e-14)


def test_relative_lr_matches_the_closed_form_on_random_points():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        W, T = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(60, 500, (1,), generator=g))
        eta, r, f, phi = (float(v) for v in torch.rand(4, generator=g, dtype=torch.float64) * torch.tensor([1e-2, 5, 5, 0.3]) + 1e-4)
        t = int(torch.randint(0, T + 10, (1,), generator=g))
        s, e = r * eta, phi * f * eta
        if t < W: want = s * (t + 1) / W
        elif t >= T: want = e
        else: want = e + 0.5 * (s - e) * (1 + math.cos(math.pi * (t - W) / (T - W)))
        assert relative_lr(t, eta, r, f, phi, W, T) == pytest.approx(want, rel=1e-15)
        cfg = TrainConfig(steps=T, warmup=W, final_frac=phi)                    # the trainer's own schedule function
        assert lr_at(t, s, e, cfg) == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_every_parameter_in_exactly_one_group(ffn):
    t = trainer(ffn, {"base": "mup", "base_kwargs": {"base_width": 32}, "multipliers": random_multipliers(random.Random(1))})
    seen = [id(p) for g in t.opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in t.model.parameters()}
    members = [m for ms in RELATIVE_GROUPS.values() for m in ms]
    assert sorted(members) == sorted(GROUPS)                                   # the relative groups partition the groups
    for g, params in param_groups(t.model).items():
        for _, p in params:
            assert sum(id(p) in {id(q) for q in pg["params"]} for pg in t.opt.param_groups) == 1


def test_relative_lr_keeps_the_base_init_and_multipliers():
    cfg = GPTConfig(vocab_size=512, seq_len=16, d_model=128, n_layers=2, n_heads=4, ffn="moe", ffn_kwargs={"expansion": 4})
    torch.manual_seed(0); a = GPT(cfg, make_parameterization("mup", base_width=32))
    torch.manual_seed(0); b = GPT(cfg, make_parameterization("rlrs", base="mup", base_kwargs={"base_width": 32},
                                                             multipliers={"head": [0.5, 2.0], "ffn": [3.0, 1.0]}))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert a.blocks[0].attn.scale == b.blocks[0].attn.scale
    ga = {g["group"]: g["lr"] for g in a.parameterization.optimizer_groups(a, 1.0, 0.1)}
    gb = {g["group"]: g["lr"] for g in b.parameterization.optimizer_groups(b, 1.0, 0.1)}
    assert ga == gb                                                           # base LRs untouched; (r, f) act in the schedule


def test_bad_multipliers_are_refused():
    with pytest.raises(ConfigError, match="unknown relative group"): RelativeLR(multipliers={"expert": [1, 1]})
    with pytest.raises(ConfigError, match="positive"): RelativeLR(multipliers={"head": [1, -1]})
    with pytest.raises(ConfigError, match="itself"): RelativeLR(base="rlrs")


def test_coordinate_search_descends_a_planted_optimum():
    target = {"embedding": (5.0, 2 / 3), "attention": (1.0, 0.2), "head": (2 / 3, 1.5)}
    calls = []
    def evaluate(cfgs, desc):
        calls.append(len(cfgs))
        return [sum((math.log(c.param_kwargs["multipliers"].get(g, (1, 1))[j]) - math.log(t[j])) ** 2
                    for g, t in target.items() for j in (0, 1)) for c in cfgs]
    rc = RLRSConfig(search=Search(groups=["embedding", "attention", "head", "router"], coords=["r", "f"], rounds=2, min_gain=0.0))
    h = coordinate_search(rc, "dense", 1e-3, evaluate=evaluate)
    assert "router" not in set(h.group)                                        # dense: no router
    fm = {r.group: (r.r, r.f) for r in final_multipliers(h).itertuples()}
    for g, (r, f) in target.items():
        assert fm[g] == (pytest.approx(r, rel=1e-5), pytest.approx(f, rel=1e-5))
    assert h.best_loss.is_monotonic_decreasing and h.best_loss.iloc[-1] < 1e-9
    assert calls == [1] + [4] * (2 * 3 * 2)


def test_steps_to_reach_and_speedups():
    assert steps_to_reach([0, 100, 200], [4.0, 3.0, 2.0], 2.5) == pytest.approx(150.0)
    assert math.isnan(steps_to_reach([0, 100], [4.0, 3.0], 2.9))
    toy = pd.DataFrame({"kind": "moe", "seed": 3, "params": 1, "schedule": ["uniform"] * 3 + ["tuned"] * 3,
                        "step": [0, 100, 200] * 2, "val_loss": [4.0, 3.0, 2.5, 4.0, 2.0, 1.9]})
    s = speedups(toy).iloc[0]
    assert s.t_star == pytest.approx(75.0) and s.steps_saved == pytest.approx(0.625) and s.speedup == pytest.approx(200 / 75)


def test_verdicts_at_decide_the_kinds_a_table_holds(tmp_path, monkeypatch):
    """A `full` table published when only its MoE runs had finished: the MoE claims alone, decided as from the whole
    table; without the tuned schedule's other η factors, the claim that re-tunes them is left out (`verdicts`, which
    the index reads, leaves out the same)."""
    whole = load_table("rlrs_reuse_medium")
    env = json.loads((results_dir() / "rlrs_reuse_medium.env.json").read_text())
    monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path))
    for kind in ("moe", "dense"):
        whole[whole.kind == kind].to_csv(tmp_path / "rlrs_reuse_full.csv", index=False)
        (tmp_path / "rlrs_reuse_full.env.json").write_text(json.dumps(env))
        v = verdicts("rlrs", "full")
        monkeypatch.delenv("EFFWB_RESULTS")
        row = verdicts("rlrs").set_index("claim").loc[[c for c in v.claim]]
        monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path))
        assert list(v.claim) == {"moe": ["speed-up, MoE", "speed-up, MoE, η re-tuned for both"],
                                 "dense": ["speed-up, dense", "speed-up, dense, η re-tuned for both"]}[kind]
        assert v.estimate.tolist() == row.estimate.tolist() and v.verdict.tolist() == row.verdict.tolist()
        one = whole[(whole.kind == kind) & ((whole.schedule == "uniform") | (whole.lr_factor == 1.0))]
        one.to_csv(tmp_path / "rlrs_reuse_full.csv", index=False)
        assert list(verdicts_at("full").claim) == list(verdicts("rlrs", "full").claim) == {"moe": ["speed-up, MoE"], "dense": ["speed-up, dense"]}[kind]


def test_speedups_against_the_best_factor_of_each_schedule():
    "The baseline is the uniform factor with the lowest mean final loss; the tuned run is the one at factor 1, or its own best."
    rows = []
    for seed, noise in ((1, 0.0), (2, 0.01)):
        for sched, f, end in (("uniform", 1.0, 3.0), ("uniform", 2.0, 2.8), ("uniform", 4.0, 2.9),
                              ("tuned", 1.0, 2.85), ("tuned", 2.0, 2.5), ("tuned", 4.0, 2.7)):
            rows += [{"kind": "moe", "seed": seed, "params": 1, "schedule": sched, "lr_factor": f, "step": st, "val_loss": v + noise}
                     for st, v in ((0, 4.0), (100, 3.2), (200, end))]
    toy = pd.DataFrame(rows)
    as_tuned, retuned = speedups(toy), speedups(toy, retuned=True)
    assert set(as_tuned.uniform_lr_factor) == set(retuned.uniform_lr_factor) == {2.0}
    assert set(as_tuned.tuned_lr_factor) == {1.0} and set(retuned.tuned_lr_factor) == {2.0}
    assert as_tuned.t_star.isna().all()                                          # 2.85 never reaches 2.8
    assert as_tuned.t_base.tolist() == pytest.approx([100 + 0.35 / 0.4 * 100] * 2)  # the baseline's 3.2 → 2.8 crosses 2.85 at 7/8
    assert retuned.t_star.tolist() == pytest.approx([100 + 0.4 / 0.7 * 100] * 2)  # 3.2 → 2.5 crosses 2.8 at 4/7 of the way
    assert retuned.t_base.isna().all()
    assert steps_saved(toy, "moe").estimate == pytest.approx(-(1 - 187.5 / 200))   # signed: the baseline saves 6.25 %
    assert steps_saved(toy, "moe", retuned=True).estimate == pytest.approx(1 - (100 + 40 / 0.7) / 200)



def reuse_toy(ends: dict[tuple[str, float], float]) -> pd.DataFrame:
    "Reuse curves of one MoE model, two seeds: per (schedule, η factor) the final loss, after 4.0 at step 0 and 3.2 at 100."
    return pd.DataFrame([{"kind": "moe", "seed": seed, "params": 1, "schedule": sched, "lr_factor": f, "step": st, "val_loss": v + noise}
                         for seed, noise in ((1, 0.0), (2, 0.01)) for (sched, f), end in ends.items()
                         for st, v in ((0, 4.0), (100, 3.2), (200, end))])


def test_a_best_factor_at_its_grids_edge_leaves_the_claim_open_the_way_a_wider_grid_could_move_it():
    "A baseline best at its grid's edge may be beaten beyond it: no 'reproduced'; a re-tuned schedule best at its edge: no 'not reproduced'."
    verdict = lambda toy, retuned=False: decide(steps_saved(toy, "moe", retuned), margin=0.05)
    beats = {("uniform", 1.0): 3.0, ("uniform", 2.0): 2.9, ("tuned", 1.0): 2.5}         # the baseline best at 2×, its top
    assert verdict(reuse_toy(beats)) == "not decided" and steps_saved(reuse_toy(beats), "moe").lo == -math.inf
    assert verdict(reuse_toy({**beats, ("uniform", 4.0): 2.95})) == "reproduced"           # 4× is worse: 2× is interior
    assert verdict(reuse_toy({**beats, ("uniform", 0.5): 2.95})) == "not decided"          # still the top
    assert verdict(reuse_toy({("uniform", 2.0): 2.9, ("tuned", 1.0): 2.5})) == "reproduced"  # one factor is no grid: no edge
    short = {("uniform", 1.0): 3.0, ("uniform", 2.0): 2.8, ("uniform", 4.0): 2.9, ("tuned", 1.0): 3.1, ("tuned", 2.0): 3.05}
    assert verdict(reuse_toy(short)) == "not reproduced"                    # the claim at 1×: the tuned grid plays no part
    assert verdict(reuse_toy(short), retuned=True) == "not decided"          # the tuned schedule best at 2×, its top
    assert steps_saved(reuse_toy(short), "moe", retuned=True).hi == math.inf
    assert verdict(reuse_toy({**short, ("tuned", 4.0): 3.2}), retuned=True) == "not reproduced"


def test_a_grid_whose_best_factor_is_its_edge_grows_up_to_grid_extensions_times(tmp_path, monkeypatch):
    "The reuse adds half the smallest or twice the largest η factor while a schedule's best factor is its grid's edge."
    import effworkbench.rlrs as rlrs
    best = {"uniform": 4.0, "tuned": 0.5}                   # final loss 3 + |log2(factor / best)|: optima outside [1, 2]
    def curves(points, store):                              # the runs are trained; their curves are made up
        return pd.DataFrame([{**lab, "step": st, "tokens": st, "params": 1,
                              "val_loss": 4.0 if st == 0 else 3 + abs(math.log2(lab["lr_factor"] / best[lab["schedule"]]))}
                             for lab, _ in points for st in (0, 4)])
    monkeypatch.setattr(rlrs, "reuse_curves", curves)
    base = TINY + ["tuned.dense.eta=0.0078125", "tuned.dense.multipliers.head=(2.0, 0.5)",
                   "reuse_lr_factors=[1.0, 2.0]", "tuned_lr_factors=[1.0, 2.0]"]
    for ext, uniform, tuned in ((0, [1, 2], [1, 2]), (1, [1, 2, 4], [0.5, 1, 2]), (3, [1, 2, 4, 8], [0.25, 0.5, 1, 2])):
        store = RunStore(tmp_path / str(ext))
        reuse = run_experiment("rlrs", EXPERIMENTS["rlrs"].config_for("smoke", base + [f"grid_extensions={ext}"]), store=store)["reuse"]
        for sched, fs in (("uniform", uniform), ("tuned", tuned)):
            assert sorted(reuse[reuse.schedule == sched].lr_factor.unique()) == fs, (ext, sched)
        assert len(finished_units(store)) == len(uniform) + len(tuned)        # each factor trained, once

def test_a_grid_given_out_of_order_takes_one_pass_when_its_best_factor_is_inside(tmp_path, monkeypatch):
    "A config grid listed unsorted, best factor interior: one pass of train-and-read, no growth pass that adds nothing."
    import effworkbench.rlrs as rlrs
    passes = []
    def curves(points, store):                              # final loss 3 + |log2(factor / 2)|: best at 2×, inside [1, 4]
        passes.append(sorted({lab["lr_factor"] for lab, _ in points}))
        return pd.DataFrame([{**lab, "step": st, "tokens": st, "params": 1,
                              "val_loss": 4.0 if st == 0 else 3 + abs(math.log2(lab["lr_factor"] / 2))}
                             for lab, _ in points for st in (0, 4)])
    monkeypatch.setattr(rlrs, "reuse_curves", curves)
    ov = TINY + ["tuned.dense.eta=0.0078125", "tuned.dense.multipliers.head=(2.0, 0.5)",
                 "reuse_lr_factors=[4.0, 1.0, 2.0]", "tuned_lr_factors=[2.0, 4.0, 1.0]", "grid_extensions=2"]
    run_experiment("rlrs", EXPERIMENTS["rlrs"].config_for("smoke", ov), store=RunStore(tmp_path))
    assert passes == [[1.0, 2.0, 4.0]]

def test_a_reuse_model_other_than_the_presets_publishes_a_variant():
    """The preset's reuse and search models publish the main tables; one changed in depth, width or steps, tables named
    for the change."""
    from effworkbench.rlrs import reuse_variant
    assert EXPERIMENTS["rlrs"].variant is reuse_variant
    for preset in ("smoke", "medium", "full"):
        assert reuse_variant(config_from(RLRSConfig, preset, [])) == ""
        assert reuse_variant(config_from(RLRSConfig, preset, ["seeds=[1, 2]", "reuse_lr_factors=[1.0]"])) == ""
    cfg = config_from(RLRSConfig, "medium", ["large.n_layers=8"])
    assert reuse_variant(cfg) == "depth8" and EXPERIMENTS["rlrs"].prefix_for(cfg) == "rlrs_depth8"
    assert reuse_variant(config_from(RLRSConfig, "full", ["large.steps=500", "large.width=128"])) == "width128_steps500"
    assert reuse_variant(config_from(RLRSConfig, "medium", ["small.steps=1000"])) == "searchsteps1000"    # a longer search
    assert reuse_variant(config_from(RLRSConfig, "medium", ["small.n_layers=4", "large.steps=2000"])) == "steps2000_searchdepth4"

def made_config(table: str) -> dict:
    "The configuration the committed table `results/<table>.csv` was made with, from its record."
    return json.loads((results_dir() / f"{table}.env.json").read_text())["config"]

@pytest.mark.parametrize("variant,changed,params,kinds,saved", [
    ("depth8", {"n_layers": 8}, (1.8, 2.0), {"dense", "moe"}, (0.36, 0.33, 0.42, 0.33)),     # 4 blocks more
    ("width256", {"width": 256}, (3.5, 4.0), {"dense", "moe"}, (0.32, 0.30, 0.37, 0.30)),    # 2× wide: ≈ 4× the blocks' parameters
    ("steps2000", {"steps": 2000}, (1.0, 1.0), {"dense", "moe"}, (-0.14, -0.09, -0.14, -0.02))])  # the same model, 4× the steps
def test_the_committed_variants_are_the_medium_reuse_with_one_factor_changed(variant, changed, params, kinds, saved):
    """`rlrs_<variant>`: the `medium` search and tuning, read back unchanged, reused on the `medium` reuse model with one
    factor of its size changed, three seeds; the notebook states their verdicts (test_claims checks them) and the shares
    of steps saved (`saved`, per claim in the order the table lists them)."""
    made = made_config(f"rlrs_{variant}_reuse_medium")
    assert made["large"] == {**vars(RLRSConfig.for_preset("medium").large), **changed} and made["seeds"] == [1, 2, 3]
    assert set(made["kinds"]) == kinds
    for t in ("eta", "search", "tuned"):         # the search it reused: medium's rows, so not copied, and read there
        assert not (results_dir() / f"rlrs_{variant}_{t}_medium.csv").exists(), t
        assert published_tables("rlrs", [t], "medium", variant)[t].equals(load_table(f"rlrs_{t}_medium")), t
    mine, main = load_table(f"rlrs_{variant}_reuse_medium"), load_table("rlrs_reuse_medium")
    ratio = mine.groupby("kind").params.first() / main.groupby("kind").params.first()
    assert ratio.dropna().between(*params).all() and set(mine.kind) == kinds, ratio
    assert mine.groupby(["kind", "schedule", "lr_factor", "seed"]).step.max().eq(changed.get("steps", 500)).all()
    assert tuple(verdicts("rlrs", variant=variant).estimate.astype(float).round(2)) == saved

def test_the_horizon_variant_searches_at_five_times_the_steps():
    """`rlrs_steps2000_searchsteps1000`: the `medium` search run on the small model at 1000 steps (5× the preset's) and
    its tuning reused at 2000 steps on the `medium` reuse model, dense, ten seeds: a search of its own, published."""
    v, med = "steps2000_searchsteps1000", RLRSConfig.for_preset("medium")
    for t in ("eta", "search", "tuned", "reuse"):
        made = made_config(f"rlrs_{v}_{t}_medium")
        assert made["small"] == {**vars(med.small), "steps": 1000} and made["large"] == {**vars(med.large), "steps": 2000}
        assert made["kinds"] == ["dense"] and made["seeds"] == list(range(1, 11)), t
    tuned, main = load_table(f"rlrs_{v}_tuned_medium"), load_table("rlrs_tuned_medium")
    assert set(tuned.kind) == {"dense"} and set(tuned.group) == set(main[main.kind == "dense"].group)
    assert not tuned[["r", "f"]].equals(main[main.kind == "dense"][["r", "f"]].reset_index(drop=True))   # its own search
    assert load_table(f"rlrs_{v}_search_medium").best_loss.is_monotonic_decreasing
    mine = load_table(f"rlrs_{v}_reuse_medium")
    assert set(mine.kind) == {"dense"} and mine.groupby(["schedule", "lr_factor", "seed"]).step.max().eq(2000).all()
    stated = {"speed-up, dense": (0.036, -0.015, 0.080), "speed-up, dense, η re-tuned for both": (0.077, 0.019, 0.132)}
    got = verdicts("rlrs", variant=v).set_index("claim")                     # the figures the notebook states
    assert {c: tuple(got.loc[c, ["estimate", "lo", "hi"]].astype(float).round(3)) for c in stated} == stated

def test_committed_tuned_multipliers_load_and_differ_from_uniform():
    t = load_table("rlrs_tuned_medium")
    assert set(t.kind) == {"dense", "moe"}
    for kind in ("dense", "moe"):
        m = tuned_multipliers(kind)
        assert set(m) == set(RLRSConfig.for_preset("medium").search_groups(kind))
        assert any(rf != (1.0, 1.0) for rf in m.values()), kind               # the search moved something
        assert all(r > 0 and f > 0 for r, f in m.values())
        assert RelativeLR(multipliers=m).multipliers == m
    h = load_table("rlrs_search_medium")
    for kind, d in h.groupby("kind"):                                          # the committed search is consistent
        last = json.loads(d[d.accepted].iloc[-1].multipliers)
        assert {g: tuple(v) for g, v in last.items()} == tuned_multipliers(kind)
        assert d.best_loss.iloc[-1] < d.val_loss.iloc[0]                        # and it improved on the uniform start
        assert d.best_loss.is_monotonic_decreasing


def test_tuned_multipliers_enter_the_keys_as_numbers():
    "A given tuning is numbers in the config: written as overrides or read from the committed table, one key; no names."
    t = committed_tuning()
    assert t.moe.multipliers.as_dict()["router"] == tuned_multipliers("moe")["router"] and t.moe.eta > 0
    ov = [f"tuned.moe.eta={t.moe.eta!r}"] + [f"tuned.moe.multipliers.{g}={v!r}" for g, v in tuned_multipliers("moe").items()]
    a, b = config_from(RLRSConfig, "medium", ov), RLRSConfig.for_preset("medium", tuned=Tuned(moe=t.moe))
    store = RunStore("/nonexistent")
    assert store.key("experiment.rlrs", a) == store.key("experiment.rlrs", b)
    c = RLRSConfig.for_preset("medium", tuned=Tuned(moe=KindTuning(t.moe.eta, {**vars(t.moe.multipliers), "head": (1, 1)})))
    assert store.key("experiment.rlrs", c) != store.key("experiment.rlrs", a)              # other numbers, other key
    run_cfg = train_config(a, "moe", a.tuned.moe.eta, a.tuned.moe.multipliers.as_dict(), large=True)
    assert run_cfg.param_kwargs["multipliers"]["embedding"] == list(tuned_multipliers("moe")["embedding"])
    assert "tuned" not in run_cfg.param_kwargs
    # equal configs, equal keys: ints for floats, and the defaults written out, change nothing
    d0 = EXPERIMENTS["rlrs"].config_for("smoke")
    d1 = EXPERIMENTS["rlrs"].config_for("smoke", ["search.moves=[0.2, 0.6666666666666666, 1.5, 5]", "small.width=32"])
    assert store.key("experiment.rlrs", d0) == store.key("experiment.rlrs", d1)
    assert config_from(RLRSConfig, "smoke", ["large.steps=4"]).large == config_from(RLRSConfig, "smoke").large.__class__(64, 2, 4)
    with pytest.raises(ConfigError, match="tuned.dense"): config_from(RLRSConfig, "smoke", ["tuned.dense.multipliers.head=(2, 1)"])


TINY = ["small.width=16", "small.steps=3", "large.width=16", "large.steps=4", "n_heads=2", "seq_len=8", "batch_size=2",
        "max_bytes=20000", "eval_batches=1", "evals=2", "search.lr_exps=[-6]", "search.groups=['embedding']",
        "search.moves=[0.2, 5.0]", "seeds=[1]", "kinds=['dense']"]


def test_a_killed_experiment_resumes_without_recomputing(tmp_path, monkeypatch):
    "The time budget runs out after the η sweep; the same call then finishes, reading back every stored unit."
    store, cfg = RunStore(tmp_path), EXPERIMENTS["rlrs"].config_for("smoke", TINY)
    spend_budget_after(monkeypatch, 2)           # spent once two batches of units have started
    with pytest.raises(OutOfTime): run_experiment("rlrs", cfg, store=store)
    first = finished_units(store)
    assert 1 <= len(first) < 1 + 1 + 2 + 2               # some units stored, not all (η, start, 2 moves, 2 reuse)
    monkeypatch.undo()
    tables = run_experiment("rlrs", cfg, store=store)
    after = finished_units(store)
    assert {k: after[k] for k in first} == first          # no stored unit was computed again
    assert set(tables) == {"eta", "search", "tuned", "reuse"} and len(after) > len(first)
    assert set(tables["reuse"].schedule) == {"uniform", "tuned"}
    again = run_experiment("rlrs", cfg, store=store)       # finished: the stored tables, nothing trained
    assert finished_units(store) == after and again["tuned"].equals(tables["tuned"])


@pytest.mark.filterwarnings("ignore:.*the checkout is")   # publish from a dirty test checkout
def test_given_tunings_skip_the_search(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    cfg = EXPERIMENTS["rlrs"].config_for("smoke", TINY + ["tuned.dense.eta=0.0078125", "tuned.dense.multipliers.head=(2.0, 0.5)"])
    tables = run_experiment("rlrs", cfg, store=store)
    assert set(tables) == {"tuned", "reuse"} and len(finished_units(store)) == 2       # only the two reuse runs
    t = tables["tuned"].set_index("group")
    assert (t.loc["head", "r"], t.loc["head", "f"]) == (2.0, 0.5) and "router" not in t.index
    monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path / "results"))
    published = sorted(p.name for p in publish("rlrs", cfg, store=store, allow_dirty=True))
    v = "width16_steps4_searchwidth16_searchsteps3"                     # smaller reuse and search models than smoke's
    assert published == [f"rlrs_{v}_reuse_smoke.csv", f"rlrs_{v}_tuned_smoke.csv"]
    # where the main tables hold every row of the variant's, only its claim table (reuse) is copied; the rest is read there
    res = tmp_path / "results"
    (res / f"rlrs_{v}_tuned_smoke.csv").rename(res / "rlrs_tuned_smoke.csv")
    main = pd.concat([pd.read_csv(res / "rlrs_tuned_smoke.csv"), tables["tuned"].assign(group="other")])   # and more rows
    main.to_csv(res / "rlrs_tuned_smoke.csv", index=False)
    (res / "rlrs_reuse_smoke.csv").write_bytes((res / f"rlrs_{v}_reuse_smoke.csv").read_bytes())
    (res / f"rlrs_{v}_reuse_smoke.csv").unlink()
    assert [p.name for p in publish("rlrs", cfg, store=store, allow_dirty=True)] == [f"rlrs_{v}_reuse_smoke.csv"]
    pd.read_csv(res / "rlrs_reuse_smoke.csv").iloc[:1].to_csv(res / "rlrs_reuse_smoke.csv", index=False)  # main's differs
    read = published_tables("rlrs", ["tuned", "reuse"], "smoke", v)
    assert len(read["tuned"]) == 2 * len(tables["tuned"]) and set(read["tuned"].group) > set(tables["tuned"].group)
    assert len(read["reuse"]) == len(tables["reuse"]) > 1                   # the variant's own table, not the main one
    with pytest.raises(FileNotFoundError): published_tables("rlrs", ["tuned"], "smoke", "width32")   # no such variant
    tables["tuned"].assign(r=tables["tuned"].r + 1).to_csv(res / "rlrs_tuned_smoke.csv", index=False)   # a row the main lacks
    assert sorted(p.name for p in publish("rlrs", cfg, store=store, allow_dirty=True)) == published


def test_the_committed_full_verdicts():
    "The `full` table's verdicts as the notebook states them (both kinds at 64× the tuning model, two seeds)."
    assert verdicts_at("full").set_index("claim").verdict.to_dict() == {
        "speed-up, dense": "not reproduced", "speed-up, MoE": "not reproduced",
        "speed-up, dense, η re-tuned for both": "not reproduced",  # tuned best at 1× of ½–4, baseline at 2×
        "speed-up, MoE, η re-tuned for both": "not reproduced"}  # tuned best at 1× of ½–4
