"""DP-SGD step time against a plain SGD step, measured side by side in one run, on the GroupNorm CNN (vgg_small).

The steps run what `train_dp` runs: Poisson batches of expected size B drawn from N = B/q examples (q = DPConfig().q),
the private set on the device and each batch gathered there from the sampled indices, `DPConfig().chunk` examples per
per-example pass, noise from a generator on the device.

1. prune = drop = 0, every method on the same sequence of Poisson batches, interleaved round by round (one step of each
   method per round, so load on the machine hits them alike): a plain SGD step; this library's DP step by book-keeping
   (`method="bk"`, the default), also with the masks the experiment grid (`run` of `43_privacy.dp_prune`) trains with (50 % unstructured magnitude pre-pruning,
   50 % random coordinate dropping: explicit masked products, no ghost norms), and by torch.func vmap (`method="vmap"`,
   the reference); on CUDA also the book-keeping step replayed from CUDA graphs (`GraphedDPStep`: batches padded to
   multiples of 64, pads weighted 0; its graphs captured before timing); Opacus with hooks and with ghost clipping. Printed as the median s/step with its interquartile range, the median and IQR of the per-round ratio
   to the plain step, and the ratio of the fastest steps (the least disturbed by other load on a shared machine); on
   the CPU also the process CPU seconds per step and their per-round ratio (not counting time the cores ran others).
2. The book-keeping step as structured pre-pruning (channels physically removed) and layer-wise gradient dropping (whole
   tensors left out of a step) grow.

    python bench/dp.py --threads 1            # B=512, 32×32, width 16 (the issue's setting), one CPU thread
    python bench/dp.py --batch 128 --repeats 5 --no-grid
On the CPU the run starts with a steady heap (`heap.py`: without it, page faults of the plain step's larger buffers, not
arithmetic, decide the ratio); `--heap default` keeps glibc's defaults. Imports only torch, numpy, opacus and the library.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from effworkbench.privacy.dp_prune import (DPConfig, GraphedDPStep, apply_masks, dp_sgd_step, full_masks, poisson_batch, prune_masks, prune_structured,
                             select_coordinates)
from effworkbench.vision.models import vgg_small
from heap import steady_heap


class Batches:
    "The training loop's batches: Poisson indices drawn on the host (public randomness), moved, and gathered on the device."
    def __init__(self, x: torch.Tensor, y: torch.Tensor, q: float, dev: torch.device, seed: int = 0):
        self.x, self.y, self.q, self.dev = x.to(dev), y.to(dev), q, dev
        self.g = torch.Generator().manual_seed(seed)
    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = poisson_batch(len(self.x), self.q, self.g).to(self.dev)
        return self.x[idx], self.y[idx]


def plain_step(model, batches, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    def step():
        x, y = batches()
        opt.zero_grad(set_to_none=True); F.cross_entropy(model(x), y).backward(); opt.step()
    return step


def ours_step(model, batches, method="bk", drop=0.0, chunk=256, expected_batch=1.0, prune=0.0, drop_mode="layer",
              graphs=False):
    masks = prune_masks(model, prune, "magnitude") if prune else full_masks(model)
    apply_masks(model, masks)
    dev = next(model.parameters()).device
    g_sel, g_noise = torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(1)
    kw = dict(C=1.0, sigma=1.0, lr=0.1, masks=masks, expected_batch=expected_batch, generator=g_noise, chunk=chunk, method=method)
    graphed = GraphedDPStep(model, capture=True, **kw) if graphs else None
    if graphed:   # capture the padded sizes a Poisson batch of this mean takes (±3σ), so that no capture is timed
        sd = math.sqrt(expected_batch)
        for cap in sorted({graphed.padded(max(1, int(expected_batch + k * sd))) for k in (-3, -1.5, 0, 1.5, 3)}):
            graphed(batches.x[:cap], batches.y[:cap], select_coordinates(model, masks, drop, drop_mode, g_sel))
    def step():
        x, y = batches()
        sel = select_coordinates(model, masks, drop, drop_mode, g_sel)
        if graphed: graphed(x, y, sel)
        else: dp_sgd_step(model, x, y, sel=sel, **kw)
    return step


def opacus_step(model, batches, mode, expected_batch):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x0, y0 = batches.x[:8].cpu(), batches.y[:8].cpu()
    loader = DataLoader(TensorDataset(x0, y0), batch_size=int(expected_batch))      # only its batch size is read
    kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
              grad_sample_mode=mode, poisson_sampling=False)
    if mode == "ghost":
        m, o, crit, _ = PrivacyEngine().make_private(criterion=nn.CrossEntropyLoss(), **kw)
    else:
        (m, o, _), crit = PrivacyEngine().make_private(**kw), nn.CrossEntropyLoss()
    def step():
        x, y = batches()
        o.zero_grad(set_to_none=True); crit(m(x), y).backward(); o.step()
    return step


def interleaved(steps: dict, repeats: int, sync) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Wall and process-CPU seconds per step of each callable, one call of each per round after one warm-up round:
    name → (repeats,) each. On a shared CPU the CPU seconds exclude the time other processes hold the cores."""
    for f in steps.values(): f(); sync()
    wall, cpu = {n: [] for n in steps}, {n: [] for n in steps}
    for _ in range(repeats):
        for n, f in steps.items():
            c0, t0 = time.process_time(), time.perf_counter(); f(); sync()
            wall[n].append(time.perf_counter() - t0); cpu[n].append(time.process_time() - c0)
    return {n: np.array(t) for n, t in wall.items()}, {n: np.array(t) for n, t in cpu.items()}


