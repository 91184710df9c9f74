"""Exported code works outside its notebook: in a fresh interpreter every `effworkbench` module imports, every name in its
`__all__` resolves, and every exported plotting function (`plot_*` and the other figure builders) returns a figure
from a small table. (A name imported only in an unexported notebook cell passes the notebook and fails here.)"""
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import effworkbench

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name.split(".", 1)[1] for m in pkgutil.walk_packages(effworkbench.__path__, "effworkbench.")
                 if not m.ispkg and not m.name.rsplit(".", 1)[-1].startswith("_"))

# figure builders whose names do not start with plot_ (module → names)
OTHER_BUILDERS = {"vision.adaglimpse": ["glimpse_animation"],
                  "viz": ["line", "scatter", "bar", "heatmap", "slider_figure", "dropdown_figure"]}

PLOTS = r'''
import numpy as np, pandas as pd, plotly.graph_objects as go
rng = np.random.default_rng(0)
def check(fig, name):
    assert isinstance(fig, go.Figure) and len(fig.data), name
    done.append(name)
done = []

from effworkbench import rlrs, mup, viz
from effworkbench.scaling import laws as scaling, joint as scaling_joint
from effworkbench.compress import projected, d2dmoe
from effworkbench.vision import adaglimpse
check(rlrs.plot_schedule(0.5, 2.0, steps=100, warmup=10), "rlrs.plot_schedule")
check(scaling.plot_budget(scaling.PUBLISHED_MOE, 20.0, 1.0), "scaling.laws.plot_budget")
law = scaling.JointLaw(a=40.0, alpha=-0.18, delta=0.15, gamma=-0.012, b=60.0, beta=-0.21, omega=0.08, zeta=-0.006, c=1.2)
from effworkbench.core import load_table
from effworkbench.scaling.granularity import ScalingGrid, grid_of_table
jt = load_table("scaling_joint_sweep_medium")
check(scaling_joint.plot_joint_budget(law, jt, grid_of_table(jt, ScalingGrid()), float(np.log10(jt.flops.median())),
                                      scaling_joint.memory_caps(jt)[-1]), "scaling.joint.plot_joint_budget")

coord = pd.DataFrame([{"param": "mup", "name": "ffn", "layer": "ffn", "quantity": "out", "width": w, "seed": 0, "step": s,
                       "value": float(w) ** 0.1 * (1 + 0.1 * s)} for w in (32, 64, 128) for s in (1, 2, 3)])
check(mup.plot_coord(coord, "mup", "ffn"), "mup.plot_coord")
panels = pd.DataFrame([{"panel": "width", "setting": f"width={w}", "lr": lr, "val_loss": (np.log2(lr) + 6) ** 2 / 10 + 3}
                       for w in (64, 128) for lr in (2.0 ** -8, 2.0 ** -6, 2.0 ** -4)])
check(mup.plot_lr(panels, "width"), "mup.plot_lr")

curves = pd.DataFrame([{"step": s, "tokens": 1000 * s, "val_loss": 4 - 0.1 * s + 0.05 * (m == "hard prune") + 0.01 * lr,
                        "method": m, "lr": lr, "ratio": r, "base_val_loss": 3.0}
                       for m in ("projected", "hard prune") for lr in (1e-3, 3e-3) for r in (0.5, 0.25) for s in (1, 2, 3)])
check(projected.plot_curves(curves, 0.5), "compress.projected.plot_curves")
check(projected.plot_curves(curves, 0.5, "margin"), "compress.projected.plot_curves margin")

sweep = pd.DataFrame([{"variant": "v", "mode": "dynamic-k", "tau": t, "k": np.nan, "module": f"blocks.{i}.ffn", "experts": 4 - 3 * t,
                       "loss": 3.0 + t, "flops_ratio": 1 - t / 2, "avg_experts": 4 - 3 * t} for t in (0.0, 0.5) for i in range(2)])
check(d2dmoe.plot_tau(sweep, 0.5, "v"), "compress.d2dmoe.plot_tau")

images = pd.DataFrame([{"image": k, "label": k, "size": 8, "pixels": " ".join(str(v) for v in rng.integers(0, 256, 64))}
                       for k in range(2)])
samples = pd.DataFrame([{"policy": "sac", "image": k, "label": k, "t": t, "x0": t, "y0": t, "d": 3, "correct": bool(t % 2)}
                        for k in range(2) for t in (1, 2)])
check(adaglimpse.glimpse_animation(images, samples, "sac"), "vision.adaglimpse.glimpse_animation")

df = pd.DataFrame({"x": [1, 2, 3, 1, 2, 3], "y": [3.0, 2.0, 1.5, 2.5, 2.0, 1.0], "c": list("aaabbb")})
check(viz.line(df, "x", "y", "c"), "viz.line")
check(viz.scatter(df, "x", "y", "c"), "viz.scatter")
check(viz.bar(df, "x", "y", "c"), "viz.bar")
check(viz.heatmap(df, "x", "c", "y"), "viz.heatmap")
check(viz.slider_figure(df, "x", "y", "c"), "viz.slider_figure")
check(viz.dropdown_figure(df, "x", "y", "c"), "viz.dropdown_figure")
print(json.dumps(done))
'''


def fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PLOTLY_RENDERER": "json", "OMP_NUM_THREADS": "1"})


def test_every_module_imports_and_exports_resolve():
    code = ("import importlib, json\nbad = []\n"
            f"for m in {MODULES!r}:\n"
            "    mod = importlib.import_module('effworkbench.' + m)\n"
            "    bad += [f'{m}.{n}' for n in getattr(mod, '__all__', []) if not hasattr(mod, n)]\n"
            "print(json.dumps(bad))")
    r = fresh(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1]) == []


def exported_plotters() -> set[str]:
    "Every exported `plot_*` function and the named figure builders, as module.name."
    out = set()
    for m in MODULES:
        spec = importlib.util.find_spec(f"effworkbench.{m}")
        src = Path(spec.origin).read_text()
        names = json.loads("[" + src.split("__all__ = [", 1)[1].split("]", 1)[0].replace("'", '"') + "]") if "__all__ = [" in src else []
        out |= {f"{m}.{n}" for n in names if n.startswith("plot_") or n in OTHER_BUILDERS.get(m, [])}
    return out


def test_every_plotting_function_runs_in_a_fresh_interpreter():
    r = fresh("import json\n" + PLOTS)
    assert r.returncode == 0, r.stderr[-3000:]
    done = set(json.loads(r.stdout.splitlines()[-1]))
    missing = exported_plotters() - done
    assert not missing, f"exported plotting functions with no call in tests/test_exports.py: {sorted(missing)}"
