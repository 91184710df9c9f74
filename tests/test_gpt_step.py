"The GPT training step: fused q/k/v and table rotary equal the plain formulas (float64), the chunked cross-entropy, and a trainer step with no host sync off logging steps."
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effworkbench.nn.gpt import GPT, GPTConfig, Rotary, _softmax_log_py, ce_block_rows, chunked_cross_entropy, linear_cross_entropy, make_parameterization
from effworkbench.train import TrainConfig, Trainer, TrainingDiverged


def reference_forward(model: GPT, idx, targets):
    """The GPT written out the plain way: three q/k/v matmuls, interleaved rotary by strided slices and `stack`,
    F.cross_entropy on float32 (float64) logits."""
    cfg = model.cfg
    B, T = idx.shape
    H, Dh = cfg.n_heads, cfg.d_head
    inv = cfg.rope_base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]             # (T, Dh/2)
    c, s = ang.cos().float().to(model.tok_emb.weight.dtype), ang.sin().float().to(model.tok_emb.weight.dtype)

    def rope(x):                                                                # (B, H, T, Dh)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)

    def lin(m, x): return F.linear(x, m.weight, m.bias) * m.group_mult[m.group]
    x = model.tok_emb(idx)
    for blk in model.blocks:
        a = blk.attn
        h = blk.norm1(x)
        q, k, v = (lin(m, h).view(B, T, H, Dh).transpose(1, 2) for m in (a.q, a.k, a.v))
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, scale=a.scale)
        x = x + lin(a.o, y.transpose(1, 2).reshape(B, T, -1))
        x = x + blk.ffn(blk.norm2(x))
    logits = lin(model.head, model.norm_f(x))
    acc = torch.promote_types(logits.dtype, torch.float32)                      # float32, or float64 in this test
    return logits, F.cross_entropy(logits.to(acc).view(-1, logits.size(-1)), targets.view(-1))


@pytest.mark.parametrize("complex_form", [True, False])
@pytest.mark.parametrize("param,kw", [("sp", {}), ("sp", {"bias": True, "act": "swiglu", "tie_weights": True}), ("mup", {})])
def test_fused_step_equals_the_plain_formulas_in_float64(param, kw, complex_form, monkeypatch):
    """Logits, loss and every gradient of the fused model equal the plain formulas, under SP and μP (non-unit multipliers),
    with rotary as a complex product (float32/64 eager) and in its real form (bf16, compiled)."""
    monkeypatch.setattr(Rotary, "complex_form", complex_form)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, seq_len=24, d_model=48, n_layers=2, n_heads=4, **kw)
    model = GPT(cfg, make_parameterization(param)).double()
    if param == "mup": assert any(m.group_mult[m.group] != 1.0 for m in model.modules() if hasattr(m, "group_mult"))
    if kw: model.apply(lambda m: setattr(m, "group_mult", {**m.group_mult, "attn_qkv": 0.7}) if hasattr(m, "group_mult") else None)
    idx, tgt = torch.randint(0, 97, (3, 24)), torch.randint(0, 97, (3, 24))
    logits, loss = model(idx, tgt)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_logits, ref_loss = reference_forward(model, idx, tgt)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    for (n, _), g, r in zip(model.named_parameters(), grads, ref_grads): torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13, msg=n)
    none, loss2 = model(idx, tgt, return_logits=False)                          # the head's matmul inside the loss
    assert none is None
    torch.testing.assert_close(loss2, ref_loss, rtol=0, atol=1e-12)
    for (n, _), g, r in zip(model.named_parameters(), torch.autograd.grad(loss2, list(model.parameters())), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13, msg=n)


