"Early exits: the multi-exit forward, the regimes (disjoint leaves the backbone bit-identical), threshold exiting and its measured FLOPs against the counter, budgets, rank and landscape diagnostics."
import numpy as np
import pandas as pd
import pytest
import torch

from effworkbench.core import ConfigError
from effworkbench.vision.early_exit import (REGIMES, EarlyExitConfig, accuracy_at_budgets, base_macs, block_ranks, exit_macs,
                                     exit_probs, loss_surface, multi_exit, multi_exit_loss, simulate_exits, threshold_curve,
                                     train_regime)
from effworkbench.vision.models import MacCounter, count_macs

torch.set_num_threads(1)


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("arch,kw,blocks", [("vgg", {"width": 4, "groups": 2}, [0, 2, 4]),
                                             ("resnet", {"width": 4, "norm": "group", "groups": 2}, [0, 1]),
                                             ("vit", {"dim": 16, "depth": 3, "heads": 2}, [1])])
def test_forward_exits_and_last_is_backbone(arch, kw, blocks):
    torch.manual_seed(0)
    m = multi_exit(arch, blocks, **kw).eval()
    x, _ = data(4)
    with torch.no_grad(): outs = m(x)
    assert len(outs) == len(blocks) + 1 and all(o.shape == (4, 10) for o in outs)
    with torch.no_grad(): assert torch.allclose(outs[-1], m.backbone(x), atol=1e-6)


def test_bad_exit_blocks():
    with pytest.raises(ConfigError, match="exit_blocks"): multi_exit("vgg", [5], width=4, groups=2)
    with pytest.raises(ConfigError, match="exit_blocks"): multi_exit("vgg", [1, 1], width=4, groups=2)


def test_disjoint_leaves_backbone_bit_identical():
    torch.manual_seed(0)
    x, y = data(96)
    m = multi_exit("vgg", [1, 3], width=4, groups=2)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    train_regime(m, "disjoint", x, y, epochs=2, backbone_epochs=1, batch_size=32)
    after_phase1 = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    assert any(not torch.equal(before[k], after_phase1[k]) for k in before)       # phase 1 did train the backbone
    heads = [p.clone() for p in m.heads.parameters()]
    train_regime(m, "disjoint", x, y, epochs=2, backbone_epochs=0, batch_size=32)  # heads only
    assert all(torch.equal(after_phase1[k], v) for k, v in m.backbone.state_dict().items())   # incl. BN running stats
    assert any(not torch.equal(a, b) for a, b in zip(heads, m.heads.parameters()))
    assert all(p.requires_grad for p in m.backbone.parameters())                   # unfrozen afterwards


def test_joint_and_mixed_change_everything_and_phases():
    x, y = data(64)
    for regime, phases in (("joint", ["all"] * 2), ("mixed", ["backbone", "all"])):
        torch.manual_seed(0)
        m = multi_exit("vgg", [1], width=4, groups=2)
        w0, h0 = m.backbone.blocks[0].conv.weight.clone(), m.heads[0].fc.weight.clone()
        h = train_regime(m, regime, x, y, epochs=2, batch_size=32)
        assert h.phase.tolist() == phases and h.regime.eq(regime).all()
        assert not torch.equal(w0, m.backbone.blocks[0].conv.weight) and not torch.equal(h0, m.heads[0].fc.weight)
    with pytest.raises(ConfigError, match="regime"): train_regime(m, "alternating", x, y, 2)


def test_exit_costs_against_hand_counts():
    m = multi_exit("vgg", [0, 3], width=8)
    per = count_macs(m.backbone).set_index("layer").macs
    c = exit_macs(m)
    assert c[0] == per["blocks.0.conv"] + 8 * 16 * 10                               # head: 8 channels pooled to 4×4
    assert c[1] == per[[f"blocks.{i}.conv" for i in range(4)]].sum() + 8 * 16 * 10 + 16 * 16 * 10
    assert c[2] == base_macs(m) + 8 * 16 * 10 + 16 * 16 * 10 and base_macs(m) == per.sum()


