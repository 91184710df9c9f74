"DP-SGD with pre-pruning and gradient dropping (effworkbench.privacy.dp_prune): clipping, noise placement, masks, sampling, accounting."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("opacus")
from effworkbench.core import ConfigError
from effworkbench.privacy.dp_prune import (DPConfig, apply_masks, book_keep, ghost_sq_norm, input_gram, norm_per_example, check_dp_model, clip_per_sample, clipped_grad_sum, density,
                             dp_sgd_step, epsilon, full_masks, GraphedDPStep, mask_kinds, noise_for_epsilon, per_sample_grads, poisson_batch,
                             SMALL_PER_EXAMPLE, prune_masks, prune_structured, select_coordinates, train_dp)
from effworkbench.vision.models import resnet_small, vgg_small

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")
torch.set_num_threads(1)


def tiny(seed=0):
    torch.manual_seed(seed)
    return vgg_small(num_classes=5, width=4, groups=2, norm="group")


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def sq_norms(grads, B):
    return sum(g.reshape(B, -1).double().pow(2).sum(1) for g in grads.values())


def test_per_sample_grads_match_float64_reference():
    m, (x, y) = tiny(), data(6)
    names = [n for n, _ in m.named_parameters()]
    gs = per_sample_grads(m, x, y, names)
    ref = tiny().double()
    for i in range(len(x)):
        ref.zero_grad(); F.cross_entropy(ref(x[i:i + 1].double()), y[i:i + 1]).backward()
        for n, p in ref.named_parameters():
            torch.testing.assert_close(gs[n][i].double(), p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("clip_on", ["selected", "full"])
def test_clipped_per_sample_norms_at_most_C(clip_on):
    m, (x, y) = tiny(), data(10)
    gs = per_sample_grads(m, x, y, [n for n, _ in m.named_parameters()])
    gs = {n: g * torch.linspace(0.01, 30, len(x)).view(-1, *[1] * (g.dim() - 1)) for n, g in gs.items()}   # tiny to huge
    sel = select_coordinates(m, full_masks(m), 0.5, "random", torch.Generator().manual_seed(3))
    C = 0.7
    clipped, norms = clip_per_sample(gs, sel, C, clip_on, full_masks(m))
    after = sq_norms(clipped, len(x)).sqrt()
    assert (after <= C + 1e-5).all()
    sel_norm = sq_norms({n: g * sel[n] for n, g in gs.items()}, len(x)).sqrt()
    full_norm = sq_norms(gs, len(x)).sqrt()
    ref = sel_norm * torch.clamp(C / (sel_norm if clip_on == "selected" else full_norm), max=1.0)     # float64 reference
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-6)
    assert (after[:1] < C).all() and (after[-1] > 0.99 * C if clip_on == "selected" else after[-1] < 0.9 * C)
    for n, g in clipped.items(): assert (g[:, ~sel[n]] == 0).all()     # nothing off the selection


def loop_update(m, x, y, masks, sel, C, clip_on, expected_batch):
    "Reference DP-SGD update without noise, one backward per example in float64: −(Σ_i ḡ_i)/(qN) on S."
    total = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for i in range(len(x)):
        m.zero_grad(); F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        g = {n: p.grad.clone() for n, p in m.named_parameters()}
        on = sel if clip_on == "selected" else masks                      # the coordinates the norm counts
        norm = math.sqrt(sum(float((g[n] * on[n]).pow(2).sum()) for n in g))
        for n in g: total[n] += g[n] * sel[n] * min(1.0, C / norm)
    return {n: -t / expected_batch for n, t in total.items()}


