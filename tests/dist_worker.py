"Worker for tests/test_distributed.py, launched by torchrun on CPU (gloo): `fsdp OUT CKPT` or `ep OUT [dp ep]`."
import sys

import torch
import torch.distributed as dist

from effworkbench.distributed import (CheckpointManager, ModelOptimizerState, ProgressState, RNGState, exit_distributed,
                                      expert_parallel, full_grads, make_mesh, shard, sync_grads)

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mode, out = sys.argv[1], sys.argv[2]


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    "Concatenate every rank's rows in rank order."
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


if mode == "fsdp":
    from tests_common import fsdp_case
    model, x, y = fsdp_case()                                   # the same init and global batch on every rank
    b = len(x) // world
    mesh = make_mesh((world,), ("dp",))
    shard(model, mesh, mp_policy=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)        # built after sharding: it holds the DTensor shards
    _, loss = model(x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])
    loss.backward()
    grads = full_grads(model)
    opt.step()
    gl = loss.detach().clone(); dist.all_reduce(gl); gl /= world
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5); sched.step()
    import numpy as np
    from effworkbench.data import LMBatchSampler
    sampler = LMBatchSampler(np.arange(1000), 4, 16, seed=3); next(sampler)       # at step 1, this rank's half
    ck = CheckpointManager(sys.argv[3])
    torch.manual_seed(1234 + rank)
    state = {"app": ModelOptimizerState(model, opt), "progress": ProgressState(1, sched), "rng": RNGState(), "sampler": sampler}
    ck.save(1, state)
    if rank == 0:
        torch.save({"loss": gl.item(), "grads": grads, "params": params, "world": world,
                    "exp_avg": {k: v["exp_avg"] for k, v in osd["state"].items()}}, out)
else:                                                           # expert parallel, 1-D (ep) or 2-D (dp × ep) mesh
    from tests_common import moe_case
    shape = tuple(int(a) for a in sys.argv[3:]) or (world,)
    names = ("dp", "ep") if len(shape) == 2 else ("ep",)
    mesh = make_mesh(shape, names)
    layer, x, w = moe_case()
    b = len(x) // world
    xl = x[rank * b:(rank + 1) * b].clone().requires_grad_(True)   # (b, T, d) this rank's sequences
    model = expert_parallel(torch.nn.Sequential(layer), mesh)
    ep_layer = model[0]
    yl = ep_layer(xl)
    loss = (yl * w[rank * b:(rank + 1) * b]).sum() / yl[..., 0].numel()   # this rank's mean
    loss.backward()
    sync_grads(model, mesh)
    epg = mesh.get_group("ep")
    full = {}
    for n in ("w_in", "w_out"):
        g = getattr(ep_layer, n).grad
        parts = [torch.empty_like(g) for _ in range(dist.get_world_size(epg))]
        dist.all_gather(parts, g, group=epg)
        full[n] = torch.cat(parts)                              # (E, ...) every expert's gradient
    res = {"y": gather_rows(yl.detach()), "dx": gather_rows(xl.grad), "router": ep_layer.router.weight.grad.clone(),
           **full, "world": world}
    if rank == 0: torch.save(res, out)
exit_distributed()                                              # barrier, destroy, exit without teardown
