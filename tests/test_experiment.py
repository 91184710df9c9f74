"""The experiment layer end to end: a toy experiment through `effwb exp` (chunks that stop on their time budget and
resume without recomputing a unit), `effwb publish` with provenance, `effwb run NB -p a.b=v` routed into a method
notebook's `overrides` and checked against its config, equal configs giving equal keys."""
import dataclasses
import json
import os
import time

import nbformat
import pandas as pd
import pytest

from effworkbench.cli import main, validate_params
from effworkbench.core import ConfigError, PresetConfig
from effworkbench.experiment import EXPERIMENTS, Context, experiment_run, register_experiment, run_experiment
from effworkbench.store import RunStore, run_function

CALLS: list[int] = []


@dataclasses.dataclass
class Noise:
    scale: float = 0.1


@dataclasses.dataclass
class ToyXConfig(PresetConfig):
    preset: str = "smoke"
    seeds: tuple[int, ...] = (0, 1, 2)
    noise: Noise = dataclasses.field(default_factory=Noise)
    presets = {"medium": {"seeds": (0, 1, 2, 3)}}


@run_function("tests.toyx.unit")
def unit(cfg: dict, run) -> dict:
    CALLS.append(cfg["seed"])
    return {"y": cfg["seed"] * cfg["scale"]}


@register_experiment("toyx", ToyXConfig, notebook="99_toyx")
def run_toyx(cfg: ToyXConfig, ctx: Context) -> dict[str, pd.DataFrame]:
    rows = [{"seed": s, **ctx.unit(unit, {"seed": s, "scale": cfg.noise.scale})} for s in cfg.seeds]
    return {"values": pd.DataFrame(rows)}


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFWB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path / "results"))
    CALLS.clear()
    return tmp_path


def test_exp_runs_in_chunks_and_resumes_without_recomputing(dirs, monkeypatch, capsys):
    import effworkbench.experiment as ex
    spent = []                      # per deadline check (made only before a unit that is not stored): is the budget spent?
    def check(self, what):
        if spent.pop(0): raise ex.OutOfTime(what)
    monkeypatch.setattr(ex.Context, "_check_time", check)
    args = ["exp", "toyx", "-p", "noise.scale=0.5", "--max-minutes", "1"]
    spent[:] = [True]; assert main(args) == 3 and CALLS == []                   # spent before the first unit
    spent[:] = [False, True]; assert main(args) == 3 and CALLS == [0]           # one unit, then spent
    spent[:] = [False, False]; assert main(args) == 0 and CALLS == [0, 1, 2]    # the rest; unit 0 read back
    assert main(["exp", "toyx", "-p", "noise.scale=0.5"]) == 0 and CALLS == [0, 1, 2]   # done: read back, no check
    spent[:] = [False]
    assert main(["exp", "toyx", "--preset", "medium", "-p", "noise.scale=0.5", "--max-minutes", "1"]) == 0
    assert CALLS == [0, 1, 2, 3] and spent == []                                # reuses the three stored units
    assert "table values: 4 rows" in capsys.readouterr().out


def test_exp_names_the_commit_of_a_run_it_reads_back(dirs, monkeypatch, capsys):
    "A finished run is read back, not run: `effwb exp` says so, and names its commit where HEAD has moved since."
    import effworkbench.core as core
    head = lambda h: monkeypatch.setattr(core, "git_info", lambda path=None: {"git_hash": h * 40, "git_dirty": False})
    args = ["exp", "toyx", "-p", "noise.scale=0.25"]
    head("a"); assert main(args) == 0 and "read back" not in capsys.readouterr().out        # computed now, at aaaa…
    assert experiment_run("toyx", EXPERIMENTS["toyx"].config_for("smoke", ["noise.scale=0.25"])).env["git_hash"] == "a" * 40
    assert main(args) == 0 and CALLS == [0, 1, 2]
    out = capsys.readouterr().out
    assert "read back" in out and "--rerun" not in out                                      # HEAD is the run's commit
    head("f"); assert main(args) == 0 and CALLS == [0, 1, 2]                                 # still nothing recomputed
    out = capsys.readouterr().out
    assert "made at commit aaaaaaa (HEAD is fffffff)" in out and "toyx --preset smoke --rerun" in out
    assert main(args + ["--rerun"]) == 0 and "read back" not in capsys.readouterr().out    # runs it (its units read back)


@run_function("tests.toyx.logged_unit")
def logged_unit(cfg: dict, run) -> dict:
    with open(os.environ["TOYX_CALLS"], "a") as f: f.write(f"{cfg['seed']}\n")   # from the worker process
    return {"y": cfg["seed"] * cfg["scale"]}


