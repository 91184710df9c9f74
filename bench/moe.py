"""MoE MLP forward+backward against a dense FFN of equal active FLOPs: Triton kernels, the torch backend, a plain torch._grouped_mm layer, a per-expert loop.

    python bench/moe.py               # CUDA: d=1024, d_ff=4096, T=32768 tokens, bf16
    python bench/moe.py --tiny        # CPU (the default without CUDA): a tiny shape, Triton through its interpreter

Setup (arXiv 2402.07871's fine-grained MoE): expansion rate 8 and granularity G give E = 8·G experts of hidden size
d_ff/G with top-k = G, so every case has the dense FFN's active FLOPs, 3 · 2 · 2·T·d·d_ff for forward+backward.
Routing: k distinct experts per token, drawn uniformly (`uniform`) or with expert e's weight ∝ (e+1)^-s (`skewed`, s = 1
by default, as learned routers are uneven); gates a softmax over them. The kernel rows take this routing as given; the
`layer_*` rows time the whole MoE FFN layer (router GEMM, softmax, top-k, load-balance and z-losses, the plan, the MLP) at
the routing its freshly initialised router gives. Beside each routing: the busiest expert's load over the mean, and the
plan alone by counting sort and by radix sort.

Triton rows: `triton` (the default tiles, deterministic combine), `triton_atomic` (float32 atomic combine),
`triton_dh128` (the dH kernel on 128 columns), `triton_tma` (weights and kernel 2's rows by TMA copies, sm_90+),
`triton_persistent` (the same with kernels 1, 2 and dH as persistent loops over their tiles, one program per SM) and,
with --tune, `triton_tuned`. Beside them `torch` (the project's torch backend, `moe_mlp_torch`), `plain_grouped_mm`
(the plain layer one would write around `torch._grouped_mm`: gather, two grouped GEMMs, gate weight, scatter-add) and
`loop` (one matmul per expert).
Printed per case and backend: ms per forward+backward, time(dense)/time(backend) (higher is better; the H100 anchors of
the design notes are grouped_mm 0.63/0.45/0.32/0.20 and loop 0.44/0.13/0.05/0.015), the peak memory of the step above
what was allocated before it, and the activations autograd saves for the backward, each also relative to dense; on CUDA
the step's TFLOP/s against the card's measured bf16 GEMM peak and the datasheet's, and for the Triton layer (`triton`,
`triton_tma` and `triton_persistent`) each kernel's time and TFLOP/s from the profiler. Times on CUDA: windows of back-to-back
steps between two events (no sync inside), the median over 5 windows.
Then, on CUDA, the proof that the Triton layer never synchronises with the host: forward+backward under
torch.cuda.set_sync_debug_mode("error"), and forward+backward captured in one CUDA graph, replayed after the routing
is overwritten in place, compared with eager. Imports only torch, triton, numpy and the library.
"""
import argparse
import dataclasses
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from effworkbench.moe.layers import MoEFFN, moe_mlp_loop, moe_mlp_torch
from effworkbench.moe.kernels import (MoEKernelConfig, kernel_config, moe_mlp_reference, moe_plan, tile_cache_path, tile_key,
                                      triton_moe_mlp, tuned_config)
from effworkbench.nn.gpt import GPTConfig

CASES = [(8, 1, 1), (32, 4, 4), (64, 8, 8), (128, 16, 16)]   # (experts, top-k, granularity)
SHAPES = {"h100": dict(d=1024, d_ff=4096, T=32768), "tiny": dict(d=32, d_ff=128, T=64)}


def dense_ffn(x, w1, w2, act):
    return F.gelu(x @ w1) @ w2 if act == "gelu" else F.relu(x @ w1) @ w2