@pytest.mark.parametrize("method", ["bk", "vmap"])
@pytest.mark.parametrize("drop_mode", ["random", "layer"])
@pytest.mark.parametrize("clip_on", ["selected", "full"])
def test_step_matches_per_example_loop_on_pruned_masks(clip_on, drop_mode, method):
    """50 %-pruned, 50 %-dropped float64 model, C, lr, qN ≠ 1, σ = 0: the step equals the per-example loop; pruned gradients
    never count. Both methods; coordinate-wise dropping (partial masks) and layer-wise dropping (whole tensors left out)."""
    m = tiny(7).double(); masks = prune_masks(m, 0.5, "random", seed=7); apply_masks(m, masks)
    sel = select_coordinates(m, masks, 0.5, drop_mode, torch.Generator().manual_seed(8))
    x, y = data(8, 7); x = x.double()
    C = 0.05                                                              # well below the gradient norms: every example clipped
    ref = loop_update(m, x, y, masks, sel, C, clip_on, expected_batch=5.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    lr = 0.3                                                              # ≠ 1, like C and qN: each must enter the update
    dp_sgd_step(m, x, y, C=C, sigma=0.0, lr=lr, masks=masks, sel=sel, expected_batch=5.0, clip_on=clip_on, chunk=3, method=method)
    got = torch.cat([(p.detach() - before[n]).flatten() for n, p in m.named_parameters()])
    want = lr * torch.cat([ref[n].flatten() for n, _ in m.named_parameters()])
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_noise_std_is_sigma_times_C():
    "Pure-noise update (empty batch) with C ≠ 1: each selected coordinate moves by N(0, (σC/(qN))²); σ alone is rejected."
    m = vgg_small(num_classes=5, width=8, norm="group"); masks = full_masks(m)
    sel = select_coordinates(m, masks, 0.5, "random", torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    sigma, C, qN = 1.5, 0.25, 4.0
    x, y = data(0)
    dp_sgd_step(m, x, y, C=C, sigma=sigma, lr=1.0, masks=masks, sel=sel, expected_batch=qN, generator=torch.Generator().manual_seed(2))
    d = torch.cat([(p.detach() - before[n])[sel[n]] for n, p in m.named_parameters()]).double().numpy()
    k = len(d)                                                            # Σ d² / s² ~ χ²(k) for the true std s
    assert k > 2000
    for s, should_pass in ((sigma * C / qN, True), (sigma / qN, False)):
        p = stats.chi2(k).cdf(float((d ** 2).sum()) / s ** 2)
        assert (min(p, 1 - p) > 1e-4) == should_pass, (s, p)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_plain_dp_sgd_is_a_one_liner(method):
    "Defaults: no pruning, every coordinate selected, qN = len(x), global generator; σ = 0 matches the per-example loop."
    m = tiny(9).double(); x, y = data(6, 9); x = x.double()
    masks = full_masks(m)
    ref = loop_update(m, x, y, masks, masks, 0.3, "selected", expected_batch=len(x))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    dp_sgd_step(m, x, y, C=0.3, sigma=0.0, lr=1.0, method=method)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], ref[n], rtol=1e-6, atol=1e-9)
    mid = {n: p.detach().clone() for n, p in m.named_parameters()}
    dp_sgd_step(m, x, y, C=0.3, sigma=1.0, lr=1.0)                       # with noise every coordinate moves
    assert all((p != mid[n]).all() for n, p in m.named_parameters())


def noise_free_update(make, method, *, C, clip_on="selected", prune=0.0, drop=0.0, drop_mode="random", chunk=256, n=9, seed=0):
    "The σ = 0 update of one float64 step (lr 0.7, qN 6.5) of `make()` with the given pruning and dropping, flattened."
    torch.manual_seed(seed)
    m = make().double()
    with torch.no_grad():                       # norm layers away from their γ = 1, β = 0 start, so that γ's use is tested
        for mod in m.modules():
            if isinstance(mod, torch.nn.GroupNorm): mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.5, 0.5)
    masks = prune_masks(m, prune, "random", seed=seed) if prune else full_masks(m); apply_masks(m, masks)
    sel = select_coordinates(m, masks, drop, drop_mode, torch.Generator().manual_seed(seed + 1))
    x, y = data(n, seed)
    w0 = torch.cat([p.detach().flatten() for p in m.parameters()])
    dp_sgd_step(m, x.double(), y, C=C, sigma=0.0, lr=0.7, masks=masks, sel=sel, expected_batch=6.5, clip_on=clip_on,
                chunk=chunk, method=method)
    return torch.cat([p.detach().flatten() for p in m.parameters()]) - w0


MODELS = {"vgg_group": lambda: vgg_small(num_classes=5, width=4, groups=2, norm="group"),
          "vgg_bias": lambda: vgg_small(num_classes=5, width=4, norm="none"),                      # conv biases, no norm
          "resnet_group": lambda: resnet_small(num_classes=5, width=4, groups=2, norm="group")}    # strided 1×1 shortcut convs


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("C, clip_on, prune, drop, drop_mode", [
    (0.05, "selected", 0.0, 0.0, "random"),     # every example clipped, nothing masked: ghost norms allowed
    (3.0, "selected", 0.0, 0.0, "random"),      # C above most norms: some examples unclipped
    (0.2, "selected", 0.6, 0.5, "random"),      # unstructured pruning + coordinate dropping: explicit products only
    (0.2, "full", 0.6, 0.5, "magnitude"),       # norm over the live (unpruned) coordinates, update on S
    (0.2, "selected", 0.0, 0.6, "layer"),       # whole tensors dropped: left out of the per-example pass
    (0.2, "full", 0.0, 0.6, "layer")])          # … but still counted in the full norm
