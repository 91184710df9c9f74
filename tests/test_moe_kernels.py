"""The Triton MoE kernels (effworkbench.moe.kernels) against a float64 loop, forward and every gradient.

Runs the kernels through the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported) on CPU; on a CUDA
machine the same tests run the compiled kernels. Small widths and token counts keep the interpreter fast."""
import dataclasses
import json
import os

if not os.environ.get("EFFWB_TEST_CUDA"): os.environ["TRITON_INTERPRET"] = "1"   # EFFWB_TEST_CUDA=1: compiled kernels on a GPU

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    # a kernel defined before the variable was set would be compiled, not interpreted: make sure none was
    from triton.runtime.interpreter import InterpretedFunction
    import effworkbench.moe.kernels as mk
    assert isinstance(mk._moe_up_kernel, InterpretedFunction), "effworkbench.moe.kernels was imported before TRITON_INTERPRET=1"
else:
    import effworkbench.moe.kernels as mk

from effworkbench.moe.kernels import (MaskedMLPConfig, MoEKernelConfig, mask_plan, moe_plan, tau_plan, triton_masked_relu_mlp,
                                      triton_moe_mlp, triton_tau_relu_mlp)

DEV = torch.device("cuda" if os.environ.get("EFFWB_TEST_CUDA") and torch.cuda.is_available() else "cpu")
CFG = MoEKernelConfig(32, 32, 32, 4, 1) if DEV.type == "cpu" else None   # 32-row tiles: N below is never a multiple
MCFG = MaskedMLPConfig(32, 32, 32, 4, 1, block_h=32) if DEV.type == "cpu" else None


def loop_reference(x, w_in, w_out, w_gate, expert_idx, gates, act):
    "float64, one slot at a time: y[n] += g · act(x[n] W_in[e]) W_out[e] for each used slot."
    x, w_in, w_out, gates = x.double(), w_in.double(), w_out.double(), gates.double()
    w_gate = w_gate.double() if w_gate is not None else None
    rows = []
    for n in range(x.shape[0]):
        yn = torch.zeros(w_out.shape[-1], dtype=torch.float64, device=x.device)
        for k in range(expert_idx.shape[1]):
            e = int(expert_idx[n, k])
            if e < 0: continue
            a = x[n] @ w_in[e]
            if act == "swiglu": hid = F.silu(x[n] @ w_gate[e]) * a
            elif act == "gelu": hid = F.gelu(a)
            else: hid = torch.relu(a)
            yn = yn + gates[n, k] * (hid @ w_out[e])
        rows.append(yn)
    return torch.stack(rows)


