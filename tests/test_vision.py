"Vision models: shapes, norms, MAC counts against hand formulas and a float64 conv reference, physical channel removal, the CIFAR-10 binary reader, training."
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effworkbench.core import ConfigError
from effworkbench.data import DataError
from effworkbench.vision.models import (CIFAR10_RECORD, MacCounter, ViT, accuracy, cifar10_splits, count_macs, fit_classifier,
                                 layer_widths, make_model, conv_norm, n_params, prune_channels, read_cifar10_bin,
                                 resnet_small, total_macs, vgg_small, vit_small)

torch.set_num_threads(1)


def randomize_bn(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(); mod.running_var.uniform_(0.5, 2.0); mod.weight.normal_(); mod.bias.normal_()


@pytest.mark.parametrize("make", [vgg_small, resnet_small])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_cnn_shapes_and_norms(make, norm):
    m = make(num_classes=7, in_channels=3, width=8, norm=norm, groups=4)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    kinds = {type(x) for x in m.modules()}
    assert {"batch": nn.BatchNorm2d, "group": nn.GroupNorm}.get(norm, nn.Conv2d) in kinds
    if norm == "group": assert all(g.num_channels % 4 == 0 for g in m.modules() if isinstance(g, nn.GroupNorm))


def test_norm_errors():
    with pytest.raises(ConfigError, match="divisible"): conv_norm("group", 10, 4)
    with pytest.raises(ConfigError, match="norm="): conv_norm("layer", 8)
    with pytest.raises(ConfigError, match="use one of"): make_model("lenet")


def test_vit_blocks_and_patch_check():
    v = vit_small(num_classes=5, dim=32, depth=3, heads=4)
    h = v.stem(torch.randn(2, 1, 32, 32))
    assert h.shape == (2, 64, 32)
    assert len(v.blocks) == 3 and v.forward_blocks(h).shape == (2, 64, 32)
    with pytest.raises(ConfigError, match="multiple of patch"): ViT(img_size=30, patch=4)


def test_forward_blocks_composes():
    torch.manual_seed(0)
    for m in (vgg_small(width=4, groups=2), resnet_small(width=4, groups=2), vit_small(dim=16, depth=3, heads=2)):
        m.eval(); x = torch.randn(3, 1, 32, 32)
        h = m.forward_blocks(m.stem(x), 0, 1)
        assert torch.allclose(m.head(m.forward_blocks(h, 1)), m(x), atol=1e-6)


def test_macs_match_hand_counts():
    w = 8
    ch, hw = [w, w, 2 * w, 2 * w, 4 * w, 4 * w], [32, 32, 16, 16, 8, 8]
    assert total_macs(vgg_small(width=w)) == sum(9 * h * h * a * b for h, a, b in zip(hw, [1, *ch[:-1]], ch)) + 4 * w * 10
    # ResNet: stem, then per block conv1 (stride s) + conv2 + 1×1 projection where the shape changes
    r = 9 * 32 * 32 * 1 * w + 9 * 32 * 32 * (w * w + w * w) + 9 * 16 * 16 * (w * 2 * w + 4 * w * w) + 16 * 16 * w * 2 * w \
        + 9 * 8 * 8 * (2 * w * 4 * w + 16 * w * w) + 8 * 8 * 2 * w * 4 * w + 4 * w * 10
    assert total_macs(resnet_small(width=w)) == r
    D, T, L = 32, 64, 2
    assert total_macs(vit_small(dim=D, depth=L, heads=4)) == T * D * 16 + L * (8 * T * D * D + 2 * T * T * D) + D * 10


def test_conv_macs_against_direct_count():
    "The hook's conv count equals the multiply-adds of an explicit unfold-matmul conv in float64 (counted by its shapes)."
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, groups=1)
    x = torch.randn(2, 3, 9, 9)
    with MacCounter(conv) as c: y = conv(x)
    cols = F.unfold(x.double(), 3, padding=1, stride=2)                   # (B, C·k·k, L)
    ref = conv.weight.double().flatten(1) @ cols + conv.bias.double()[:, None]
    assert torch.allclose(y.double().flatten(2), ref, atol=1e-5)
    assert c.total == ref.shape[0] * ref.shape[2] * conv.weight[0].numel() * ref.shape[1]   # B · L · (C k k) · C_out


def test_counter_scales_with_batch_and_layers_are_named():
    m = vgg_small(width=4, groups=2)
    df = count_macs(m)
    assert list(df.layer) == [f"blocks.{i}.conv" for i in range(6)] + ["head.fc"]
    with MacCounter(m) as c: m(torch.zeros(5, 1, 32, 32))
    assert c.total == 5 * df.macs.sum()