def test_book_keeping_equals_vmap(model, C, clip_on, prune, drop, drop_mode):
    "The book-keeping step and the vmap reference give the same noise-free update, batch split into chunks or not."
    kw = dict(C=C, clip_on=clip_on, prune=prune, drop=drop, drop_mode=drop_mode)
    want = noise_free_update(MODELS[model], "vmap", **kw)
    assert want.abs().max() > 0
    for chunk in (4, 256):
        torch.testing.assert_close(noise_free_update(MODELS[model], "bk", chunk=chunk, **kw), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel, stride, padding, dilation, hw", [
    (3, 1, 1, 1, (8, 8)), ((3, 2), (2, 1), (2, 0), (1, 2), (9, 7)), (1, 2, 0, 1, (7, 8)), (5, 3, 2, 1, (11, 10))])
def test_input_gram_and_ghost_norm_match_unfolded_float64(kernel, stride, padding, dilation, hw):
    """The conv input gram (a_t · a_s) summed over kernel offsets, column offsets first, equals the gram of the unfolded
    receptive fields, for non-square kernels, strides, paddings and dilations; the ghost norm equals the norm of the
    explicit per-example product."""
    g = torch.Generator().manual_seed(7)
    m = torch.nn.Conv2d(3, 4, kernel, stride, padding, dilation, bias=False).double()
    a = torch.randn(5, 3, *hw, generator=g, dtype=torch.float64)
    A = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)      # (B, T, C·kh·kw)
    torch.testing.assert_close(input_gram(m, a), A @ A.transpose(1, 2), rtol=1e-12, atol=1e-12)
    out = m(a)
    b = torch.randn(out.shape, generator=g, dtype=torch.float64)
    explicit = b.flatten(2) @ A                                                          # (B, P, C·kh·kw) per example
    torch.testing.assert_close(ghost_sq_norm(m, a, b), explicit.flatten(1).square().sum(1), rtol=1e-12, atol=1e-12)


class OpCalls(TorchDispatchMode):
    "Counts calls of the given aten ops."
    def __init__(self, *ops): super().__init__(); self.ops, self.n = ops, 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket in self.ops
        return func(*args, **(kwargs or {}))


def test_group_norm_per_example_gradients_from_its_own_backward():
    """With `norms`, book_keep runs each GroupNorm so that its one backward call also gives the per-example γ and β
    gradients: they equal the closed form that normalises anew, and the gradient it passes down equals the plain one, in
    float64 with a large mean (μ/σ ≈ 30) and groups of several channels; a GroupNorm on the raw input (at the frontier,
    nothing below it needs a gradient) is still differentiated; and a backward makes one GroupNorm call per layer."""
    torch.manual_seed(0)
    m = torch.nn.GroupNorm(3, 12).double()
    with torch.no_grad(): m.weight.normal_(); m.bias.normal_()
    conv = torch.nn.Conv2d(2, 12, 3, padding=1).double()
    net = torch.nn.Sequential(conv, m, torch.nn.Flatten(), torch.nn.Linear(12 * 25, 4).double())
    with torch.no_grad(): conv.bias.fill_(30.0)
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    acts, grads = book_keep(net, x, y, [conv, m])                            # the plain backward: inputs and output gradients
    norms = {}
    _, folded = book_keep(net, x, y, [conv, m], norms=norms)
    assert set(norms) == {m} and m not in folded and conv(x).mean() > 25
    want = norm_per_example(m, acts[m], grads[m])
    for a, b in zip(norms[m], want): torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(folded[conv], grads[conv], rtol=1e-12, atol=1e-13)   # ∂ℓ/∂(conv output) through the folded norm
    assert want[0].abs().max() > 0 and m.forward.__func__ is torch.nn.GroupNorm.forward   # the module's own forward is back
    first = torch.nn.Sequential(torch.nn.GroupNorm(2, 2), torch.nn.Flatten(), torch.nn.Linear(50, 4)).double()
    a1, g1 = book_keep(first, x, y, [first[0]])
    n1 = {}; book_keep(first, x, y, [first[0]], norms=n1)
    for a, b in zip(n1[first[0]], norm_per_example(first[0], a1[first[0]], g1[first[0]])): torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    net = tiny(); xb, yb = data(5)
    with OpCalls(torch.ops.aten.native_group_norm_backward) as calls:
        clipped_grad_sum(net, xb, yb, [n for n, _ in net.named_parameters()], 1.0, {n: None for n, _ in net.named_parameters()})
    assert calls.n == sum(isinstance(mod, torch.nn.GroupNorm) for mod in net.modules()) == 6