def make_case(N, E, K, d, h, act, routing, seed):
    "Fresh random inputs for one case (its own seed). Routings: uniform, skewed (with empty experts), dynamic_k, none."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    w_in, w_out = torch.randn(E, d, h, generator=g) / d**0.5, torch.randn(E, h, d, generator=g) / h**0.5
    w_gate = torch.randn(E, d, h, generator=g) / d**0.5 if act == "swiglu" else None
    if routing == "uniform":
        idx = torch.randint(0, E, (N, K), generator=g)
    elif routing == "skewed":                       # loads ∝ 1/(e+1)³ over the first half of the experts; the rest empty
        p = torch.zeros(E, dtype=torch.float64); p[: max(1, E // 2)] = 1 / torch.arange(1, max(1, E // 2) + 1) ** 3
        idx = torch.multinomial(p.expand(N, -1), K, replacement=True, generator=g)
        idx[torch.rand(N, K, generator=g) < 0.2] = -1   # dropped slots
    elif routing == "dynamic_k":                    # K = E slots, slot i = expert i when taken; some tokens take none
        assert K == E
        take = torch.rand(N, E, generator=g) < torch.rand(N, 1, generator=g)
        take[: N // 5] = False
        idx = torch.where(take, torch.arange(E).expand(N, E), -1)
    elif routing == "none":
        idx = torch.full((N, K), -1)
    else:
        raise ValueError(routing)
    gates = torch.rand(N, K, generator=g) * (idx >= 0)
    return [t.to(DEV) if t is not None else None for t in (x, w_in, w_out, w_gate, idx, gates)]


CASES = {   # name: (N, E, K, d, h, act, routing)
    "uneven_empty_k2_gelu": (77, 8, 2, 32, 32, "gelu", "skewed"),
    "top1_relu": (45, 4, 1, 32, 32, "relu", "uniform"),
    "k3_swiglu": (50, 6, 3, 32, 16, "swiglu", "skewed"),
    "dynamic_k_gelu": (40, 5, 5, 16, 32, "gelu", "dynamic_k"),
    "dynamic_k_swiglu": (33, 4, 4, 16, 16, "swiglu", "dynamic_k"),
    "odd_widths_relu": (29, 3, 2, 24, 40, "relu", "uniform"),       # d, h not multiples of the tiles
    "all_unused_gelu": (20, 4, 2, 16, 16, "gelu", "none"),          # every slot -1: y = 0, every gradient 0
    "top1_dropped_swiglu": (45, 6, 1, 32, 40, "swiglu", "skewed"),  # K = 1 with dropped slots: kernel 2 writes their rows' zeros
}


def run_case(case, seed, atomic=False, config=None):
    x, w_in, w_out, w_gate, idx, gates = make_case(*case, seed)
    act = case[5]
    leaves = [t.requires_grad_() for t in (x, w_in, w_out, w_gate, gates) if t is not None]
    y = triton_moe_mlp(x, w_in, w_out, w_gate, idx, gates, act, atomic=atomic, config=config or CFG)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEV)
    grads = torch.autograd.grad(y, leaves, dy)
    x64, w_in64, w_out64, w_gate64, gates64 = (t.detach().double().requires_grad_() if t is not None else None
                                               for t in (x, w_in, w_out, w_gate, gates))
    leaves64 = [t for t in (x64, w_in64, w_out64, w_gate64, gates64) if t is not None]
    y64 = loop_reference(x64, w_in64, w_out64, w_gate64, idx, gates64, act)
    grads64 = (torch.autograd.grad(y64, leaves64, dy.double(), allow_unused=True) if y64.requires_grad
               else [None] * len(leaves))                               # no used slot: y depends on nothing
    names = ["y", "x", "w_in", "w_out"] + (["w_gate"] if w_gate is not None else []) + ["gates"]
    return y, grads, names, [y64.detach(), *[g if g is not None else torch.zeros_like(l, dtype=torch.float64)
                                             for g, l in zip(grads64, leaves64)]]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_loop(name):
    seed = 1000 + list(CASES).index(name)            # a different seed for every case
    y, grads, names, refs = run_case(CASES[name], seed)
    for n, got, ref in zip(names, [y, *grads], refs):
        assert got.dtype == torch.float32 and got.shape == ref.shape, n
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=lambda m: f"{name} {n}: {m}")
    if CASES[name][-1] == "none":
        assert all(g.abs().max() == 0 for g in [y, *grads])
    if CASES[name][-1] == "skewed":                  # empty experts get exactly zero weight gradients
        assert (grads[1][CASES[name][1] // 2:] == 0).all() and (grads[2][CASES[name][1] // 2:] == 0).all()


@pytest.mark.parametrize("name", ["k3_swiglu", "odd_widths_relu"])
def test_dh_column_tile_of_its_own(name):
    "The dH kernel on narrower column tiles than the rest (dh_block_n; its gate-gradient partials then come in more blocks)."
    seed = 4000 + list(CASES).index(name)
    narrow = dataclasses.replace(CFG or mk.kernel_config(DEV, torch.float32), dh_block_n=16)
    y, grads, names, refs = run_case(CASES[name], seed, config=narrow)
    for n, got, ref in zip(names, [y, *grads], refs):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * max(ref.abs().max().item(), 1.0), msg=lambda m: f"{n}: {m}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # TMA candidates: rows copied, never written out
def test_every_tile_candidate_matches_float64():
    "Each tile shape the tuner may pick computes the same layer: every CUDA candidate of the running dtype, or the interpreter's."
    cands = mk.TILE_CANDIDATES["interpreter" if DEV.type == "cpu" else "float32"]
    for i, cfg in enumerate(cands):
        y, grads, names, refs = run_case(CASES["uneven_empty_k2_gelu"], 1500 + i, config=cfg)
        for n, got, ref in zip(names, [y, *grads], refs):
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * max(ref.abs().max().item(), 1.0), msg=lambda m: f"{cfg} {n}: {m}")


def record_tma(monkeypatch) -> list:
    "(kernel, TMA, W_T) of every launch that takes the TMA switch; the launches still run."
    seen, launch = [], mk._launch
    def rec(kernel, n, cfg, *args, **meta):
        if "TMA" in meta: seen.append((kernel.fn.__name__, meta["TMA"], meta["W_T"]))
        return launch(kernel, n, cfg, *args, **meta)
    monkeypatch.setattr(mk, "_launch", rec)
    return seen


def assert_matches(got, refs, names, what):
    for n, g_, r_ in zip(names, got, refs):
        torch.testing.assert_close(g_.double(), r_, rtol=1e-4, atol=1e-5 * max(r_.abs().max().item(), 1.0), msg=lambda m: f"{what} {n}: {m}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # kernel 2 copies rows it never writes out
@pytest.mark.parametrize("name", ["uneven_empty_k2_gelu", "k3_swiglu", "top1_relu", "odd_widths_relu"])
def test_tma_copies_match_float64(name, monkeypatch):
    """With `tma`, every weight tile (W_in and W_out as stored in kernels 1 and 2, transposed in the dH kernel and for dX)
    and kernel 2's sorted rows come by TMA copies (the interpreter's, or an sm_90 card's), and the layer is unchanged."""
    seen = record_tma(monkeypatch)
    cfg = dataclasses.replace(CFG or mk.kernel_config(DEV, torch.float32), tma=True)
    y, grads, names, refs = run_case(CASES[name], 6000 + list(CASES).index(name), config=cfg)
    assert_matches([y, *grads], refs, names, name)
    on = mk._has_tma(y)                                                   # False on a CUDA card before sm_90: pointer loads
    assert set(seen) == {("_moe_up_kernel", on, False), ("_moe_rows_kernel", on, False), ("_moe_dh_kernel", on, on),
                         ("_moe_rows_kernel", on, on)}, seen


@pytest.mark.parametrize("persistent", [False, True])
def test_tma_falls_back_where_copies_cannot_address(persistent, monkeypatch):
    """h = 42 float32 (168-byte rows, not a multiple of 16): W_in, H and dA cannot be described, so kernel 1 and both
    kernel-2 launches load by pointers, while the dH kernel still copies W_out (rows of d = 24: 96 bytes) by TMA; the
    persistent kernels run only over TMA copies, so here kernels 1 and 2 run per tile and the dH kernel persistent."""
    seen, names_run, launch = record_tma(monkeypatch), [], mk._launch
    monkeypatch.setattr(mk, "_launch", lambda kernel, *a, **kw: names_run.append(kernel.fn.__name__) or launch(kernel, *a, **kw))
    cfg = dataclasses.replace(CFG or mk.kernel_config(DEV, torch.float32), tma=True, persistent=persistent)
    y, grads, names, refs = run_case((29, 3, 2, 24, 42, "relu", "uniform"), 6100, config=cfg)
    assert_matches([y, *grads], refs, names, "h=42")
    on = mk._has_tma(y)
    dh_persistent = persistent and on
    assert set(seen) == {("_moe_up_kernel", False, False), ("_moe_rows_kernel", False, False)} | (set() if dh_persistent else
                                                                                                  {("_moe_dh_kernel", on, on)}), seen
    assert ("_moe_dh_persistent_kernel" in names_run) == dh_persistent, names_run


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # kernel 2 copies rows it never writes out
@pytest.mark.parametrize("name,atomic", [(n, False) for n in ["uneven_empty_k2_gelu", "k3_swiglu", "odd_widths_relu", "dynamic_k_gelu",
                                                              "all_unused_gelu", "top1_dropped_swiglu"]]
                                        + [("uneven_empty_k2_gelu", True), ("top1_dropped_swiglu", True)])
def test_persistent_kernels_match_float64(name, atomic, monkeypatch):
    """`persistent` where the copies are TMA's: kernels 1 and 2 (forward and dX) and the dH kernel (not for SwiGLU) each
    run as min(tiles, programs) programs (3 under the interpreter, one per SM on a card), each looping over every P-th
    tile of the row tiles they compute × column blocks; the layer is unchanged, empty experts, all-unused routings and
    K = 1 with dropped slots (whose zero rows kernel 2 writes) included, with either combine. On a card before sm_90 the
    per-tile kernels run."""
    grids, launch = [], mk._launch
    monkeypatch.setattr(mk, "_launch", lambda kernel, n, *a, **kw: grids.append((kernel.fn.__name__, n)) or launch(kernel, n, *a, **kw))
    cfg = dataclasses.replace(CFG or mk.kernel_config(DEV, torch.float32), tma=True, persistent=True)
    y, grads, names, refs = run_case(CASES[name], 6200 + list(CASES).index(name), atomic=atomic, config=cfg)
    assert_matches([y, *grads], refs, names, name)
    on = mk._has_tma(y)
    ran = {k for k, _ in grids if k.startswith(("_moe_up", "_moe_rows", "_moe_dh"))}
    swiglu = CASES[name][5] == "swiglu"
    if not on:                                                         # a card before sm_90: the per-tile kernels
        assert ran == {"_moe_up_kernel", "_moe_rows_kernel", "_moe_dh_kernel"}, grids
        return
    assert ran == {"_moe_up_persistent_kernel", "_moe_rows_persistent_kernel", "_moe_dh_kernel" if swiglu else "_moe_dh_persistent_kernel"}, grids
    N, E, K, d, h = CASES[name][:5]
    P = mk._persistent_programs(y)
    up, rows, dh = ((triton.cdiv(N * K, cfg.block_m) + E + 1) * triton.cdiv(n, b) for n, b in
                    ((h, cfg.block_n), (d, cfg.block_n), (h, cfg.dh_block_n or cfg.block_n)))
    assert [n for k, n in grids if k == "_moe_up_persistent_kernel"] == [min(up, P)], grids
    assert [n for k, n in grids if k == "_moe_rows_persistent_kernel"] == [min(rows, P)] * 2, grids   # y and dX
    assert [n for k, n in grids if k == "_moe_dh_persistent_kernel"] == ([] if swiglu else [min(dh, P)]), grids
    if DEV.type == "cpu": assert min(up, rows, dh) > 3                # the grid is the programs, not the tiles


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # kernel 2 copies rows it never writes out
@pytest.mark.parametrize("persistent", ["up", "rows", "dh", "up,dh"])
def test_persistent_subsets_run_only_the_kernels_they_name(persistent, monkeypatch):
    """`persistent` naming some of kernels 1 ('up'), 2 ('rows': its y and dX launches) and dH: those run as persistent
    loops, the others per tile over the same TMA copies, and the layer is unchanged."""
    names_run, launch = [], mk._launch
    monkeypatch.setattr(mk, "_launch", lambda kernel, *a, **kw: names_run.append(kernel.fn.__name__) or launch(kernel, *a, **kw))
    cfg = dataclasses.replace(CFG or mk.kernel_config(DEV, torch.float32), tma=True, persistent=persistent)
    y, grads, names, refs = run_case(CASES["uneven_empty_k2_gelu"], 6300, config=cfg)
    assert_matches([y, *grads], refs, names, persistent)
    on = mk._has_tma(y)
    for kernel in mk.PERSISTENT_KERNELS:
        launches = [n for n in names_run if n.startswith(f"_moe_{kernel}_")]
        want = f"_moe_{kernel}_persistent_kernel" if on and kernel in persistent.split(",") else f"_moe_{kernel}_kernel"
        assert launches == [want] * (2 if kernel == "rows" else 1), names_run


def test_config_names_its_persistent_kernels():
    """`persistent` is stored as the kernels it names, in one order (True: all three, False: none), so equal choices are
    equal configs, a subset survives the tile cache's JSON and an old cache's `true` still reads; the tuner's label names
    a subset, and an unknown kernel is an error."""
    C = MoEKernelConfig
    assert C(persistent=True).persistent == "up,rows,dh" and C(persistent=False).persistent == ""
    assert C(persistent="dh, up") == C(persistent="up,dh") and C(persistent="dh, up").persistent == "up,dh"
    assert [C(persistent="rows,dh").persists(k) for k in mk.PERSISTENT_KERNELS] == [False, True, True]
    assert not any(C().persists(k) for k in mk.PERSISTENT_KERNELS)
    sub = C(16, 32, 16, 4, 1, tma=True, persistent="dh,rows")
    assert C(**json.loads(json.dumps(dataclasses.asdict(sub)))) == sub
    old = dataclasses.asdict(C(persistent=True)) | {"persistent": True}
    assert C(**json.loads(json.dumps(old))) == C(persistent="up,rows,dh")
    assert mk._tile_label(sub) == "16,32,16,4,1,None,tma,persistent=rows+dh"
    assert mk._tile_label(dataclasses.replace(sub, persistent=True)) == "16,32,16,4,1,None,tma,persistent"
    assert mk._tile_label(dataclasses.replace(sub, persistent="")) == "16,32,16,4,1,None,tma"
    with pytest.raises(ValueError, match="unknown kernels"): C(persistent="up,down")
    with pytest.raises(TypeError): C(persistent=1)


def test_tuned_config_picks_the_fastest_and_caches_it(tmp_path, monkeypatch):
    """The tuner runs the real timing step once per candidate, keeps the argmin of the times it is given, writes every
    time to the cache file, and answers later calls of the shape class from memory, then from the file alone; a new shape
    class is timed again; a candidate out of resources is skipped, any other error raised."""
    monkeypatch.setenv("EFFWB_CACHE", str(tmp_path))
    monkeypatch.setattr(mk, "_TUNED", {})
    c0, c1 = cands = (MoEKernelConfig(32, 32, 32, 4, 1), MoEKernelConfig(16, 32, 16, 4, 1, tma=True))   # the cache keeps `tma`
    fake = {c0: 3.0, c1: 1.0}
    calls = []
    def timer(cfg, *args):
        t = mk.time_tiles(cfg, *args, reps=1)                                     # the real step runs and times
        assert t > 0
        calls.append(cfg)
        return fake[cfg]
    g = torch.Generator().manual_seed(5)
    x, w_in, w_out = (torch.randn(*s, generator=g).to(DEV) for s in [(37, 16), (3, 16, 24), (3, 24, 16)])
    idx = torch.randint(0, 3, (37, 2), generator=g).to(DEV)
    assert mk.tuned_config(x, w_in, w_out, None, idx, candidates=cands, timer=timer) == c1
    assert calls == [c0, c1]
    table = json.loads((tmp_path / "moe_tiles.json").read_text())
    key = mk.tile_key(x, w_in, idx.numel(), "gelu", False)
    assert list(table) == [key] and table[key]["config"] == dataclasses.asdict(c1)
    assert table[key]["ms"] == {"32,32,32,4,1,None": 3000.0, "16,32,16,4,1,None,tma": 1000.0}
    assert key.endswith("E=3|d=16|h=24|S=128")                                    # 74 slots round up to 128
    never = lambda *a: pytest.fail("timed a cached shape class")
    assert mk.tuned_config(x, w_in, w_out, None, idx[:33], candidates=cands, timer=never) == c1   # 66 slots: same class
    monkeypatch.setattr(mk, "_TUNED", {})                                         # a new process: the file answers
    assert mk.tuned_config(x, w_in, w_out, None, idx, candidates=cands, timer=never) == c1
    fake.update({c0: 0.5})
    assert mk.tuned_config(x, w_in[:, :, :20], w_out[:, :20], None, idx, candidates=cands, timer=timer) == c0   # new h
    assert len(json.loads((tmp_path / "moe_tiles.json").read_text())) == 2

    class OutOfResources(Exception): pass
    def tight(cfg, *a):
        if cfg == c0: raise OutOfResources("shared memory")
        return 1.0
    assert mk.tuned_config(x, w_in[:, :, :8], w_out[:, :8], None, idx, candidates=cands, timer=tight, cache=False) == c1
    with pytest.raises(ZeroDivisionError):
        mk.tuned_config(x, w_in[:, :, :4], w_out[:, :4], None, idx, candidates=cands, timer=lambda *a: 1 / 0, cache=False)


def test_tuner_tries_tma_tiles_only_where_the_card_has_tma(tmp_path, monkeypatch):
    "On a card without TMA (before sm_90) a `tma` candidate would repeat its pointer-load twin: it is not timed."
    monkeypatch.setenv("EFFWB_CACHE", str(tmp_path))
    monkeypatch.setattr(mk, "_TUNED", {})
    c0, c1 = MoEKernelConfig(32, 32, 32, 4, 1), MoEKernelConfig(16, 32, 16, 4, 1, tma=True)
    g = torch.Generator().manual_seed(12)
    x, w_in, w_out = (torch.randn(*s, generator=g).to(DEV) for s in [(37, 16), (3, 16, 24), (3, 24, 16)])
    idx = torch.randint(0, 3, (37, 2), generator=g).to(DEV)
    calls = []
    timer = lambda cfg, *a: calls.append(cfg) or (1.0 if cfg.tma else 2.0)
    monkeypatch.setattr(mk, "_has_tma", lambda t: False)
    assert mk.tuned_config(x, w_in, w_out, None, idx, candidates=(c0, c1), timer=timer, cache=False) == c0 and calls == [c0]
    monkeypatch.setattr(mk, "_TUNED", {}); calls.clear()
    monkeypatch.setattr(mk, "_has_tma", lambda t: True)
    assert mk.tuned_config(x, w_in, w_out, None, idx, candidates=(c0, c1), timer=timer, cache=False) == c1 and calls == [c0, c1]


def test_tuner_times_swiglu_persistent_subsets_once(tmp_path, monkeypatch):
    "SwiGLU's dH kernel runs per tile whatever `persistent` says, so subsets that differ only in 'dh' are timed once for it."
    monkeypatch.setenv("EFFWB_CACHE", str(tmp_path))
    base = MoEKernelConfig(16, 32, 16, 4, 1, tma=True)
    cands = tuple(dataclasses.replace(base, persistent=p) for p in ("up", "up,dh", "dh", "", "rows,dh"))
    g = torch.Generator().manual_seed(13)
    x, w_in, w_out = (torch.randn(*s, generator=g).to(DEV) for s in [(37, 16), (3, 16, 24), (3, 24, 16)])
    idx = torch.randint(0, 3, (37, 2), generator=g).to(DEV)
    monkeypatch.setattr(mk, "_has_tma", lambda t: True)
    for act, w_gate, timed in (("swiglu", w_in.clone(), ["up", "", "rows"]), ("gelu", None, ["up", "up,dh", "dh", "", "rows,dh"])):
        monkeypatch.setattr(mk, "_TUNED", {})
        calls = []
        best = mk.tuned_config(x, w_in, w_out, w_gate, idx, act, candidates=cands, cache=False,
                               timer=lambda cfg, *a: calls.append(cfg.persistent) or len(calls))
        assert calls == timed and best.persistent == "up", (act, calls)


def test_layer_tunes_only_when_asked_and_on_cuda(monkeypatch):
    "EFFWB_MOE_TUNE=1 routes a CUDA call without a config through tuned_config; off, or on CPU, the default tiles."
    asked = []
    monkeypatch.setattr(mk, "tuned_config", lambda *a, **k: asked.append(1) or (CFG or mk.kernel_config(DEV, torch.float32)))
    for env in ("0", "1"):
        monkeypatch.setenv("EFFWB_MOE_TUNE", env)
        x, w_in, w_out, w_gate, idx, gates = make_case(*CASES["uneven_empty_k2_gelu"], 3)
        triton_moe_mlp(x, w_in, w_out, w_gate, idx, gates, "gelu", config=CFG if DEV.type == "cpu" and env == "0" else None)
    assert asked == ([1] if DEV.type == "cuda" else [])


def test_tuner_chooses_the_combine_when_it_is_open(tmp_path, monkeypatch):
    """atomic=None: every candidate is timed with both combines (K > 1; with K = 1 only the deterministic one), the
    winner carries its combine, the cache names the class `auto` and labels each time; the layer then runs the chosen
    combine. Under torch.use_deterministic_algorithms the layer asks the tuner for the deterministic combine only."""
    monkeypatch.setenv("EFFWB_CACHE", str(tmp_path))
    monkeypatch.setattr(mk, "_TUNED", {})
    c0, c1 = cands = (MoEKernelConfig(32, 32, 32, 4, 1), MoEKernelConfig(16, 32, 16, 4, 1))
    calls = []
    def timer(cfg, *a):                                      # atomics win with c1, the deterministic combine with c0
        calls.append(cfg)
        return {(c0, False): 2.0, (c0, True): 3.0, (c1, False): 4.0, (c1, True): 1.5}[(dataclasses.replace(cfg, atomic=None), cfg.atomic)]
    g = torch.Generator().manual_seed(8)
    x, w_in, w_out = (torch.randn(*s, generator=g).to(DEV) for s in [(37, 16), (3, 16, 24), (3, 24, 16)])
    idx = torch.randint(0, 3, (37, 2), generator=g).to(DEV)
    best = mk.tuned_config(x, w_in, w_out, None, idx, atomic=None, candidates=cands, timer=timer)
    assert best == dataclasses.replace(c1, atomic=True)
    assert sorted((c.block_m, c.atomic) for c in calls) == [(16, False), (16, True), (32, False), (32, True)]
    key = mk.tile_key(x, w_in, idx.numel(), "gelu", None)
    assert "|auto|" in key and key != mk.tile_key(x, w_in, idx.numel(), "gelu", False)
    entry = json.loads((tmp_path / "moe_tiles.json").read_text())[key]
    assert entry["config"]["atomic"] is True
    assert entry["ms"] == {"32,32,32,4,1,None|deterministic": 2000.0, "32,32,32,4,1,None|atomic": 3000.0,
                           "16,32,16,4,1,None|deterministic": 4000.0, "16,32,16,4,1,None|atomic": 1500.0}
    calls.clear()                                            # K = 1: slots are tokens, only the deterministic combine
    assert mk.tuned_config(x, w_in, w_out, None, idx[:, :1], atomic=None, candidates=cands, timer=timer, cache=False) \
        == dataclasses.replace(c0, atomic=False)
    assert [c.atomic for c in calls] == [False, False]

    ran = []                                                 # the layer runs the combine the chosen config carries
    real_down = mk._down
    monkeypatch.setattr(mk, "_down", lambda *a: ran.append(a[8]) or real_down(*a))
    base = CFG or mk.kernel_config(DEV, torch.float32)
    xs, wi, wo, wg, i2, gates = make_case(*CASES["uneven_empty_k2_gelu"], 5)
    for chosen in (True, False):
        ran.clear()
        y = triton_moe_mlp(xs, wi, wo, wg, i2, gates, "gelu", config=dataclasses.replace(base, atomic=chosen))
        assert ran == [chosen]
        ran.clear()                                          # an explicit combine overrides the config's
        triton_moe_mlp(xs, wi, wo, wg, i2, gates, "gelu", atomic=not chosen, config=dataclasses.replace(base, atomic=chosen))
        assert ran == [not chosen]
    torch.testing.assert_close(y.double(), loop_reference(xs, wi, wo, wg, i2, gates, "gelu"), rtol=1e-4, atol=1e-5)
    ran.clear()                                              # the tuner's clock times the candidate's own combine
    mk.time_tiles(dataclasses.replace(base, atomic=True), xs, wi, wo, wg, i2, "gelu", False, reps=1)
    assert set(ran) == {True}

    asked = []                                               # with tuning on: the open combine, or deterministic only
    monkeypatch.setattr(mk, "_tune_tiles", lambda x: True)
    monkeypatch.setattr(mk, "tuned_config", lambda *a, **k: asked.append(a[6]) or dataclasses.replace(base, atomic=True))
    ran.clear()
    triton_moe_mlp(xs, wi, wo, wg, i2, gates, "gelu")
    assert asked == [None] and ran == [True]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        asked.clear(); ran.clear()
        monkeypatch.setattr(mk, "tuned_config", lambda *a, **k: asked.append(a[6]) or base)
        triton_moe_mlp(xs, wi, wo, wg, i2, gates, "gelu")
        assert asked == [False] and ran == [False]
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed):
    "Random sizes, activations and routings (a fresh draw per seed), forward and every gradient."
    g = torch.Generator().manual_seed(3000 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    E = r(1, 9)
    routing = ["uniform", "skewed", "dynamic_k"][seed % 3]
    K = E if routing == "dynamic_k" else r(1, 4)
    act = ["gelu", "relu", "swiglu"][r(0, 2)]
    case = (r(1, 70), E, K, 8 * r(1, 5), 8 * r(1, 5), act, routing)
    y, grads, names, refs = run_case(case, 3000 + seed)
    for n, got, ref in zip(names, [y, *grads], refs):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * max(ref.abs().max().item(), 1.0),
                                   msg=lambda m: f"{case} {n}: {m}")


@pytest.mark.parametrize("name", ["uneven_empty_k2_gelu", "dynamic_k_swiglu"])
def test_atomic_combine_matches(name):
    seed = 2000 + list(CASES).index(name)
    y, grads, names, refs = run_case(CASES[name], seed, atomic=True)
    for n, got, ref in zip(names, [y, *grads], refs):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * max(ref.abs().max().item(), 1.0), msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_bf16_and_autocast(act):
    """The GPU dtype: bf16 inputs (bf16 A, H and outputs) within bf16 rounding of float64; under autocast, float32
    master weights get float32 gradients through the casts."""
    case = (60, 5, 2, 32, 32, act, "skewed")
    x, w_in, w_out, w_gate, idx, gates = make_case(*case, seed=4000 + len(act))
    leaves32 = [t.requires_grad_() for t in (x, w_in, w_out, w_gate, gates) if t is not None]
    b = [t.detach().bfloat16().requires_grad_() for t in leaves32]
    it = iter(b)
    xb, wib, wob, wgb, gb = (next(it) if t is not None else None for t in (x, w_in, w_out, w_gate, gates))
    y = triton_moe_mlp(xb, wib, wob, wgb, idx, gb, act, config=CFG)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(DEV)
    got = [y, *torch.autograd.grad(y, b, dy.bfloat16())]
    l64 = [t.detach().double().requires_grad_() for t in b]
    it = iter(l64)
    x64, wi64, wo64, wg64, g64 = (next(it) if t is not None else None for t in (x, w_in, w_out, w_gate, gates))
    y64 = loop_reference(x64, wi64, wo64, wg64, idx, g64, act)
    ref = [y64, *torch.autograd.grad(y64, l64, dy.bfloat16().double())]
    for g_, r_ in zip(got, ref):
        assert g_.dtype == torch.bfloat16
        assert ((g_.double() - r_).abs().max() / r_.abs().max()).item() < 3e-2
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        ya = triton_moe_mlp(x, w_in, w_out, w_gate, idx, gates, act, config=CFG)
    assert ya.dtype == torch.bfloat16
    ga = torch.autograd.grad(ya, leaves32, dy.bfloat16())
    assert all(g_.dtype == torch.float32 for g_ in ga)
    for g_, r_ in zip([ya, *ga], ref):                                   # (the gates stay float32 under autocast)
        assert ((g_.double() - r_).abs().max() / r_.abs().max()).item() < 3e-2


@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}), reason="triton without its NVIDIA backend")
def test_kernels_compile_for_hopper():
    """Every launch the layer makes, compiled for sm_90 without a GPU: wgmma, pipelined loads, shared memory that fits;
    the registers ptxas reports for each kernel, and no kernel spilling to local memory at the default tiles."""
    import re
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("moe_aot.py")), "90"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ok   sm_90")]
    assert len(lines) >= 20, r.stdout
    res = [re.search(r"regs (\d+) \((\d+) block/SM\) spills (\d+)/(\d+) B", ln) for ln in lines]
    assert all(res), r.stdout
    regs = [int(m.group(1)) for m in res]
    assert all(0 < g <= 255 for g in regs) and len(set(regs)) > 1, regs      # parsed per kernel, within sm_90's limit
    assert "summary sm_90: " in r.stdout and f"most registers {max(regs)} " in r.stdout
    spilling = [ln for ln, m in zip(lines, res) if m.group(3) != "0" or m.group(4) != "0"]
    assert not spilling and f"{len(lines)} kernels" in r.stdout and ", 0 spilling" in r.stdout, spilling
    tma = [ln for ln in lines if re.search(r"TMA(_I|_O)?=True", ln) or re.search(r" _moe_(rows|dh)_persistent_kernel ", ln)]
                                                                           # built with a TMA descriptor (these two: always)
    assert all(ln.endswith(" tma") for ln in tma), [ln for ln in tma if not ln.endswith(" tma")]
    assert {ln.split()[2] for ln in tma} >= {"_moe_up_kernel", "_moe_up_persistent_kernel", "_moe_rows_kernel", "_moe_rows_persistent_kernel",
                                             "_moe_dh_kernel", "_moe_dh_persistent_kernel",
                                             "_masked_mlp_kernel"}, tma


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # TMA: NaN rows copied, never written out
@pytest.mark.parametrize("tma,persistent,name", [(False, False, "k3_swiglu"), (True, False, "k3_swiglu"), (True, True, "k3_swiglu"),
                                                (True, True, "top1_dropped_swiglu"), (True, True, "uneven_empty_k2_gelu")])
