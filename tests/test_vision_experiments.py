"""The vision and privacy experiments go through the run store unit by unit: a run stopped by its time budget
(`OutOfTime`) continues without recomputing a finished unit, and equal configs give equal run keys."""
import importlib
import warnings

import pytest
import torch

from effworkbench import experiment
from effworkbench.experiment import EXPERIMENTS, Context, OutOfTime, run_experiment
from effworkbench.store import RunStore

torch.set_num_threads(1)

# experiment → overrides of its smoke config that keep the run to a few seconds (and at least two units)
TINY = {"vision.early_exit": ["n_train=64", "n_test=32", "epochs=2", "n_diag=16", "slice_points=3", "width=4"],
        "vision.models": ["n_train=64", "n_test=32", "epochs=1", "width=4", "vit_dim=16", "vit_depth=1"],
        "vision.shapley": ["n_train=64", "n_val=32", "n_test=32", "epochs=1", "width=4", "exact_layers=['0']",
                           "perms=[1]", "kernel=[8]", "seeds=1", "ratios=[0.5]", "time_repeats=1"],
        "privacy.dp_prune": ["n_train=120", "n_test=40", "size=8", "width=4", "pretrain_epochs=1", "epsilons=(8.0,)",
                             "prunes=(0.5,)", "drops=(0.0,)", "dp.q=0.2", "dp.epochs=0.4", "tune_frac=0.4",
                             "tune_lrs=(1.0,)", "tune_clips=(1.0,)"],
        "vision.adaglimpse": ["n_train=32", "n_test=16", "dim=16", "depth=1", "pretrain_epochs=1", "rounds=2", "warmup=1",
                              "n_envs=4", "budget=2", "sac.hidden=16", "sac.batch_size=8", "n_random=2", "n_boot=50", "n_samples=2"]}


def counted_units(monkeypatch, name: str) -> list:
    """Wrap every unit function of the experiment's module so that each computed unit is recorded (its run name and
    config); after the first one the context's time budget is spent, so the next unit raises `OutOfTime`."""
    mod = importlib.import_module(EXPERIMENTS[name].run.__module__)
    calls, real = [], Context._check_time
    def check(self, what):                    # a context with a budget has spent it once a unit was computed
        if calls and self.deadline is not None: raise OutOfTime(f"time budget spent before {what}")
        return real(self, what)
    monkeypatch.setattr(Context, "_check_time", check)
    for attr, fn in list(vars(mod).items()):
        if not getattr(fn, "run_name", "").startswith(name + "."): continue
        def wrapped(cfg, run, _fn=fn):
            out = _fn(cfg, run)
            calls.append((_fn.run_name, repr(cfg)))
            return out
        wrapped.run_name = fn.run_name
        monkeypatch.setattr(mod, attr, wrapped)
    return calls


@pytest.mark.parametrize("name", sorted(TINY))
def test_killed_run_resumes_without_recomputing(name, tmp_path, monkeypatch):
    calls = counted_units(monkeypatch, name)
    exp, store = EXPERIMENTS[name], RunStore(tmp_path)
    cfg = exp.config_for("smoke", TINY[name])
    with pytest.raises(OutOfTime): run_experiment(name, cfg, store=store, max_minutes=60)
    first = list(calls)
    assert len(first) >= 1
    tables = run_experiment(name, cfg, store=store)
    assert all(len(df) for df in tables.values())
    assert len(calls) > len(first) and not set(calls[len(first):]) & set(first)   # the finished units were read back
    run_experiment(name, cfg, store=store)
    assert len(calls) == len(set(calls))                                           # done: nothing computed again


# experiment → overrides that restate its smoke defaults (nested parts too, an int for a float): the same config
SAME = {"vision.early_exit": ["epochs=4", "exit_blocks=[0, 1, 2, 3, 4]", "lr=0.05"],
        "vision.models": ["epochs=2", "seed=0", "task.name=hard_digits", "task.cifar_dir="],
        "vision.shapley": ["metric=acc", "ratios=[0.5]", "cost_ratio=0.5"],
        "privacy.dp_prune": ["dp.clip=1", "dp.q=0.1", "epsilons=(2, 8)"],
        "vision.adaglimpse": ["sac.hidden=64", "sac.gamma=0.99", "budget=4"]}


@pytest.mark.parametrize("name", sorted(TINY))
def test_equal_configs_equal_keys(name, tmp_path):
    exp, store = EXPERIMENTS[name], RunStore(tmp_path)
    key = lambda c: store.key(f"experiment.{name}", c)
    a, b = exp.config_for("smoke"), exp.config_for("smoke", TINY[name])
    assert key(a) == key(exp.config_for("smoke")) == key(exp.config()) and key(a) != key(b)
    assert key(exp.config_for("smoke", SAME[name])) == key(a)                      # defaults written out: the same key
    assert experiment.experiment_for_notebook(exp.notebook) is exp


# experiment, an override on top of TINY, and the units that depend on it (all others are read back from the store)
CHANGES = [("vision.adaglimpse", "rounds=3", ["vision.adaglimpse.agent"] + ["vision.adaglimpse.policy"] * 3),   # sac + 2 matched
           ("privacy.dp_prune", "pretrain_epochs=2", ["privacy.dp_prune.pretrain"] + ["privacy.dp_prune.cell"] * 2),  # + its tuning
           ("vision.shapley", "finetune_epochs=2", ["vision.shapley.prune"] * 4),
           ("vision.early_exit", "slice_range=0.5", ["vision.early_exit.evaluate"] * 3)]


@pytest.mark.parametrize("name,change,redone", CHANGES)
def test_a_change_recomputes_only_the_units_that_depend_on_it(name, change, redone, tmp_path, monkeypatch):
    calls = counted_units(monkeypatch, name)
    exp, store = EXPERIMENTS[name], RunStore(tmp_path)
    run_experiment(name, exp.config_for("smoke", TINY[name]), store=store)
    n = len(calls)
    run_experiment(name, exp.config_for("smoke", TINY[name] + [change]), store=store)
    assert sorted(fn for fn, _ in calls[n:]) == sorted(redone)


@pytest.mark.parametrize("name", sorted(TINY))
def test_published_names_match_the_committed_tables(name, tmp_path, monkeypatch):
    "`publish` writes `<prefix>_<table>_<preset>.csv`: every committed medium table of the experiment is one of them."
    from pathlib import Path
    from effworkbench.experiment import publish
    exp, store = EXPERIMENTS[name], RunStore(tmp_path / "runs")
    cfg = exp.config_for("smoke", TINY[name])
    run_experiment(name, cfg, store=store)
    monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path / "results"))
    with warnings.catch_warnings():                     # a dirty checkout (while editing) warns; a clean one does not
        warnings.simplefilter("ignore")
        written = {p.name.removesuffix("_smoke.csv") for p in publish(name, cfg, store=store, allow_dirty=True)}
    committed = {p.name.removesuffix("_medium.csv") for p in (Path(__file__).parents[1] / "results").glob(f"{exp.table_prefix}_*_medium.csv")}
    assert committed and committed <= written, (committed, written)