def test_units_given_twice_are_computed_once(dirs, monkeypatch):
    "In worker processes a config listed twice runs once; results come back in input order."
    monkeypatch.setenv("TOYX_CALLS", str(dirs / "calls.txt"))
    a, b = {"seed": 1, "scale": 2.0}, {"seed": 2, "scale": 2.0}
    out = Context(RunStore(dirs / "runs"), workers=2).units(logged_unit, [a, b, dict(a), a])
    assert sorted((dirs / "calls.txt").read_text().split()) == ["1", "2"] and [r["y"] for r in out] == [2.0, 4.0, 2.0, 2.0]


@run_function("tests.toyx.chunked_unit")
def chunked_unit(cfg: dict, run) -> dict:
    """Counts to cfg['steps'], `sleep` seconds a step, as a training run does: at the chunk's deadline it saves its step
    and raises `OutOfTime`; started again it goes on from there. Writes its seed, start step and start time."""
    from effworkbench.experiment import OutOfTime, past_deadline
    start = (run.load_checkpoint() or {"step": 0})["step"]
    with open(os.environ["TOYX_CALLS"], "a") as f: f.write(f"{cfg['seed']} {start} {time.time()!r}\n")
    for step in range(start, cfg["steps"]):
        time.sleep(cfg["sleep"])
        if past_deadline() and step + 1 < cfg["steps"]:
            run.save_checkpoint({"step": step + 1})
            raise OutOfTime(f"stopped at step {step + 1} of {cfg['steps']}")
    return {"y": 10 * cfg["seed"], "resumed_from": start}


@dataclasses.dataclass
class ToyChunksConfig(PresetConfig):
    preset: str = "smoke"
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 8
    sleep: float = 0.25


@register_experiment("toyx_chunks", ToyChunksConfig, notebook="99_toyx_chunks")
def run_toyx_chunks(cfg: ToyChunksConfig, ctx: Context) -> dict[str, pd.DataFrame]:
    units = ctx.units(chunked_unit, [{"seed": s, "steps": cfg.steps, "sleep": cfg.sleep} for s in cfg.seeds])
    return {"values": pd.DataFrame([{"seed": s, **u} for s, u in zip(cfg.seeds, units)])}


def test_parallel_units_stop_at_the_deadline_and_the_next_chunk_resumes_them(dirs, monkeypatch):
    """A chunk with worker processes: the two units going at the deadline checkpoint and stop, no worker starts a unit
    after it, and the chunk ends with `OutOfTime` (not a failure); the next chunk resumes the stopped units from their
    checkpoints and runs the others. Four units of 2 s on two workers, a deadline 1 s after the start."""
    from effworkbench.experiment import OutOfTime
    calls = dirs / "calls.txt"
    monkeypatch.setenv("TOYX_CALLS", str(calls))
    cfg = EXPERIMENTS["toyx_chunks"].config_for("smoke")
    t0 = time.time()
    with pytest.raises(OutOfTime, match="0 of 4 units finished, 2 stopped mid-way .checkpointed., 2 not started"):
        run_experiment("toyx_chunks", cfg, workers=2, max_minutes=1 / 60)
    deadline = t0 + 1.0
    first = [line.split() for line in calls.read_text().splitlines()]
    assert len(first) == 2 and all(start == "0" and float(t) < deadline for _, start, t in first)   # none after the deadline
    stopped = {int(seed) for seed, _, _ in first}
    assert all(0 < RunStore().get(RunStore().key(chunked_unit, {"seed": s, "steps": 8, "sleep": 0.25})).load_checkpoint()["step"] < 8
               for s in stopped)
    values = run_experiment("toyx_chunks", cfg, workers=2)["values"].set_index("seed")
    assert values.y.tolist() == [0, 10, 20, 30]
    assert all((values.resumed_from[s] > 0) == (s in stopped) for s in range(4))   # the stopped two went on from their step


@run_function("tests.toyx.failing_unit")
def failing_unit(cfg: dict, run) -> dict:
    if cfg["seed"] == 1: raise ValueError("seed 1 is bad")
    return {"y": cfg["seed"]}


def test_a_failing_parallel_unit_is_an_error_not_a_spent_budget(dirs):
    "With worker processes, a unit that fails (not stopped by a deadline) fails the units call, with its error."
    with pytest.raises(RuntimeError, match="1 of 2 units failed; first: seed 1 is bad"):
        Context(RunStore(dirs / "runs"), workers=2).units(failing_unit, [{"seed": 0}, {"seed": 1}])