def plain_grouped_mm(x, w_in, w_out, w_gate, expert_idx, gates, act: str = "gelu"):
    """The plain grouped-GEMM MoE MLP, as one would write it around `torch._grouped_mm` (every slot valid): slots sorted by
    expert, rows gathered, two grouped GEMMs, the gate weight, a scatter-add per token. Sync-free (group ends by a
    scatter-add, not bincount), so that it is timed at its best beside the project's backends."""
    N, K = expert_idx.shape
    flat = expert_idx.reshape(-1)                                       # (S,)
    order = flat.argsort(stable=True)                                   # (S,) slots grouped by expert
    tok = order // K                                                    # (S,) token of each sorted row
    ends = torch.zeros(w_in.shape[0], dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat)).cumsum(0).to(torch.int32)
    xs = x[tok]                                                         # (S, d) gathered rows
    pre = torch._grouped_mm(xs, w_in, offs=ends)                        # (S, h)
    hid = F.silu(torch._grouped_mm(xs, w_gate, offs=ends)) * pre if w_gate is not None else (F.gelu(pre) if act == "gelu" else F.relu(pre))
    ys = torch._grouped_mm(hid, w_out, offs=ends) * gates.reshape(-1)[order].unsqueeze(-1)   # (S, d) weighted
    return torch.zeros_like(x).index_add_(0, tok, ys)


def backends(act, config=None, tune: bool = False):
    "name → fn(x, w_in, w_out, w_gate, expert_idx, gates) for the MoE backends."
    dh128 = dataclasses.replace(config or kernel_config("cuda", torch.bfloat16), dh_block_n=128)   # the dH tile before it spilled
    # triton_tuned: tiles and combine tuned together (atomic=None), the layer's choice under EFFWB_MOE_TUNE=1
    tuned = {"triton_tuned": lambda *a: triton_moe_mlp(*a, act, config=tuned_config(*a[:5], act, None))} if tune else {}
    tiles = lambda x, **kw: dataclasses.replace(config or kernel_config(x.device, x.dtype), **kw)   # the default tiles, changed
    return {**tuned, "triton": lambda *a: triton_moe_mlp(*a, act, atomic=False, config=config),
            "triton_atomic": lambda *a: triton_moe_mlp(*a, act, atomic=True, config=config),
            "triton_dh128": lambda *a: triton_moe_mlp(*a, act, config=dh128 if a[0].is_cuda else config),
            # the default tiles with TMA copies of the weights and of kernel 2's rows (sm_90+; pointer loads elsewhere)
            "triton_tma": lambda *a: triton_moe_mlp(*a, act, atomic=False, config=tiles(a[0], tma=True)),
            # the same with kernels 1, 2 and dH persistent: one program per SM, tile and reduction loops flattened into one
            "triton_persistent": lambda *a: triton_moe_mlp(*a, act, atomic=False, config=tiles(a[0], tma=True, persistent=True)),
            "torch": lambda *a: moe_mlp_torch(*a, act),                # the project's torch backend
            "plain_grouped_mm": lambda *a: plain_grouped_mm(*a, act),
            "loop": lambda *a: moe_mlp_loop(*a, act)}


def routing(T, E, k, gen, device, skew: float = 0.0):
    "k distinct experts per token, expert e drawn with weight ∝ (e+1)^-skew (0: uniform); gates a softmax of random logits."
    logw = -skew * torch.arange(1, E + 1, dtype=torch.float32).log()        # (E,)
    gumbel = -torch.empty(T, E).exponential_(generator=gen).log()           # Gumbel top-k = k draws without replacement
    idx = (logw + gumbel).topk(k, dim=-1).indices                           # (T, k)
    gates = torch.randn(T, k, generator=gen).softmax(-1)
    return idx.to(device), gates.to(device)


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def time_step(step, device, warmup, iters, repeats: int = 5) -> float:
    """Seconds per step() after `warmup` calls. CUDA: `repeats` windows of `iters` back-to-back steps between two events,
    no sync inside a window; the median over windows of their mean. CPU: the median of single timed calls."""
    for _ in range(warmup): step()
    sync(device)
    if device.type != "cuda":
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
        return float(np.median(ts))
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters): step()
        b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / iters)
    return float(np.median(ts))


def gemm_peak_tflops(device, dtype, n: int = 8192) -> float:
    "The card's attainable dense peak: TFLOP/s of an n×n×n matmul in `dtype`, the best of 5 windows of 10."
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return max(2 * n**3 / time_step(lambda: a @ b, device, 3 if i == 0 else 0, 10, 1) / 1e12 for i in range(5))


