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
