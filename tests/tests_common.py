"Shared inputs of tests/test_distributed.py and its torchrun worker: the same model and batch in every process."
import torch

from effworkbench.core import set_seed
from effworkbench.nn.gpt import GPT, GPTConfig


def fsdp_case():
    "A 2-block GPT and a global batch of 4 sequences (x, y), identical on every rank."
    set_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 16), generator=g)
    return model, x, torch.randint(0, 64, (4, 16), generator=g)


def moe_case():
    "An MoE FFN with 4 experts, top-2 dropless routing, d=16; input x (8, 6, 16) and loss weights w."
    from effworkbench.moe.layers import MoEFFN
    set_seed(0)
    cfg = GPTConfig(vocab_size=64, seq_len=6, d_model=16, n_layers=1, n_heads=2, d_ff=32, ffn="moe",
                    ffn_kwargs={"expansion": 4, "top_k": 2, "backend": "torch"})
    layer = MoEFFN(cfg)
    g = torch.Generator().manual_seed(2)
    return layer, torch.randn(8, 6, 16, generator=g), torch.randn(8, 6, 16, generator=g)