def test_deterministic_and_no_unwritten_reads(tma, persistent, name, monkeypatch):
    """Every buffer from NaN-filled memory: any element read into a result before it is written would poison it. (With
    TMA, kernel 2 copies whole row tiles, so rows of the unused slots come on chip too; their output rows are not written,
    or, by the persistent kernel 2 at K = 1, written as zeros.)"""
    case = CASES[name]
    cfg = dataclasses.replace(CFG or mk.kernel_config(DEV, torch.float32), tma=tma, persistent=persistent)
    y1, g1, _, _ = run_case(case, 7, config=cfg)
    monkeypatch.setattr(mk, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    y2, g2, _, _ = run_case(case, 7, config=cfg)
    for a, b in zip([y1, *g1], [y2, *g2]):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)                     # bitwise: the default combine is deterministic


def test_plan_invariants():
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        N, K, E, B = (int(v) for v in torch.randint(1, 50, (4,), generator=g))
        ei = torch.randint(-1, E, (N, K), generator=g)
        if trial % 4 == 0: ei[ei % 3 == 0] = -1
        p = moe_plan(ei, E, B)
        S = N * K
        key = ei.reshape(-1).masked_fill(ei.reshape(-1) < 0, E)
        assert torch.equal(key[p.order.long()], key.sort(stable=True).values)
        assert torch.equal(p.tok.long(), p.order.long() // K)
        counts = torch.bincount(key, minlength=E + 1)
        assert torch.equal(p.offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
        assert len(p.tile_e) == -(-S // B) + E + 1
        cover = torch.zeros(S, dtype=torch.long)
        for e, r0 in zip(p.tile_e.tolist(), p.tile_row.tolist()):
            if e > E: continue
            r1 = min(r0 + B, int(p.offsets[e + 1]))
            assert int(p.offsets[e]) <= r0 < r1
            cover[r0:r1] += 1
        assert (cover == 1).all()


def _brute_force_plan(ei, E):
    "order, tok, offsets by a per-expert scan: slots grouped by expert (unused last), in slot order within a group."
    K = ei.shape[1]
    flat = ei.reshape(-1).tolist()
    groups = [[s for s, e in enumerate(flat) if e == x] for x in range(E)] + [[s for s, e in enumerate(flat) if e < 0]]
    sizes = [len(grp) for grp in groups]
    return ([s for grp in groups for s in grp], [s // K for grp in groups for s in grp],
            [sum(sizes[:i]) for i in range(E + 2)])


class SortCalls(TorchFunctionMode):
    "Records the key dtype of every sort called inside it."
    def __init__(self):
        super().__init__(); self.dtypes = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.sort, torch.Tensor.sort, torch.argsort): self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("idx_dtype,slots_per_block", [(torch.int64, 2048), (torch.int32, 2048), (torch.int64, 64)])
def test_plan_is_a_counting_sort_equal_to_brute_force(idx_dtype, slots_per_block, monkeypatch):
    """order, tok, offsets and counts against a per-expert scan (odd N, empty experts, E + 1 above and below the
    16-group tile; one block of several chunks, several blocks of one chunk, several of several); no sort runs."""
    monkeypatch.setattr(mk, "SLOTS_PER_BLOCK", slots_per_block)
    g = torch.Generator().manual_seed(11)
    for trial in range(25):
        N = 2 * int(torch.randint(0, 40, (1,), generator=g)) + 1                  # odd
        K, B = (int(v) for v in torch.randint(1, 20, (2,), generator=g))
        E = int(torch.randint(1, 40, (1,), generator=g)) if trial % 5 else 200    # 200: BG = 256, 16-slot blocks
        ei = torch.randint(-1, E, (N, K), generator=g)
        ei[ei % 2 == 1] = -1                                                      # every odd expert empty
        with SortCalls() as m:
            p = mk.moe_plan(ei.to(DEV, idx_dtype), E, B)
        assert m.dtypes == []
        order, tok, offsets = _brute_force_plan(ei, E)
        assert p.order.tolist() == order and p.tok.tolist() == tok and p.offsets.tolist() == offsets
        assert p.counts.tolist() == [offsets[i + 1] - offsets[i] for i in range(E + 1)]
        assert all(p.counts[e] == 0 for e in range(1, E, 2))
        assert p.order.dtype == p.tok.dtype == p.offsets.dtype == torch.int32
        q = mk.moe_plan(ei.to(DEV, idx_dtype), E, B, counting=False)              # the radix-sort plan, same layout
        assert all(torch.equal(a, b) for a, b in zip(p, q))


def test_plan_without_kernels_sorts_int16_keys(monkeypatch):
    "Where no kernel can run (CPU tensors, interpreter off) the plan is the same, from one stable sort on int16 keys."
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(12)
    for trial in range(10):
        N, K, E, B = (int(v) for v in torch.randint(1, 30, (4,), generator=g))
        ei = torch.randint(-1, E, (N, K), generator=g)
        with SortCalls() as m:
            p = mk.moe_plan(ei, E, B)
        assert m.dtypes == [torch.int16]
        assert [p.order.tolist(), p.tok.tolist(), p.offsets.tolist()] == list(_brute_force_plan(ei, E))


# ---------------------------------------------------------------- no host synchronisation

SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "bincount", "unique_dim",
            "_unique", "_unique2", "unique_consecutive", "unique_dim_consecutive", "histogram", "histc", "allclose",
            "masked_scatter", "repeat_interleave"}


class NoHostSync(TorchDispatchMode):
    """Every aten operator passes here: fail on those that read a device value on the host or produce a data-dependent
    shape (what would sync on CUDA and break a CUDA graph), and on device → host copies; record (op, output shapes)."""
    def __init__(self):
        super().__init__(); self.trace = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS: raise AssertionError(f"host sync: aten.{name}")
        if name.startswith(("index", "_index_put")) and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())):
            raise AssertionError(f"host sync: aten.{name} with a boolean mask (nonzero inside)")
        if name in ("_to_copy", "to", "copy_") and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args) and (
                kwargs.get("device") == torch.device("cpu") or (name == "copy_" and not args[0].is_cuda)):
            raise AssertionError(f"host sync: device → host copy through aten.{name}")
        out = func(*args, **kwargs)
        flat = out if isinstance(out, (tuple, list)) else [out]
        self.trace.append((str(func), tuple((tuple(o.shape), o.dtype) for o in flat if isinstance(o, torch.Tensor))))
        return out