def test_bf16_rotary_qkv_is_one_node_and_matches_float64():
    """In bf16 (no complex dtype) eager q, k, v come from one autograd node whose backward writes y5's gradient whole;
    values and gradient equal the float64 rotation within bf16 rounding."""
    torch.manual_seed(3)
    rot = Rotary(16, 12)
    y5 = torch.randn(2, 12, 3, 4, 16, dtype=torch.bfloat16, requires_grad=True)
    out = rot.qkv(y5)
    assert all(type(t.grad_fn).__name__ == "_RotaryQKVRealBackward" for t in out)
    y64 = y5.detach().double().requires_grad_()
    ref = rot.qkv(y64)                                                          # float64: the complex product
    for a, b in zip(out, ref): torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2)
    gs = [torch.randn_like(t) for t in out]
    g, = torch.autograd.grad(out, y5, gs)
    g64, = torch.autograd.grad(ref, y64, [t.double() for t in gs])
    assert g.shape == y5.shape and g.is_contiguous()
    torch.testing.assert_close(g.double(), g64, rtol=2e-2, atol=3e-2)


def test_compiled_rotary_equals_the_eager_rotation_in_float64():
    """Under torch.compile rotary takes `_rotate_pairs` (even and odd halves, one interleaving write): q, k, v from the fused
    projection, a rotation along another dim, and the gradients equal the eager complex product in float64."""
    torch.manual_seed(5)
    rot = Rotary(16, 12)
    y5 = torch.randn(2, 10, 3, 4, 16, dtype=torch.float64, requires_grad=True)   # (B, T, 3, H, Dh), T < seq_len
    x = torch.randn(2, 10, 4, 16, dtype=torch.float64, requires_grad=True)       # (B, T, H, Dh): positions along dim 1
    def f(y5, x): return (*rot.qkv(y5), rot(x, seq_dim=1))
    want, got = f(y5, x), torch.compile(f, fullgraph=True)(y5, x)
    gs = [torch.randn_like(t) for t in want]
    for a, b in zip(got, want): torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (y5, x), gs), torch.autograd.grad(want, (y5, x), gs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 16), (2, 9, 16)])
