"MoE layers: routing invariants, losses, backends against float64 (values and gradients), no host sync, GPT integration."
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from effworkbench.nn.gpt import GPT, GPTConfig, flops_per_token, param_counts
from effworkbench.moe.layers import (MoEFFN, load_balance_loss, moe_mlp, moe_mlp_by_expert, moe_mlp_torch, moe_stats, route_dynamic_k,
                              route_expert_choice, route_token_choice)
from tests_common import load_bench

bench_moe = load_bench("moe")                  # its plain_grouped_mm: the plain layer the torch backend is measured against


def reference(x, w_in, w_out, w_gate, idx, gates, act):
    "Token by token in float64."
    act_fn = {"gelu": torch.nn.functional.gelu, "relu": torch.relu}
    y = torch.zeros(x.shape[0], w_out.shape[-1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            if e < 0: continue
            pre = x[n] @ w_in[e]
            h = torch.nn.functional.silu(x[n] @ w_gate[e]) * pre if act == "swiglu" else act_fn[act](pre)
            y[n] = y[n] + gates[n, k] * (h @ w_out[e])
    return y


def random_case(seed, N, d, h, E, K, swiglu, empty_expert=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    w = [torch.randn(E, d, h, generator=g) / d**0.5, torch.randn(E, h, d, generator=g) / h**0.5,
         torch.randn(E, d, h, generator=g) / d**0.5 if swiglu else None]
    hi = E - 1 if empty_expert else E                       # the last expert gets nothing
    p = torch.rand(E - (E > 1), generator=g) ** 3 + 0.01    # uneven loads
    idx = torch.multinomial(p[:hi] / p[:hi].sum(), N * K, replacement=True, generator=g).view(N, K)
    idx[torch.rand(N, K, generator=g) < 0.2] = -1            # empty slots (dropped / dynamic-k)
    idx[0] = -1                                              # a token with no expert at all
    gates = torch.rand(N, K, generator=g)
    return x, w, idx, gates


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("act", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("N,K", [(1, 1), (37, 2), (64, 4)])
def test_backend_matches_float64(backend, act, N, K):
    seed = hash((backend, act, N, K)) % 10_000
    x, (w_in, w_out, w_gate), idx, gates = random_case(seed, N, 16, 8, 5, K, act == "swiglu")
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, gates)] + ([w_gate.clone().requires_grad_()] if w_gate is not None else [])
    y = moe_mlp(leaves[0], leaves[1], leaves[2], idx, leaves[3], act, leaves[4] if w_gate is not None else None, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    yr = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[4] if w_gate is not None else None, idx, ref_leaves[3], act)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(yr)
    (y * gy.float()).sum().backward()
    if yr.requires_grad: (yr * gy).sum().backward()          # (no slot at all: every gradient is zero)
    for a, b in zip(leaves, ref_leaves):
        want = b.grad if b.grad is not None else torch.zeros_like(b)
        got = a.grad.double() if a.grad is not None else torch.zeros_like(b)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_capacity_drops_are_counted():
    probs = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).mul(3).softmax(-1)
    for cf in (0.5, 1.0, 2.0):
        r = route_token_choice(probs, 2, cf)
        C = -(-int(cf * 200 * 2) // 8)
        run = torch.zeros(8).scatter_add_(0, r.expert_idx[r.expert_idx >= 0], torch.ones(int((r.expert_idx >= 0).sum())))
        assert (run <= C).all()
        assert int(r.dropped) == int((r.wanted - C).clamp(min=0).sum()) == 400 - int(run.sum())
        assert (r.gates[r.expert_idx < 0] == 0).all()
    assert int(route_token_choice(probs, 2).dropped) == 0                    # dropless by default


def test_expert_choice_is_balanced():
    probs = torch.rand(64, 8).softmax(-1)
    r = route_expert_choice(probs, 2)
    assert ((r.expert_idx >= 0).sum(0) == 16).all()                          # C = N·k/n


def test_dynamic_k_uses_fewer_experts_as_tau_rises():
    probs = torch.randn(500, 16).softmax(-1)
    means = [float((route_dynamic_k(probs, t).expert_idx >= 0).sum(-1).float().mean()) for t in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert all(a >= b for a, b in zip(means, means[1:])) and means[0] > means[-1] == 1.0


def test_load_balance_loss_is_minimal_when_uniform():
    n = 8
    uni = load_balance_loss(torch.full((32, n), 1 / n), torch.full((n,), 4.0))
    logits = torch.randn(32, n); logits[:, 0] += 5                           # most probability and all load on expert 0
    skew = load_balance_loss(torch.softmax(logits, -1), torch.tensor([32.0] + [0.0] * (n - 1)))
    assert float(uni) == pytest.approx(1.0) and float(skew) > 1.0


class NoSync(TorchFunctionMode):
    "Raises on operations that copy data-dependent values or shapes to the host."
    FORBIDDEN = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
                 torch.Tensor.nonzero, torch.nonzero, torch.bincount, torch.Tensor.bincount, torch.unique,
                 torch.masked_select, torch.Tensor.masked_select, torch.Tensor.cpu, torch.Tensor.numpy,
                 torch.nn.functional.one_hot}
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN: raise AssertionError(f"host sync inside the layer: {func}")
        return func(*args, **(kwargs or {}))


class _NaNGradRows(torch.autograd.Function):
    "Identity whose backward sets the rows in `mask` to NaN."
    @staticmethod
    def forward(ctx, a, mask): ctx.mask = mask; return a.view_as(a)
    @staticmethod
    def backward(ctx, g): return g.masked_fill(ctx.mask.unsqueeze(1), float("nan")), None


def grouped_mm_with_nan_junk(real):
    "torch._grouped_mm whose rows after the last group are NaN, forward and input gradient (what a GPU may leave there)."
    def f(a, b, offs=None, **kw):
        junk = torch.arange(a.shape[0]) >= offs[-1]                             # (S,) rows no group covers
        out = real(_NaNGradRows.apply(a, junk), b, offs=offs, **kw)
        return torch.where(junk.unsqueeze(1), float("nan"), out)
    return f


@pytest.mark.parametrize("N,K", [(1, 1), (37, 2), (64, 4)])
def test_torch_backend_never_reads_junk_rows(monkeypatch, N, K):
    """With NaN in every row _grouped_mm leaves unwritten (outputs and input gradients of the rows after the last group:
    empty slots), the torch backend's output and gradients are finite and equal the float64 reference, including a
    token with no expert and a batch with no valid slot at all (N = K = 1)."""
    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm_with_nan_junk(torch._grouped_mm))
    x, (w_in, w_out, _), idx, gates = random_case(11 + N, N, 16, 8, 5, K, False)
    assert (idx < 0).any()
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, gates)]
    y = moe_mlp(leaves[0], leaves[1], leaves[2], idx, leaves[3], "gelu", backend="torch")
    ref = [t.detach().double().requires_grad_() for t in leaves]
    yr = reference(ref[0], ref[1], ref[2], None, idx, ref[3], "gelu")
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    if yr.requires_grad: (yr * gy.double()).sum().backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad if b.grad is not None else torch.zeros_like(b), rtol=1e-4, atol=1e-5)