def test_small_per_example_tensors_share_one_norm_and_one_product():
    """Biases and norm parameters (≤ SMALL_PER_EXAMPLE numbers an example) get one norm and one product for all, masked
    or not; each larger explicit one its own."""
    net = tiny(); xb, yb = data(5)
    names = [n for n, _ in net.named_parameters()]
    shapes = dict(net.named_parameters())
    for on in ({n: None for n in names}, select_coordinates(net, full_masks(net), 0.5, "random", torch.Generator().manual_seed(0))):
        on = {n: None if m is None or bool(m.all()) else m for n, m in on.items()}
        with OpCalls(torch.ops.aten.linalg_vector_norm) as norms, OpCalls(torch.ops.aten.mm) as mms:
            _, got = clipped_grad_sum(net, xb, yb, names, 1.0, on, ghost="never")
        big = [n for n in names if shapes[n].numel() > SMALL_PER_EXAMPLE]
        assert 0 < len(big) < len(names) and norms.n == len(big) + 1, (norms.n, len(big))
        assert mms.n <= len(big) + 1 + 2                                    # + the head's own forward and input gradient
        want = sq_norms({n: g if on[n] is None else g * on[n] for n, g in per_sample_grads(net, xb, yb, names).items()}, len(xb)).sqrt()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_ghost_norm_is_used_only_on_whole_tensors():
    """A partial mask cannot restrict the ghost identity: with the ghost norm forced wherever allowed, the norms are still
    those of the masked gradients (float64 reference), and they differ from the unmasked norms."""
    m = tiny(5).double(); x, y = data(7, 5); x = x.double()
    names = [n for n, _ in m.named_parameters()]
    gs = per_sample_grads(m, x, y, names)
    on = prune_masks(m, 0.5, "random", seed=5)
    on["head.fc.weight"] = torch.ones_like(on["head.fc.weight"])             # one whole weight: the ghost norm is allowed there
    kinds = mask_kinds(on)
    assert kinds["head.fc.weight"] == "all" and kinds["blocks.0.conv.weight"] == "part"
    _, norms = clipped_grad_sum(m, x, y, names, 1.0, {n: None if kinds[n] == "all" else on[n] for n in names}, "always")
    ref = sq_norms({n: g * on[n] for n, g in gs.items()}, len(x)).sqrt()
    torch.testing.assert_close(norms, ref, rtol=1e-10, atol=0)
    assert (sq_norms(gs, len(x)).sqrt() > 1.05 * ref).all()


def test_book_keeping_forms_no_parameter_gradient_and_skips_dropped_layers():
    m = tiny(6); x, y = data(5, 6)
    convs = [m.blocks[3].conv, m.blocks[5].conv]
    calls = []
    m.blocks[0].conv.register_full_backward_hook(lambda *a: calls.append(0))   # before the earliest needed layer
    acts, bs = book_keep(m, x, y, convs)
    assert all(p.grad is None for p in m.parameters())
    assert calls == []                                                       # the backward stopped at blocks.3
    assert set(bs) == set(convs) and bs[convs[0]].shape == (5, 8, 8, 8)


def test_frozen_parameters_are_trained_alike():
    "Parameters with requires_grad=False get the same DP update by both methods (the masks, not requires_grad, decide)."
    def make():
        m = vgg_small(num_classes=5, width=4, groups=2, norm="group")
        for p in m.blocks[0].parameters(): p.requires_grad_(False)
        return m
    d = noise_free_update(make, "bk", C=0.1)
    torch.testing.assert_close(d, noise_free_update(make, "vmap", C=0.1), rtol=1e-9, atol=1e-12)
    assert d[:36].abs().max() > 0                                             # blocks.0.conv.weight moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_has_no_host_sync_on_cuda():
    "After the first step has seen the masks, a step on the GPU never waits for the device."
    dev = torch.device("cuda")
    m = vgg_small(num_classes=5, width=8, norm="group").to(dev); masks = prune_masks(m, 0.5)
    sel = select_coordinates(m, masks, 0.0)
    x, y = (t.to(dev) for t in data(32))
    g = torch.Generator(device=dev).manual_seed(0)
    kw = dict(C=1.0, sigma=1.0, lr=0.1, masks=masks, sel=sel, expected_batch=30.0, generator=g, chunk=16)
    dp_sgd_step(m, x, y, **kw); torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try: dp_sgd_step(m, x, y, **kw)
    finally: torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("method", ["bk", "vmap"])
