"""The package's shape in numbers (issue-style report): lines of library code, experiment config classes, experiment
runners, exported notebook cells over 40 lines, and module dependencies that point to a later notebook (which is what
makes import loops possible).

    python bench/layout.py [CHECKOUT]      # default: this checkout
"""
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
PKG, NBS = ROOT / "effworkbench", ROOT / "nbs"
_SRC = re.compile(r"File to edit: [./]*nbs/([^/]+)\.ipynb")


def modules() -> dict[str, tuple[str, Path]]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        m = _SRC.search(p.read_text()[:2000])
        if m: out["effworkbench." + ".".join(p.relative_to(PKG).with_suffix("").parts)] = (m.group(1), p)
    return out


def deps(mod: str, path: Path, known: set[str]) -> set[str]:
    pkg, out = mod.rsplit(".", 1)[0], set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import): names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level: base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = re.findall(r"effworkbench(?:\.\w+)+", node.value)
        out |= {n for n in names if n in known}
    return out - {mod}


def main():
    mods = modules()
    lines = sum(len(p.read_text().splitlines()) for _, p in mods.values())
    configs, runners = [], []
    for mod, (_, p) in mods.items():
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.ClassDef) and re.search(r"(Config|Bench|Sweep|CoordCheck)$", node.name):
                if any(getattr(b, "id", "") == "PresetConfig" for b in node.bases): configs.append(f"{mod}.{node.name}")
            if isinstance(node, ast.FunctionDef) and any("register_experiment" in ast.unparse(d) for d in node.decorator_list):
                runners.append(f"{mod}.{node.name}")
    big = []
    for nb in sorted(NBS.glob("*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            s = "".join(c["source"])
            if c["cell_type"] == "code" and s.startswith("#| export") and len(s.splitlines()) > 40:
                big.append((nb.stem, len(s.splitlines())))
    order = lambda stem: stem if stem[0].isdigit() else "zz_" + stem
    upward = [f"{m} -> {d}" for m, (nb, p) in mods.items() for d in sorted(deps(m, p, set(mods)))
              if order(mods[d][0]) > order(nb)]
    print(f"checkout: {ROOT}")
    print(f"library: {len(mods)} modules, {lines} lines (effworkbench/**/*.py without _modidx)")
    print(f"experiment configs (PresetConfig subclasses named *Config/*Bench/*Sweep): {len(configs)}")
    for c in configs: print(f"  {c}")
    print(f"registered experiment runners: {len(runners)}" + "".join(f"\n  {r}" for r in runners))
    print(f"exported cells over 40 lines: {len(big)}" + (f" (largest {max(n for _, n in big)})" if big else ""))
    for nb, n in big: print(f"  {nb}: {n}")
    print(f"dependencies on a later notebook's module: {len(upward)}" + "".join(f"\n  {u}" for u in upward))


if __name__ == "__main__":
    main()