def test_cpu_rms_norm_matches_the_formula_in_float64(shape):
    "The closed-form CPU RMSNorm against F.rms_norm: output and the gradients of x and the gain (a non-unit gain)."
    from effworkbench.nn.gpt import RMSNorm
    torch.manual_seed(4)
    norm = RMSNorm(16, eps=1e-3).double()
    with torch.no_grad(): norm.weight.uniform_(-2, 2)
    x = (3 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()
    dy = torch.randn(*shape, dtype=torch.float64)
    ref = F.rms_norm(x, (16,), norm.weight, 1e-3)
    out = norm(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    for a, b in zip(torch.autograd.grad((out * dy).sum(), (x, norm.weight)), torch.autograd.grad((ref * dy).sum(), (x, norm.weight))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_unfused_fallback_when_a_projection_is_replaced():
    "A q projection swapped for another module (as compression does) still runs, through three separate calls."
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, seq_len=8, d_model=16, n_layers=1, n_heads=2)).double()
    idx = torch.randint(0, 50, (2, 8))
    before = model(idx)
    a = model.blocks[0].attn
    w = a.q.weight.detach().clone()
    a.q = torch.nn.Linear(16, 16, bias=False).double()
    with torch.no_grad(): a.q.weight.copy_(w)
    assert not a._fusable()
    torch.testing.assert_close(model(idx), before, rtol=0, atol=1e-12)


def test_hooked_projection_takes_the_unfused_path_with_the_same_bits():
    """A forward hook on q makes q, k, v three calls; in float32 the logits equal the fused path's bit for bit
    (compression's step 0 relies on it)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=4))
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad(): fused = model(idx)
    h = model.blocks[0].attn.q.register_forward_hook(lambda m, i, o: None)
    assert not model.blocks[0].attn._fusable()
    with torch.no_grad(): assert torch.equal(model(idx), fused)
    h.remove()


def test_chunked_cross_entropy_matches_torch_in_float64():
    torch.manual_seed(1)
    z = torch.randn(53, 29, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 29, (53,)); y[::7] = -100
    for chunk in (29, 7 * 29, 10**6):                                     # 1 row, 7 rows, everything in one chunk
        loss = chunked_cross_entropy(z, y, chunk_elems=chunk)
        ref = F.cross_entropy(z, y)
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-13)
        torch.testing.assert_close(torch.autograd.grad(2.5 * loss, z)[0], torch.autograd.grad(2.5 * ref, z)[0], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="expected \\(N, V\\)"): chunked_cross_entropy(z[None], y)
    loss = chunked_cross_entropy(z, y)                                    # the backward scales its stored gradient in place:
    torch.autograd.grad(loss, z, retain_graph=True)                       # a second backward is refused, not wrong
    with pytest.raises(RuntimeError, match="backward ran twice"): torch.autograd.grad(loss, z)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_torch_in_float64(bias):
    """Loss and the gradients of h, W (and b) against F.cross_entropy(m · linear) with ignored rows, blocks of 1, 7 and
    all rows."""
    torch.manual_seed(2)
    h = torch.randn(41, 9, dtype=torch.float64, requires_grad=True)
    W = torch.randn(23, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(23, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 23, (41,)); y[::6] = -100
    inputs = (h, W, b) if bias else (h, W)
    ref = F.cross_entropy(1.3 * F.linear(h, W, b), y)
    g_ref = torch.autograd.grad(-0.4 * ref, inputs)
    for chunk in (23, 7 * 23, None):
        loss = linear_cross_entropy(h, W, y, b, mult=1.3, chunk_elems=chunk)
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-13)
        for g, r in zip(torch.autograd.grad(-0.4 * loss, inputs), g_ref): torch.testing.assert_close(g, r, rtol=0, atol=1e-14)
    gh, = torch.autograd.grad(linear_cross_entropy(h, W, y, b), h)           # only h: W's and b's sums are skipped
    assert gh[::6].abs().sum() == 0 and gh[1::6].abs().sum() > 0              # ignored rows get no gradient
    with torch.no_grad(): torch.testing.assert_close(linear_cross_entropy(h, W, y, b, mult=1.3), ref, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="expected \\(N, d\\)"): linear_cross_entropy(h[None], W, y)
    loss = linear_cross_entropy(h, W, y, b)
    torch.autograd.grad(loss, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"): torch.autograd.grad(loss, h)


def test_linear_cross_entropy_under_no_grad_does_only_the_forward_matmul():
    """Under no_grad (an evaluation) the loss forms no gradients: the FLOPs of one (N, d) × (d, V) matmul, where a
    training call forms ∂ℓ/∂h and ∂ℓ/∂W in its forward too (three); the same loss either way."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(3)
    N, d, V = 64, 16, 96
    h, W = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True)   # W a parameter as in a model
    y = torch.randint(0, V, (N,))
    def flops(grad_mode):
        with torch.set_grad_enabled(grad_mode), FlopCounterMode(display=False) as fc: loss = linear_cross_entropy(h, W, y)
        return fc.get_total_flops(), loss.detach()
    (f_eval, l_eval), (f_train, l_train) = flops(False), flops(True)
    assert f_eval == 2 * N * d * V and f_train == 3 * f_eval
    torch.testing.assert_close(l_eval, l_train, rtol=0, atol=0)


def test_loss_block_sizes():
    """linear_cross_entropy's default blocks: on a CPU 2²² logits but never fewer than 256 rows (its matmuls slow down
    with fewer); on a GPU at the GPT-2 vocabulary enough rows c that the block's matmuls (6·c·V·d FLOPs) outweigh its
    float32 ∂ℓ/∂W update (≈ 12·V·d bytes) four times over at an H100's 295 FLOPs a byte: c/2 ≥ 4 · 295. A given block
    size is used as given."""
    cpu = torch.device("cpu")
    assert ce_block_rows(4096, cpu) == 1024 and ce_block_rows(16384, cpu) == 256 and ce_block_rows(50304, cpu) == 256
    assert ce_block_rows(50304, torch.device("cuda")) / 2 >= 4 * 295
    assert ce_block_rows(50304, torch.device("cuda"), chunk_elems=50304 * 7) == 7 and ce_block_rows(10, torch.device("cpu"), 3) == 1


