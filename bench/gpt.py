"""Training-step throughput and MFU of the library's GPT, in a plain loop and in its trainer, beside plain references, in one run.

    python bench/gpt.py                  # CUDA: GPT-2-small shape (d=768, 12 layers, seq 1024, batch 16, bf16)
    python bench/gpt.py --shape smoke    # CPU: the smoke model (float32)

Rows (eager, then compiled; --compiled-rows names the rows also compiled, each a compile of its own):
  reference            plain GPT: one fused QKV matmul, SDPA, GELU MLP, RMSNorm; no rotary, no clipping, no groups
  reference+rope+clip  the same with rotary positions (precomputed half-split tables) and global-norm clipping
  workbench model      effworkbench.nn.gpt.GPT in the reference+rope+clip loop (separates the model from the trainer)
  workbench trainer    effworkbench.train.Trainer.train_step: batch sampling + prefetch, per-group LR schedule,
                       clipping, loss/grad-norm check synced on every --log-every-th step as `fit` does
                       (on CUDA, three unsynced steps are then run under torch.cuda.set_sync_debug_mode("error"))

MFU = tokens/s × (6·(N + V·d) + 12·L·T·d) / peak, the library's `flops_per_token(cfg, training=True)`: N the layers'
matmul weights, V·d the head's (36 % of the step's FLOPs at the cpu-small shape), against two peaks:
the datasheet's (--peak-tflops, default 989 = H100 dense bf16; none on CPU unless given) and the card's own measured
GEMM peak (a large matmul in the compute dtype, the best of 5 timings in the same run). The rows take turns round by
round, each round starting one row later (of three copies of the reference timed in turn, the two that always ran
after the first were 0.6–0.8 % slower); ms_per_step is the median over rounds, ms_min the fastest round (the least
disturbed on a shared machine), paired_vs_reference the median over rounds of (reference's time / the row's time) in
the same round, with its quartiles (on a noisy CPU: --iters 100 --rounds 100, one step a round).

A second table, "head + loss", times the head's matmul with the cross-entropy alone, forward and backward (eager, the
compute dtype as in the step, weights in float32 under autocast on CUDA), at the step's B·T rows: F.linear with
F.cross_entropy on float32 logits (the reference's loss), the library's chunked_cross_entropy on the logits, and its
linear_cross_entropy at four block sizes around its default (`chunk` logits a block); with the peak memory each adds
on CUDA. linear_cross_entropy sums ∂ℓ/∂W over blocks in float32, V·d elements read and written per block, so its block
size trades that traffic against the block's own memory. Imports only torch, numpy, pandas and the library.
"""
import argparse
import inspect
import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from effworkbench.nn.gpt import (GPT, GPTConfig, ce_block_rows, chunked_cross_entropy, flops_per_token, linear_cross_entropy,
                                 param_counts)
from effworkbench.train import TrainConfig, Trainer
from heap import steady_heap

ROWS = ("reference", "reference+rope+clip", "workbench model", "workbench trainer")
SHAPES = {
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, seq_len=1024, vocab_size=50304, batch=16),
    "cpu-small": dict(d_model=128, n_layers=4, n_heads=4, seq_len=128, vocab_size=4096, batch=8),
    "smoke": dict(d_model=64, n_layers=2, n_heads=4, seq_len=64, vocab_size=1024, batch=16),
}


class SyntheticCorpus:
    "Random token ids standing in for a tokenized corpus (the trainer only needs .train, .val and .vocab_size)."
    def __init__(self, vocab_size: int, n: int = 2_000_000):
        rng = np.random.default_rng(0)
        self.vocab_size = vocab_size
        self.train = rng.integers(0, vocab_size, n, dtype=np.int64).astype(np.uint16 if vocab_size < 65536 else np.uint32)
        self.val = self.train[: n // 10]


def rope_tables(T: int, dh: int, base: float = 10_000.0):
    "Half-split rotary tables (T, Dh): cos, and sin with the sign of rotate_half folded in."
    inv = base ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]                # (T, Dh/2)
    return torch.cat((ang.cos(), ang.cos()), -1).float(), torch.cat((-ang.sin(), ang.sin()), -1).float()


