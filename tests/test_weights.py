"Weights files carry the forward's multipliers and attention scale: a μP model reloads to the same logits, and a model with other multipliers is refused."
import pytest
import torch

from effworkbench.core import ConfigError
from effworkbench.nn.gpt import GPT, GPTConfig, load_gpt, make_parameterization
from effworkbench.train import forward_spec, load_weights, save_weights

CFG = GPTConfig(vocab_size=50, seq_len=8, d_model=32, n_layers=2, n_heads=2)


def _mup(): return make_parameterization("mup", base_width=8, alpha_out=2.0)   # m = 32/8 = 4: head mult 0.5, attn scale ≠ SP's


def test_mup_weights_reload_to_same_logits(tmp_path):
    torch.manual_seed(0)
    a = GPT(CFG, _mup()).eval()
    b = GPT(CFG, _mup()).eval()
    load_weights(b, save_weights(a, tmp_path / "w.safetensors"))
    x = torch.randint(0, 50, (2, 8))
    assert torch.equal(a(x), b(x))


def test_mup_weights_into_sp_model_are_refused(tmp_path):
    a = GPT(CFG, _mup())
    path = save_weights(a, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="forward multipliers.*head"):
        load_weights(GPT(CFG), path)
    with pytest.raises(ConfigError, match="attention scale"):   # same multipliers, other attention scale
        load_weights(GPT(CFG, make_parameterization("mup", base_width=8, alpha_out=2.0, attn_mult=1.0)), path)
    sp = save_weights(GPT(CFG), tmp_path / "sp.safetensors")
    with pytest.raises(ConfigError, match="make_parameterization"):
        load_weights(GPT(CFG, _mup()), sp)


MOE = GPTConfig(vocab_size=50, seq_len=8, d_model=32, n_layers=2, n_heads=2, ffn="moe",
                ffn_kwargs={"expansion": 2, "granularity": 2, "backend": "torch"})


@pytest.mark.parametrize("cfg", [CFG, MOE], ids=["dense", "moe"])
def test_load_gpt_rebuilds_the_parameterization(cfg, tmp_path):
    "A μP model saved and loaded with `load_gpt` (no config given) has the same multipliers, attention scale and logits."
    torch.manual_seed(0)
    a = GPT(cfg, _mup()).eval()
    path = save_weights(a, tmp_path / "w.safetensors")
    b = load_gpt(path)
    assert type(b.parameterization).__name__ == "MuP" and b.parameterization.spec() == a.parameterization.spec()
    assert forward_spec(b) == forward_spec(a)
    assert b.head.group_mult["head"] == 0.5 and b.blocks[0].attn.scale == a.blocks[0].attn.scale != 1 / 4
    if cfg.ffn == "moe": assert b.blocks[0].ffn.router.group_mult["router"] == a.blocks[0].ffn.router.group_mult["router"]
    x = torch.randint(0, 50, (2, 8))
    assert torch.equal(a(x), b(x))
    sp = load_gpt(save_weights(GPT(cfg), tmp_path / "sp.safetensors"))         # a standard model round-trips too
    assert type(sp.parameterization).__name__ == "StandardParameterization"


def test_load_gpt_refuses_a_file_without_a_spec(tmp_path):
    from safetensors.torch import save_model
    save_model(GPT(CFG), str(tmp_path / "bare.safetensors"))
    with pytest.raises(ConfigError, match="carries no model spec"):
        load_gpt(tmp_path / "bare.safetensors")