def test_losses_are_exact_where_the_target_probability_underflows():
    """float32 logits whose target probability is below float32's smallest number (z_y 150 under the row's maximum): both
    losses give the float64 cross-entropy (log p_y from the row maxima, not the log of a softmax that is 0)."""
    g = torch.Generator().manual_seed(3)
    h, W = torch.randn(12, 8, generator=g), torch.randn(40, 8, generator=g)
    y = torch.randint(0, 40, (12,), generator=g)
    W[y[:4]] -= 30 * h[:4] / h[:4].square().sum(1, keepdim=True)          # rows 0-3: z_y pushed 30 down …
    z = 5 * F.linear(h, W)                                                  # … and scaled: z_y − max ≈ −150 or less
    assert (z.gather(1, y[:, None])[:4, 0] - z[:4].amax(1) < -140).all()
    want = F.cross_entropy(z.double(), y)
    torch.testing.assert_close(chunked_cross_entropy(z, y, chunk_elems=40 * 5).double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(linear_cross_entropy(h, W, y, mult=5.0, chunk_elems=40 * 5).double(), want, rtol=1e-6, atol=0)
    for how in ("gather", "amax", "argmax"):            # the CPU's log p_y (rows 0-3 redone from z), two max passes, argmax
        p, lpy = _softmax_log_py(z.double(), y[:, None], torch.float64, how)
        torch.testing.assert_close(lpy[:, 0], torch.log_softmax(z.double(), -1).gather(1, y[:, None])[:, 0], rtol=1e-13, atol=0)
        torch.testing.assert_close(p, torch.softmax(z.double(), -1), rtol=0, atol=0)
    zs = torch.zeros(3, 8); zs[:, 0] = torch.tensor([80.0, 95.0, 102.0])   # p_1 = e^-80 (normal), e^-95, e^-102 (subnormal)
    ys = torch.ones(3, 1, dtype=torch.long)
    _, lpy = _softmax_log_py(zs, ys, torch.float32, "gather")         # float32's log of a subnormal p_y is off by > 1e-4
    torch.testing.assert_close(lpy.double(), torch.log_softmax(zs.double(), -1).gather(1, ys), rtol=0, atol=1e-5)


def test_compiled_linear_cross_entropy_sums_dw_in_place():
    """Compiled, the float32 ∂ℓ/∂W sum is updated in place by `effworkbench::addmm_into` (inductor would turn `addmm_` into
    an out-of-place addmm, copying the (V, d) sum once a block), with the same loss and gradients as eager."""
    from torch._inductor.utils import run_and_get_code
    g = torch.Generator().manual_seed(5)
    h, W = torch.randn(64, 8, generator=g, requires_grad=True), torch.randn(32, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 32, (64,), generator=g)
    f = lambda h, W: torch.autograd.grad(linear_cross_entropy(h, W, y, chunk_elems=16 * 32), (h, W))   # 4 blocks
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(f), h, W)
    for a, b in zip(got, f(h, W)): torch.testing.assert_close(a, b)
    code = "\n".join(code)
    assert code.count("torch.ops.effworkbench.addmm_into.default(") == 3 and "extern_kernels.addmm(" not in code


def test_linear_cross_entropy_under_bf16_autocast_matches_the_unfused_head():
    """Under CPU bf16 autocast the fused head+loss gives the unfused path's loss and gradients to bf16 accuracy, in their
    dtypes."""
    torch.manual_seed(3)
    h = torch.randn(64, 32, requires_grad=True); W = (0.1 * torch.randn(300, 32)).requires_grad_()
    y = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, W, y, mult=2.0, chunk_elems=16 * 300)
        ref = chunked_cross_entropy(2.0 * F.linear(h, W), y)
    g, r = torch.autograd.grad(loss, (h, W)), torch.autograd.grad(ref, (h, W))
    assert loss.dtype == torch.float32 and g[0].dtype == g[1].dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    for a, c in zip(g, r): torch.testing.assert_close(a, c, rtol=0.02, atol=2e-4)


