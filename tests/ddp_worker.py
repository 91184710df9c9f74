"Worker for tests/test_ddp.py, launched by torchrun: one DDP gradient computation and one optimizer step."
import json
import sys

import torch

from effworkbench.train import TrainConfig, Trainer, cleanup_distributed

cfg = TrainConfig.for_preset("smoke", **json.loads(sys.argv[1]))
t = Trainer(cfg)
loss, _ = t.compute_grads(0)
grads = {n: p.grad.clone() for n, p in t.model.named_parameters()}
t.step = 0
t.train_step()                                        # clip + schedule + AdamW, with DDP-averaged gradients
if t.rank == 0:
    torch.save({"loss": loss, "grads": grads, "params": {n: p.detach().clone() for n, p in t.model.named_parameters()},
                "world": t.world}, sys.argv[2])
cleanup_distributed()