def q3(a: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.percentile(a, [50, 25, 75]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=512, help="expected Poisson batch size qN")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    ap.add_argument("--grid-repeats", type=int, default=3)
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--no-vmap", action="store_true")
    ap.add_argument("--heap", choices=["steady", "default"], default="steady", help="CPU heap (see heap.py)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)      # Opacus: secure RNG off, full backward hooks
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    if dev.type == "cpu": name += ", " + (steady_heap() if a.heap == "steady" else "default heap")
    cfg = DPConfig()
    n = int(round(a.batch / cfg.q))
    print(f"# DP step vs plain step: vgg_small(width={a.width}, norm='group'), Poisson batches q={cfg.q} of N={n} "
          f"(expected B={a.batch}), {a.size}×{a.size}, chunk {cfg.chunk}, {name}, torch {torch.__version__}, fp32, "
          f"{a.repeats} interleaved rounds")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, a.size, a.size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    make = lambda: vgg_small(width=a.width, norm="group").to(dev)
    batches = lambda: Batches(x, y, cfg.q, dev)                  # every method sees the same batch sequence
    steps = {"plain SGD step": plain_step(make(), batches()),
             "DP, book-keeping (this library)": ours_step(make(), batches(), "bk", chunk=cfg.chunk, expected_batch=a.batch)}
    steps["DP, bk, 50% unstruct. + 50% random"] = ours_step(make(), batches(), "bk", 0.5, cfg.chunk, a.batch, prune=0.5,
                                                           drop_mode="random")         # the experiment grid's kind of masks
    if not a.no_vmap:
        steps["DP, torch.func vmap (reference)"] = ours_step(make(), batches(), "vmap", chunk=cfg.chunk, expected_batch=a.batch)
    if not a.no_opacus:
        for mode in ("hooks", "ghost"):
            try: steps[f"DP, Opacus {mode}"] = opacus_step(make(), batches(), mode, a.batch)
            except Exception as e: print(f"Opacus {mode}: failed ({type(e).__name__}: {e})")
    if dev.type == "cuda":   # the book-keeping step replayed from CUDA graphs, batches padded to multiples of 64; last,
        try:                 # so that a failed capture leaves the other rows built
            steps["DP, book-keeping, CUDA graphs"] = ours_step(make(), batches(), "bk", chunk=cfg.chunk,
                                                               expected_batch=a.batch, graphs=True)
        except Exception as e: print(f"CUDA graphs: the capture failed ({type(e).__name__}: {e}); the row is left out")
    t, c = interleaved(steps, a.repeats, sync)
    base, cbase = t["plain SGD step"], c["plain SGD step"]
    print(f"{'step':<36}{'s/step':>9}{'IQR':>17}{'× plain':>9}{'IQR':>14}{'fastest ÷ fastest':>19}"
          + (f"{'CPU s':>8}{'CPU × plain':>13}{'IQR':>14}" if dev.type == "cpu" else ""))
    for k, v in t.items():
        s, r, cr = q3(v), q3(v / base), q3(c[k] / cbase)
        print(f"{k:<36}{s[0]:>9.4f}   [{s[1]:.4f}, {s[2]:.4f}]{r[0]:>9.2f}   [{r[1]:.2f}, {r[2]:.2f}]{v.min() / base.min():>19.2f}"
              + (f"{np.median(c[k]):>8.3f}{cr[0]:>13.2f}   [{cr[1]:.2f}, {cr[2]:.2f}]" if dev.type == "cpu" else ""))
    if a.no_grid: return

    print(f"\n# book-keeping DP step as structured pre-pruning and layer-wise gradient dropping grow ({a.grid_repeats} rounds)")
    grid = {}
    for prune in a.rates:
        for drop in a.rates:
            m = make() if prune == 0 else prune_structured(make(), prune)
            grid[(prune, drop, sum(p.numel() for p in m.parameters()))] = ours_step(m, batches(), "bk", drop, cfg.chunk, a.batch)
    tg, _ = interleaved({"plain": plain_step(make(), batches()), **grid}, a.grid_repeats, sync)
    print(f"{'prune':>6}{'drop':>6}{'params':>10}{'s/step':>10}{'× plain (unpruned)':>20}")
    for (prune, drop, p), v in ((k, v) for k, v in tg.items() if k != "plain"):
        print(f"{prune:>6.2f}{drop:>6.2f}{p:>10d}{np.median(v):>10.4f}{np.median(v / tg['plain']):>20.2f}")


if __name__ == "__main__":
    main()