def test_pads_weighted_zero_leave_the_update_of_the_unpadded_batch(method):
    """dp_sgd_step on a batch padded with large random examples of weight 0 makes the unpadded batch's update (float64,
    50 % pruned, 50 % random dropping, C below the norms, chunks that split pads and examples); weights of the wrong shape are refused."""
    def update(pad):
        m = tiny(2).double(); masks = prune_masks(m, 0.5, "random"); apply_masks(m, masks)
        sel = select_coordinates(m, masks, 0.5, "random", torch.Generator().manual_seed(3))
        x, y = data(11, seed=4); x = x.double()
        w = None
        if pad:
            g = torch.Generator().manual_seed(5)
            x, y = torch.cat([x, 50 * torch.randn(pad, *x.shape[1:], generator=g, dtype=x.dtype)]), torch.cat([y, torch.zeros(pad, dtype=y.dtype)])
            w = torch.cat([torch.ones(11), torch.zeros(pad)]).double()
        w0 = torch.cat([p.detach().flatten() for p in m.parameters()])
        dp_sgd_step(m, x, y, C=0.05, sigma=0.0, lr=0.5, masks=masks, sel=sel, expected_batch=10.0, chunk=6, method=method, weight=w)
        return torch.cat([p.detach().flatten() for p in m.parameters()]) - w0
    d = update(0)
    assert d.abs().max() > 0
    torch.testing.assert_close(update(5), d, rtol=1e-10, atol=1e-13)
    m = tiny()
    with pytest.raises(ConfigError, match="weight"):
        dp_sgd_step(m, *data(4), C=1.0, sigma=0.0, lr=0.1, weight=torch.ones(3))


def test_capture_path_replays_the_recorded_step_from_refilled_buffers_after_an_undone_warm_up():
    """GraphedDPStep's capture path on a CPU, its graph a stand-in that replays the recorded call: with the warm-up's
    updates undone and the static buffers refilled before each replay, every step's update is the unpadded step's."""
    from types import SimpleNamespace
    class Replayed(GraphedDPStep):
        def _capture(self, step):
            self._warm_up(step)
            return SimpleNamespace(replay=step)
    def run(graphed):
        m = tiny(2).double(); masks = prune_masks(m, 0.5, "random"); apply_masks(m, masks)
        g_sel, g_data = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
        kw = dict(C=0.3, sigma=0.0, lr=0.5, masks=masks, expected_batch=10.0, chunk=8)
        step = Replayed(m, pad_to=8, capture=False, **kw) if graphed else None
        if graphed: step.capture = True                                    # the capture path, with the stand-in graph
        for b in (10, 13, 6, 12):                                           # padded to 16, 16, 8, 16
            x = torch.rand(b, 1, 16, 16, generator=g_data, dtype=torch.float64)
            y = torch.randint(0, 5, (b,), generator=g_data)
            sel = select_coordinates(m, masks, 0.5, "random", g_sel)
            step(x, y, sel) if graphed else dp_sgd_step(m, x, y, sel=sel, **kw)
        return torch.cat([p.detach().flatten() for p in m.parameters()]), step
    (a, step), (b, _) = run(True), run(False)
    assert sorted(k[0] for k in step.entries) == [8, 16] and all(e.graph is not None for e in step.entries.values())
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_step_on_cuda_replays_the_eager_padded_step_with_fresh_noise_and_no_sync():
    """GraphedDPStep captured on a GPU: without noise its replays make the eager padded step's update; with noise two
    replays of the same batch from the same weights differ (the generator advances); a replay never waits for the device;
    train_dp(graphs=True) trains through it."""
    import copy
    dev = torch.device("cuda")
    base = vgg_small(num_classes=5, width=8, norm="group").to(dev); masks = prune_masks(base, 0.5); apply_masks(base, masks)
    batches = [tuple(t.to(dev) for t in data(b, seed=b)) for b in (30, 21, 33)]     # padded to 32, 32, 64
    def run(capture, sigma, model):
        step = GraphedDPStep(model, C=1.0, sigma=sigma, lr=0.1, masks=masks, expected_batch=28.0, chunk=16, pad_to=32,
                             generator=torch.Generator(device=dev).manual_seed(1), capture=capture)
        g_sel = torch.Generator().manual_seed(0)
        for x, y in batches: step(x, y, select_coordinates(model, masks, 0.5, "random", g_sel))
        return step
    graphed, eager = copy.deepcopy(base), copy.deepcopy(base)
    step = run(True, 0.0, graphed); run(False, 0.0, eager)
    assert sorted(k[0] for k in step.entries) == [32, 64] and all(e.graph is not None for e in step.entries.values())
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    noisy = copy.deepcopy(base); step = run(True, 1.0, noisy)
    x, y = batches[0]; sel = select_coordinates(noisy, masks, 0.0)           # the masks themselves: a new entry
    params = list(noisy.parameters()); saved = [p.detach().clone() for p in params]
    w0 = torch.cat([p.detach().flatten() for p in params])
    step(x, y, sel); w1 = torch.cat([p.detach().flatten() for p in params])  # captured, then replayed
    with torch.no_grad(): torch._foreach_copy_(params, saved)
    torch.cuda.synchronize(); torch.cuda.set_sync_debug_mode("error")
    try: step(x, y, sel)                                                      # the same entry: a replay only
    finally: torch.cuda.set_sync_debug_mode("default")
    w2 = torch.cat([p.detach().flatten() for p in params])
    moved = (w1 != w0) & (w2 != w0)
    assert moved.float().mean() > 0.3 and not torch.equal(w1[moved], w2[moved])   # fresh noise in every replay
    m = vgg_small(num_classes=5, width=8, norm="group").to(dev)                  # and through the trainer
    hist, summary = train_dp(m, *data(120, seed=7), DPConfig(epsilon=3.0, q=0.1, epochs=0.5, log_every=5), graphs=True)
    assert summary["steps"] == 5 and all(torch.isfinite(p).all() for p in m.parameters())


