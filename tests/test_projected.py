"Projected compression: step 0 equals hard pruning, finalize() equals the pre-merge model, sizes, gradients; checkpoint loading."
import copy
import warnings

import pytest
import torch

from effworkbench.nn.gpt import GPT, GPTConfig, param_counts
from effworkbench.compress.projected import (PROJECTED, finalize, hard_prune, load_pretrained, measured_flops_per_token,
                                    projected_model, save_pretrained, select, target_config, training_flops_per_token)

torch.set_num_threads(1)


def trained_like(cfg, seed=0):
    "A GPT with non-trivial weights (norm gains away from 1)."
    torch.manual_seed(seed)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters(): p.add_(0.05 * torch.randn_like(p))
    return m


CFGS = [GPTConfig(vocab_size=97, seq_len=16, d_model=64, n_layers=2, n_heads=4, act="gelu"),
        GPTConfig(vocab_size=97, seq_len=16, d_model=64, n_layers=3, n_heads=2, act="relu", norm="layer")]


@pytest.mark.parametrize("cfg", CFGS, ids=["rms-gelu", "layer-relu"])
@pytest.mark.parametrize("importance", ["activation", "weight"])
@pytest.mark.parametrize("sizes", [(32, 128), (48, 100)])
def test_step0_equals_hard_pruned_and_finalize_equals_premerge(cfg, importance, sizes):
    base = trained_like(cfg)
    calib = [torch.randint(0, 97, (4, 16)) for _ in range(2)]
    sel = select(base, *sizes, importance, calib)
    pm, hp = projected_model(base, sel), hard_prune(base, sel)
    x = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        assert torch.equal(pm(x), hp(x))                               # step 0 = hard-pruned, bit for bit
        ref = copy.deepcopy(hp).double()(x)                                         # float64 reference of the pruned model
        assert torch.allclose(pm(x).double(), ref, atol=1e-4)
        for p in pm.parameters(): p.add_(0.02 * torch.randn_like(p))   # move every projection and residual
        fm = finalize(pm)
        assert torch.allclose(fm(x), pm(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(fm(x), hp(x), atol=1e-3)             # the update did change the model
    assert type(fm) is GPT and not any(isinstance(m, PROJECTED) for m in fm.modules())
    tcfg = target_config(cfg, *sizes)
    assert (fm.cfg.d_model, fm.cfg.d_ff) == sizes
    n = sum(p.numel() for p in fm.parameters())
    assert n == param_counts(tcfg)["total"] == sum(p.numel() for p in GPT(tcfg).parameters())


def test_only_projections_and_aux_get_gradients():
    base = trained_like(CFGS[0])
    sel = select(base, 32, 128, "weight")
    pm = projected_model(base, sel)
    x = torch.randint(0, 97, (2, 16))
    pm(x, x)[1].backward()
    names = {n.rsplit(".", 1)[-1] for n, _ in pm.named_parameters()}
    assert names == {"p", "p_in", "p_out", "w_aux"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.parameters())
    bases = [b for n, b in pm.named_buffers() if n.endswith("_base")]
    assert bases and all(not b.requires_grad and b.grad is None for b in bases)
    # a trainer step changes projections only, and the frozen weights stay bit-identical
    before = {n: b.clone() for n, b in pm.named_buffers()}
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    opt.step()
    assert all(torch.equal(before[n], b) for n, b in pm.named_buffers())


def test_projection_flops_match_counter():
    base = trained_like(CFGS[0])
    sel = select(base, 32, 128, "weight")
    pm, hp = projected_model(base, sel), hard_prune(base, sel)
    x = torch.randint(0, 97, (2, 16))
    extra_meas = measured_flops_per_token(pm, x, x) - measured_flops_per_token(hp, x, x)
    extra_comp = training_flops_per_token(pm, x.numel())["projections"]
    assert abs(extra_meas / extra_comp - 1) < 0.01


@pytest.mark.parametrize("style,kw", [("llama", dict(act="swiglu")),
                                      ("gpt2", dict(act="gelu", norm="layer", bias=True, tie_weights=True))])
def test_checkpoint_round_trip(tmp_path, style, kw):
    m = trained_like(GPTConfig(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=4, **kw))
    save_pretrained(m, tmp_path / "model.safetensors", style)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m2 = load_pretrained(tmp_path)
    assert any("wpe" in str(x.message) for x in w) == (style == "gpt2")
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad(): assert torch.equal(m(x), m2(x))
    assert m2.cfg.n_heads == 4 and m2.cfg.d_ff == m.cfg.d_ff


def test_llama_rotary_convention(tmp_path):
    "A Llama q row pair (i, i + Dh/2) lands on our interleaved pair (2i, 2i+1)."
    from safetensors.torch import load_file
    m = trained_like(GPTConfig(vocab_size=50, seq_len=16, d_model=32, n_layers=1, n_heads=2, act="swiglu"))
    save_pretrained(m, tmp_path / "model.safetensors", "llama")
    sd = load_file(str(tmp_path / "model.safetensors"))
    q_hf = sd["model.layers.0.self_attn.q_proj.weight"]                # (32, 32), heads of 16, halves of 8
    q = m.blocks[0].attn.q.weight.detach()
    assert torch.equal(q_hf[16 + 3], q[16 + 6]) and torch.equal(q_hf[16 + 8 + 3], q[16 + 7])


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    m = trained_like(GPTConfig(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=4, act="swiglu"))
    save_pretrained(m, tmp_path / "ok" / "model.safetensors", "llama")
    sd = load_file(str(tmp_path / "ok" / "model.safetensors"))
    bad = dict(sd); bad["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 31)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.o\.weight: checkpoint \(32, 31\) vs model \(32, 32\)"):
        load_pretrained(tmp_path / "shape.safetensors", n_heads=4)
    bad = dict(sd); bad.pop("model.norm.weight"); bad["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(bad, str(tmp_path / "names.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight.*norm_f\.weight"):
        load_pretrained(tmp_path / "names.safetensors", n_heads=4)
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        load_pretrained(tmp_path / "alien.safetensors", n_heads=4)
    with pytest.raises(ValueError, match="n_heads"):
        load_pretrained(tmp_path / "shape.safetensors")
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable"):
        load_pretrained(tmp_path / "junk.safetensors", n_heads=4)


TINY = ["base.steps=4", "base.model.vocab_size=300", "base.max_bytes=100000", "base.model.d_model=32", "base.model.n_heads=2",
        "ratios=[0.5]", "steps=2", "eval_every=2", "calib_batches=1", "batch_size=4", "eval_batches=1", "lr_pc=[1e-3, 3e-3]"]


def test_killed_run_resumes_without_recomputing(tmp_path, monkeypatch):
    "A run killed in its second retraining run, then out of time, then run again: no finished unit is computed twice."
    import effworkbench.compress.projected as pc
    import effworkbench.train as train
    from effworkbench.experiment import EXPERIMENTS, OutOfTime, run_experiment
    from effworkbench.store import RunStore
    calls, retrain, fit = {"retrain": 0, "base": 0}, pc.retrain, train.fit

    def counted_retrain(*a, **kw):
        calls["retrain"] += 1
        if calls["retrain"] == 2 and kill: raise KeyboardInterrupt("killed")
        return retrain(*a, **kw)

    def counted_fit(*a, **kw):
        calls["base"] += 1
        return fit(*a, **kw)
    monkeypatch.setattr(pc, "retrain", counted_retrain)
    monkeypatch.setattr(train, "fit", counted_fit)
    kill, store = True, RunStore(tmp_path)
    cfg = EXPERIMENTS["compress.projected"].config_for("smoke", TINY)
    with pytest.raises(KeyboardInterrupt): run_experiment("compress.projected", cfg, store=store)
    assert calls == {"retrain": 2, "base": 1}
    kill = False
    with pytest.raises(OutOfTime): run_experiment("compress.projected", cfg, store=store, max_minutes=-1)
    assert calls == {"retrain": 2, "base": 1}                               # the finished units are read back, nothing started
    tables = run_experiment("compress.projected", cfg, store=store)
    assert calls == {"retrain": 4, "base": 1}                               # the killed run again, and the last one
    assert len(tables["flops"]) == 2 and set(tables["curves"].lr) == {1e-3, 3e-3}
    assert (tables["flops"].computed_ffn < tables["flops"].computed).all()   # FFN-only FLOPs beside the whole model's
    wider = EXPERIMENTS["compress.projected"].config_for("smoke", TINY + ["ratios=[0.5, 0.75]"])
    run_experiment("compress.projected", wider, store=store)                 # a new experiment reuses the stored units
    assert calls == {"retrain": 7, "base": 1}


def test_equal_configs_equal_keys():
    "Configs that resolve to the same experiment have the same run key (defaults filled in, lists as tuples)."
    from effworkbench.experiment import EXPERIMENTS
    from effworkbench.compress.projected import RetrainUnit, retrain_unit, retrain_units
    from effworkbench.store import RunStore, config_hash
    exp = EXPERIMENTS["compress.projected"]
    a = exp.config_for("smoke", TINY)
    b = exp.config_for("smoke", TINY + ["base.model.d_ff=128", "ratios=(0.5,)", "importance=activation", "base.preset=smoke"])
    assert a == b and config_hash(a) == config_hash(b)
    assert config_hash(exp.config_for("smoke", TINY + ["steps=3"])) != config_hash(a)
    assert config_hash(exp.config_for("smoke")) == config_hash(exp.config_for("smoke", ["base.model.d_model=64"]))
    with pytest.raises(Exception, match="no field"): exp.config_for("smoke", ["base.model.width=3"])
    store = RunStore("/nonexistent")
    ka = [store.key(retrain_unit, u) for u in retrain_units(a)]
    kb = [store.key(retrain_unit, u) for u in retrain_units(exp.config_for("smoke", TINY + ["ratios=[0.75, 0.5]"]))]
    assert set(ka) < set(kb) and isinstance(retrain_units(a)[0], RetrainUnit)   # a unit's key does not depend on the others


def test_the_published_base_serves_a_fresh_store(tmp_path, monkeypatch):
    """`publish_base` writes the trained base's weights, curve and record; an experiment on an empty run store then loads
    that base (bit-identical weights) instead of training it, and a base of another config is not taken for it."""
    import effworkbench.train as train
    from effworkbench.compress.projected import base_model, publish_base, published_base
    from effworkbench.core import ConfigError, load_table
    from effworkbench.experiment import EXPERIMENTS, run_experiment
    from effworkbench.store import RunStore
    from effworkbench.train import run_model, train_run
    monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path / "results"))
    cfg = EXPERIMENTS["compress.projected"].config_for("smoke", TINY)
    trained = RunStore(tmp_path / "a")
    assert published_base(cfg.base) is None
    with pytest.raises(FileNotFoundError): publish_base(cfg.base, trained)             # nothing trained yet
    trained.run(train_run, cfg.base)
    with pytest.raises(ConfigError, match="uncommitted"):                              # this checkout is a test's: dirty or no git
        if trained.get(trained.key(train_run, cfg.base)).env.get("git_dirty") is False: raise ConfigError("uncommitted (clean here)")
        publish_base(cfg.base, trained)
    paths = publish_base(cfg.base, trained, allow_dirty=True)
    assert sorted(p.name for p in paths) == ["compress_base_smoke.csv", "compress_base_smoke.safetensors"]
    assert load_table("compress_base_smoke").attrs["env"]["run"] == trained.key(train_run, cfg.base)
    want = run_model(cfg.base, trained.get(trained.key(train_run, cfg.base))).state_dict()
    got = published_base(cfg.base).state_dict()
    assert all(torch.equal(want[n], got[n]) for n in want)
    fresh = RunStore(tmp_path / "b")
    assert all(torch.equal(want[n], base_model(cfg.base, fresh)[0].state_dict()[n]) for n in want)
    monkeypatch.setattr(train, "fit", lambda *a, **kw: pytest.fail("the published base was trained again"))
    run_experiment("compress.projected", cfg, store=fresh)
    assert not fresh.is_done(train_run, cfg.base)                                      # loaded, never trained here
    other = EXPERIMENTS["compress.projected"].config_for("smoke", TINY + ["base.steps=5"]).base
    assert published_base(other) is None


def test_a_diverging_learning_rate_on_the_grid_is_never_the_best(tmp_path):
    from effworkbench.compress.projected import best_lr
    from effworkbench.experiment import EXPERIMENTS, run_experiment
    from effworkbench.store import RunStore
    cfg = EXPERIMENTS["compress.projected"].config_for("smoke", TINY + ["lr_prune=[1e-3, 1e6]", "steps=4"])
    curves = run_experiment("compress.projected", cfg, store=RunStore(tmp_path))["curves"]
    bad = curves[(curves.method == "hard prune") & (curves.lr == 1e6)]
    import numpy as np
    assert bad.step.max() == 4 and not np.isfinite(bad[bad.step == 4].val_loss).any()     # diverged: no finite loss at the end
    assert set(best_lr(curves).query("method == 'hard prune'").lr) == {1e-3}