@pytest.fixture
def no_python_reads(monkeypatch):
    "Python-level reads that bypass the dispatcher (tolist, numpy, __array__) fail when called from effworkbench code."
    guard_python_reads(monkeypatch)


def guard_python_reads(monkeypatch):
    def guard(orig, what):
        def wrapped(self, *a, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("effworkbench"): raise AssertionError(f"host read: Tensor.{what} in {caller}")
            return orig(self, *a, **k)
        return wrapped
    for what in ("tolist", "numpy", "__array__", "item", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, what, guard(getattr(torch.Tensor, what), what))


def traced_step(idx, case, seed=5):
    x, w_in, w_out, w_gate, _, gates = make_case(*case, seed)
    leaves = [t.requires_grad_() for t in (x, w_in, w_out, w_gate, gates) if t is not None]
    with NoHostSync() as mode:
        y = triton_moe_mlp(x, w_in, w_out, w_gate, idx, gates, case[5], config=CFG)
        torch.autograd.grad(y, leaves, torch.ones_like(y))
    return mode.trace


def test_layer_has_no_host_sync(no_python_reads):
    "Forward + backward under the guard, for two routings of the same shapes: no sync op, and identical op/shape traces."
    case = CASES["k3_swiglu"]
    N, E, K = case[:3]
    uniform = torch.randint(0, E, (N, K), generator=torch.Generator().manual_seed(1)).to(DEV)
    skewed = make_case(*case, seed=2)[4]
    skewed[:10] = -1
    tr_u, tr_s = traced_step(uniform, case), traced_step(skewed, case)
    assert tr_u == tr_s, "the operators or their shapes depend on the routing's values"
    ops = {op for op, _ in tr_u}
    assert any("sort" in op for op in ops) and any("scatter" in op for op in ops)   # forward and backward both traced


def test_guard_catches_syncs(no_python_reads):
    "The guard is not vacuous: each kind of host read it should catch raises."
    t = torch.arange(6.0)
    for fn in (lambda: t.sum().item(), lambda: bool(t.sum() > 0), lambda: t[t > 2], lambda: t.nonzero(),
               lambda: torch.bincount(t.long()), lambda: torch.unique(t), lambda: int(t.max())):
        with NoHostSync(), pytest.raises(AssertionError, match="host sync"): fn()


def test_compiled_models_call_the_kernels_eagerly():
    """Under torch.compile the kernels' entry points are graph breaks (TorchDynamo traced through the interpreter fails):
    a compiled function around the layer gives the eager output and gradients, training and inference entry points alike."""
    x, w_in, w_out, _, idx, gates = make_case(41, 4, 2, 16, 32, "gelu", "uniform", 8100)
    leaves = [t.requires_grad_() for t in (x, w_in, w_out, gates)]
    f = lambda x: F.relu(triton_moe_mlp(x * 2, w_in, w_out, None, idx, gates, "gelu", config=CFG)).square().sum()
    want, got = f(x), torch.compile(f)(x)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(f(x), leaves)): torch.testing.assert_close(a, b)
    take = torch.rand(41, 4, generator=torch.Generator().manual_seed(1)).to(DEV) < 0.4
    g = lambda x: triton_masked_relu_mlp(x.detach() + 1, w_in.detach(), w_out.detach(), take, config=MCFG) * 3
    torch.testing.assert_close(torch.compile(g)(x), g(x))
    z, w2, b2 = (t.to(DEV) for t in router_case(41, 4, 16, torch.Generator().manual_seed(2)))
    t = lambda x: triton_tau_relu_mlp(x.detach(), w_in.detach(), w_out.detach(), z, w2, b2, 0.5, config=MCFG)[0] - 1
    torch.testing.assert_close(torch.compile(t)(x), t(x))


