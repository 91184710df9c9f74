"D2DMoE: lossless expert split, Hoyer lowers density, experts fall monotonically with τ, the τ rule, FLOPs accounting."
import copy

import pytest
import torch
import torch.nn.functional as F

from effworkbench.compress.d2dmoe import (DynamicKMLP, activation_density, balanced_kmeans, dynamic_k_model, hoyer, model_flops,
                                 relufy, set_routing, split_experts, train_router)
from effworkbench.nn.gpt import GPT, GPTConfig, flops_per_token

torch.set_num_threads(1)


def unit_ffn(d=32, d_ff=128, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return (torch.randn(d_ff, d, dtype=dtype) / d ** 0.5, torch.randn(d, d_ff, dtype=dtype) / d_ff ** 0.5)


@pytest.mark.parametrize("E", [1, 4, 16])
def test_all_experts_equal_dense(E):
    w_in, w_out = unit_ffn(dtype=torch.float64)
    _, wi, wo = split_experts(w_in, w_out, E)
    x = torch.randn(200, 32, dtype=torch.float64)
    dense = F.relu(x @ w_in.T) @ w_out.T
    layer = DynamicKMLP(wi, wo, None, mode="all", backend="loop")
    with torch.no_grad(): y = layer(x)
    assert torch.allclose(y, dense, rtol=0, atol=1e-12)                           # float64: equal to rounding
    layer32 = DynamicKMLP(wi.float(), wo.float(), None, mode="all", backend="torch")
    with torch.no_grad(): assert torch.allclose(layer32(x.float()), dense.float(), atol=1e-5)


def test_balanced_kmeans_sizes_and_clusters():
    g = torch.Generator().manual_seed(1)
    dirs = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    rows = dirs.repeat_interleave(12, 0) * torch.rand(96, 1, generator=g) * 3 + 0.03 * torch.randn(96, 16, generator=g)
    perm = torch.randperm(96, generator=g)
    lab = balanced_kmeans(rows[perm], 8)
    assert torch.bincount(lab).tolist() == [12] * 8
    truth = torch.arange(96).div(12, rounding_mode="floor")[perm]
    assert all(len(set(lab[truth == c].tolist())) == 1 for c in range(8))          # planted groups recovered (scale-free)
    with pytest.raises(ValueError, match="equal clusters"): balanced_kmeans(rows[:10], 3)


def test_tau_rule_and_monotone_experts():
    w_in, w_out = unit_ffn()
    _, wi, wo = split_experts(w_in, w_out, 16)
    x = torch.randn(300, 32)
    router, mse = train_router(x, wi, wo, hidden=32, steps=100)
    layer = DynamicKMLP(wi, wo, router)
    h = router(x).detach()
    taus = torch.linspace(0, 1, 11).tolist()
    counts = []
    with torch.no_grad():
        for tau in taus:
            layer.tau = tau
            take = layer.active(x)
            ref = (h >= tau * h.max(-1, keepdim=True).values) & (h > 0)             # the paper's τ, not 1 − τ
            assert torch.equal(take, ref)
            layer(x); counts.append(float(layer.experts_per_token))
            # the layer's output is the sum of exactly the active experts
            per = torch.einsum("enh,ehd->ned", F.relu(torch.einsum("nd,edh->enh", x, wi)), wo)   # (N, E, d)
            assert torch.allclose(layer(x), (per * take.unsqueeze(-1)).sum(1), atol=1e-5)
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] > counts[-1] == 1.0


def test_hoyer_finetune_lowers_density():
    "Same steps, same data: with the Hoyer term the FFN activations end up sparser than with ReLU fine-tuning alone."
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, act="gelu"))
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 64, (8, 17), generator=g) for _ in range(40)]
    dens = {}
    for lam in (0.0, 1.0):
        m = relufy(base, lam).train()
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        for b in data:
            _, loss = m(b[:, :-1].contiguous(), b[:, 1:].contiguous())
            loss = loss + sum(m.aux_losses().values(), torch.zeros(()))
            opt.zero_grad(); loss.backward(); opt.step()
        dens[lam] = sum(activation_density(m, [b[:, :-1] for b in data[:4]]))
    assert dens[1.0] < 0.8 * dens[0.0], dens


def test_hoyer_measure():
    a = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]])
    assert torch.allclose(hoyer(a), torch.tensor([0.25, 1.0]))
    x = torch.rand(5, 10)
    assert torch.allclose(hoyer(3 * x), hoyer(x)) and ((hoyer(x) > 0.1 - 1e-6) & (hoyer(x) <= 1 + 1e-6)).all()