class ActivationPasses(TorchDispatchMode):
    "Names the aten ops that read or write a tensor of at least `big` elements (views and bare allocations are not passes)."
    def __init__(self, big: int):
        super().__init__(); self.big, self.ops = big, []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ts = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if not func.is_view and func.overloadpacket not in (torch.ops.aten.empty, torch.ops.aten.empty_like) \
                and any(t.numel() >= self.big for t in ts):
            self.ops.append(func.overloadpacket.__name__)
        return out


def activation_passes(layer, x, w_in, w_out, idx, gates) -> tuple[list[str], list[str]]:
    "The forward's and the backward's passes over (N, d)- or (N·K, d)-sized tensors."
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, gates)]
    with ActivationPasses(x.numel()) as fwd: y = layer(leaves[0], leaves[1], leaves[2], None, idx, leaves[3], "gelu")
    gy = torch.randn_like(y)
    with ActivationPasses(x.numel()) as bwd: y.backward(gy)
    return fwd.ops, bwd.ops


@pytest.mark.parametrize("K", [1, 2])
def test_torch_backend_makes_no_more_passes_than_a_plain_grouped_gemm(K):
    """Counted op by op, forward and backward: the torch backend touches the activations no more often than the plain
    grouped-GEMM layer that bench/moe.py times beside it (gather, GEMMs, gate weight, scatter-add), and empty slots (the
    junk rows after the last group) add no pass."""
    x, (w_in, w_out, _), idx, gates = random_case(3, 64, 16, 32, 4, K, False, empty_expert=False)
    full = idx.clone(); full[full < 0] = 1                                      # every slot valid, for the plain layer
    plain = activation_passes(bench_moe.plain_grouped_mm, x, w_in, w_out, full, gates)
    ours = activation_passes(moe_mlp_torch, x, w_in, w_out, full, gates)
    assert ours == activation_passes(moe_mlp_torch, x, w_in, w_out, idx, gates)   # -1 slots: the same passes
    assert sum(op == "_grouped_mm" for op in ours[0] + ours[1]) == 6             # 2 forward, 4 backward
    assert len(ours[0]) <= len(plain[0]) and len(ours[1]) <= len(plain[1]), (ours, plain)