@pytest.mark.parametrize("arch,kw", [("vgg", {"width": 8}), ("vit", {"dim": 16, "depth": 3, "heads": 2})])
def test_measured_flops_of_early_exited_batch_match_counter(arch, kw):
    torch.manual_seed(0)
    m = multi_exit(arch, [0, 1], **kw).eval()
    with torch.no_grad(): m.heads[1].fc.weight.mul_(30)                          # a confident second head
    x, _ = data(80, seed=1)
    c = exit_macs(m)
    conf = exit_probs(m, x)[:-1].max(-1).values.flatten()
    used, mixed = set(), False
    for tau in [*torch.quantile(conf, torch.linspace(0.05, 0.95, 10)).tolist(), 2.0]:
        with MacCounter(m) as mc: pred, where = m.early_exit(x, tau)
        assert mc.total == pytest.approx(float(c[where.numpy()].sum()), rel=1e-9)
        assert torch.equal(where, simulate_exits(exit_probs(m, x), tau))
        used |= set(where.tolist()); mixed |= len(where.unique()) > 1
    assert used == {0, 1, 2} and mixed                                            # every exit taken, batches split


def test_threshold_curve_and_budgets():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 50, 10) * 3, -1)
    y = torch.randint(0, 10, (50,))
    costs, base = np.array([1.0, 2.0, 4.2]), 4.0
    cv = threshold_curve(probs, y, costs, base, [0.0, 0.5, 0.9, 2.0])
    assert cv.macs.iloc[0] == 1.0 and cv.macs.iloc[-1] == pytest.approx(4.2) and cv.macs.is_monotonic_increasing
    e = simulate_exits(probs, 0.5)
    ref_acc = float(np.mean([int(probs[int(k), i].argmax()) == int(y[i]) for i, k in enumerate(e)]))
    assert cv.accuracy.iloc[1] == pytest.approx(ref_acc)
    b = accuracy_at_budgets(pd.DataFrame({"flops_frac": [0.3, 0.6, 1.05], "accuracy": [0.5, 0.8, 0.9]}))
    assert np.isnan(b[0.25]) and b[0.5] == 0.5 and b[0.75] == 0.8 and b[1.0] == 0.8


def test_block_ranks_detects_low_rank():
    torch.manual_seed(0)
    m = multi_exit("vgg", [1], width=4, groups=2)
    v = torch.randn(1, 4, 32, 32)
    class Rank2(torch.nn.Module):
        def forward(self, h): return h.mean((1, 2, 3), keepdim=True) * v + h.amax((1, 2, 3), keepdim=True) * v.flip(-1)
    m.backbone.blocks[0] = Rank2()
    x, _ = data(40)
    r = block_ranks(m, x)
    assert r["rank"].iloc[0] == 2 and r["rank"].iloc[1] > 2 and (r.eff_rank <= r.max_rank).all()


def test_loss_surface_center_and_restore():
    torch.manual_seed(0)
    m = multi_exit("vgg", [1], width=4, groups=2).eval()
    x, y = data(32)
    w = [p.clone() for p in m.parameters()]
    s = loss_surface(m, x, y, [-1.0, 0.0, 1.0], [0.0, 0.5])
    with torch.no_grad(): l0 = float(multi_exit_loss(m, x, y))
    assert len(s) == 6 and s[(s.alpha == 0) & (s.beta == 0)].loss.item() == pytest.approx(l0, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(w, m.parameters()))
    assert s.loss.max() > l0                                                       # moving away costs loss somewhere


def test_config_presets():
    c = EarlyExitConfig.for_preset("medium")
    assert c.epochs == 10 and c.backbone_frac == 0.5 and REGIMES == ("disjoint", "joint", "mixed")


def test_multi_exit_with_colour_input():
    "in_channels = 3 (every other test uses 1): the model takes RGB, and only the first convolution's MACs grow (×3)."
    m1 = multi_exit("vgg", [0, 2], width=4, groups=2).eval()
    m3 = multi_exit("vgg", [0, 2], in_channels=3, width=4, groups=2).eval()
    with torch.no_grad(): outs = m3(torch.rand(2, 3, 32, 32))
    assert [o.shape for o in outs] == [(2, 10)] * 3
    d = exit_macs(m3) - exit_macs(m1)                                            # the same extra MACs at every exit
    first = next(mod for mod in m1.modules() if isinstance(mod, torch.nn.Conv2d))
    stem = 32 * 32 * first.kernel_size[0] * first.kernel_size[1] * first.out_channels   # one input channel, stride 1, same size
    assert np.allclose(d, 2 * stem), (d, stem)