def _saved_during(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        out = fn()
    return out, saved


def test_training_forward_keeps_no_float32_logits():
    "Under bf16 autocast the training forward returns no logits and saves no float32 tensor as large as the logits."
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, seq_len=16, d_model=32, n_layers=1, n_heads=2))
    x, y = torch.randint(0, 512, (4, 16)), torch.randint(0, 512, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (logits, loss), saved = _saved_during(lambda: model(x, y, return_logits=False))
    assert logits is None and loss.dtype == torch.float32
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= 4 * 16 * 512], saved
    with torch.autocast("cpu", dtype=torch.bfloat16): ref = F.cross_entropy(model(x).float().view(-1, 512), y.view(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)


# ----- the trainer step

def toy_trainer(**kw) -> Trainer:
    g = np.random.default_rng(0)
    corpus = SimpleNamespace(train=g.integers(0, 48, 4000), val=g.integers(0, 48, 400), vocab_size=48)
    cfg = TrainConfig(model=GPTConfig(vocab_size=48, seq_len=8, d_model=16, n_layers=1, n_heads=2, dropout=0.1), steps=20,
                      batch_size=4, warmup=2, lr=3e-3, eval_every=10**6, log_every=10**6, ckpt_every=10**6, **kw)
    return Trainer(cfg, corpus=corpus)


def test_unsynced_steps_are_bit_identical_to_synced_ones():
    a = toy_trainer()                                                              # dropout: the global RNG streams must match too
    for _ in range(6): a.train_step(sync=True)
    b = toy_trainer()
    for _ in range(5): assert b.train_step(sync=False) is None
    b.train_step(sync=True)
    assert (a.step, a.tokens) == (b.step, b.tokens)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()): assert torch.equal(p, q), n


class _NoSync:
    "Make every Python-level device-to-host read of a tensor an error."
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}
        def boom(*a, **k): raise AssertionError("host sync")
        for n in self.names: setattr(torch.Tensor, n, boom)
    def __exit__(self, *exc):
        for n, f in self.saved.items(): setattr(torch.Tensor, n, f)


def test_unsynced_step_reads_nothing_back():
    "What a GPU's trainer does: on a CPU, where a read is no sync, the trainer reads the clip factor (`clip_reads_factor`)."
    t = toy_trainer()
    t.clip_reads_factor = False
    t.train_step()
    with _NoSync():
        for _ in range(3): t.train_step(sync=False)
    with pytest.raises(AssertionError, match="host sync"), _NoSync(): t.train_step(sync=True)   # the logging step does read


def test_nonfinite_unsynced_step_is_skipped_and_reported_at_the_next_sync():
    """A NaN at an unsynced step: that update and all later ones are skipped on the device, the next sync raises and
    rewinds to it."""
    t = toy_trainer()
    for _ in range(2): t.train_step(sync=False)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    opt_before = [{k: v.clone() for k, v in s.items()} for s in t.opt.state.values()]
    tokens = t.tokens
    h = t.model.blocks[0].register_forward_hook(lambda m, i, out: out * float("nan") if t.step == 2 else out)  # step 2 only
    for _ in range(3): t.train_step(sync=False)                                    # steps 2 (NaN), 3 and 4 (finite again)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2: .*optimizer step was not taken"):
        t.train_step(sync=True)
    h.remove()
    assert (t.step, t.tokens) == (2, tokens)
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    assert all(int(s["step"]) == 2 for s in t.opt.state.values())
    assert all(torch.equal(s[k], b[k]) for s, b in zip(t.opt.state.values(), opt_before) for k in b)   # moments untouched