@pytest.mark.parametrize("routing,extra", [("token_choice", {}), ("token_choice", {"capacity_factor": 1.0}),
                                           ("expert_choice", {}), ("dynamic_k", {"tau": 0.3}), ("switch", {"granularity": 1})])
def test_layer_has_no_host_sync(routing, extra):
    cfg = GPTConfig(vocab_size=64, seq_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, ffn="moe",
                    ffn_kwargs={"expansion": 2, "granularity": 2, "routing": routing, "backend": "torch", **extra})
    ffn = MoEFFN(cfg)
    x = torch.randn(2, 16, 16, requires_grad=True)
    with NoSync():
        y = ffn(x)
        (y.sum() + sum(ffn.aux_loss.values())).backward()
    assert x.grad is not None and ffn.w_in.grad.abs().sum() > 0
    with pytest.raises(AssertionError, match="host sync"):                   # the check itself can fail
        with NoSync(): moe_mlp(x.detach().view(-1, 16), ffn.w_in, ffn.w_out, torch.zeros(32, 1, dtype=torch.long),
                               torch.ones(32, 1), "gelu", backend="loop")


@pytest.mark.parametrize("G", [1, 2, 4])
def test_gpt_counters_and_active_flops(G):
    base = dict(vocab_size=128, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, act="swiglu")
    c = GPTConfig(**base, ffn="moe", ffn_kwargs={"expansion": 4, "granularity": G})
    m = GPT(c)
    assert param_counts(c)["total"] == sum(p.numel() for p in m.parameters())
    assert flops_per_token(c) - flops_per_token(GPTConfig(**base)) == 2 * 2 * 32 * 4 * G   # the router only
    x = torch.randint(0, 128, (2, 16))
    m(x)
    st = moe_stats(m)
    assert len(st) == 2 * 4 * G and st.groupby("layer").wanted.sum().round(6).eq(1).all()
    assert (st.experts_per_token == G).all()


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match=r"ffn .moe. has no option\(s\) \[.experts.\]; valid options"):
        GPT(GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=1, n_heads=2, ffn="moe", ffn_kwargs={"experts": 8}))
    with pytest.raises(ValueError, match="unknown MoE backend"):
        moe_mlp(torch.randn(2, 4), torch.randn(1, 4, 4), torch.randn(1, 4, 4), torch.zeros(2, 1, dtype=torch.long),
                torch.ones(2, 1), backend="cutlass")


def _brute_force_flops_per_token(model, x) -> float:
    "Every matmul FLOP that ran (torch's operator counter; the loop backend runs only the routed slots), per token."
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(x)
    return fc.get_total_flops() / x.numel()


