"""One registry mechanism (`effworkbench.core.Registry`) for FFNs, parameterizations and MoE backends: lower modules never
name higher ones, a name is one thing, a fresh interpreter finds every part through its entry point, and no module of
the package needs another to be imported first (no import loop)."""
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import effworkbench
from effworkbench.core import ConfigError, Registry
from effworkbench.moe.layers import MOE_BACKENDS, moe_mlp_loop
from effworkbench.nn.gpt import FFN_REGISTRY, PARAMETERIZATIONS, DenseFFN, register_ffn, register_parameterization

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(effworkbench.__path__, "effworkbench.") if not m.ispkg)


def fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_the_three_tables_are_registries():
    for reg, kind in ((FFN_REGISTRY, "ffn"), (PARAMETERIZATIONS, "parameterizations"), (MOE_BACKENDS, "moe_backends")):
        assert isinstance(reg, Registry) and reg.kind == kind and reg.group == f"effworkbench.{kind}"


def test_a_second_different_registration_raises():
    with pytest.raises(ConfigError, match="ffn 'dense' is already registered"):
        register_ffn("dense")(lambda cfg, layer: DenseFFN(cfg))
    with pytest.raises(ConfigError, match="parameterizations 'sp' is already registered"):
        @register_parameterization("sp")
        class Other: pass
    with pytest.raises(ConfigError, match="moe_backends 'torch' is already registered"):
        MOE_BACKENDS.register("torch", moe_mlp_loop)
    register_ffn("dense")(FFN_REGISTRY["dense"])          # the same object again is fine (a notebook cell run twice)


def test_lower_modules_do_not_name_higher_ones():
    gpt = (ROOT / "effworkbench/nn/gpt.py").read_text()
    for name in ("moe.layers", "effworkbench.moe", "d2dmoe", "effworkbench.mup", "effworkbench.rlrs", "importlib",
                 "_FFN_MODULES", "_PARAM_MODULES"):
        assert name not in gpt, f"nn/gpt.py names {name!r}"
    layers = (ROOT / "effworkbench/moe/layers.py").read_text()
    code = layers.split('"""', 2)[2]                     # after the module docstring
    for name in ("moe.kernels", ".kernels import", "import kernels", "importlib"):
        assert name not in code, f"moe/layers.py names {name!r}"


def test_parts_are_found_through_entry_points_in_a_fresh_interpreter():
    code = """
import sys, json
from effworkbench.nn.gpt import GPT, GPTConfig, make_parameterization, FFN_REGISTRY
before = sorted(m for m in sys.modules if m.startswith("effworkbench."))
m = GPT(GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=1, n_heads=2, ffn="moe", ffn_kwargs={"expansion": 2}),
        make_parameterization("mup", base_width=8))
import torch
m(torch.randint(0, 64, (1, 8)))
print(json.dumps({"before": before, "moe": "effworkbench.moe.layers" in sys.modules, "mup": "effworkbench.mup" in sys.modules,
                  "ffn": type(m.blocks[0].ffn).__name__, "param": type(m.parameterization).__name__,
                  "names": sorted(FFN_REGISTRY)}))
"""
    r = fresh(code)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert not any(m.startswith(("effworkbench.moe", "effworkbench.mup")) for m in out["before"])
    assert out["moe"] and out["mup"] and out["ffn"] == "MoEFFN" and out["param"] == "MuP"
    assert {"dense", "moe", "hoyer_relu"} <= set(out["names"])


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    "Each module imported first and alone: an import loop (a imports b imports a) fails here on a partly initialised module."
    code = ("import importlib, json, subprocess, sys\nbad = {}\n"
            f"for m in {MODULES!r}:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True, text=True)\n"
            "    if r.returncode: bad[m] = r.stderr.strip().splitlines()[-1]\n"
            "print(json.dumps(bad))")
    r = fresh(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {}


def test_module_imports_form_no_cycle():
    "The package's module-level imports, as a graph, have no cycle (a lazy import inside a function is not a loop)."
    import ast
    graph = {}
    for m in MODULES:
        path = ROOT / (m.replace(".", "/") + ".py")
        tree, deps = ast.parse(path.read_text()), set()
        pkg = m.rsplit(".", 1)[0]
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level: base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                if base.startswith("effworkbench"):
                    deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("effworkbench")}
        graph[m] = {d for d in deps if d in MODULES and d != m}
    state = {}
    def visit(m, path):
        if state.get(m) == "done": return
        assert state.get(m) != "open", f"import loop: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]): visit(d, path + [m])
        state[m] = "done"
    for m in MODULES: visit(m, [])
    assert "effworkbench.moe.kernels" not in graph["effworkbench.moe.layers"]


def test_auto_backend_on_cuda_asks_the_registry_and_falls_back_to_torch(monkeypatch):
    "`auto` on CUDA is MOE_BACKENDS['triton'] (found through its entry point); where it cannot be loaded, torch with a warning."
    import torch
    import effworkbench.moe.layers as layers
    missing = Registry("moe_backends_test_missing")          # a group no distribution provides: 'triton' cannot be found
    missing.register("torch", layers.moe_mlp_torch)
    monkeypatch.setattr(layers, "MOE_BACKENDS", missing)
    with pytest.warns(UserWarning, match="Triton MoE kernels unavailable"):
        assert layers.resolve_backend("auto", torch.device("cuda")) is layers.moe_mlp_torch
    assert layers.resolve_backend("auto", torch.device("cpu")) is layers.moe_mlp_torch
    with pytest.raises(ConfigError, match="unknown MoE backend 'triton'"):
        layers.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.undo()
    pytest.importorskip("triton")
    from effworkbench.moe.kernels import triton_moe_mlp
    assert layers.resolve_backend("auto", torch.device("cuda")) is triton_moe_mlp