@pytest.mark.parametrize("make", [vgg_small, resnet_small])
def test_prune_equals_masking_batchnorm(make):
    torch.manual_seed(1)
    m = make(width=8); randomize_bn(m); m.eval()
    keep = {n: torch.randperm(len(g.mask))[: 3 + i] for i, (n, g) in enumerate(m.gates().items())}
    for n, g in m.gates().items(): g.mask.zero_(); g.mask[keep[n]] = 1.0
    x = torch.randn(6, 1, 32, 32)
    small = prune_channels(m, keep)
    assert type(small) is type(m) and small.config != m.config
    assert torch.allclose(small(x), m(x), atol=1e-5)
    assert list(layer_widths(small).values()) == [3 + i for i in range(len(keep))]
    assert n_params(small) < n_params(m) and total_macs(small) < total_macs(m)
    fresh = type(m)(**small.config)                                     # a standard model of the new config
    assert sum(p.numel() for p in fresh.parameters()) == n_params(small)


def test_prune_groupnorm_divisibility_and_errors():
    m = vgg_small(width=8, norm="group", groups=4)
    with pytest.raises(ConfigError, match="multiple of the 4"): prune_channels(m, {"0": [0, 1, 2]})
    with pytest.raises(ConfigError, match="no prunable"): prune_channels(m, {"head": [0]})
    small = prune_channels(m, {"0": [0, 2, 4, 6], "5": list(range(8))})
    assert layer_widths(small)["0"] == 4 and layer_widths(small)["5"] == 8
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="VGG and ResNet"): prune_channels(vit_small(dim=16, depth=1, heads=2), {})


def test_cifar_binary_reader(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        r = rng.integers(0, 256, (4, CIFAR10_RECORD), dtype=np.uint8); r[:, 0] = rng.integers(0, 10, 4)
        r.tofile(tmp_path / f"{name}.bin")
    x, y = read_cifar10_bin(tmp_path / "data_batch_2.bin")
    raw = np.fromfile(tmp_path / "data_batch_2.bin", dtype=np.uint8).reshape(4, -1)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8
    assert int(x[3, 1, 31, 0]) == raw[3, 1 + 1024 + 31 * 32] and y.tolist() == raw[:, 0].tolist()   # green, row 31, col 0
    (tmp_path / "cifar-10-batches-bin").mkdir()
    for p in tmp_path.glob("*.bin"): p.rename(tmp_path / "cifar-10-batches-bin" / p.name)
    s = cifar10_splits(tmp_path, n_train=10)                             # the parent folder works too
    assert s.x_train.shape == (10, 3, 32, 32) and s.x_test.shape == (4, 3, 32, 32) and float(s.x_train.max()) <= 1
    bad = tmp_path / "bad.bin"; bad.write_bytes(bytes(CIFAR10_RECORD - 1))
    with pytest.raises(DataError, match="not a multiple"): read_cifar10_bin(bad)
    lab = tmp_path / "lab.bin"; r = np.zeros(CIFAR10_RECORD, np.uint8); r[0] = 12; r.tofile(lab)
    with pytest.raises(DataError, match="out of range"): read_cifar10_bin(lab)
    with pytest.raises(DataError, match="binary release"): cifar10_splits(tmp_path / "nowhere")
    for bad_n in [dict(n_train=-1), dict(n_test=0), dict(n_train=2.5)]:      # -1 used to drop the last record silently
        with pytest.raises(ConfigError, match="give a count >= 1"): cifar10_splits(tmp_path, **bad_n)


def test_fit_learns_separable_data():
    torch.manual_seed(0)
    x = torch.zeros(128, 1, 32, 32); y = torch.arange(128) % 2
    x[y == 1, :, :16] = 1.0; x += 0.1 * torch.randn_like(x)
    m = vgg_small(num_classes=2, width=4, groups=2)
    h = fit_classifier(m, x, y, epochs=3, batch_size=32)
    assert h.loss.iloc[-1] < h.loss.iloc[0] and accuracy(m, x, y) > 0.9
    with pytest.raises(ConfigError, match="optimizer"): fit_classifier(m, x, y, optimizer="lion")


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_conv_macs_are_the_sum_of_its_groups(groups):
    "groups ≠ 1 (the direct count above uses 1): a grouped conv costs what its `groups` separate convs on channel slices cost."
    cin, cout = 2 * groups, 3 * groups
    conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, cin, 9, 9)
    with MacCounter(conv) as c: y = conv(x)
    parts, total = [], 0
    for g in range(groups):
        sub = nn.Conv2d(cin // groups, cout // groups, 3, stride=2, padding=1)
        with torch.no_grad():
            sub.weight.copy_(conv.weight[g * (cout // groups):(g + 1) * (cout // groups)])
            sub.bias.copy_(conv.bias[g * (cout // groups):(g + 1) * (cout // groups)])
        with MacCounter(sub) as cs: parts.append(sub(x[:, g * (cin // groups):(g + 1) * (cin // groups)]))
        total += cs.total
    assert torch.allclose(torch.cat(parts, 1), y, atol=1e-5)                  # the split is the same function
    assert c.total == total
