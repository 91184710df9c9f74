"The effwb command: list, run (parameter checks, failures, --all with an index), runs ls/show/rm."
import json
import re
import shutil
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from effworkbench.cli import main, resolve_notebook, run_notebook, store_outputs
from effworkbench.core import ConfigError
from effworkbench.store import RunStore

EFFWB = [str(Path(sys.executable).parent / "effwb")]  # the installed console script


def _nb(path, params_src, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    p = nbformat.v4.new_code_cell(params_src); p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Toy\n\n$$e^{i\\pi} + 1 = 0$$"), p,
                *[nbformat.v4.new_code_cell(c) for c in cells]]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def nbs(tmp_path, monkeypatch):
    d = tmp_path / "nbs"; d.mkdir()
    _nb(d / "10_toy.ipynb", "preset = 'smoke'\nsteps = 3\nlr = 0.5",
        "import os\nresult = steps * lr\nprint('result', result, os.environ['EFFWB_STATIC'])")
    _nb(d / "11_broken.ipynb", "preset = 'smoke'", "x = 1", "raise ValueError('the broken cell')")
    monkeypatch.setenv("EFFWB_NBS", str(d))
    monkeypatch.chdir(tmp_path)
    return d


def _effwb(*args, env=None):
    return subprocess.run([*EFFWB, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_list_shows_parameters_and_defaults(nbs):
    r = _effwb("list")
    assert r.returncode == 0, r.stderr
    assert "10_toy" in r.stdout and "steps=3" in r.stdout and "lr=0.5" in r.stdout and "11_broken" in r.stdout


def test_unknown_parameter_is_rejected_before_running(nbs, tmp_path):
    r = _effwb("run", "toy", "-p", "stepz=4")
    assert r.returncode == 2
    assert "no parameter(s) ['stepz']" in r.stderr and "steps=3" in r.stderr
    assert not (tmp_path / "_site").exists()                      # nothing ran


@pytest.mark.parametrize("args,msg", [(["-p", "steps=four"], "expected int"), (["--preset", "huge"], "invalid choice")])
def test_bad_values_are_rejected(nbs, args, msg):
    r = _effwb("run", "toy", *args)
    assert r.returncode == 2 and msg in r.stderr


def test_run_injects_typed_parameters(nbs, tmp_path):
    r = _effwb("run", "10_toy", "--preset", "medium", "-p", "steps=4", "-p", "lr=1", "--no-html")
    assert r.returncode == 0, r.stderr
    out = nbformat.read(tmp_path / "_site" / "10_toy.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert "result 4.0 1" in text                                 # steps * lr with int and float overrides; static mode
    injected = [c for c in out.cells if "injected-parameters" in c.metadata.get("tags", [])][0].source
    assert "preset = \"medium\"" in injected and "lr = 1.0" in injected


def test_run_in_place_stores_the_outputs_in_the_notebook(nbs, tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.nbdev]\nallowed_cell_metadata_keys = ["tags"]\n')   # the project's
    src = nbs / "10_toy.ipynb"
    nb = nbformat.read(src, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="result 0 stale\n")]   # from an older version
    nbformat.write(nb, src)
    r = _effwb("run", "10_toy", "--in-place", "--no-html")
    assert r.returncode == 0, r.stderr
    out = nbformat.read(src, as_version=4)
    assert [(c.cell_type, c.source) for c in out.cells] == [(c.cell_type, c.source) for c in nb.cells]   # no injected cell
    assert "".join(o.get("text", "") for o in out.cells[2].outputs) == "result 1.5 1\n"
    assert out.cells[1].metadata["tags"] == ["parameters"] and "papermill" not in out.metadata   # clean, tag kept
    assert all(c.execution_count is None for c in out.cells if c.cell_type == "code")        # as nbdev-clean leaves it
    r = _effwb("run", "10_toy", "--in-place", "-p", "steps=4", "--no-html")
    assert r.returncode != 0 and "at its defaults" in r.stderr
    assert nbformat.read(src, as_version=4).cells[2].outputs == out.cells[2].outputs          # left as it was


def test_run_all_in_place_writes_nothing_until_every_notebook_ran(nbs, tmp_path):
    before = {p.name: p.read_bytes() for p in nbs.glob("*.ipynb")}
    r = _effwb("run", "--all", "--in-place")
    assert r.returncode != 0 and "the broken cell" in r.stderr
    assert {p.name: p.read_bytes() for p in nbs.glob("*.ipynb")} == before      # 10_toy ran, but nothing was written
    (nbs / "11_broken.ipynb").unlink()
    _nb(nbs / "12_figure.ipynb", "preset = 'smoke'", "import os\nprint(os.environ['PLOTLY_RENDERER'])")
    env = {k: v for k, v in os.environ.items() if k != "PLOTLY_RENDERER"}
    r = subprocess.run([*EFFWB, "run", "--all", "--in-place"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = nbformat.read(nbs / "10_toy.ipynb", as_version=4)
    assert "".join(o.get("text", "") for o in out.cells[2].outputs) == "result 1.5 1\n"
    out = nbformat.read(nbs / "12_figure.ipynb", as_version=4)        # figures stored as data, not with plotly.js
    assert "".join(o.get("text", "") for o in out.cells[2].outputs) == "plotly_mimetype+notebook_connected\n"


def test_store_outputs_refuses_a_copy_of_another_version(nbs, tmp_path):
    run_notebook("10_toy", out_dir=tmp_path / "x", html=False)
    src = nbs / "10_toy.ipynb"
    nb = nbformat.read(src, as_version=4); nb.cells[2].source += "\nx = 1"; nbformat.write(nb, src)
    with pytest.raises(ConfigError, match="not an executed copy"): store_outputs(tmp_path / "x" / "10_toy.ipynb", src)


def test_failure_exits_nonzero_and_shows_the_cell(nbs, tmp_path):
    r = _effwb("run", "broken", "--no-html")
    assert r.returncode == 1
    assert "raise ValueError('the broken cell')" in r.stderr and "ValueError: the broken cell" in r.stderr
    assert (tmp_path / "_site" / "11_broken.ipynb").exists()      # the partly executed copy is kept


def test_run_all_writes_pages_and_index(nbs, tmp_path):
    r = _effwb("run", "--all")
    assert r.returncode == 1                                      # one notebook fails, the other still runs
    site = tmp_path / "_site"
    assert (site / "10_toy.html").exists() and (site / "11_broken.html").exists()
    index = (site / "index.html").read_text()
    assert "10_toy.html" in index and "11_broken.html" in index


def test_notebook_timeout_is_enforced(nbs):
    slow = _nb(nbs / "12_slow.ipynb", "preset = 'smoke'", "import time; time.sleep(5)")
    with pytest.raises(Exception, match="budget is 1"):
        run_notebook(slow, timeout=1, out_dir="_site", html=False)


def test_runs_ls_show_rm(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.run(lambda c, r: (r.log(step=0, loss=1.0), {"y": c["x"]})[1], {"x": 7})
    key = store.runs()[0].key
    env = {"EFFWB_RUNS": str(tmp_path / "runs")}
    r = _effwb("runs", "ls", env=env)
    assert r.returncode == 0 and key in r.stdout and "done" in r.stdout
    r = _effwb("runs", "show", key[:5], env=env)
    shown = r.stdout.split("metrics:")[0]
    assert r.returncode == 0 and json.loads(shown)["config"] == {"x": 7} and "metrics: 1 records" in r.stdout
    assert _effwb("runs", "show", "nope", env=env).returncode == 2
    r = _effwb("runs", "rm", key[:5], env=env)
    assert r.returncode == 0 and f"removed {key}" in r.stdout and store.runs() == []


def test_kernel_runs_without_the_tcp_warning(nbs, tmp_path):
    r = _effwb("run", "10_toy", "--no-html")
    assert r.returncode == 0, r.stderr
    assert "without encryption" not in r.stderr and "WARNING" not in r.stderr


def test_progress_reports_cell_and_elapsed_time(nbs, tmp_path, capsys):
    slow = _nb(nbs / "12_slow.ipynb", "preset = 'smoke'", "x = 1", "import time; time.sleep(1.5)", "y = 2")
    run_notebook(slow, out_dir="_site", html=False, progress=0.3)
    err = capsys.readouterr().err
    assert re.search(r"12_slow: cell 4/5 · 1 s", err), err   # the sleeping cell among the code cells (with the injected one)
    run_notebook(slow, out_dir="_site", html=False)                    # under tests: silent by default
    assert "12_slow: cell" not in capsys.readouterr().err


def test_ambiguous_notebook_name_lists_the_matches(nbs):
    _nb(nbs / "20_scaling.laws.ipynb", "preset = 'smoke'"); _nb(nbs / "21_scaling.joint.ipynb", "preset = 'smoke'")
    r = _effwb("run", "scaling", "--no-html")
    assert r.returncode == 2 and "ambiguous" in r.stderr and "20_scaling.laws, 21_scaling.joint" in r.stderr
    assert "Traceback" not in r.stderr
    assert resolve_notebook("joint").name == "21_scaling.joint.ipynb"       # one dotted part
    assert resolve_notebook("scaling.la").name == "20_scaling.laws.ipynb"   # a unique prefix
    assert resolve_notebook("11").name == "11_broken.ipynb"                 # its number
    with pytest.raises(FileNotFoundError, match="no notebook 'nope'"):
        resolve_notebook("nope")


@pytest.mark.parametrize("args,msg", [(["-p", "preset=medium"], "use --preset medium"),
                                      (["-p", "steps=3", "-p", "steps=4"], "given twice"),
                                      (["-p", "steps"], "expected KEY=VALUE")])
def test_run_param_misuse_is_rejected(nbs, tmp_path, args, msg):
    r = _effwb("run", "10_toy", "--no-html", *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "_site").exists()


@pytest.mark.skipif(shutil.which("make") is None or os.name == "nt", reason="needs make and a POSIX shell")
@pytest.mark.parametrize("uid,flag", [("0", True), ("1000", False)])
def test_make_lab_allows_root(tmp_path, uid, flag):
    "`make lab` adds --allow-root for root only (JupyterLab refuses root without it); `id` and `jupyter` are faked."
    for name, body in [("jupyter", 'echo "jupyter $*"'), ("id", f"echo {uid}")]:
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n"); (tmp_path / name).chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["make", "-s", "-o", "setup", "lab", f"BIN={tmp_path}"], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "jupyter lab nbs" + (" --allow-root" if flag else "")


# ----- effwb train: every bad input is one `effwb: error:` line, never a traceback

WORDS = "the king queen sword crown night day love death speak hear see ".split()


@pytest.fixture
def train_env(tmp_path, monkeypatch):
    "A tiny corpus and a YAML config that trains in a second; the store and caches in tmp_path."
    import random
    rng = random.Random(0)
    (tmp_path / "words.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"corpus: {tmp_path / 'words.txt'}\nmax_bytes: null\nsteps: 4\nbatch_size: 4\nwarmup: 1\neval_every: 2\n"
                   "eval_batches: 1\nlog_every: 1\nckpt_every: 1\nlr: 1e-3\n"
                   "model: {vocab_size: 300, seq_len: 16, d_model: 16, n_layers: 1, n_heads: 2}\n")
    monkeypatch.setenv("EFFWB_RUNS", str(tmp_path / "runs")); monkeypatch.setenv("EFFWB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return cfg


def _train(capsys, *args):
    rc = main(["train", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("text,msg", [("steps: [1\n", "is not valid YAML"),
                                      ("steps: !!python/object/apply:os.system ['touch pwned']\n", "YAML tags that build Python objects are refused"),
                                      ("- 1\n- 2\n", "must hold a mapping")])
def test_train_bad_yaml_is_an_error_not_a_traceback(train_env, capsys, text, msg):
    train_env.write_text(text)
    rc, _, err = _train(capsys, str(train_env))
    assert rc == 2 and err.startswith("effwb: error:") and msg in err, err
    assert not (train_env.parent / "pwned").exists()


def test_train_bad_toml_is_an_error(train_env, capsys):
    t = train_env.with_suffix(".toml"); t.write_text("steps = [\n")
    rc, _, err = _train(capsys, str(t))
    assert rc == 2 and "is not valid TOML" in err


@pytest.mark.parametrize("sets,msg", [
    (["model.n_heads=0"], "GPTConfig.n_heads=0 is out of range: set n_heads to an integer >= 1"),
    (["model.d_model=0"], "GPTConfig.d_model=0"),
    (["model.n_heads=3"], "choose n_heads from [1, 2, 4, 8]"),
    (["lr=0"], "TrainConfig.lr=0"), (["lr=nan"], "TrainConfig.lr=nan"), (["lr=-1e-3"], "TrainConfig.lr=-0.001"),
    (["val_frac=1.5"], "val_frac"), (["steps=0"], "steps"), (["batch_size=-4"], "batch_size"),
    (["device=bogus"], "device='bogus'"), (["corpus="], "TrainConfig.corpus=''"), (["corpus=  "], "corpus"),
    (["model.dropout=1"], "dropout"), (["betas=(0.9, 1.5)"], "betas"),
    (["model.=3"], "not a field name"), (["steps.x=1"], "steps is 4, not a config"), (["lr"], "expected key=value")])
def test_train_bad_values_are_errors(train_env, capsys, sets, msg):
    rc, _, err = _train(capsys, str(train_env), *[a for s in sets for a in ("--set", s)])
    assert rc == 2 and err.startswith("effwb: error:") and msg in err, err
    assert not (train_env.parent / "runs").exists()                  # nothing started


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cuda_without_gpu_is_an_error(train_env, capsys):
    rc, _, err = _train(capsys, str(train_env), "--set", "device=cuda")
    assert rc == 2 and "CUDA is not available" in err and "--set device=cpu" in err


@pytest.mark.parametrize("args,msg", [(["--nproc", "0"], "--nproc 0"), (["--nproc", "-2"], "--nproc -2"),
                                      (["--nnodes", "0"], "--nnodes 0")])
def test_train_bad_process_counts(train_env, capsys, args, msg):
    rc, _, err = _train(capsys, str(train_env), *args)
    assert rc == 2 and msg in err


def test_train_bad_save_weights_path_is_refused_before_training(train_env, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    for path in [tmp_path / "afile" / "w.safetensors", tmp_path]:
        rc, _, err = _train(capsys, str(train_env), "--save-weights", str(path))
        assert rc == 2 and "--save-weights" in err, err
    assert not (tmp_path / "runs").exists()


def test_train_diverged_run_exits_1_with_a_message(train_env, capsys):
    rc, _, err = _train(capsys, str(train_env), "--set", "lr=1e9", "--set", "grad_clip=0", "--set", "steps=30")
    assert rc == 1 and err.startswith("effwb: error: ") and "diverged" in err and "Lower the learning rate" in err, err
    assert "Traceback" not in err and err.count("Lower the learning rate") == 1, err


def test_yaml_number_spelled_as_text_is_read_by_the_field_type(train_env):
    "YAML 1.1 reads `lr: 1e-3` as the string '1e-3'; the config takes it as the float the field wants."
    from effworkbench.train import train_config_from
    train_env.write_text(train_env.read_text() + "max_bytes: 1e6\nbetas: [0.8, 9e-1]\n")
    cfg = train_config_from(train_env)
    assert (cfg.lr, cfg.max_bytes, cfg.betas) == (1e-3, 1_000_000, (0.8, 0.9))
    assert isinstance(cfg.max_bytes, int)


def test_train_errors_from_the_shell_have_no_traceback(train_env):
    r = _effwb("train", "--set", "model.n_heads=0")                     # was a ZeroDivisionError traceback
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("effwb: error:")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    "Ctrl-C during a command prints one line (no traceback) and exits 130, the shell's code for SIGINT."
    import effworkbench.cli as cli

    def interrupted(args): raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_cmd_list", interrupted)
    assert cli.main(["list"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("effwb: interrupted") and "Traceback" not in err