def test_interpreter_chosen_too_late_is_named():
    """TRITON_INTERPRET=1 set after triton was imported (TorchDynamo imports it) leaves triton's own library compiled: the
    import says so. Imported first, the layers module chooses the interpreter on a machine without CUDA before it imports
    TorchDynamo, and the triton backend then runs on CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    late = "import torch._dynamo, os; os.environ['TRITON_INTERPRET'] = '1'; import effworkbench.moe.kernels"
    r = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "TRITON_INTERPRET=1 was set after triton was imported" in r.stderr, r.stderr[-2000:]
    first = ("import torch; from effworkbench.moe.layers import moe_mlp; g = torch.Generator().manual_seed(0)\n"
             "x, wi, wo = torch.randn(20, 16, generator=g), torch.randn(3, 16, 32, generator=g), torch.randn(3, 32, 16, generator=g)\n"
             "idx, gates = torch.randint(-1, 3, (20, 2), generator=g), torch.rand(20, 2, generator=g)\n"
             "y, y0 = (moe_mlp(x, wi, wo, idx, gates, 'gelu', backend=b) for b in ('triton', 'loop'))\n"
             "print('max diff', float((y - y0).abs().max()))")
    r = subprocess.run([sys.executable, "-c", first], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split("max diff")[1]) < 1e-4, r.stdout


def test_registered_as_backend():
    from effworkbench.moe import layers as moe
    assert moe.MOE_BACKENDS["triton"] is triton_moe_mlp
    x, w_in, w_out, w_gate, idx, gates = make_case(*CASES["k3_swiglu"], seed=11)
    y = moe.moe_mlp(x, w_in, w_out, idx, gates, "swiglu", w_gate=w_gate, backend="triton")
    torch.testing.assert_close(y, moe.moe_mlp(x, w_in, w_out, idx, gates, "swiglu", w_gate=w_gate, backend="loop"),
                               rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named():
    x, w_in, w_out, w_gate, idx, gates = make_case(*CASES["top1_relu"], seed=3)
    with pytest.raises(ValueError, match="unknown act"): triton_moe_mlp(x, w_in, w_out, None, idx, gates, "tanh")
    with pytest.raises(ValueError, match=r"x must be \(N, d\)"): triton_moe_mlp(x[None], w_in, w_out, None, idx, gates, "relu")
    with pytest.raises(ValueError, match="w_out"): triton_moe_mlp(x, w_in, w_out[:, 1:], None, idx, gates, "relu")
    with pytest.raises(ValueError, match="needs w_gate"): triton_moe_mlp(x, w_in, w_out, None, idx, gates, "swiglu")
    with pytest.raises(ValueError, match=r"\(N, K\)"): triton_moe_mlp(x, w_in, w_out, None, idx[:-1], gates[:-1], "relu")
    with pytest.raises(ValueError, match="integer"): triton_moe_mlp(x, w_in, w_out, None, idx.float(), gates, "relu")


def random_mask(N, E, g, p_token_empty=0.2, n_empty_experts=1):
    "take (N, E): each token its own density, the first tokens with no expert, the last experts with no token."
    take = torch.rand(N, E, generator=g) < torch.rand(N, 1, generator=g)
    take[: int(N * p_token_empty)] = False
    if n_empty_experts: take[:, -n_empty_experts:] = False
    return take


@pytest.mark.parametrize("seed", range(4))
def test_mask_plan_counts_as_moe_plan_sorts(seed):
    "The counted plan has moe_plan's rows and tiles for the same routing written as (N, E) slots, on random shapes."
    g = torch.Generator().manual_seed(100 + seed)
    for trial in range(10):
        N, E, B = (int(v) for v in torch.randint(1, 60, (3,), generator=g))
        take = random_mask(N, E, g, n_empty_experts=trial % 3)
        if trial == 0: take[:] = True
        if trial == 1: take[:] = False
        ref = moe_plan(torch.where(take, torch.arange(E).expand(N, E), -1), E, B)
        p = mask_plan(take, B)
        used = int(take.sum())
        assert torch.equal(p.offsets[: E + 1], ref.offsets[: E + 1]) and p.offsets[E + 1] == p.offsets[E]
        assert torch.equal(p.order[:used], ref.order[:used]) and torch.equal(p.tok[:used], ref.tok[:used])
        assert (p.order[used:] == -1).all() and (p.tok[used:] == -1).all()
        assert len(p.tile_e) == len(ref.tile_e) == -(-N * E // B) + E + 1
        assert torch.equal(p.tile_e[p.tile_e < E], ref.tile_e[ref.tile_e < E])
        assert torch.equal(p.tile_row[p.tile_e < E], ref.tile_row[ref.tile_e < E])
        assert (p.tile_e[p.tile_e >= E] == E + 1).all()                      # no unused group: surplus tiles only


def masked_loop_reference(x, w_in, w_out, take):
    "float64, one (token, expert) pair at a time."
    y = torch.zeros(x.shape[0], w_out.shape[-1], dtype=torch.float64)
    for n, e in take.nonzero().tolist():
        y[n] += torch.relu(x[n].double() @ w_in[e].double()) @ w_out[e].double()
    return y


@pytest.mark.parametrize("N, E, d, h, d_out", [(45, 6, 32, 32, 32), (29, 5, 24, 40, 17), (9, 3, 16, 80, 16), (70, 2, 48, 16, 48)])
def test_masked_mlp_matches_float64_loop(N, E, d, h, d_out):
    "Fused inference kernel: odd shapes, h over the hidden block (two passes), d_out ≠ d, tokens and experts with nothing."
    g = torch.Generator().manual_seed(N * 1000 + E)
    x = torch.randn(N, d, generator=g)
    w_in, w_out = torch.randn(E, d, h, generator=g) / d**0.5, torch.randn(E, h, d_out, generator=g) / h**0.5
    take = random_mask(N, E, g)
    y = triton_masked_relu_mlp(x.to(DEV), w_in.to(DEV), w_out.to(DEV), take.to(DEV), config=MCFG)
    ref = masked_loop_reference(x, w_in, w_out, take)
    assert y.dtype == torch.float32 and y.shape == (N, d_out)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    assert (y[: int(N * 0.2)] == 0).all()
    y0 = triton_masked_relu_mlp(x.to(DEV), w_in.to(DEV), w_out.to(DEV), torch.zeros_like(take).to(DEV), config=MCFG)
    assert (y0 == 0).all()


@pytest.mark.parametrize("N, E, d, h, d_out, transposed, expect", [
    (45, 6, 32, 32, 32, "", (True, False, True, False)),
    (45, 6, 32, 32, 32, "in", (True, True, True, False)),      # W_in stored transposed: its boxes read transposed
    (29, 5, 24, 40, 17, "", (True, False, False, False)),      # W_out's rows of 17 float32 (68 bytes): pointer loads
    (9, 3, 16, 80, 16, "in out", (True, True, True, True))])   # h over the hidden block: two passes over W_in and W_out
def test_masked_mlp_tma_matches_float64(N, E, d, h, d_out, transposed, expect, monkeypatch):
    "The fused inference kernel with `tma`: each weight by TMA copies where a descriptor can address it, else by pointers."
    seen, launch = [], mk._launch
    def rec(kernel, n, cfg, *args, **meta):
        seen.append(tuple(meta[k] for k in ("TMA_I", "WI_T", "TMA_O", "WO_T")))
        return launch(kernel, n, cfg, *args, **meta)
    monkeypatch.setattr(mk, "_launch", rec)
    g = torch.Generator().manual_seed(N * 1000 + E + 7)
    x = torch.randn(N, d, generator=g)
    w_in = torch.randn(E, h, d, generator=g).transpose(1, 2) if "in" in transposed else torch.randn(E, d, h, generator=g)
    w_out = torch.randn(E, d_out, h, generator=g).transpose(1, 2) if "out" in transposed else torch.randn(E, h, d_out, generator=g)
    w_in, w_out = w_in / d**0.5, w_out / h**0.5
    take = random_mask(N, E, g)
    cfg = dataclasses.replace(MCFG, block_n=16, block_k=16, tma=True) if MCFG else dataclasses.replace(mk.masked_mlp_config(DEV, torch.float32, h), tma=True)
    y = triton_masked_relu_mlp(x.to(DEV), w_in.to(DEV), w_out.to(DEV), take.to(DEV), config=cfg)
    torch.testing.assert_close(y.cpu().double(), masked_loop_reference(x, w_in, w_out, take), rtol=1e-5, atol=1e-5)
    on = mk._has_tma(y)
    assert seen == [tuple(v and on for v in expect)], seen


def test_masked_mlp_bf16_matches_training_kernels():
    "In bf16 the fused kernel rounds A and H as the training kernels do: equal to the triton backend with unit gates."
    g = torch.Generator().manual_seed(5)
    N, E, d, h = 37, 4, 32, 32
    x = torch.randn(N, d, generator=g).bfloat16()
    w_in, w_out = (torch.randn(E, d, h, generator=g) / d**0.5).bfloat16(), (torch.randn(E, h, d, generator=g) / h**0.5).bfloat16()
    take = random_mask(N, E, g)
    idx = torch.where(take, torch.arange(E).expand(N, E), -1)
    y = triton_masked_relu_mlp(x.to(DEV), w_in.to(DEV), w_out.to(DEV), take.to(DEV), config=MCFG)
    want = triton_moe_mlp(x.to(DEV), w_in.to(DEV), w_out.to(DEV), None, idx.to(DEV), take.to(DEV, torch.bfloat16), "relu", config=CFG)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.double().cpu(), masked_loop_reference(x, w_in, w_out, take), rtol=3e-2, atol=3e-2)


def test_masked_mlp_has_no_host_sync(no_python_reads):
    "The plan and the launch under the guard, for a dense and a sparse mask of one shape: no sync op, identical traces."
    g = torch.Generator().manual_seed(9)
    N, E, d, h = 40, 5, 16, 32
    x, w_in, w_out = torch.randn(N, d, generator=g), torch.randn(E, d, h, generator=g), torch.randn(E, h, d, generator=g)
    traces = []
    for take in (torch.ones(N, E, dtype=torch.bool), random_mask(N, E, g)):
        with NoHostSync() as mode:
            triton_masked_relu_mlp(x.to(DEV), w_in.to(DEV), w_out.to(DEV), take.to(DEV), config=MCFG)
        traces.append(mode.trace)
    assert traces[0] == traces[1], "the operators or their shapes depend on the mask's values"
    assert any("cumsum" in op for op, _ in traces[0]) and not any(op.startswith(("aten.sort", "aten.argsort")) for op, _ in traces[0])   # counted, not sorted


def test_masked_mlp_bad_inputs_are_named():
    x, w_in, w_out = torch.randn(5, 8), torch.randn(3, 8, 16), torch.randn(3, 16, 8)
    take = torch.ones(5, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool mask"): mask_plan(take.int(), 32)
    with pytest.raises(ValueError, match=r"take must be \(N, E\)"): triton_masked_relu_mlp(x, w_in, w_out, take[:, :2])
    with pytest.raises(ValueError, match="expert weights"): triton_masked_relu_mlp(x, w_in, w_out[:, 1:], take)


@pytest.mark.parametrize("mode", ["dynamic", "topk", "all"])
def test_dynamic_k_layer_inference_runs_the_fused_kernel(mode, monkeypatch):
    """D2DMoE's layer with the triton backend, without autograd: the mask path (no compaction, no host read) gives the torch
    backend's output and experts per token; with autograd it keeps the training kernels."""
    import effworkbench.compress.d2dmoe as dk
    g = torch.Generator().manual_seed(21)
    N, E, d, h = 53, 6, 16, 24
    x = torch.randn(2, N, d, generator=g)
    w_in, w_out = torch.randn(E, d, h, generator=g) / d**0.5, torch.randn(E, h, d, generator=g) / h**0.5
    torch.manual_seed(0)
    router = dk.NormRouter(d, E, 16)
    fused = dk.DynamicKMLP(w_in, w_out, router, tau=0.6, mode=mode, k=2, backend="triton").to(DEV)
    plain = dk.DynamicKMLP(w_in, w_out, router, tau=0.6, mode=mode, k=2, backend="torch").to(DEV)
    with torch.no_grad():
        want = plain(x.to(DEV))
        monkeypatch.setattr(dk, "compact_slots", lambda idx: (_ for _ in ()).throw(AssertionError("compacted")))
        monkeypatch.setattr(mk, "MoEMLPFunction", None)                           # the training kernels are not reached
        guard_python_reads(monkeypatch)
        with NoHostSync():
            y = fused(x.to(DEV))
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.experts_per_token, plain.experts_per_token)
    assert 1 <= float(fused.experts_per_token) <= E
    seen, launch = [], mk._launch                                             # the layer's kernel tiles reach the kernel
    monkeypatch.setattr(mk, "_launch", lambda k, n, cfg, *a, **m: (seen.append((cfg, m.get("TMA_I"))), launch(k, n, cfg, *a, **m)))
    fused.inference_config = dataclasses.replace(MCFG or mk.masked_mlp_config(DEV, torch.float32, h), block_m=16, tma=True)
    with torch.no_grad(): torch.testing.assert_close(fused(x.to(DEV)), want, rtol=1e-4, atol=1e-5)
    assert (fused.inference_config, mk._has_tma(x.to(DEV))) in seen, seen


