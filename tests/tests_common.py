"""Shared pieces of the tests: the inputs of tests/test_distributed.py and its torchrun worker (the same config and corpus
in every process), and loading a script of bench/ as a module."""


def toy_corpus(vocab: int = 64):
    "Random tokens, the same in every process: what `Trainer` reads as its corpus (.train, .val, .vocab_size)."
    import numpy as np
    from types import SimpleNamespace
    g = np.random.default_rng(0)
    return SimpleNamespace(train=g.integers(0, vocab, 4000), val=g.integers(0, vocab, 400), vocab_size=vocab)


def trainer_cfg(parallel: str, moe: bool = False, **kw):
    "A small `TrainConfig` for the equivalence tests: a 2-block GPT (or a 4-expert top-2 MoE one), global batch 8 in micro-batches of 2."
    from effworkbench.train import TrainConfig
    model = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2)
    if moe:   # the load-balancing loss is not a mean over tokens, so ranks' means would not average to it: off
        model.update(ffn="moe", ffn_kwargs={"expansion": 4, "top_k": 2, "backend": "torch", "lb_weight": 0.0})
    return TrainConfig(model=model, batch_size=8, micro_batch=2, warmup=1, eval_batches=1, device="cpu", parallel=parallel, **kw)


def finished_units(store, fn: str | None = "effworkbench.train.train_run") -> dict[str, int]:
    "key → mtime of result.json of every finished unit of `store` (runs of `fn`; None: every run but experiments)."
    return {r.key: r.result_file.stat().st_mtime_ns for r in store.runs() if r.status == "done"
            and (r.record["fn"] == fn if fn else not r.record["fn"].startswith("experiment."))}


def spend_budget_after(monkeypatch, n: int, one_check_per_unit: bool = False):
    "Make an experiment's time budget run out at its (n+1)-th deadline check (`monkeypatch.undo()` restores it)."
    from effworkbench.experiment import Context, OutOfTime
    checks, real = [], Context._check_time
    def budget(self, what):
        checks.append(what)
        if len(checks) > n: raise OutOfTime(f"time budget spent before {what}")
        return real(self, what)
    monkeypatch.setattr(Context, "_check_time", budget)
    if one_check_per_unit:   # units one at a time, so each unit is one check
        monkeypatch.setattr(Context, "units", lambda self, fn, cfgs, desc=None: [self.unit(fn, c) for c in cfgs])


def load_bench(name: str):
    "The script bench/<name>.py as a module (bench/ is no package), to test what it prints or reuse what it defines."
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / f"bench/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
