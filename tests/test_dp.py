"DP-SGD with pre-pruning and gradient dropping (effworkbench.dp): clipping, noise placement, masks, sampling, accounting."
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

pytest.importorskip("opacus")
from effworkbench.core import ConfigError
from effworkbench.dp import (DPConfig, apply_masks, check_dp_model, clip_per_sample, density, dp_sgd_step, epsilon,
                             full_masks, noise_for_epsilon, per_sample_grads, poisson_batch, prune_masks,
                             prune_structured, select_coordinates, train_dp)
from effworkbench.vision import resnet_small, vgg_small

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
    clipped, norms = clip_per_sample(gs, sel, C, clip_on)
    after = sq_norms(clipped, len(x)).sqrt()
    assert (after <= C + 1e-5).all()
    sel_norm = sq_norms({n: g * sel[n] for n, g in gs.items()}, len(x)).sqrt()
    full_norm = sq_norms(gs, len(x)).sqrt()
    ref = sel_norm * torch.clamp(C / (sel_norm if clip_on == "selected" else full_norm), max=1.0)     # float64 reference
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-6)
    assert (after[:1] < C).all() and (after[-1] > 0.99 * C if clip_on == "selected" else after[-1] < 0.9 * C)
    for n, g in clipped.items(): assert (g[:, ~sel[n]] == 0).all()     # nothing off the selection


def test_noise_only_on_selected_coordinates():
    "With all examples' gradients zeroed out (empty batch) the update is pure noise: it must sit exactly on S."
    m = tiny(); masks = prune_masks(m, 0.5); apply_masks(m, masks)
    sel = select_coordinates(m, masks, 0.6, "random", torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, y = data(0)
    dp_sgd_step(m, x, y, masks, sel, C=1.0, sigma=2.0, lr=1.0, expected_batch=10.0, generator=torch.Generator().manual_seed(2))
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
    dp_sgd_step(m, x, y, masks, sel, C=1.0, sigma=1.0, lr=0.5, expected_batch=16, generator=torch.Generator().manual_seed(6))
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
