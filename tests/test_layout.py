"""The package's layering, read from the source: each module comes from one notebook, and a module imports (at the top
or inside a function) and names in strings only modules of notebooks that come no later than its own, so the
dependency graph is the notebook order and has no loop. Later notebooks reach earlier code through registries and
entry points (`effworkbench.core.Registry`), never the other way round."""
import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "effworkbench"
_SRC = re.compile(r"File to edit: [./]*nbs/([^/]+)\.ipynb")


def modules() -> dict[str, tuple[str, Path]]:
    "module name → (its notebook's stem, file), for every exported module."
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        m = _SRC.search(p.read_text()[:2000])
        if m: out["effworkbench." + ".".join(p.relative_to(PKG).with_suffix("").parts)] = (m.group(1), p)
    return out


def named_modules(mod: str, path: Path, known: set[str]) -> set[str]:
    "The effworkbench modules that `mod` imports (absolute or relative, anywhere in the file) or names in a string."
    tree, out = ast.parse(path.read_text()), set()
    pkg = mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import): names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = re.findall(r"effworkbench(?:\.\w+)+", node.value)
        out |= {n for n in names if n in known}
    return out - {mod}


def _order(stem: str) -> str: return stem if stem[0].isdigit() else "zz_" + stem   # index.ipynb comes last


def test_every_module_names_only_modules_of_earlier_notebooks():
    mods = modules()
    assert "effworkbench.moe.layers" in mods and "effworkbench.experiment" in mods, sorted(mods)
    bad = []
    for mod, (nb, path) in mods.items():
        for dep in named_modules(mod, path, set(mods)):
            if _order(mods[dep][0]) > _order(nb): bad.append(f"{mod} ({nb}) -> {dep} ({mods[dep][0]})")
    assert not bad, "modules that name a later notebook's module (use a Registry and an entry point):\n" + "\n".join(bad)


def test_layering_check_sees_relative_lazy_and_string_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from ..moe import layers\ndef f():\n    from .kernels import x\n    return 'effworkbench.rlrs'\n")
    known = {"effworkbench.moe.layers", "effworkbench.moe.kernels", "effworkbench.rlrs", "effworkbench.core"}
    assert named_modules("effworkbench.moe.other", f, known) == {"effworkbench.moe.layers", "effworkbench.moe.kernels",
                                                                 "effworkbench.rlrs"}