class RefBlock(nn.Module):
    "The plain reference block: fused QKV, SDPA, GELU MLP, RMSNorm; rotary when given tables."
    def __init__(self, d, h):
        super().__init__()
        self.h, self.n1, self.n2 = h, nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x, rope=None):
        B, T, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)   # (B, H, T, Dh) each
        if rope is not None:
            c, s = (t[:T].to(q.dtype) for t in rope)
            q, k = (u * c + u.roll(u.shape[-1] // 2, -1) * s for u in (q, k))      # x·cos + rotate_half(x)·sin
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d))
        return x + self.proj(F.gelu(self.fc(self.n2(x))))


class RefGPT(nn.Module):
    def __init__(self, c, rotary: bool = False):
        super().__init__()
        self.emb = nn.Embedding(c["vocab_size"], c["d_model"])
        self.blocks = nn.ModuleList(RefBlock(c["d_model"], c["n_heads"]) for _ in range(c["n_layers"]))
        self.norm, self.head = nn.RMSNorm(c["d_model"]), nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        if rotary:
            cos, sin = rope_tables(c["seq_len"], c["d_model"] // c["n_heads"])
            self.register_buffer("cos", cos, persistent=False); self.register_buffer("sin", sin, persistent=False)
        self.rotary = rotary

    def forward(self, idx, tgt):
        x = self.emb(idx)
        rope = (self.cos, self.sin) if self.rotary else None
        for b in self.blocks: x = b(x, rope)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.view(-1))


def timed(step, device, warmup: int, iters: int) -> float:
    "Seconds per call of `step`, after `warmup` calls."
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup): step()
    sync(); t0 = time.perf_counter()
    for _ in range(iters): step()
    sync()
    return (time.perf_counter() - t0) / max(1, iters)


def gemm_tflops(device, dtype, n: int, reps: int = 10) -> float:
    "Measured TFLOP/s of an n×n×n matmul in `dtype`: the card's (or CPU's) attainable dense peak."
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sec = min(timed(lambda: a @ b, device, 2 if i == 0 else 0, reps) for i in range(5))   # the best of 5: load only slows it
    return 2 * n ** 3 / sec / 1e12


