"""Compile every Triton MoE kernel launch for NVIDIA GPUs ahead of time, on a machine without one (worker of
test_moe_kernels.py, run in its own process because the kernels must be defined with TRITON_INTERPRET unset).

The layer runs forward and backward (and the dynamic-k inference kernels their forward) on CPU tensors with `_launch` replaced by a recorder, so the launches — kernel,
arguments, constexprs, warps, stages — are exactly the library's, with CUDA's tile choice. Each distinct launch is then
specialised as Triton's JIT would (16-byte-aligned pointers and multiples of 16 marked divisible, ints equal to 1 made
constants) and compiled to a cubin for sm_90 (H100/H200) and sm_80 (A100). On sm_90 the 16-bit kernels must use wgmma
(`warp_group_dot`) fed by a software-pipelined loop of async copies, and every kernel must fit in shared memory.
Launches with TMA descriptors (`MoEKernelConfig.tma`) are compiled for sm_90 only and must copy by TMA; the persistent
kernels (`MoEKernelConfig.persistent`: kernels 1, 2 and dH) must flatten their tile and reduction loops into one loop.
Each line also reports what `ptxas -v` says of the kernel's PTX (Triton's own ptxas, the same target): registers per
thread, the thread blocks per SM those registers allow, and spill stores/loads in bytes. Spills are reported, not failed
(test_moe_kernels.py fails on any at the default tiles).
Prints one line per compiled kernel and a summary; exit status 1 on any failure.

    python tests/moe_aot.py                 # sm_90 and sm_80
    python tests/moe_aot.py 90              # sm_90 only
    python tests/moe_aot.py 90 --candidates # instead: the training kernels at every tile the tuner may pick (16-bit, float32), both combines"""
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.tensor_descriptor import TensorDescriptor

import effworkbench.moe.kernels as mk

SMEM = {90: 232448, 80: 166912}   # opt-in shared memory per block, bytes
REGS_PER_SM = 65536                # 32-bit registers per SM (sm_80, sm_90)