def test_layer_outside_the_loss_gets_zero_gradient():
    "A parameterised layer the forward never uses (or whose output never reaches the loss) counts zero, as in vmap."
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.spare = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 5), torch.nn.Linear(4, 4)
        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            self.spare(h)                                                     # computed, never reaches the loss
            return self.fc(h)
    d = noise_free_update(Net, "bk", C=0.5)
    torch.testing.assert_close(d, noise_free_update(Net, "vmap", C=0.5), rtol=1e-9, atol=1e-12)
    assert d.abs().max() > 0


def test_unsupported_layers_fall_back_to_vmap():
    "A grouped conv: method='bk' names it and the fix; 'auto' runs the vmap path and equals it."
    make = lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Flatten(),
                                       torch.nn.Linear(4 * 12 * 12, 5))
    with pytest.raises(ConfigError, match="method='vmap'"): noise_free_update(make, "bk", C=0.5)
    torch.testing.assert_close(noise_free_update(make, "auto", C=0.5), noise_free_update(make, "vmap", C=0.5))
    with pytest.raises(ConfigError, match="method="): noise_free_update(make, "ghost", C=0.5)


def test_noise_is_one_flat_draw_from_the_generator():
    """Empty batch: the update is −lr·σC/(qN)·ξ ⊙ S with ξ the next Σ numel normals of the generator, split in parameter
    order."""
    m = tiny(2); masks = prune_masks(m, 0.5); apply_masks(m, masks)
    sel = select_coordinates(m, masks, 0.5, "layer", torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in m.parameters()]
    x, y = data(0)
    dp_sgd_step(m, x, y, C=0.5, sigma=2.0, lr=0.3, masks=masks, sel=sel, expected_batch=4.0, generator=torch.Generator().manual_seed(9))
    live = [n for n, _ in m.named_parameters() if sel[n].any()]
    xi = torch.randn(sum(sel[n].numel() for n in live), generator=torch.Generator().manual_seed(9)).split([sel[n].numel() for n in live])
    want = dict(zip(live, xi))
    for (n, p), b in zip(m.named_parameters(), before):
        exp = -0.3 * 2.0 * 0.5 / 4.0 * want[n].view_as(p) * sel[n] if n in want else torch.zeros_like(p)
        torch.testing.assert_close(p.detach() - b, exp, rtol=1e-5, atol=1e-7)


def test_mask_kinds_cached_until_changed():
    m = tiny(); mk = prune_masks(m, 0.5)
    k = mask_kinds(mk)
    assert k["blocks.0.conv.weight"] == "part" and k["blocks.0.norm.weight"] == "all"
    mk["blocks.0.conv.weight"].zero_()                                         # in place: the cached kind must not be reused
    assert mask_kinds(mk)["blocks.0.conv.weight"] == "none"


