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


def toy_corpus(vocab: int = 64):
    "Random tokens, the same in every process: what `Trainer` reads as its corpus (.train, .val, .vocab_size)."
    import numpy as np
    from types import SimpleNamespace
    g = np.random.default_rng(0)
    return SimpleNamespace(train=g.integers(0, vocab, 4000), val=g.integers(0, vocab, 400), vocab_size=vocab)


def trainer_cfg(parallel: str, moe: bool = False, **kw):
    "A small `TrainConfig` for the equivalence tests: a 2-block GPT (or a 4-expert top-2 MoE one), global batch 8 in micro-batches of 2."
    from effworkbench.train import TrainConfig
    model = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2)
    if moe:   # the load-balancing loss is not a mean over tokens, so ranks' means would not average to it: off
        model.update(ffn="moe", ffn_kwargs={"expansion": 4, "top_k": 2, "backend": "torch", "lb_weight": 0.0})
    return TrainConfig(model=model, batch_size=8, micro_batch=2, warmup=1, eval_batches=1, device="cpu", parallel=parallel, **kw)