def test_clipping_inside_the_fused_adamw_equals_clipping_in_place():
    """The fused AdamW's grad_scale = 1/c (`clip_in_update`, a GPU's default) gives the weights and the stored .grad of
    clip_grads_with_norm_ followed by the step (the CPU's default, where the fused kernel's grad_scale path is the slower)."""
    def run(clip, in_update=False, sync=False):                                    # one after the other: dropout draws from the global RNG
        t = toy_trainer(grad_clip=clip)
        assert t.fused_opt and t.clip_in_update == (t.device.type != "cpu")        # on the CPU: the fused AdamW, clipping in place
        t.clip_in_update = in_update
        for _ in range(3):
            t.train_step(sync=sync)
            assert getattr(t.opt, "grad_scale", None) is None                      # not left for a later step
        return t
    fused, in_place, unclipped = run(0.05, in_update=True), run(0.05, sync=True), run(0.0)
    for (n, p), q, u in zip(fused.model.named_parameters(), in_place.model.parameters(), unclipped.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9, msg=n)   # .grad holds the clipped gradient
    assert not all(torch.allclose(p, u, rtol=1e-4) for p, u in zip(fused.model.parameters(), unclipped.model.parameters()))


@pytest.mark.parametrize("reads", [True, False])
@pytest.mark.parametrize("over", [20.0, 1.001, 0.999, 0.01, float("nan")])
def test_trainer_clips_as_clip_grad_norm_does(over, reads):
    """The trainer's in-place clip (one `_foreach_mul_` over the gradients of the parameters it updates, in module order,
    left out when c = 1 if the trainer `reads` c, as on a CPU) equals torch's clip_grad_norm_ bit for bit: the norm and
    every gradient, at a norm `over` × the threshold (0.5): clipping hard, barely (c just below 1), not quite, far below,
    and with a NaN gradient (torch multiplies every gradient by c = NaN). In the optimizer's group order instead, the norm
    differs in its last bit."""
    clip = 0.5
    t = toy_trainer(grad_clip=clip)
    t.clip_reads_factor = reads
    g = torch.Generator().manual_seed(1)
    for p in t.model.parameters(): p.grad = 3 * torch.randn(p.shape, generator=g)
    norm = torch.nn.utils.get_total_norm([p.grad for p in t.model.parameters()])
    for p in t.model.parameters(): p.grad *= (clip * (1.0 if math.isnan(over) else over)) / norm
    if math.isnan(over): t.model.blocks[0].ffn.w_in.weight.grad[0, 0] = float("nan")
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in t.model.parameters()]
    for s, p in zip(shadow, t.model.parameters()): s.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(shadow, clip)
    assert math.isnan(over) or (want > clip) == (over > 1)
    assert torch.equal(t.grad_norm(), want) if not math.isnan(over) else t.grad_norm().isnan()
    for (n, p), s in zip(t.model.named_parameters(), shadow): assert torch.equal(p.grad, s.grad) or (
        math.isnan(over) and p.grad.isnan().all() and s.grad.isnan().all()), n


def test_infinite_gradient_at_an_unsynced_step():
    t = toy_trainer(grad_clip=0.5)
    t.train_step(sync=False)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    h = t.model.blocks[0].ffn.w_in.weight.register_hook(lambda g: g * float("inf"))
    t.train_step(sync=False)
    h.remove()
    t.train_step(sync=False)                                                       # finite, but after the bad step: skipped too
    with pytest.raises(TrainingDiverged, match="gradient norm is (inf|nan) .*at step 1"):
        t.train_step()
    assert t.step == 1 and all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())


def test_prefetched_batch_is_the_batch_of_the_next_step():
    t = toy_trainer(batch_rampup=[[64, 8]])
    t.train_step(sync=False)                                                       # 32 tokens: the next batch has 4 rows
    (key, (x, y)) = t._next
    assert key == (1, 4)
    xs, ys = t.sampler(4).batch(1)
    assert torch.equal(x, xs) and torch.equal(y, ys)
    t.train_step(sync=False)                                                       # 64 tokens: the ramp-up switches to 8 rows
    assert t._next[0] == (2, 8) and t._next[1][0].shape == (8, 8)
    assert torch.equal(t.batch(5, 8)[0], t.sampler(8).batch(5)[0]) and t._next is None   # a stale prefetch is not used