def router_case(N, E, HR, g):
    "A router's hidden layer z (N, HR) ≥ 0 and last layer; the first tokens' scores all ≤ 0 (no expert runs for them)."
    z = torch.relu(torch.randn(N, HR, generator=g))
    w2, b2 = torch.randn(E, HR, generator=g) / HR**0.5, torch.randn(E, generator=g) * 0.1
    z[: N // 6] = 0.0; b2 = b2 - b2.max() - 0.01                              # those tokens: ĥ = relu(b₂) = 0
    return z, w2, b2


@pytest.mark.parametrize("seed", range(4))
def test_tau_plan_is_the_unfused_rule_and_mask_plan(seed):
    "Fused router + τ rule + counting: the unfused rule's mask and mask_plan's plan exactly, E over and under 16, ragged blocks."
    g = torch.Generator().manual_seed(200 + seed)
    for N, E, HR, tau, bt in [(77, 6, 40, 0.5, 16), (130, 19, 24, 0.0, 32), (45, 33, 16, 1.0, 16), (1, 3, 8, 0.7, 16)]:
        z, w2, b2 = router_case(N, E, HR, g)
        hh = torch.relu(z @ w2.T + b2)
        want = (hh >= tau * hh.amax(-1, keepdim=True)) & (hh > 0)
        p, take = tau_plan(z.to(DEV), w2.to(DEV), b2.to(DEV), tau, 32, block_t=bt)
        assert torch.equal(take.cpu(), want), (N, E, tau)
        assert not want[: N // 6].any()
        for a, b in zip(p, mask_plan(want, 32)): assert torch.equal(a.cpu(), b), (N, E, tau)


def test_tau_relu_mlp_matches_float64_and_has_no_host_sync(no_python_reads):
    "The three-kernel layer against the float64 loop on the unfused rule's mask; the op trace has no sync and no sort."
    g = torch.Generator().manual_seed(31)
    N, E, d, h, HR = 58, 7, 24, 40, 16
    z, w2, b2 = router_case(N, E, HR, g)
    x = torch.randn(N, d, generator=g)
    w_in, w_out = torch.randn(E, d, h, generator=g) / d**0.5, torch.randn(E, h, d, generator=g) / h**0.5
    with NoHostSync() as mode:
        y, take = triton_tau_relu_mlp(*(t.to(DEV) for t in (x, w_in, w_out, z, w2, b2)), 0.4, config=MCFG)
    hh = torch.relu(z @ w2.T + b2)
    want = (hh >= 0.4 * hh.amax(-1, keepdim=True)) & (hh > 0)
    assert torch.equal(take.cpu(), want)
    torch.testing.assert_close(y.cpu().double(), masked_loop_reference(x, w_in, w_out, want), rtol=1e-5, atol=1e-5)
    assert not any(op.startswith(("aten.sort", "aten.argsort")) for op, _ in mode.trace)


def test_interpreter_index_fix_is_given_only_where_it_is_needed():
    """Triton's interpreter before 3.7 makes a scalar argument an index by int((1,) array), which numpy 2.4 and later
    refuse; the kernels module gives those versions triton 3.7's squeeze, and leaves every other pairing alone."""
    from effworkbench.moe.kernels import _interpreter_needs_index_fix as needs, _major_minor
    assert _major_minor("3.10.1") == (3, 10) and _major_minor("2.4.0rc1") == (2, 4) and _major_minor("3") == (3, 0)
    assert needs("3.6.0", "2.5.2") and needs("3.5.1", "2.4.0rc1")              # the device image's pairing, and older
    assert not needs("3.6.0", "2.3.5") and not needs("3.7.1", "2.5.2") and not needs("3.10.0", "2.4.6")