GEMM_KERNELS = ("_moe_up_kernel", "_moe_up_persistent_kernel", "_moe_rows_kernel", "_moe_rows_persistent_kernel", "_moe_dh_kernel",
                "_moe_dh_persistent_kernel", "_moe_wgrad_kernel")   # 2·S·d·h FLOPs a launch


def kernel_breakdown(step, flops_per_gemm: float, steps: int = 3) -> list[tuple[str, int, float, float]]:
    """(kernel, launches per step, ms per step, TFLOP/s) of every CUDA kernel of `steps` steps, from the profiler; every
    grouped-GEMM launch of the Triton layer does 2·S·d·h FLOPs (S = T·k rows), the rest (sort, combine, …) none counted."""
    from torch.profiler import ProfilerActivity, profile
    step(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps): step()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if not us: continue
        n, ms = e.count / steps, us / 1e3 / steps
        tf = n * flops_per_gemm / (ms / 1e3) / 1e12 if e.key.startswith(GEMM_KERNELS) else float("nan")
        out.append((e.key, n, ms, tf))
    return sorted(out, key=lambda r: -r[2])


def peak_bytes(step, device) -> float:
    "Peak allocated memory during step() above what was allocated before it (CUDA only)."
    if device.type != "cuda": return float("nan")
    sync(device); torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(); sync(device)
    return float(torch.cuda.max_memory_allocated() - base)


def saved_bytes(fwd, inputs) -> float:
    "Bytes of the distinct storages autograd saves in fwd(), not counting the inputs' and weights' own storages."
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip: seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): y = fwd()
    del y
    return float(sum(seen.values()))