def ptxas_resources(k, cc: int, warps: int) -> dict:
    "Registers per thread, the blocks per SM they allow and spill stores/loads (bytes) of compiled kernel `k`, from `ptxas -v`."
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f: f.write(k.asm["ptx"])
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{cc}{'a' if cc == 90 else ''}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    st, ld = (int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    per_block = -(-regs // 8) * 8 * 32 * warps                      # allocated in units of 8 per thread (256 per warp)
    return {"regs": regs, "blocks": REGS_PER_SM // per_block, "spill_st": st, "spill_ld": ld}


def dot_loops(ttgir: str) -> tuple[list[int], bool]:
    """How many scf.for loops enclose each dot of a kernel's TTGIR, and whether a store (or atomic add) sits in the
    innermost loop of a dot (a tile loop flattened with its reduction loop: the epilogue runs under an scf.if inside that one loop)."""
    stack, n_ids, depths, dot_fors, store_fors = [], 0, [], set(), set()   # stack: id of each open region (-1: not a loop)
    for ln in ttgir.splitlines():
        fors = [r for r in stack if r >= 0]
        if "warp_group_dot " in ln or "tt.dot " in ln:
            depths.append(len(fors))
            if fors: dot_fors.add(fors[-1])
        if ("tt.store " in ln or "tt.atomic_rmw " in ln) and fors: store_fors.add(fors[-1])
        net = ln.count("{") - ln.count("}")
        for _ in range(max(net, 0)):
            stack.append(n_ids if "scf.for " in ln else -1); n_ids += 1
        for _ in range(max(-net, 0)): stack.pop()
    return depths, bool(dot_fors & store_fors)


def record_launches(candidates: bool = False):
    seen = {}
    def rec(kernel, n_programs, cfg, *args, max_stages=8, **meta):
        seen.setdefault((kernel.fn.__name__, tuple(sorted(meta.items())), _spec_key(kernel, args), cfg.num_warps, cfg.num_stages),
                        (kernel, args, meta, cfg.num_warps, min(cfg.num_stages, max_stages)))
    mk._launch = rec
    mk._has_tma = lambda t: True                                     # CPU tensors stand for an sm_90 card's
    g = torch.Generator().manual_seed(0)
    N, E, d, h = 96, 4, 64, 128

    def layer(cfg, act, atomic, dtype=torch.bfloat16, K=2):
        ws = [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in [(N, d), (E, d, h), (E, h, d), (E, d, h)]]
        idx, gates = torch.randint(-1, E, (N, K), generator=g), torch.rand(N, K, generator=g).requires_grad_()
        y = mk.triton_moe_mlp(ws[0], ws[1], ws[2], ws[3] if act == "swiglu" else None, idx, gates, act, atomic=atomic, config=cfg)
        torch.autograd.grad(y, [*ws[:3], gates], torch.ones_like(y), allow_unused=True)

    if candidates:                                                   # training kernels, each activation, each tile, both combines
        for key, dtype in (("16bit", torch.bfloat16), ("float32", torch.float32)):
            for cfg in mk.TILE_CANDIDATES[key]:
                for act, atomic in [(a, at) for a in ("gelu", "relu", "swiglu") for at in (False, True)]: layer(cfg, act, atomic, dtype)
        return list(seen.values())
    tma = dataclasses.replace(mk.kernel_config("cuda", torch.bfloat16), tma=True)
    for act, atomic in [(a, at) for a in ("gelu", "swiglu") for at in (False, True)]: layer(tma, act, atomic)
    for act, atomic, K in [("gelu", False, 2), ("relu", False, 2), ("swiglu", False, 2), ("gelu", True, 2), ("swiglu", False, 1)]:
        layer(dataclasses.replace(tma, persistent=True), act, atomic, K=K)   # persistent kernels (K = 1: zero rows)
    for E2, h2 in ((32, 128), (128, 32)):                            # the dynamic-k inference kernel with TMA weight tiles
        x, take = torch.randn(N, d, generator=g).bfloat16(), torch.rand(N, E2, generator=g) < 0.2
        w_in, w_out = torch.randn(E2, d, h2, generator=g).bfloat16(), torch.randn(E2, h2, d, generator=g).bfloat16()
        mk.triton_masked_relu_mlp(x, w_in, w_out, take, config=dataclasses.replace(mk.masked_mlp_config("cuda", torch.bfloat16, h2), tma=True))
    for dtype in (torch.bfloat16, torch.float32):
        for act, atomic, K in [(a, at, k) for a in ("gelu", "relu", "swiglu") for at in (False, True) for k in (1, 2)]:
            x = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
            w_in = torch.randn(E, d, h, generator=g).to(dtype).requires_grad_()
            w_out = torch.randn(E, h, d, generator=g).to(dtype).requires_grad_()
            w_gate = torch.randn(E, d, h, generator=g).to(dtype).requires_grad_() if act == "swiglu" else None
            idx = torch.randint(-1, E, (N, K), generator=g)
            gates = torch.rand(N, K, generator=g).requires_grad_()
            y = mk.triton_moe_mlp(x, w_in, w_out, w_gate, idx, gates, act, atomic=atomic,
                                  config=mk.kernel_config("cuda", dtype))
            leaves = [t for t in (x, w_in, w_out, w_gate, gates) if t is not None]
            torch.autograd.grad(y, leaves, torch.ones_like(y))
        for E2, h2 in ((32, 128), (128, 32)):                        # the dynamic-k inference kernel, d_ff = 4096 split E ways
            x = torch.randn(N, d, generator=g).to(dtype)
            w_in, w_out = torch.randn(E2, d, h2, generator=g).to(dtype), torch.randn(E2, h2, d, generator=g).to(dtype)
            take = torch.rand(N, E2, generator=g) < 0.2
            mk.triton_masked_relu_mlp(x, w_in, w_out, take, config=mk.masked_mlp_config("cuda", dtype, h2))
            z, w2, b2 = torch.rand(N, 128, generator=g).to(dtype), torch.randn(E2, 128, generator=g).to(dtype), torch.randn(E2).to(dtype)
            mk.triton_tau_relu_mlp(x, w_in, w_out, z, w2, b2, 0.5, config=mk.masked_mlp_config("cuda", dtype, h2))
    interpreting, mk._interpreting = mk._interpreting, lambda: True  # CPU tensors take the plan's kernels, not its sort
    try:
        for E3, K3 in ((4, 2), (127, 4), (200, 8)):                   # the counting plan: 16-, 128- and 256-group tiles
            for idt in (torch.int64, torch.int32):
                mk.moe_plan(torch.randint(-1, E3, (N, K3), generator=g).to(idt), E3, 128)
    finally:
        mk._interpreting = interpreting
    return list(seen.values())


def _arg_spec(a):
    if isinstance(a, TensorDescriptor):                              # as the JIT specialises one: dtype and box
        return f"tensordesc<{_arg_spec(a.base)[0][1:]}[{', '.join(map(str, a.block_shape))}]>", False
    if isinstance(a, torch.Tensor):
        ty = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64", torch.int8: "i8"}[a.dtype]
        return f"*{ty}", a.data_ptr() % 16 == 0
    if isinstance(a, bool): return "i1", False
    if isinstance(a, float): return "fp32", False
    if isinstance(a, int):
        if a == 1: return 1, False                                   # the JIT makes it a constant
        return ("i32" if -2**31 <= a < 2**31 else "i64"), a % 16 == 0
    raise TypeError(type(a))


def _spec_key(kernel, args):
    return tuple(_arg_spec(a) for a in args)


def compile_all(ccs=(90, 80), candidates: bool = False):
    failures, res = 0, []
    for kernel, args, meta, warps, stages in record_launches(candidates):
        names = kernel.arg_names
        const, sig, attrs = dict(meta), {}, {}
        for i, (n, a) in enumerate(zip(names, args)):
            ty, div = _arg_spec(a)
            if ty == 1: const[n] = 1
            else:
                sig[n] = ty
                if div: attrs[(i,)] = [["tt.divisibility", 16]]
        full = {n: ("constexpr" if n in const else sig[n]) for n in names}
        a0 = args[0].base if isinstance(args[0], TensorDescriptor) else args[0]
        label = f"{kernel.fn.__name__} {a0.dtype if isinstance(a0, torch.Tensor) else ''} " + \
                " ".join(f"{k}={v}" for k, v in meta.items() if candidates or k not in ("BM", "BN", "BK"))
        tma = any(isinstance(a, TensorDescriptor) for a in args)
        for cc in ccs:
            if tma and cc < 90: continue                             # TMA: sm_90 and up
            try:
                k = triton.compile(ASTSource(kernel, full, constexprs=const, attrs=attrs), target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": warps, "num_stages": stages})
            except Exception as e:
                print(f"FAIL sm_{cc} {label}: {type(e).__name__}: {str(e)[:300]}"); failures += 1; continue
            ttgir, smem = k.asm["ttgir"], k.metadata.shared
            problems = []
            if smem > SMEM[cc]: problems.append(f"shared memory {smem} > {SMEM[cc]}")
            if cc == 90 and meta.get("PREC") == 1 and isinstance(a0, torch.Tensor) and a0.dtype == torch.bfloat16:
                if "warp_group_dot" not in ttgir: problems.append("no wgmma")
                if "async_copy_global_to_local" not in ttgir and "async_tma_copy_global_to_local" not in ttgir:
                    problems.append("loads not pipelined")
            if tma and "async_tma_copy_global_to_local" not in ttgir: problems.append("no TMA copy")
            if "persistent" in kernel.fn.__name__:
                depths, epilogue_in_loop = dot_loops(ttgir)
                if not depths or any(n != 1 for n in depths) or not epilogue_in_loop: problems.append("loops not flattened")
            r = ptxas_resources(k, cc, warps)
            res.append((cc, label, r))
            print(f"{'FAIL' if problems else 'ok  '} sm_{cc} {label}: warps {warps} stages {stages} smem {smem} "
                  f"regs {r['regs']} ({r['blocks']} block/SM) spills {r['spill_st']}/{r['spill_ld']} B "
                  + ("wgmma " if "warp_group_dot" in ttgir else "") + ("pipelined" if "async_copy" in ttgir else "")
                  + (" tma" if "async_tma_copy_global_to_local" in ttgir else "")
                  + (f"  <- {'; '.join(problems)}" if problems else ""), flush=True)
            failures += bool(problems)
    for cc in sorted({c for c, _, _ in res}):
        rc = [(lab, r) for c, lab, r in res if c == cc]
        spill = [lab for lab, r in rc if r["spill_st"] or r["spill_ld"]]
        top = max(rc, key=lambda t: t[1]["regs"])
        print(f"summary sm_{cc}: {len(rc)} kernels, most registers {top[1]['regs']} ({top[0].strip()}), "
              f"{len(spill)} spilling" + (f": {'; '.join(s.strip() for s in spill)}" if spill else ""))
    return failures


if __name__ == "__main__":
    ccs = tuple(int(c) for c in sys.argv[1:] if c.isdigit()) or (90, 80)        # args: compute capabilities
    sys.exit(1 if compile_all(ccs, candidates="--candidates" in sys.argv) else 0)