@pytest.mark.parametrize("mode", ["random", "layer", "magnitude"])
def test_selection_kinds_known_without_read_back(mode, monkeypatch):
    "select_coordinates records its selections' kinds (exact or the always-safe `part`), so the step reads nothing back."
    m = tiny(); masks = prune_masks(m, 0.5); mask_kinds(masks)
    sel = select_coordinates(m, masks, 0.5, mode, torch.Generator().manual_seed(0))
    def no_read_back(self): raise AssertionError("read back")
    monkeypatch.setattr(torch.Tensor, "tolist", no_read_back)
    k = mask_kinds(sel)
    for n, t in sel.items():
        exact = "all" if t.all() else "part" if t.any() else "none"
        assert k[n] == exact or (k[n] == "part" and mode != "layer"), (n, k[n], exact)   # `part` is safe for any draw


def test_full_clip_needs_masks():
    m, (x, y) = tiny(), data(4)
    gs = per_sample_grads(m, x, y, [n for n, _ in m.named_parameters()])
    with pytest.raises(ConfigError, match="masks"): clip_per_sample(gs, full_masks(m), 1.0, "full")


@pytest.mark.parametrize("args, msg", [((1.5, 1.0, 10, 1e-5), "q=1.5"), ((0.0, 1.0, 10, 1e-5), "q=0.0"),
                                       ((0.05, 0.0, 10, 1e-5), "σ=0.0"), ((0.05, -1.0, 10, 1e-5), "σ=-1.0"),
                                       ((0.05, 1.0, 0, 1e-5), "steps=0"), ((0.05, 1.0, math.inf, 1e-5), "steps=inf"),
                                       ((0.05, 1.0, 10, 1.0), "δ=1.0")])
def test_epsilon_rejects_bad_arguments(args, msg):
    for acc in ("rdp", "prv"):
        with pytest.raises(ConfigError, match=msg): epsilon(*args, accountant=acc)
    with pytest.raises(ConfigError, match="q=1.5"): noise_for_epsilon(2.0, 1e-5, 1.5, 10)