def test_exp_refuses_unknown_fields_and_names(dirs, capsys):
    assert main(["exp", "toyx", "-p", "noise.sigma=1"]) == 2
    assert "no field" in capsys.readouterr().err
    assert main(["exp", "nosuch"]) == 2
    assert main(["exp", "toyx", "-p", "seeds"]) == 2
    assert CALLS == []


def test_publish_writes_tables_with_provenance(dirs):
    cfg = EXPERIMENTS["toyx"].config_for("smoke", ["noise.scale=2"])
    assert main(["publish", "toyx", "-p", "noise.scale=2", "--allow-dirty"]) == 2       # not run yet: nothing to publish
    run_experiment("toyx", cfg)
    assert main(["publish", "toyx", "-p", "noise.scale=2", "--allow-dirty"]) == 0
    df = pd.read_csv(dirs / "results" / "toyx_values_smoke.csv")
    assert df.y.tolist() == [0.0, 2.0, 4.0]
    rec = json.loads((dirs / "results" / "toyx_values_smoke.env.json").read_text())
    assert rec["experiment"] == "toyx" and rec["run"] == experiment_run("toyx", cfg).key and rec["units"] == 3
    assert rec["config"]["noise"] == {"scale": 2.0} and "git_hash" in rec


def test_publish_refuses_runs_from_uncommitted_code(dirs, monkeypatch):
    import effworkbench.store as st
    monkeypatch.setattr(st, "env_report", lambda preset=None: {"preset": preset, "git_hash": "abc", "git_dirty": True})
    run_experiment("toyx", EXPERIMENTS["toyx"].config_for("smoke"))
    assert main(["publish", "toyx"]) == 2
    assert not (dirs / "results").exists()


def test_equal_configs_equal_keys(dirs):
    store = RunStore()
    a = ToyXConfig.for_preset("smoke")
    b = ToyXConfig.for_preset("smoke", seeds=[0, 1, 2], noise={"scale": 0.1})     # defaults spelled out, list for tuple
    c = ToyXConfig.for_preset("smoke", noise={"scale": 0.2})
    key = lambda cfg: experiment_run.__globals__["_experiment_fn"](EXPERIMENTS["toyx"])
    assert store.key(key(a), a) == store.key(key(b), b) != store.key(key(c), c)


def test_run_routes_dotted_overrides_into_a_method_notebook(dirs):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("preset = 'smoke'\noverrides = []"); cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    path = dirs / "99_toyx.ipynb"; nbformat.write(nb, path)
    got = validate_params(path, {"noise.scale": "0.5", "seeds": "(4,)"}, "medium")
    assert got == {"preset": "medium", "overrides": ["noise.scale=0.5", "seeds=(4,)"]}
    assert EXPERIMENTS["toyx"].config_for(got["preset"], got["overrides"]).seeds == (4,)
    with pytest.raises(ConfigError, match="no field"):
        validate_params(path, {"noise.sigma": "1"}, "smoke")


def test_continue_finishes_every_stopped_experiment(dirs, monkeypatch):
    import effworkbench.experiment as ex
    for scale in ("0.3", "0.4"):
        assert main(["exp", "toyx", "-p", f"noise.scale={scale}", "--max-minutes", "-1"]) == 3   # stopped before any unit
    assert [c.noise.scale for _, c, _ in ex.unfinished_experiments()] == [0.3, 0.4]
    assert main(["exp", "--continue", "--max-minutes", "5"]) == 0
    assert CALLS == [0, 1, 2, 0, 1, 2] and ex.unfinished_experiments() == []
    assert main(["exp", "--continue", "toyx"]) == 2


def test_full_advances_the_queue_chunk_by_chunk(dirs, monkeypatch, capsys):
    "`effwb full NAME`: each call runs until its budget is spent (exit 3 while unfinished), then reads the finished run back (exit 0)."
    import effworkbench.experiment as ex
    spent = []
    def check(self, what):
        if spent.pop(0): raise ex.OutOfTime(what)
    monkeypatch.setattr(ex.Context, "_check_time", check)
    spent[:] = [False, True]; assert main(["full", "toyx", "--max-minutes", "1"]) == 3 and CALLS == [0]
    assert "unfinished" in capsys.readouterr().out
    spent[:] = [False, False]; assert main(["full", "toyx", "--max-minutes", "1"]) == 0 and CALLS == [0, 1, 2]
    assert main(["full", "toyx"]) == 0 and CALLS == [0, 1, 2] and spent == []      # done: read back, nothing run
    assert "done" in capsys.readouterr().out
