"""Worker for tests/test_distributed.py, launched by torchrun on CPU (gloo): `Trainer` with parallel=fsdp or ep.
`MODE OUT RUN_DIR [EP_DEGREE]` (MODE fsdp or ep): one step, checked against one process;
`train PARALLEL OUT RUN_DIR STOP`: resume from RUN_DIR's checkpoint, train and checkpoint every step until STOP."""
import sys

import torch
import torch.distributed as dist

from effworkbench.distributed import exit_distributed
from effworkbench.store import Run
from effworkbench.train import Trainer
from tests_common import toy_corpus, trainer_cfg

torch.set_num_threads(1)
if sys.argv[1] == "train":
    parallel, out, run_dir, stop = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    t = Trainer(trainer_cfg(parallel, moe=parallel == "ep", steps=4), Run(run_dir, loggers=()), corpus=toy_corpus())
    start = t.step if t.resume() else None
    while t.step < stop: t.train_step(); t.checkpoint()
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in t.model.named_parameters()}
    mine = {n: p.detach().clone() for n, p in params.items()}      # ep: this rank's experts
    torch.save({"params": mine, "start": start, "step": t.step, "tokens": t.tokens}, f"{out}.{t.rank}")
    exit_distributed()
mode, out, run_dir = sys.argv[1:4]
kw = {"ep_degree": int(sys.argv[4])} if len(sys.argv) > 4 else {}
t = Trainer(trainer_cfg(mode, moe=mode == "ep", **kw), Run(run_dir, loggers=()), corpus=toy_corpus())
rank, world = t.rank, t.world


def full(tensors: dict) -> dict:
    "Every tensor whole: FSDP2's DTensor shards gathered, expert shards concatenated over the expert group in rank order."
    res = {}
    for n, v in tensors.items():
        if hasattr(v, "full_tensor"): v = v.full_tensor()
        elif getattr(t.model.get_parameter(n), "expert_parallel", False):
            g = t.mesh.get_group("ep")
            parts = [torch.empty_like(v) for _ in range(dist.get_world_size(g))]
            dist.all_gather(parts, v.contiguous(), group=g)
            v = torch.cat(parts)
        res[n] = v.detach().clone()
    return res


loss, _ = t.compute_grads(0)
grads = full({n: p.grad for n, p in t.model.named_parameters()})
t.step = 0
t.train_step()                                        # clip + schedule + AdamW on the synced gradients
params = full(dict(t.model.named_parameters()))
exp_avg = full({n: t.opt.state[p]["exp_avg"] for n, p in t.model.named_parameters()})
torch.manual_seed(1234 + rank)
t.checkpoint()                                        # every rank writes its shard
if rank == 0:
    torch.save({"loss": loss, "grads": grads, "params": params, "exp_avg": exp_avg, "world": world,
                "scheme": type(t.scheme).__name__}, out)
exit_distributed()                                    # barrier, destroy, exit without teardown
