"""Inference speed of a D2DMoE dynamic-k FFN layer against the dense ReLU FFN it came from, beside its FLOPs ratio.

    python bench/d2dmoe.py            # CUDA: d=1024, d_ff=4096, 16384 tokens, bf16, Triton kernels and torch._grouped_mm
    python bench/d2dmoe.py --tiny     # CPU: a tiny shape, the grouped-GEMM path only

The layer is `effworkbench.compress.d2dmoe.DynamicKMLP`: a norm-predicting router (2-layer MLP of width 128), the τ·max
rule, and the MoE dispatch of `12_moe.layers` / `13_moe.kernels`. The router's weights are random here; what a trained
router predicts sets the experts per token and their loads, and the time with them, so each row records them: experts
run per token, the most any token runs (k_max), the busiest expert's load over the mean load and the empty experts,
beside the layer's FLOPs over the dense FFN's (router included) and its forward time over the dense FFN's (CUDA: the
median over 5 windows of 10 back-to-back calls between two events). Backends on CUDA: `triton` (inference: the counted
mask plan and the fused up → ReLU → down kernel, no host read), `triton-graph` (the same captured in one CUDA graph and
replayed: the proof that it reads nothing back, and its time without launch overheads), `triton-tma` (the fused kernel
with its weight tiles by TMA copies, sm_90+), `triton-train` (the training
kernels after the N × k_max compaction, one host read) and `torch`. Writes d2dmoe_speed_<device>.csv to $OUT (or the
working directory). Imports only torch, triton, numpy, pandas and the library.
"""
import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from effworkbench.core import git_info
from effworkbench.compress.d2dmoe import DynamicKMLP, NormRouter
from effworkbench.moe.kernels import masked_mlp_config

TAUS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def timed(fn, device, warmup=3, iters=10, repeats=5) -> float:
    """Seconds per call. CUDA: `repeats` windows of `iters` back-to-back calls between two events (no sync inside a window),
    the median of the windows' means. CPU: the median of single timed calls."""
    for _ in range(warmup): fn()
    if device.type != "cuda":
        import time
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        return float(np.median(ts))
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters): fn()
        b.record(); b.synchronize(); ts.append(a.elapsed_time(b) / 1e3 / iters)
    return float(np.median(ts))


def graphed(fn):
    "`fn` (no arguments) captured in one CUDA graph after two warm-up calls on a side stream; returns the replay."
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2): fn()                                                   # Triton compiles here, not in the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    return g.replay


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    d, d_ff, N = (1024, 4096, 16384) if cuda else (64, 256, 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    experts = [32, 128] if cuda else [16]
    backends = ["triton", "triton-graph", "triton-tma", "triton-train", "torch"] if cuda else ["torch"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, d, generator=g).to(device, dtype)
    w1 = (torch.randn(d, d_ff, generator=g) / d ** 0.5).to(device, dtype)
    w2 = (torch.randn(d_ff, d, generator=g) / d_ff ** 0.5).to(device, dtype)
    rows = []
    with torch.no_grad():
        t_dense = timed(lambda: F.relu(x @ w1) @ w2, device)
        for E in experts:
            h = d_ff // E
            torch.manual_seed(E)
            router = NormRouter(d, E, 128).to(device, dtype)
            w_in = w1.view(d, E, h).permute(1, 0, 2).contiguous()                 # (E, d, h)
            w_out = w2.view(E, h, d).contiguous()                                 # (E, h, d)
            for backend in backends:
                layer = DynamicKMLP(w_in, w_out, router, backend=backend.split("-")[0]).to(device)
                layer.fused_inference = not backend.endswith("-train")
                if backend.endswith("-tma"): layer.inference_config = dataclasses.replace(masked_mlp_config(device, dtype, h), tma=True)
                for tau in TAUS:
                    layer.tau = tau
                    fn = lambda: layer(x)
                    if backend.endswith("-graph"):
                        try: fn = graphed(fn)
                        except Exception as e:                                    # a host read inside the layer fails the capture
                            print(f"E={E:4d} {backend:12s} τ={tau:.2f}: capture failed: {type(e).__name__}: {str(e)[:200]}")
                            continue
                    t = timed(fn, device)
                    take = layer.active(x)                                        # (N, E): what the timed calls ran
                    load = take.sum(0).float()                                    # (E,) tokens per expert
                    rows.append({"n_experts": E, "expert_size": h, "backend": backend, "tau": tau,
                                 "experts": float(layer.experts_per_token), "k_max": int(take.sum(-1).max()),
                                 "load_max_over_mean": float(load.max() / load.mean().clamp(min=1e-9)),
                                 "empty_experts": int((load == 0).sum()), "flops_ratio": layer.flops_per_token() / (4.0 * d * d_ff),
                                 "time_ratio": t / t_dense, "dense_ms": 1e3 * t_dense, "dynamic_ms": 1e3 * t})
                    r = rows[-1]
                    print(f"E={E:4d} {backend:12s} τ={tau:.2f}: {r['experts']:6.2f} experts/token (k_max {r['k_max']}, "
                          f"busiest expert {r['load_max_over_mean']:.2f} × mean), FLOPs {r['flops_ratio']:.3f}, "
                          f"time {r['time_ratio']:.3f} × dense ({r['dynamic_ms']:.3f} ms vs {r['dense_ms']:.3f} ms)", flush=True)
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    df = pd.DataFrame(rows).assign(device=name, d_model=d, d_ff=d_ff, tokens=N, dtype=str(dtype).removeprefix("torch."))
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    tag = "h100" if "H100" in name else "h200" if "H200" in name else "cuda" if cuda else "cpu"
    df.to_csv(out / f"d2dmoe_speed_{tag}.csv", index=False)
    (out / f"d2dmoe_speed_{tag}.env.json").write_text(json.dumps({"device_name": name, "torch": torch.__version__,
                                                                   "bench": "bench/d2dmoe.py", **git_info()}, indent=1))


if __name__ == "__main__":
    main()