def test_chunked_cross_entropy_bf16_gradient_is_rounded_once():
    """bf16 logits, confident rows (p_y near 1): the gradient p_y - 1 is formed in float32 and rounded once, as
    autocast's cast would."""
    torch.manual_seed(2)
    z = torch.randn(24, 40) * 0.1
    y = torch.randint(0, 40, (24,))
    z[torch.arange(24), y] += torch.linspace(2, 12, 24)                       # p_y from ~0.15 to ~0.9999
    zb = z.bfloat16().requires_grad_()
    g = torch.autograd.grad(chunked_cross_entropy(zb, y, chunk_elems=5 * 40), zb)[0]
    zf = zb.detach().float().requires_grad_()
    ref = torch.autograd.grad(F.cross_entropy(zf, y), zf)[0]
    torch.testing.assert_close(g.float(), ref, rtol=2 ** -7, atol=1e-7)


def test_hooks_on_a_projection_still_fire():
    "A forward hook on attn.q (as distillation's input collection uses) sees its input: attention calls the modules then."
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, seq_len=8, d_model=16, n_layers=1, n_heads=2))
    idx = torch.randint(0, 50, (2, 8))
    before, seen = model(idx), []
    h = model.blocks[0].attn.q.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    after = model(idx)
    h.remove()
    assert seen == [(2, 8, 16)] and model.blocks[0].attn._fusable()
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_grouped_adamw_equals_torch_fused_adamw_with_one_kernel_call_per_hyperparameter_set(monkeypatch):
    """Four groups, two of them alike: three kernel calls a step; weights, moments, step counts and .grad bit for bit
    torch's, through grad_scale, found_inf and a missing gradient."""
    from effworkbench.train import GroupedAdamW
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (4, 4), (3,), (6, 2), (2, 5)]
    def groups(ps):                                      # groups 0 and 2 alike; 1 differs in lr, 3 in weight decay
        return [{"params": ps[0:2], "lr": 1e-2, "weight_decay": 0.1}, {"params": ps[2:3], "lr": 3e-3, "weight_decay": 0.1},
                {"params": ps[3:5], "lr": 1e-2, "weight_decay": 0.1}, {"params": ps[5:], "lr": 1e-2, "weight_decay": 0.0}]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    pa, pb = ([torch.nn.Parameter(t.clone()) for t in init] for _ in range(2))
    ta, tb = torch.optim.AdamW(groups(pa), betas=(0.9, 0.95), fused=True), GroupedAdamW(groups(pb), betas=(0.9, 0.95))
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(k["lr"]), real(*a, **k)))
    for i, gr in enumerate(grads):
        for opt, ps in ((ta, pa), (tb, pb)):
            for p, t in zip(ps, gr): p.grad = None if (i == 3 and p is ps[1]) else t.clone()   # step 3: one gradient missing
            opt.grad_scale = torch.tensor(1.7) if i in (2, 4) else None                       # clipping inside the update
            opt.found_inf = torch.tensor(1.0 if i == 4 else 0.0) if i >= 4 else None          # step 4 skipped
            calls.clear(); opt.step()
            if opt is ta: torch_calls = len(calls)
        assert (torch_calls, len(calls)) == (4, 4 if i == 0 else 3)    # the first step (state created) is torch's own
        for a, b in zip(pa, pb): assert torch.equal(a, b) and (a.grad is None) == (b.grad is None)
        for a, b in zip(pa, pb):
            sa, sb = ta.state[a], tb.state[b]
            for k in ("step", "exp_avg", "exp_avg_sq"): assert torch.equal(sa[k], sb[k]), (i, k)
    assert ta.state[pa[0]]["step"].item() == 5                          # 6 steps, one skipped
    sd_a, sd_b = ta.state_dict(), tb.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"] and sd_a["state"].keys() == sd_b["state"].keys()