def test_converted_model_all_experts_and_flops():
    torch.manual_seed(0)
    rm = relufy(GPT(GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, act="relu")), 0.0).eval()
    xb = [torch.randint(0, 64, (4, 16)) for _ in range(2)]
    conv, info = dynamic_k_model(rm, xb, n_experts=8, router_hidden=16, router_steps=30, attention=True, attn_steps=30)
    assert len(info) == 2 + 2 * 4
    with torch.no_grad():
        set_routing(conv, "all")
        ffn_only = copy.deepcopy(conv)
        for i, blk in enumerate(ffn_only.blocks): blk.attn = rm.blocks[i].attn
        assert torch.allclose(ffn_only(xb[0]), rm(xb[0]), atol=1e-5)               # converted FFNs lose nothing
        set_routing(conv, "topk", k=1); conv(xb[0])
        d, dff, L = 32, 128, 2
        r = 2 * (32 * 16 + 16 * 8)                                                  # router FLOPs of one layer
        expect = flops_per_token(rm.cfg) + L * (r + 4 * d * dff / 8 - 4 * d * dff) + 4 * L * (r + 4 * d * 32 / 8 - 2 * d * d)
        assert abs(model_flops(conv) - expect) < 1e-6 * expect


TINY = ["base.steps=4", "base.model.vocab_size=300", "base.max_bytes=100000", "base.model.d_model=32", "sparsify_steps=2",
        "batch_size=4", "n_experts=4", "router_hidden=8", "router_steps=2", "calib_batches=1", "eval_batches=1",
        "taus=(0.0, 1.0)", "ks=(1, 4)", "attn_steps=2"]


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_experiment_runs_without_hoyer(tmp_path, lam):
    "λ = 0 (ReLU fine-tuning only) is a valid config: the experiment still returns every table, the speed one included."
    from effworkbench.experiment import EXPERIMENTS, run_experiment
    from effworkbench.store import RunStore
    cfg = EXPERIMENTS["compress.d2dmoe"].config_for("smoke", TINY + [f"hoyer={lam}", "attention=false"])
    res = run_experiment("compress.d2dmoe", cfg, store=RunStore(tmp_path))
    assert set(res) == {"sweep", "density", "routers", "speed"} and len(res["speed"])
    assert set(res["density"].model) == ({"ReLU fine-tune", "ReLU + Hoyer"} if lam else {"ReLU fine-tune"})
    sw = res["sweep"]
    assert (sw.ffn_flops < sw.flops).all()                                  # FFN-only FLOPs beside the whole model's:
    assert (sw.flops - sw.ffn_flops).round(3).nunique() == 1                # routing the FFNs changes only their share
    assert (sw[sw.k == 4].ffn_flops_ratio > 1).all()                        # all 4 experts plus the routers cost more than dense


def test_killed_run_resumes_without_recomputing(tmp_path, monkeypatch):
    "A run killed in its first routing sweep, then out of time, then run again: no finished unit is computed twice."
    import effworkbench.compress.d2dmoe as d2d
    from effworkbench.experiment import EXPERIMENTS, OutOfTime, run_experiment
    from effworkbench.store import RunStore
    calls = {n: 0 for n in ("sparsify", "dynamic_k_model", "routing_sweep", "layer_speed")}
    kill = {"routing_sweep": 1}                                             # the first sweep is killed mid-unit

    def counting(name):
        fn = getattr(d2d, name)
        def wrapped(*a, **kw):
            calls[name] += 1
            if kill.get(name) == calls[name]: raise KeyboardInterrupt("killed")
            return fn(*a, **kw)
        return wrapped
    for n in calls: monkeypatch.setattr(d2d, n, counting(n))
    store = RunStore(tmp_path)
    cfg = EXPERIMENTS["compress.d2dmoe"].config_for("smoke", TINY + ["attention=false"])
    with pytest.raises(KeyboardInterrupt): run_experiment("compress.d2dmoe", cfg, store=store)
    assert calls == {"sparsify": 2, "dynamic_k_model": 2, "routing_sweep": 1, "layer_speed": 0}   # (ReLU, Hoyer) × FFN
    kill.clear()
    with pytest.raises(OutOfTime): run_experiment("compress.d2dmoe", cfg, store=store, max_minutes=-1)
    assert calls == {"sparsify": 2, "dynamic_k_model": 2, "routing_sweep": 1, "layer_speed": 0}   # nothing new started
    res = run_experiment("compress.d2dmoe", cfg, store=store)
    # the killed sweep again plus the other one, one speed measurement; no sparsification or conversion again
    assert calls == {"sparsify": 2, "dynamic_k_model": 2, "routing_sweep": 3, "layer_speed": 1}
    assert set(res["sweep"].variant) == {"ReLU fine-tune, FFN", "ReLU + Hoyer, FFN"}
    run_experiment("compress.d2dmoe", cfg, store=store)                     # finished: the stored tables, nothing computed
    assert calls["routing_sweep"] == 3