def test_noise_only_on_selected_coordinates():
    "With all examples' gradients zeroed out (empty batch) the update is pure noise: it must sit exactly on S."
    m = tiny(); masks = prune_masks(m, 0.5); apply_masks(m, masks)
    sel = select_coordinates(m, masks, 0.6, "random", torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, y = data(0)
    dp_sgd_step(m, x, y, C=1.0, sigma=2.0, lr=1.0, masks=masks, sel=sel, expected_batch=10.0, generator=torch.Generator().manual_seed(2))
    moved = {n: (p.detach() != before[n]) for n, p in m.named_parameters()}
    for n in moved:
        assert torch.equal(moved[n], sel[n]), n                     # changed exactly on S (noise is a.s. non-zero)
    # the noise has std σC/(qN) = 2·1/10 per selected coordinate
    d = torch.cat([(p.detach() - before[n])[sel[n]] for n, p in m.named_parameters()])
    assert abs(float(d.std()) - 0.2) < 0.02 and abs(float(d.mean())) < 0.02


@pytest.mark.parametrize("mode", ["random", "layer", "magnitude"])
def test_pruned_and_dropped_coordinates_unchanged(mode):
    m = tiny(1); masks = prune_masks(m, 0.6, "random", seed=4); apply_masks(m, masks)
    sel = select_coordinates(m, masks, 0.5, mode, torch.Generator().manual_seed(5))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, y = data(16, 1)
    dp_sgd_step(m, x, y, C=1.0, sigma=1.0, lr=0.5, masks=masks, sel=sel, expected_batch=16, generator=torch.Generator().manual_seed(6))
    n_moved = 0
    for n, p in m.named_parameters():
        assert torch.equal(p.detach()[~sel[n]], before[n][~sel[n]]), n
        assert (p.detach()[~masks[n]] == 0).all()                   # pruned weights stay exactly zero
        n_moved += int((p.detach() != before[n]).sum())
    assert n_moved == int(sum(s.sum() for s in sel.values()))


def test_training_keeps_pruned_weights_zero_and_full_clip_mode_runs():
    m = tiny(2); masks = prune_masks(m, 0.5)
    x, y = data(60, 2)
    for clip_on in ("selected", "full"):
        train_dp(m, x, y, DPConfig(epsilon=5.0, q=0.2, epochs=1.0, drop=0.5, clip_on=clip_on, log_every=100), masks)
        for n, p in m.named_parameters(): assert (p.detach()[~masks[n]] == 0).all()


def test_poisson_sampling():
    "Batch sizes are Bin(N, q) (χ² goodness of fit), and membership is independent across examples and steps."
    g = torch.Generator().manual_seed(0)
    N, q, T = 200, 0.1, 3000
    members = torch.zeros(T, N, dtype=torch.bool)
    for t in range(T): members[t, poisson_batch(N, q, g)] = True
    sizes = members.sum(1).numpy()
    ks = np.arange(8, 33)                                             # bins with enough expected counts; tails lumped
    obs = np.array([(sizes <= ks[0]).sum(), *[(sizes == k).sum() for k in ks[1:-1]], (sizes >= ks[-1]).sum()])
    pmf = stats.binom(N, q)
    exp = T * np.array([pmf.cdf(ks[0]), *pmf.pmf(ks[1:-1]), pmf.sf(ks[-1] - 1)])
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert abs(members.float().mean().item() - q) < 0.003             # every example at rate q
    c = np.corrcoef(members[:, 0].numpy(), members[:, 1].numpy())[0, 1]
    assert abs(c) < 0.07                                              # independent examples
    assert sizes.std() > 3                                            # not a fixed-size batch (Bin var = 18)


def test_rdp_accountant_value():
    assert abs(epsilon(0.04, 1.5, 2250, 1e-5, "rdp") - 7.3291) < 1e-3
    assert epsilon(0.04, 1.5, 2250, 1e-5, "prv") < epsilon(0.04, 1.5, 2250, 1e-5, "rdp")


def test_noise_for_epsilon_round_trip():
    for acc in ("rdp", "prv"):
        s = noise_for_epsilon(2.0, 1e-5, 0.05, 100, acc)
        assert 1.97 < epsilon(0.05, s, 100, 1e-5, acc) <= 2.0 + 1e-6
    assert noise_for_epsilon(math.inf, 1e-5, 0.05, 100) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_trainer_reports_accountants_epsilon(accountant):
    m = tiny(3); x, y = data(80, 3)
    cfg = DPConfig(epsilon=4.0, q=0.1, epochs=1.2, log_every=4, accountant=accountant, drop=0.3)
    hist, s = train_dp(m, x, y, cfg)
    assert s["steps"] == 12 and s["q"] == 0.1 and hist.step.tolist() == [4, 8, 12]
    for r in hist.itertuples():
        assert r.epsilon == pytest.approx(epsilon(s["q"], s["sigma"], r.step, cfg.delta, accountant), rel=1e-6)
    assert s["epsilon"] <= 4.0 + 1e-6 and s["epsilon"] > 3.8


def test_batchnorm_rejected_with_groupnorm_hint():
    with pytest.raises(ConfigError, match="GroupNorm"): check_dp_model(resnet_small(norm="batch"))
    x, y = data(20)
    with pytest.raises(ConfigError, match="norm='group'"): train_dp(vgg_small(width=4, groups=2), x, y, DPConfig())
    check_dp_model(vgg_small(width=4, groups=2, norm="group"))


def test_structured_prepruning_is_physically_smaller_and_keeps_largest_filters():
    m = vgg_small(num_classes=5, width=8, norm="group")
    l1 = m.blocks[0].conv.weight.detach().abs().sum((1, 2, 3))
    s = prune_structured(m, 0.5)
    assert s.config["channels"] == [4, 4, 8, 8, 16, 16]
    kept = set(torch.topk(l1, 4).indices.tolist())
    got = {i for i in range(8) if any(torch.equal(s.blocks[0].conv.weight[j], m.blocks[0].conv.weight[i]) for j in range(4))}
    assert got == kept
    with pytest.raises(ConfigError): prune_structured(m, 1.0)


def test_selection_modes_and_density():
    m = tiny(); masks = prune_masks(m, 0.5, "magnitude")
    assert 0.5 < density(masks) < 0.53
    with pytest.raises(ConfigError): select_coordinates(m, masks, 0.5, "private-topk")
    s = select_coordinates(m, masks, 0.75, "magnitude")
    p = dict(m.named_parameters())["blocks.3.conv.weight"].detach().abs()
    k = s["blocks.3.conv.weight"]
    assert p[k].min() >= p[masks["blocks.3.conv.weight"] & ~k].max()  # the largest live |θ| are selected


def test_config_prune_is_applied_when_no_masks_given():
    m = tiny(4); x, y = data(40, 4)
    train_dp(m, x, y, DPConfig(epsilon=5.0, q=0.25, epochs=1.0, prune=0.6, prune_criterion="random", log_every=100))
    w = m.blocks[2].conv.weight.detach()
    assert abs(float((w == 0).float().mean()) - 0.6) < 0.01