@pytest.mark.parametrize("tau,sharpen,act", [(0.5, 10.0, "gelu"), (0.3, 3.0, "swiglu"), (0.8, 30.0, "gelu")])
def test_dynamic_k_flops_count_what_ran(tau, sharpen, act):
    from effworkbench.core import ConfigError
    from effworkbench.moe.layers import experts_per_token
    base = dict(vocab_size=96, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, act=act)
    kw = {"expansion": 4, "granularity": 2, "top_k": 1}                    # k = 2 of 8 experts
    c = GPTConfig(**base, ffn="moe", ffn_kwargs={**kw, "routing": "dynamic_k", "tau": tau, "backend": "loop"})
    with pytest.raises(ConfigError, match="experts_per_token"):            # not defined by the config alone
        flops_per_token(c)
    assert param_counts(c).active is None and param_counts(c).total == param_counts(
        GPTConfig(**base, ffn="moe", ffn_kwargs=kw)).total
    torch.manual_seed(1)
    m = GPT(c).eval()
    with torch.no_grad():
        for b in m.blocks: b.ffn.router.weight.mul_(sharpen)
    x = torch.randint(0, 96, (3, 16))
    brute = _brute_force_flops_per_token(m, x)
    e = experts_per_token(m)
    assert e != kw["granularity"] * kw["top_k"]                              # the k-count would be wrong here
    assert flops_per_token(c, experts_per_token=e) == pytest.approx(brute, rel=1e-6)
    # the per-token active parameters agree: 2·N_active = FLOPs less attention's T×T products
    mm = param_counts(c, experts_per_token=e, matmul_only=True)          # embedding: the head's V·d
    assert 2 * (mm.active + mm.embedding) == pytest.approx(brute - 4 * 2 * 16 * 32, rel=1e-6)
    top = GPTConfig(**base, ffn="moe", ffn_kwargs={**kw, "backend": "loop"})   # token choice: k ran, the default count holds
    torch.manual_seed(1)
    mt = GPT(top).eval()
    assert flops_per_token(top) == pytest.approx(_brute_force_flops_per_token(mt, x), rel=1e-9)
    with pytest.raises(ConfigError, match="experts_per_token"):
        flops_per_token(GPTConfig(**base), experts_per_token=1.0)          # dense: nothing to measure


class SortDtypes(TorchFunctionMode):
    "Records the dtype of every tensor handed to a sort."
    def __init__(self):
        super().__init__(); self.dtypes = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort): self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("seed", range(6))