def test_equal_configs_equal_keys(tmp_path):
    "Configs that resolve to the same experiment have the same run key; the base model's training is the unit 30 trains."
    from effworkbench.compress.projected import compress_base
    from effworkbench.experiment import EXPERIMENTS, experiment_run, run_experiment
    from effworkbench.store import RunStore, config_hash
    from effworkbench.train import train_run
    exp = EXPERIMENTS["compress.d2dmoe"]
    a = exp.config_for("smoke", TINY)
    b = exp.config_for("smoke", TINY + ["base.model.d_ff=128", "taus=[0, 1]", "base.model.n_layers=2", "hoyer=0.3"])
    assert a == b and config_hash(a) == config_hash(b)
    assert config_hash(exp.config_for("smoke", TINY + ["hoyer=0.4"])) != config_hash(a)
    assert exp.config_for("medium").base == compress_base("medium") == EXPERIMENTS["compress.projected"].config_for("medium").base
    assert exp.config_for("medium").base.preset == "medium"                 # the medium run's base is the medium base
    store = RunStore(tmp_path)
    run_experiment(exp, a, store=store, max_minutes=None)
    assert experiment_run(exp, b, store).status == "done"
    assert store.is_done(train_run, a.base)


@pytest.mark.parametrize("tau", [0.3, 0.7])
def test_dynamic_k_model_flops_count_what_ran(tau):
    "model_flops of a converted model in dynamic-k mode = every matmul FLOP the forward ran (loop backend), per token."
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from effworkbench.core import ConfigError
    torch.manual_seed(0)
    rm = relufy(GPT(GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, act="relu")), 0.0).eval()
    xb = [torch.randint(0, 64, (4, 16)) for _ in range(2)]
    conv, _ = dynamic_k_model(rm, xb, n_experts=8, router_hidden=16, router_steps=30, attention=True, attn_steps=30)
    set_routing(conv, "dynamic", tau=tau)
    layers = [m for m in conv.modules() if isinstance(m, DynamicKMLP)]
    for m in layers: m.backend = "loop"
    with pytest.raises(ConfigError, match="run it on a batch first"):      # nothing measured yet: not a NaN count
        model_flops(conv)
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        conv(xb[0])
    brute = fc.get_total_flops() / xb[0].numel()
    assert model_flops(conv) == pytest.approx(brute, rel=1e-6)
    ran = [float(m.experts_per_token) for m in layers]
    assert min(ran) < 8 and len(set(ran)) > 1                               # layers ran different, partial expert counts


@pytest.mark.parametrize("mode", ["dynamic", "topk", "all"])
def test_active_mask_is_the_slots_rule(mode):
    "The mask `active` builds in a few device ops marks exactly the experts of `slots`, at several τ and k, ties included."
    from effworkbench.compress.d2dmoe import NormRouter
    torch.manual_seed(3)
    E, d = 8, 16
    _, wi, wo = split_experts(*unit_ffn(d, 64), E)
    layer = DynamicKMLP(wi, wo, NormRouter(d, E, 16), mode=mode)
    x = torch.randn(300, d)
    for tau, k in ((0.0, 1), (0.3, 2), (0.7, 3), (1.0, 8)):
        layer.tau, layer.k = tau, k
        with torch.no_grad():
            idx = layer.slots(x)
            want = torch.zeros(len(x), E + 1, dtype=torch.bool).scatter_(1, torch.where(idx >= 0, idx, E), True)[:, :E]
            assert torch.equal(layer.active(x), want), (mode, tau, k)


def test_seeds_run_stage_by_stage_with_the_rows_of_each_seed(tmp_path, monkeypatch):
    """More seeds: each stage (sparsify, convert, sweep) sends the units of every seed at once, and the tables hold, in
    seed order, exactly the rows the same experiment gives at each seed alone."""
    from dataclasses import replace

    import pandas as pd

    from effworkbench.experiment import EXPERIMENTS, Context, run_experiment
    from effworkbench.store import RunStore
    stages, units = [], Context.units
    def recording(self, fn, cfgs, desc=None):
        stages.append((desc, len(cfgs)))
        return units(self, fn, cfgs, desc)
    monkeypatch.setattr(Context, "units", recording)
    store = RunStore(tmp_path)
    cfg = EXPERIMENTS["compress.d2dmoe"].config_for("smoke", TINY + ["attention=false", "seeds=(3,)", "hoyer=0.5"])
    res = run_experiment("compress.d2dmoe", cfg, store=store)
    assert stages == [("sparsify", 4), ("convert", 4), ("sweep", 4)]        # 2 seeds × (ReLU, Hoyer), one call a stage
    for name in ("sweep", "density", "routers"):
        assert list(dict.fromkeys(res[name].seed)) == [0, 3]
    alone = [run_experiment("compress.d2dmoe", replace(cfg, seed=s, seeds=()), store=store) for s in (0, 3)]
    for name in ("sweep", "density", "routers"):
        pd.testing.assert_frame_equal(res[name], pd.concat([a[name] for a in alone], ignore_index=True))