def loss_table(device, dtype, N: int, d: int, V: int, rounds: int, iters: int) -> pd.DataFrame:
    "Forward + backward of head and loss alone at (N, d, V): milliseconds (median of rounds), × the reference loss, peak MB."
    g = torch.Generator(device="cpu").manual_seed(1)
    h0 = torch.randn(N, d, generator=g).to(device, dtype)                       # (N, d) the final norm's output
    w = (0.02 * torch.randn(V, d, generator=g)).to(device).requires_grad_()     # (V, d) the head, float32 as trained
    y = torch.randint(0, V, (N,), generator=g).to(device)
    amp = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    default = ce_block_rows(1, device, None)                                          # the default block, in logits
    chunks = [default >> 2, default >> 1, default, default << 1]
    losses = {"F.cross_entropy, float32 logits": lambda h: F.cross_entropy(F.linear(h, w).float(), y),
              "chunked_cross_entropy": lambda h: chunked_cross_entropy(F.linear(h, w), y)}
    ce_chunk = inspect.signature(chunked_cross_entropy).parameters["chunk_elems"].default
    rows = {"F.cross_entropy, float32 logits": N, "chunked_cross_entropy": min(N, max(1, ce_chunk // V))}   # rows per block
    for c in chunks:
        name = f"linear_cross_entropy 2^{c.bit_length() - 1}{' (default)' if c == default else ''}"
        losses[name], rows[name] = (lambda h, c=c: linear_cross_entropy(h, w, y, chunk_elems=c)), min(N, ce_block_rows(V, device, c))
    h = h0.clone().requires_grad_()

    def step(fn):
        with amp: loss = fn(h)
        loss.backward(); h.grad = w.grad = None

    secs, peak = {k: [] for k in losses}, {}
    for name, fn in losses.items():
        step(fn)                                                                 # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
            step(fn); torch.cuda.synchronize(); peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(rounds):
        for name, fn in losses.items(): secs[name].append(timed(lambda: step(fn), device, 0, iters))
    ref = float(np.median(secs["F.cross_entropy, float32 logits"]))
    return pd.DataFrame([dict(loss=name, ms=float(np.median(v)) * 1e3, ms_min=min(v) * 1e3, speed_vs_reference=ref / float(np.median(v)),
                              peak_mb=peak.get(name, float("nan")), rows_per_block=rows[name]) for name, v in secs.items()])


def plain_loop(model, device, amp, x, clip: float, compile_: bool):
    "The step of a plain loop: forward, backward, (clip,) AdamW; returns the step closure."
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu") or None)
    fwd = torch.compile(model) if compile_ else model
    kw = {"return_logits": False} if isinstance(model, GPT) else {}

    def step():
        with torch.autocast(**amp) if amp else torch.autocast("cpu", enabled=False):
            out = fwd(x, x, **kw)
        loss = out[1] if isinstance(out, tuple) else out
        loss.backward()
        if clip: torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step(); opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default=None, help="default: gpt2-small on CUDA, smoke elsewhere")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30, help="timed steps per row, split over --rounds")
    ap.add_argument("--rounds", type=int, default=5, help="the rows take turns this many times (median reported)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="datasheet dense peak (default 989 on CUDA = H100 bf16)")
    ap.add_argument("--gemm-n", type=int, default=None, help="size of the peak-measuring matmul (default 8192 CUDA, 1024 CPU)")
    ap.add_argument("--log-every", type=int, default=10, help="the trainer row syncs (loss check) every this many steps")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--compiled-rows", default=",".join(ROWS), help="the rows also timed compiled, comma-separated "
                    "(each costs a compile: on a GPU with a short budget, 'reference,workbench trainer')")
    ap.add_argument("--csv", default=None, help="also write the table here")
    ap.add_argument("--heap", choices=["steady", "default"], default="steady", help="CPU heap (see heap.py)")
    args = ap.parse_args()
    compiled = [r.strip() for r in args.compiled_rows.split(",") if r.strip()]
    if unknown := set(compiled) - set(ROWS): ap.error(f"--compiled-rows: unknown {sorted(unknown)}; rows are {list(ROWS)}")
    if "reference" not in compiled: ap.error("--compiled-rows: the compiled rows are compared with the compiled reference; name it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heap = (steady_heap() if args.heap == "steady" else "default heap") if device.type == "cpu" else ""
    s = SHAPES[args.shape or ("gpt2-small" if device.type == "cuda" else "smoke")]
    B, T = s["batch"], s["seq_len"]
    mcfg = GPTConfig(**{k: s[k] for k in ("d_model", "n_layers", "n_heads", "seq_len", "vocab_size")})
    N = param_counts(mcfg, matmul_only=True)                       # .active: the layers' matmul weights; .embedding: the head's V·d
    step_flops_per_token = flops_per_token(mcfg, training=True)     # 6·(N + V·d) + 12·L·T·d
    corpus = SyntheticCorpus(mcfg.vocab_size)
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak_sheet = args.peak_tflops or (989.0 if device.type == "cuda" else float("nan"))
    peak_gemm = gemm_tflops(device, dtype, args.gemm_n or (8192 if device.type == "cuda" else 1024))
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}{', ' + heap if heap else ''}, shape {s}, "
          f"matmul weights {N.active / 1e6:.2f} M in the layers + {N.embedding / 1e6:.2f} M in the head, {step_flops_per_token / 1e9:.4f} GFLOP/token")
    print(f"peaks: datasheet {peak_sheet:.1f} TFLOP/s, measured {dtype} GEMM {peak_gemm:.2f} TFLOP/s")

    rows, rounds = [], {}
    def record(name, mode, secs):
        rounds[(name, mode)] = np.array(secs)
        sec = float(np.median(secs))
        tps = B * T / sec
        ach = tps * step_flops_per_token / 1e12
        rows.append(dict(name=name, mode=mode, ms_per_step=sec * 1e3, ms_min=min(secs) * 1e3, tokens_per_s=tps, tflops=ach,
                         mfu_datasheet=ach / peak_sheet, mfu_gemm=ach / peak_gemm))
        print(f"  {name:<20} {mode:<8} {sec * 1e3:9.2f} ms/step (min {min(secs) * 1e3:.2f}) {tps:12,.0f} tok/s   "
              f"MFU {ach / peak_sheet:6.1%} of datasheet, {ach / peak_gemm:6.1%} of measured GEMM", flush=True)

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, mcfg.vocab_size, (B, T), generator=g).to(device)
    for compile_ in ([False] if args.no_compile else [False, True]):
        mode = "compile" if compile_ else "eager"
        steps, wanted = {}, compiled if compile_ else ROWS
        for name, build, clip in (("reference", lambda: RefGPT(s), 0.0),
                                  ("reference+rope+clip", lambda: RefGPT(s, rotary=True), 1.0),
                                  ("workbench model", lambda: GPT(mcfg), 1.0)):
            if name not in wanted: continue
            torch.manual_seed(0)
            steps[name] = plain_loop(build().to(device), device, amp, x, clip, compile_)
        # the library's trainer (data sampling, schedule, clipping and the loss check on logging steps included)
        cfg = TrainConfig(model=mcfg, steps=10**6, batch_size=B, warmup=10, compile=compile_, eval_every=10**9,
                          ckpt_every=10**9, log_every=args.log_every)
        t = Trainer(cfg, corpus=corpus) if "workbench trainer" in wanted else None
        if t is not None: steps["workbench trainer"] = lambda: t.train_step(sync=(t.step + 1) % args.log_every == 0)
        # the rows take turns, round by round, so a load change on the machine hits them alike; median over rounds
        secs = {name: [] for name in steps}
        for name, step in steps.items(): timed(step, device, args.warmup, 0)
        per, names = max(1, args.iters // args.rounds), list(steps)
        for r in range(args.rounds):                               # each round starts one row later: no row always runs first
            for name in names[r % len(names):] + names[:r % len(names)]: secs[name].append(timed(steps[name], device, 0, per))
        for name in steps: record(name, mode, secs[name])
        if device.type == "cuda" and t is not None:    # an unsynced trainer step must not wait for the device
            t.train_step(sync=True)
            torch.cuda.synchronize(); torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3): t.train_step(sync=False)
                print(f"  {mode}: 3 unsynced trainer steps ran under set_sync_debug_mode('error'): no host sync")
            except RuntimeError as e: print(f"  {mode}: an unsynced trainer step synced: {str(e).splitlines()[0]}")
            finally: torch.cuda.set_sync_debug_mode("default")
        steps = t = None
        if device.type == "cuda": torch.cuda.empty_cache()

    df = pd.DataFrame(rows)
    base = df.set_index(["name", "mode"]).ms_per_step
    df["speed_vs_reference"] = [base[("reference", m)] / ms for m, ms in zip(df["mode"], df.ms_per_step)]
    best = df.set_index(["name", "mode"]).ms_min                   # on a shared machine the fastest round is the least disturbed
    def rc(t, m): return t.get(("reference+rope+clip", m), float("nan"))   # a row left out of --compiled-rows: nan
    df["speed_vs_rope_clip"] = [rc(base, m) / ms for m, ms in zip(df["mode"], df.ms_per_step)]
    df["speed_vs_rope_clip_min"] = [rc(best, m) / ms for m, ms in zip(df["mode"], df.ms_min)]
    # paired by round (the rows take turns, so a round's times share the machine's state): median and quartiles of
    # reference time / row time over rounds, the steadiest comparison on a shared CPU (--rounds = --iters: one step a round)
    paired = [rounds[("reference", m)] / rounds[(n, m)] for n, m in zip(df["name"], df["mode"])]
    df["paired_vs_reference"] = [float(np.median(r)) for r in paired]
    df["paired_q1"], df["paired_q3"] = [float(np.percentile(r, 25)) for r in paired], [float(np.percentile(r, 75)) for r in paired]
    pd.set_option("display.width", 200)
    print("\n" + df.to_string(index=False, float_format=lambda v: "nan" if math.isnan(v) else f"{v:.4g}"))
    if args.csv: df.to_csv(args.csv, index=False)

    lt = loss_table(device, dtype, B * T, mcfg.d_model, mcfg.vocab_size, max(3, args.rounds), 3 if device.type == "cuda" else 1)
    print(f"\nhead + loss, forward and backward, N = {B * T} rows, d = {mcfg.d_model}, V = {mcfg.vocab_size}, {dtype}:")
    print(lt.to_string(index=False, float_format=lambda v: "nan" if math.isnan(v) else f"{v:.4g}"))


if __name__ == "__main__":
    main()