def test_trainer_steps_groups_alike_together():
    t = toy_trainer()
    assert type(t.opt).__name__ == "GroupedAdamW" and len(t.opt.param_groups) > 2
    for _ in range(3): t.train_step(sync=False)
    keys = {(g["lr"], g["weight_decay"]) for g in t.opt.param_groups}
    assert len(keys) < len(t.opt.param_groups)                          # under SP most groups are alike: fewer kernel calls


def test_rotary_table_is_cached_and_rebuilt_when_the_tables_change():
    """`Rotary.qkv`'s complex table is built once and rebuilt after the tables change in place or in dtype; one first
    built under inference_mode still trains."""
    from effworkbench.nn.gpt import _swap_pairs
    r = Rotary(8, 16)
    y5 = torch.randn(2, 16, 3, 2, 8, dtype=torch.float64)
    def expected(y5):                                                          # x·cos + swap(x)·sin from the module's own tables
        c, s = r.cos.to(y5.dtype), r.sin.to(y5.dtype)
        return [u * c + _swap_pairs(u) * s for u in y5[:, :, :2].permute(2, 0, 3, 1, 4)]
    for _ in range(2):                                                         # the second call reads the cached table
        q, k, _ = r.qkv(y5)
        for got, want in zip((q, k), expected(y5)): torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert r._e[1] is r.cos
    other = Rotary(8, 16, base=100.0)
    r.cos.copy_(other.cos); r.sin.copy_(other.sin)                             # in place: a new version of the tables
    q, k, _ = r.qkv(y5)
    for got, want in zip((q, k), expected(y5)): torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    q32, _, _ = r.qkv(y5.float())                                              # another dtype: its own table
    torch.testing.assert_close(q32, q.float(), rtol=1e-5, atol=1e-5)
    m = GPT(GPTConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    with torch.inference_mode(): m(x)
    m(x, x)[1].backward()                                                      # the cached table is a normal tensor
    assert m.blocks[0].attn.q.weight.grad is not None


def test_block_dropout_applies_only_in_training_with_p_above_zero():
    torch.manual_seed(0)
    blk = GPT(GPTConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16, vocab_size=64, dropout=0.5)).blocks[0]
    blk.attn.dropout = 0.0                                                     # the block's own dropout alone
    x = torch.randn(2, 16, 32)
    assert not torch.equal(blk(x), blk(x))                                     # training: two dropout draws
    blk.eval()
    assert torch.equal(blk(x), blk(x))
    blk.train(); blk.drop.p = 0.0
    assert torch.equal(blk(x), blk(x))


def test_rotary_table_follows_replaced_buffers():
    r = Rotary(8, 16)
    y5 = torch.randn(1, 16, 3, 2, 8)
    q0 = r.qkv(y5)[0]
    other = Rotary(8, 16, base=100.0)
    r.cos, r.sin = other.cos.clone(), other.sin.clone()                        # new buffers, version 0 like the old ones
    torch.testing.assert_close(r.qkv(y5)[0], other.qkv(y5)[0])
    assert not torch.allclose(r.qkv(y5)[0], q0)


@pytest.mark.parametrize("patched_first", [True, False])
def test_grouped_adamw_runs_step_hooks_once(patched_first):
    """Hooks registered on the optimizer run once a step, on torch's path (the first step, hooks present) too, whether or
    not a plain AdamW wrapped torch's step first."""
    from effworkbench.train import GroupedAdamW
    if patched_first: torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    p = torch.nn.Parameter(torch.randn(3))
    o, ref = GroupedAdamW([p], lr=0.1), torch.optim.AdamW([q := torch.nn.Parameter(p.detach().clone())], lr=0.1, fused=True)
    pre, post = [], []
    o.register_step_pre_hook(lambda *a: pre.append(1)); o.register_step_post_hook(lambda *a: post.append(1))
    for _ in range(3):
        g = torch.randn(3)
        p.grad, q.grad = g.clone(), g.clone()
        o.step(); ref.step()
    assert (len(pre), len(post)) == (3, 3) and torch.equal(p, q)