def test_token_choice_counts_match_one_hot(seed):
    "Counts, capacity drops and the load-balance loss against a float64 one-hot brute force (odd N, empty experts)."
    from effworkbench.moe.layers import expert_counts, queue_position
    g = torch.Generator().manual_seed(100 + seed)
    N = 2 * int(torch.randint(1, 60, (1,), generator=g)) + 1                # odd
    n = int(torch.randint(2, 12, (1,), generator=g)); k = int(torch.randint(1, n - n // 2 + 1, (1,), generator=g))
    logits = torch.randn(N, n, generator=g) * 4
    logits[:, 1::2] -= 100                                                  # the odd experts stay empty
    probs = logits.softmax(-1)
    _, idx = probs.topk(k, -1)
    onehot = torch.zeros(N, k, n, dtype=torch.float64).scatter_(-1, idx.unsqueeze(-1), 1.0)   # (N, k, n) the old way
    want = onehot.sum((0, 1))
    flat = idx.reshape(-1)
    assert torch.equal(expert_counts(flat, n).double(), want)
    pos = onehot.reshape(N * k, n).cumsum(0).reshape(N, k, n)
    assert torch.equal(queue_position(flat, expert_counts(flat, n)).double(), (pos * onehot).sum(-1).reshape(-1))
    brute = [sum(1 for j in range(s + 1) if flat[j] == flat[s]) for s in range(N * k)]   # 1 + earlier slots of that expert
    assert queue_position(flat, expert_counts(flat, n)).tolist() == brute
    r = route_token_choice(probs, k)
    assert r.wanted.dtype == probs.dtype and torch.equal(r.wanted.double(), want)
    assert (r.wanted[1::2] == 0).all()
    lb_onehot = n * ((want / want.sum()) * probs.double().mean(0)).sum()   # n · Σ f_i P_i, float64
    torch.testing.assert_close(load_balance_loss(probs, r.wanted).double(), lb_onehot, rtol=1e-6, atol=0)
    assert float(load_balance_loss(probs, r.wanted)) == float(load_balance_loss(probs, want.float()))   # identical
    for cf in (0.3, 1.0):
        C = max(1, math.ceil(cf * N * k / n))
        rc = route_token_choice(probs, k, cf)
        keep = (pos * onehot).sum(-1) <= C                                  # (N, k) the one-hot rule
        assert torch.equal(rc.expert_idx, torch.where(keep, idx, -1))
        assert int(rc.dropped) == int((~keep).sum())


def test_sorts_use_narrow_keys():
    "The dispatch sorts (capacity queue, torch backend) run on int16 keys; wider ids on int32, then int64."
    from effworkbench.moe.layers import sort_key
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(33, 8, generator=g).softmax(-1)
    x, w_in, w_out = torch.randn(33, 16, generator=g), torch.randn(8, 16, 16, generator=g), torch.randn(8, 16, 16, generator=g)
    with SortDtypes() as m:
        r = route_token_choice(probs, 2, 1.0)
        moe_mlp(x, w_in, w_out, r.expert_idx, r.gates, backend="torch")
    assert m.dtypes and all(d == torch.int16 for d in m.dtypes), m.dtypes
    key = torch.tensor([3, 0, 2])
    assert [sort_key(key, n).dtype for n in (2**15, 2**15 + 1, 2**31 - 1, 2**31)] == [torch.int16, torch.int32, torch.int32, torch.int64]
    big = torch.tensor([2**15 - 1, 0, 7])                                      # the largest id an int16 key holds
    assert torch.equal(sort_key(big, 2**15).long(), big)


def test_torch_backend_ignores_unwritten_rows(monkeypatch):
    """torch._grouped_mm leaves the rows past its last group unwritten (any bits, NaN included): filled with NaN, they reach
    neither the output nor any gradient, which still match float64."""
    real = torch._grouped_mm
    def nan_tail(a, b, offs=None, **kw):
        y = real(a, b, offs=offs, **kw)
        with torch.no_grad(): y[int(offs[-1]):] = float("nan")          # the test may read offs on the host
        return y
    monkeypatch.setattr(torch, "_grouped_mm", nan_tail)
    x, (w_in, w_out, w_gate), idx, gates = random_case(5, 29, 16, 8, 4, 3, True)
    assert (idx < 0).any()
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, gates, w_gate)]
    y = moe_mlp(*leaves[:3], idx, leaves[3], "swiglu", leaves[4], backend="torch")
    ref = [t.detach().double().requires_grad_() for t in leaves]
    yr = reference(ref[0], ref[1], ref[2], ref[4], idx, ref[3], "swiglu")
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(yr)
    (y * gy.float()).sum().backward(); (yr * gy).sum().backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_expert_choice_runs_by_expert_and_matches_the_slots_in_float64(act):
    "The (n, C) batched path (torch backend) against the (N, n) slot path (loop backend): output and every gradient."
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=64, seq_len=12, d_model=16, n_layers=1, n_heads=2, d_ff=40, act=act, ffn="moe",
                    ffn_kwargs={"expansion": 3, "granularity": 2, "routing": "expert_choice", "capacity_factor": 1.5})
    layers = {}
    for backend in ("torch", "loop"):
        torch.manual_seed(4)
        layers[backend] = MoEFFN(GPTConfig(**{**cfg.to_dict(), "ffn_kwargs": {**cfg.ffn_kwargs, "backend": backend}})).double()
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    outs = {}
    for backend, ffn in layers.items():
        xi = x.clone().requires_grad_()
        y = ffn(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs[backend] = [y, xi.grad] + [p.grad for p in ffn.parameters()]
    r = layers["torch"].route(x.view(-1, 16))[0]
    assert r.by_expert[0].shape == (6, 18) and int((r.expert_idx >= 0).sum()) == 6 * 18     # n = 6 experts, k = 2, C = ⌈1.5·36·2/6⌉
    for a, b in zip(outs["torch"], outs["loop"]):
        assert a is not None and torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_by_expert_combines_agree_and_cover_repeated_tokens():
    "index_add and grid give the same sum, with tokens chosen by several experts and tokens chosen by none."
    torch.manual_seed(5)
    N, d, h, n = 10, 8, 4, 3
    x, w_in, w_out = torch.randn(N, d, dtype=torch.float64), torch.randn(n, d, h, dtype=torch.float64), torch.randn(n, h, d, dtype=torch.float64)
    tok = torch.tensor([[0, 1, 2, 3], [0, 1, 5, 6], [0, 2, 5, 9]])            # token 0 in all three, 4, 7, 8 in none
    g = torch.rand(n, 4, dtype=torch.float64)
    want = torch.zeros(N, d, dtype=torch.float64)
    for e in range(n):
        for c in range(4):
            want[tok[e, c]] += g[e, c] * F.gelu(x[tok[e, c]] @ w_in[e]) @ w_out[e]
    for comb in ("index_add", "grid"):
        assert torch.allclose(moe_mlp_by_expert(x, w_in, w_out, None, tok, g, "gelu", comb), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="combine"):
        moe_mlp_by_expert(x, w_in, w_out, None, tok, g, "gelu", "atomic")


@pytest.mark.parametrize("backend, routing", [("torch", "token_choice"), ("triton", "token_choice"), ("torch", "expert_choice"),
                                             ("torch", "dynamic_k")])
def test_compiled_moe_gpt_matches_eager(backend, routing):
    """A GPT with MoE FFNs under torch.compile: the dispatch backends are graph breaks that run eagerly (traced, torch's
    `_grouped_mm` refuses float32 and the Triton launch code breaks TorchDynamo), the rest compiles; loss and every
    gradient as in eager mode."""
    cfg = GPTConfig(vocab_size=128, seq_len=16, d_model=32, n_layers=2, n_heads=2, ffn="moe",
                    ffn_kwargs={"expansion": 4, "granularity": 2, "backend": backend, "routing": routing})
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    def loss_and_grads(fwd):
        loss = fwd(idx, idx)[1]
        return [loss, *torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)]
    want, got = loss_and_grads(model), loss_and_grads(torch.compile(model))
    for a, b in zip(got, want):
        if b is None: assert a is None
        else: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_aux_losses_sum_in_module_order_each_module_once():
    """GPT.aux_losses walks the modules itself: the same sums, bit for bit, as summing each module's `aux_loss` in
    `model.modules()` order, with a layer registered twice counted once, an empty module slot skipped and an
    `aux_loss` that a class defines as a property read. The "order" terms, 1 then 2⁻²⁴ twice, sum to 1 in that order in
    float32 and to 1 + 2⁻²³ in any order that adds the small ones first."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=3, n_heads=2, ffn="moe",
                      ffn_kwargs={"expansion": 2, "granularity": 2, "top_k": 1, "backend": "torch"}))

    class Prop(torch.nn.Module):
        def __init__(self, v): super().__init__(); self.v = v
        @property
        def aux_loss(self): return {"order": torch.tensor(self.v), "load_balance": torch.tensor(1e-3)}

    m.again = m.blocks[1].ffn                          # a shared layer: one entry in modules()
    m.blocks[2].register_module("empty", None)
    m.blocks[0].prop, m.tail1, m.tail2 = Prop(1.0), Prop(2.0 ** -24), Prop(2.0 ** -24)
    x = torch.randint(0, 64, (3, 8))
    m(x, x, return_logits=False)
    want: dict = {}
    for mod in m.modules():
        for name, v in (getattr(mod, "aux_loss", None) or {}).items(): want[name] = want.get(name, 0) + v
    got = m.aux_losses()
    assert list(got) == list(want) and set(want) >= {"load_balance", "order"} and want["order"].item() == 1.0
    for name in want: assert torch.equal(got[name], want[name]), name
    terms = [mod.aux_loss["load_balance"] for mod in m.modules() if hasattr(mod, "aux_loss")]
    assert len(terms) == 6 and not all(torch.equal(t, terms[0]) for t in terms)   # 3 MoE layers, 3 properties
