"Weights files carry the forward's multipliers and attention scale: a μP model reloads to the same logits, and a model with other multipliers is refused."
import pytest
import torch

from effworkbench.core import ConfigError
from effworkbench.nn.gpt import GPT, GPTConfig, make_parameterization
from effworkbench.train import load_weights, save_weights

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
