"""Training-step throughput and MFU of the library's GPT + trainer, beside a plain eager reference, in one run.

    python bench/gpt.py                  # CUDA: GPT-2-small shape (d=768, 12 layers, seq 1024, batch 16, bf16)
    python bench/gpt.py --shape smoke    # CPU: the smoke model (tokens/s only)

MFU = tokens/s × (6·N + 12·L·T·d) / peak, N = non-embedding parameters (the head included), peak = 989 TFLOP/s
(H100 dense bf16; --peak-tflops to change). Imports only torch, numpy and the library's model and trainer.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from effworkbench.gpt import GPTConfig, param_counts
from effworkbench.train import TrainConfig, Trainer

SHAPES = {
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, seq_len=1024, vocab_size=50304, batch=16),
    "smoke": dict(d_model=64, n_layers=2, n_heads=4, seq_len=64, vocab_size=1024, batch=16),
}


class SyntheticCorpus:
    "Random token ids standing in for a tokenized corpus (the trainer only needs .train, .val and .vocab_size)."
    def __init__(self, vocab_size: int, n: int = 2_000_000):
        rng = np.random.default_rng(0)
        self.vocab_size = vocab_size
        self.train = rng.integers(0, vocab_size, n, dtype=np.int64).astype(np.uint16 if vocab_size < 65536 else np.uint32)
        self.val = self.train[: n // 10]


class RefBlock(nn.Module):
    "The plain reference: one fused QKV matmul, SDPA, GELU MLP, RMSNorm; no rotary, no multipliers, no groups."
    def __init__(self, d, h):
        super().__init__()
        self.h, self.n1, self.n2 = h, nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d))
        return x + self.proj(F.gelu(self.fc(self.n2(x))))


class RefGPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.emb = nn.Embedding(c["vocab_size"], c["d_model"])
        self.blocks = nn.ModuleList(RefBlock(c["d_model"], c["n_heads"]) for _ in range(c["n_layers"]))
        self.norm, self.head = nn.RMSNorm(c["d_model"]), nn.Linear(c["d_model"], c["vocab_size"], bias=False)

    def forward(self, idx, tgt):
        x = self.emb(idx)
        for b in self.blocks: x = b(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.view(-1))


def timed(step, device, warmup: int, iters: int) -> float:
    "Seconds per call of `step`, after `warmup` calls."
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup): step()
    sync(); t0 = time.perf_counter()
    for _ in range(iters): step()
    sync()
    return (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default=None, help="default: gpt2-small on CUDA, smoke elsewhere")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = SHAPES[args.shape or ("gpt2-small" if device.type == "cuda" else "smoke")]
    B, T = s["batch"], s["seq_len"]
    mcfg = GPTConfig(**{k: s[k] for k in ("d_model", "n_layers", "n_heads", "seq_len", "vocab_size")})
    N = param_counts(mcfg)["non_embedding"]
    flops_per_token = 6 * N + 12 * mcfg.n_layers * T * mcfg.d_model
    corpus = SyntheticCorpus(mcfg.vocab_size)
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"shape {s}, N_non_embedding {N / 1e6:.1f} M, {flops_per_token / 1e9:.2f} GFLOP/token")

    rows = []
    def record(name, sec):
        tps = B * T / sec
        mfu = tps * flops_per_token / (args.peak_tflops * 1e12) if device.type == "cuda" else float("nan")
        rows.append((name, sec * 1e3, tps, mfu))
        print(f"  {name:<22} {sec * 1e3:9.2f} ms/step {tps:12,.0f} tok/s   MFU {mfu:6.1%}", flush=True)

    for compile_ in ([False] if args.no_compile else [False, True]):
        # plain reference
        torch.manual_seed(0)
        ref = RefGPT(s).to(device)
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        fwd = torch.compile(ref) if compile_ else ref
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randint(0, mcfg.vocab_size, (B, T), generator=g).to(device)
        def ref_step():
            with torch.autocast(**amp) if amp else torch.autocast("cpu", enabled=False):
                loss = fwd(x, x)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        record(f"reference {'compile' if compile_ else 'eager'}", timed(ref_step, device, args.warmup, args.iters))
        del ref, opt, fwd
        # the library's trainer (data sampling, schedule, clipping and the loss check included)
        cfg = TrainConfig(model=mcfg, steps=10**6, batch_size=B, warmup=10, compile=compile_, eval_every=10**9,
                          ckpt_every=10**9, log_every=10**9)
        t = Trainer(cfg, corpus=corpus)
        record(f"effworkbench {'compile' if compile_ else 'eager'}", timed(t.train_step, device, args.warmup, args.iters))
        del t
        if device.type == "cuda": torch.cuda.empty_cache()

    base = rows[0][1]
    print("\nname,ms_per_step,tokens_per_s,mfu,speed_vs_reference_eager")
    for name, ms, tps, mfu in rows: print(f"{name},{ms:.3f},{tps:.0f},{mfu:.4f},{base / ms:.3f}")


if __name__ == "__main__":
    main()
