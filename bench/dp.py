"""DP-SGD step time against a plain SGD step, measured side by side in one run, on the GroupNorm CNN (vgg_small).

1. prune = drop = 0: a plain step; this library's DP step (torch.func per-sample grads, clipping, noise); Opacus 1.6
   with hooks and with ghost clipping. Each printed as seconds per step and as a ratio to the plain step.
2. The library's DP step as structured pre-pruning (channels physically removed) and gradient dropping (whole
   parameter tensors left out of a step) grow: the step time falls with both.

    python bench/dp.py                      # B=512, 32×32, width 16 (the anchor's setting)
    python bench/dp.py --batch 128 --threads 1
Imports only torch, numpy, opacus and the library.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from effworkbench.dp import dp_sgd_step, full_masks, prune_structured, select_coordinates
from effworkbench.vision import vgg_small


def timed(fn, repeats: int, sync) -> float:
    "Median seconds of `fn()` after one warm-up call."
    fn(); sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def plain_step(model, x, y, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    def step():
        opt.zero_grad(set_to_none=True); F.cross_entropy(model(x), y).backward(); opt.step()
    return step


def ours_step(model, x, y, drop=0.0, chunk=512):
    masks = full_masks(model)
    g_sel, g_noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    def step():
        sel = select_coordinates(model, masks, drop, "layer", g_sel)
        dp_sgd_step(model, x, y, masks, sel, C=1.0, sigma=1.0, lr=0.1, expected_batch=len(x), generator=g_noise, chunk=chunk)
    return step


def opacus_step(model, x, y, mode):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=len(x))
    kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
              grad_sample_mode=mode, poisson_sampling=False)
    if mode == "ghost":
        m, o, crit, _ = PrivacyEngine().make_private(criterion=nn.CrossEntropyLoss(), **kw)
    else:
        (m, o, _), crit = PrivacyEngine().make_private(**kw), nn.CrossEntropyLoss()
    def step():
        o.zero_grad(set_to_none=True); crit(m(x), y).backward(); o.step()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    ap.add_argument("--no-opacus", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)      # Opacus: secure RNG off, full backward hooks
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# DP step vs plain step: vgg_small(width={a.width}, norm='group'), B={a.batch}, {a.size}×{a.size}, {name}, "
          f"torch {torch.__version__}, fp32, median of {a.repeats}")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, 1, a.size, a.size, generator=g).to(dev)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(dev)
    make = lambda: vgg_small(width=a.width, norm="group").to(dev)

    t_plain = timed(plain_step(make(), x, y), a.repeats, sync)
    rows = [("plain SGD step", t_plain), ("DP, torch.func vmap (this library)", timed(ours_step(make(), x, y), a.repeats, sync))]
    if not a.no_opacus:
        for mode in ("hooks", "ghost"):
            try: rows.append((f"DP, Opacus {mode}", timed(opacus_step(make(), x, y, mode), a.repeats, sync)))
            except Exception as e: print(f"Opacus {mode}: failed ({type(e).__name__}: {e})")
    print(f"{'step':<38}{'s/step':>10}{'× plain':>10}")
    for n, t in rows: print(f"{n:<38}{t:>10.4f}{t / t_plain:>10.2f}")

    print("\n# this library's DP step as structured pre-pruning and (layer-wise) gradient dropping grow")
    print(f"{'prune':>6}{'drop':>6}{'params':>10}{'s/step':>10}{'× plain (unpruned)':>20}")
    for prune in a.rates:
        for drop in a.rates:
            m = make() if prune == 0 else prune_structured(make(), prune)
            t = timed(ours_step(m, x, y, drop), a.repeats, sync)
            print(f"{prune:>6.2f}{drop:>6.2f}{sum(p.numel() for p in m.parameters()):>10d}{t:>10.4f}{t / t_plain:>20.2f}")


if __name__ == "__main__":
    main()
