"Shared inputs of tests/test_distributed.py and its torchrun worker: the same config and corpus in every process."


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