def check_kernels(device, dtype):
    "Compiled kernels vs the float64 reference on a small skewed routing with unused slots, every act, every gradient."
    print(f"kernel check vs float64 ({dtype}): max |error| / max |reference|")
    gen = torch.Generator().manual_seed(0)
    N, E, K, d, h = 300, 8, 3, 64, 96
    worst = 0.0
    for act in ("gelu", "relu", "swiglu"):
        for atomic in (False, True):
            x = torch.randn(N, d, generator=gen)
            w_in, w_out = torch.randn(E, d, h, generator=gen) / d**0.5, torch.randn(E, h, d, generator=gen) / h**0.5
            w_gate = torch.randn(E, d, h, generator=gen) / d**0.5 if act == "swiglu" else None
            p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 2; p[-1] = 0       # skewed, last expert empty
            idx = torch.multinomial(p.expand(N, -1), K, replacement=True, generator=gen)
            idx[torch.rand(N, K, generator=gen) < 0.2] = -1; idx[:5] = -1
            gates = torch.rand(N, K, generator=gen)
            ts = [t.to(device=device, dtype=dtype).requires_grad_() if t is not None else None
                  for t in (x, w_in, w_out, w_gate, gates)]
            leaves = [t for t in ts if t is not None]
            y = triton_moe_mlp(ts[0], ts[1], ts[2], ts[3], idx.to(device), ts[4], act, atomic=atomic)
            dy = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
            got = [y, *torch.autograd.grad(y, leaves, dy)]
            l64 = [t.detach().double().requires_grad_() for t in leaves]
            it = iter(l64)
            a64 = [next(it) if t is not None else None for t in ts]
            y64 = moe_mlp_reference(a64[0], a64[1], a64[2], a64[3], idx.to(device), a64[4], act)
            ref = [y64, *torch.autograd.grad(y64, l64, dy.double())]
            errs = [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref)]
            worst = max(worst, *errs)
            names = ["y", "x", "w_in", "w_out"] + (["w_gate"] if act == "swiglu" else []) + ["gates"]
            print(f"  {act:<7}{' atomic' if atomic else '       '} " + "  ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    print(f"  worst {worst:.1e} ({'ok' if worst < tol else 'FAILED'}, tolerance {tol:g})")
    return worst < tol


def no_sync_and_graph(d, d_ff, T, E, k, G, act, device, dtype, gen, config=None):
    "Triton fwd+bwd under sync-debug 'error'; fwd+bwd captured in a CUDA graph, replayed on a new routing vs eager."
    h = d_ff // G
    x = torch.randn(T, d, generator=gen).to(device, dtype).requires_grad_()
    w_in = (torch.randn(E, d, h, generator=gen) / d**0.5).to(device, dtype).requires_grad_()
    w_out = (torch.randn(E, h, d, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    idx, gates = routing(T, E, k, gen, device)
    gates = gates.to(dtype).requires_grad_()
    leaves = [x, w_in, w_out, gates]
    dy = torch.randn(T, d, generator=gen).to(device, dtype)
    step = lambda: torch.autograd.grad(triton_moe_mlp(x, w_in, w_out, None, idx, gates, act, config=config), leaves, dy)
    for _ in range(2): step()                                                  # compile the kernels first
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(); sync_ok = "ok: no synchronising call"
    except RuntimeError as e:
        sync_ok = f"FAILED: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # CUDA graph of forward + backward on static buffers
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            y_s = triton_moe_mlp(x, w_in, w_out, None, idx, gates, act, config=config)
            g_s = torch.autograd.grad(y_s, leaves, dy)
    except Exception as e:                                                     # report, do not crash the table
        return sync_ok, f"FAILED to capture: {type(e).__name__}: {str(e).splitlines()[0]}", float("nan")
    new_idx, new_gates = routing(T, E, k, gen, device)
    new_idx[: T // 8] = -1                                                     # and some unused slots
    with torch.no_grad(): idx.copy_(new_idx); gates.copy_(new_gates.to(dtype))
    graph.replay(); sync(device)
    y_e = triton_moe_mlp(x, w_in, w_out, None, idx, gates, act, config=config)
    g_e = torch.autograd.grad(y_e, leaves, dy)
    same = all(torch.equal(a, b) for a, b in zip([y_s, *g_s], [y_e, *g_e]))
    t_graph = time_step(graph.replay, device, 3, 10)
    return sync_ok, f"{'ok: replay on a new routing equals eager bitwise' if same else 'FAILED: replay differs from eager'}", t_graph


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape (default without CUDA)")
    ap.add_argument("--act", choices=["gelu", "relu"], default="gelu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cases", default="all", help="comma-separated case indices (0-3), default all")
    ap.add_argument("--skip", default="", help="comma-separated backends to skip, e.g. loop,triton_atomic")
    ap.add_argument("--no-check", action="store_true", help="skip the kernel check against float64")
    ap.add_argument("--tune", action="store_true", help="add a triton_tuned row: tiles and combine tuned per shape class (tuned_config), "
                                                        "first, so the tuner's compiles fall in its warm-up")
    ap.add_argument("--routing", default="uniform,skewed", help="comma-separated: uniform, skewed (default both)")
    ap.add_argument("--skew", type=float, default=1.0, help="skewed routing: expert e drawn with weight ∝ (e+1)^-skew")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--config", default=None, help="Triton tiles block_m,block_n,block_k,num_warps,num_stages[,dh_block_n] "
                                                    "(default: the library's choice, 128,128,64,8,3,64 for bf16 on CUDA)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    shp = SHAPES["tiny" if tiny else "h100"]
    d, d_ff, T = shp["d"], shp["d_ff"], shp["T"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    iters, warmup = (1, 0) if device.type != "cuda" else (args.iters, args.warmup)
    config = MoEKernelConfig(*map(int, args.config.split(","))) if args.config else None
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, d={d} d_ff={d_ff} T={T} {str(dtype).replace('torch.', '')} act={args.act}")
    if device.type != "cuda":
        print("note: no CUDA. Triton runs through its interpreter (numpy): its times here say nothing about a GPU; "
              "no peak memory, no sync-debug mode, no CUDA graph.")
    ok = True
    if device.type == "cuda" and not args.no_check:
        ok &= check_kernels(device, torch.float32)
        ok &= check_kernels(device, torch.bfloat16)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(T, d, generator=gen).to(device, dtype)
    w1 = (torch.randn(d, d_ff, generator=gen) / d**0.5).to(device, dtype).requires_grad_()
    w2 = (torch.randn(d_ff, d, generator=gen) / d_ff**0.5).to(device, dtype).requires_grad_()
    dense_step = lambda: torch.autograd.grad(dense_ffn(x, w1, w2, args.act), [x, w1, w2], dy)
    t_dense = time_step(dense_step, device, warmup, iters)
    m_dense = peak_bytes(dense_step, device)
    s_dense = saved_bytes(lambda: dense_ffn(x, w1, w2, args.act), [x, w1, w2])
    flops = 3 * 2 * 2 * T * d * d_ff
    peak = gemm_peak_tflops(device, dtype) if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        print(f"peaks: datasheet {args.peak_tflops:.0f} TFLOP/s, measured {dtype} GEMM {peak:.0f} TFLOP/s")
    print(f"dense FFN: {t_dense * 1e3:.3f} ms fwd+bwd" + (f", {flops / t_dense / 1e12:.0f} TFLOP/s ({flops / t_dense / 1e12 / peak:.0%} "
                                                          f"of the measured GEMM peak)" if device.type == "cuda" else ""))
    w1 = w2 = None                                             # free them (dense_step still names them)

    rows, fns = [], backends(args.act, config, args.tune)
    routings = [r for r in args.routing.split(",") if r]
    hdr = f"{'E':>4} {'k':>3} {'G':>3}  {'backend':<26} {'ms':>9} {'dense/this':>10} {'peak MiB':>9} {'peak/dense':>10} {'saved MiB':>9} {'saved/dense':>11}"
    print(hdr); print("-" * len(hdr))
    print(f"{'':>12}  {'dense':<26} {t_dense * 1e3:9.3f} {1.0:10.2f} {m_dense / 2**20:9.1f} {1.0:10.2f} {s_dense / 2**20:9.2f} {1.0:11.2f}")

    def report(E, k, G, name, t, m, sv):
        r = dict(E=E, k=k, G=G, backend=name, ms=t * 1e3, ratio=t_dense / t, peak_mib=m / 2**20, peak_vs_dense=m / m_dense,
                 saved_mib=sv / 2**20, saved_vs_dense=sv / s_dense, tflops=flops / t / 1e12)
        rows.append(r)
        print(f"{E:>4} {k:>3} {G:>3}  {name:<26} {r['ms']:9.3f} {r['ratio']:10.2f} {r['peak_mib']:9.1f} "
              f"{r['peak_vs_dense']:10.2f} {r['saved_mib']:9.2f} {r['saved_vs_dense']:11.2f}"
              + (f"  {r['tflops']:4.0f} TFLOP/s = {r['tflops'] / peak:4.0%} of GEMM peak, {r['tflops'] / args.peak_tflops:4.0%} of datasheet"
                 if device.type == "cuda" else ""), flush=True)

    for E, k, G in cases:
        h = d_ff // G
        w_in = (torch.randn(E, d, h, generator=gen) / d**0.5).to(device, dtype).requires_grad_()
        w_out = (torch.randn(E, h, d, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
        for rname in routings:
            idx, gates = routing(T, E, k, gen, device, skew=args.skew if rname == "skewed" else 0.0)
            gates = gates.to(dtype).requires_grad_()
            load = torch.bincount(idx.reshape(-1), minlength=E).float()
            t_count = time_step(lambda: moe_plan(idx, E, 128), device, warmup, iters)
            t_sort = time_step(lambda: moe_plan(idx, E, 128, counting=False), device, warmup, iters)
            print(f"{'':>12}  routing {rname}: busiest expert {load.max() / load.mean():.2f}× the mean load, "
                  f"{int((load == 0).sum())} empty; plan {t_count * 1e3:.3f} ms by counting, {t_sort * 1e3:.3f} ms by sort")
            leaves = [x, w_in, w_out, gates]
            outs = {}
            for name, fn in fns.items():
                if name in skip: continue
                fwd = lambda fn=fn: fn(x, w_in, w_out, None, idx, gates)
                step = lambda fwd=fwd: torch.autograd.grad(fwd(), leaves, dy)
                it = max(1, iters // 5) if name == "loop" and device.type == "cuda" and E >= 64 else iters
                t = time_step(step, device, warmup, it)
                report(E, k, G, f"{name} {rname}", t, peak_bytes(step, device), saved_bytes(fwd, leaves))
                if name == "triton_tuned":                                     # what the tuner chose, and every candidate's time
                    entry = json.loads(tile_cache_path().read_text()).get(tile_key(x, w_in, idx.numel(), args.act, None), {})
                    print(f"{'':>18}tuned tiles {entry.get('config')}; ms per candidate (block_m,n,k,warps,stages,dh_block_n[,tma][,persistent[=kernels]]|combine): {entry.get('ms')}")
                y = fwd(); outs[name] = [y.detach(), *[g.detach() for g in torch.autograd.grad(y, leaves, dy)]]
                if name in ("triton", "triton_tma", "triton_persistent") and device.type == "cuda":   # per tile, TMA, persistent
                    try:
                        for kn, n, ms, tf in kernel_breakdown(step, 2 * T * k * d * h):
                            print(f"{'':>18}{kn[:40]:<40} {n:5.1f}/step {ms:8.3f} ms" + ("" if math.isnan(tf) else f" {tf:5.0f} TFLOP/s"))
                    except Exception as e: print(f"{'':>18}kernel breakdown failed: {type(e).__name__}: {str(e)[:200]}")
            for other in ("triton", "triton_tma", "triton_persistent", "plain_grouped_mm"):   # the fast paths agree with the torch backend
                if other not in outs or "torch" not in outs: continue
                errs = [((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()
                        for a, b in zip(outs[other], outs["torch"])]
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                ok &= max(errs) < tol
                print(f"{'':>12}  {other} vs torch (y, dx, dw_in, dw_out, dgates) max rel err "
                      + " ".join(f"{e:.1e}" for e in errs) + ("" if max(errs) < tol else "  MISMATCH"))
            outs = None
        w_in = w_out = None                                    # free them (the lambdas above still name them)
        for backend in ("triton", "torch"):                    # the whole layer, routing included
            if backend in skip: continue
            gcfg = GPTConfig(d_model=d, d_ff=d_ff, act=args.act, ffn="moe",
                             ffn_kwargs=dict(expansion=E // G, granularity=G, top_k=k // G, backend=backend))
            layer = MoEFFN(gcfg).to(device, dtype)
            xl = x.detach().view(1, T, d).requires_grad_()
            params = [xl, *layer.parameters()]
            def lfwd():
                y = layer(xl)
                return y, sum(layer.aux_loss.values())
            lstep = lambda: torch.autograd.grad(lfwd(), params, (dy.view(1, T, d), torch.ones((), device=device)), allow_unused=True)
            t = time_step(lstep, device, warmup, iters)
            report(E, k, G, f"layer_{backend} (router)", t, peak_bytes(lstep, device), saved_bytes(lambda: lfwd()[0], params))
            print(f"{'':>12}  its router: busiest expert {float(layer.stats['used'].max() / layer.stats['used'].mean()):.2f}× the mean load")
            layer = None
        if device.type == "cuda": torch.cuda.empty_cache()

    print("CSV,E,k,G,backend,ms,dense_over_this,peak_mib,peak_vs_dense,saved_mib,saved_vs_dense")
    print(f"CSV,0,0,0,dense,{t_dense * 1e3:.4f},1.0000,{m_dense / 2**20:.1f},1.0000,{s_dense / 2**20:.3f},1.0000")
    for r in rows:
        print(f"CSV,{r['E']},{r['k']},{r['G']},{r['backend']},{r['ms']:.4f},{r['ratio']:.4f},{r['peak_mib']:.1f},"
              f"{r['peak_vs_dense']:.4f},{r['saved_mib']:.3f},{r['saved_vs_dense']:.4f}")

    if device.type == "cuda":
        print("no host synchronisation, Triton layer:")
        for E, k, G in cases:
            sync_ok, graph_ok, t_graph = no_sync_and_graph(d, d_ff, T, E, k, G, args.act, device, dtype, gen, config)
            ok &= sync_ok.startswith("ok") and graph_ok.startswith("ok")
            print(f"  E={E} k={k} G={G}: sync-debug 'error': {sync_ok}; CUDA graph fwd+bwd: {graph_ok}"
                  + (f"; replay {t_graph * 1e3:.3f} ms, dense/graph {t_dense / t_graph:.2f}" if not math.isnan(t_graph) else ""))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
