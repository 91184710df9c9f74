"The run store: content addressing, atomic files, resume, two processes at once, and SIGKILL in the middle of a run."
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from effworkbench.store import Run, RunStore, atomic_write_json, config_hash

sys.path.insert(0, str(Path(__file__).parent))
from runfns import slow_count, square  # noqa: E402

HERE = Path(__file__).parent


def _worker(root, config, fn="slow_count"):
    "Start a process that runs `fn(config)` through a store at `root` and prints the result as JSON."
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import runfns; "
            f"from effworkbench.store import RunStore; "
            f"print(json.dumps(RunStore({str(root)!r}).run(runfns.{fn}, json.loads(sys.argv[1]))))")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_hash_is_canonical_and_sensitive():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": (1, 2), "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    store = RunStore("/nonexistent")
    assert store.key(slow_count, {"a": 1}) != store.key(square, {"a": 1})   # the function is part of the key


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = atomic_write_json(tmp_path / "x" / "r.json", {"a": (1, 2)})
    assert json.loads(p.read_text()) == {"a": [1, 2]}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def test_finished_run_is_not_recomputed(tmp_path):
    store = RunStore(tmp_path)
    cfg = {"steps": 3}
    r1 = store.run(slow_count, cfg)
    r2 = store.run(slow_count, dict(cfg))
    assert r1 == r2 and r1["total"] == 0 + 1 + 2
    run = store.get(store.key(slow_count, cfg)[:6])           # a prefix is enough
    assert run.status == "done"
    assert (run.path / "calls.txt").read_text().count("start=") == 1
    assert list(run.metrics().step) == [0, 1, 2]
    assert {"config.json", "metrics.jsonl", "result.json", "env.json", "checkpoint.pt"} <= {f.name for f in run.path.iterdir()}
    assert json.loads((run.path / "env.json").read_text())["packages"]["torch"]
    r3 = store.run(slow_count, cfg, rerun=True)
    assert r3["resumed_from"] == 0 and (run.path / "calls.txt").read_text().count("start=") == 2


def test_a_whole_key_is_found_without_scanning_the_store(tmp_path, monkeypatch):
    "Publishing an experiment looks up thousands of unit keys: each must not list the store's folders."
    store = RunStore(tmp_path)
    keys = [store.key(square, {"x": x}) for x in range(3)]
    for x in range(3): store.run(square, {"x": x})
    monkeypatch.setattr(RunStore, "_folders", lambda self: pytest.fail("scanned the store for a whole key"))
    assert [store.get(k).result["y"] for k in keys] == [0, 1, 4]
    monkeypatch.undo()
    assert store.get(keys[0][:5]).key == keys[0]                            # a prefix still scans, and finds it
    (tmp_path / keys[1] / "config.json").unlink()                          # a folder without its config is not a run
    with pytest.raises(KeyError): store.get(keys[1])


def test_failure_is_recorded_and_retried(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match="asked to fail"):
        store.run(square, {"x": 3, "fail": True})
    df = store.load()
    assert df.status.tolist() == ["failed"] and "asked to fail" in df.error[0]
    assert "Traceback" in store.runs()[0].error["traceback"]


def test_torn_metrics_line_is_skipped(tmp_path):
    run = Run(tmp_path / "r"); run.path.mkdir()
    run.log(step=0, loss=1.0); run.log(step=1, loss=0.5)
    with open(run.metrics_file, "a") as f: f.write('{"step": 2, "lo')     # what a kill mid-write leaves
    assert run.metrics().step.tolist() == [0, 1]
    Run(run.path).log(step=1, loss=0.4)                                    # a resumed process repeats step 1
    assert run.metrics().loss.tolist() == [1.0, 0.4]


def test_sigkill_mid_run_then_resume(tmp_path):
    store = RunStore(tmp_path)
    cfg = {"steps": 40, "sleep": 0.02}
    proc = _worker(tmp_path, cfg)
    run = Run(tmp_path / store.key(slow_count, cfg))
    deadline = time.time() + 60
    while time.time() < deadline:
        if run.metrics_file.exists() and run.metrics_file.read_text().count("\n") >= 8: break
        time.sleep(0.01)
    else:
        proc.kill(); pytest.fail(f"worker made no progress: {proc.stderr.read()}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the store still reads cleanly
    df = store.load()
    assert df.status.tolist() == ["unfinished"]
    ck = run.load_checkpoint()
    done = int(ck["step"])
    assert 7 <= done < 40 and float(ck["weights"][0, 0]) == done - 1      # the checkpoint is whole
    assert (run.metrics().step.diff().dropna() == 1).all()
    # the rerun resumes and completes
    res = store.run(slow_count, cfg)
    assert res["resumed_from"] == done and res["total"] == sum(range(40))
    assert run.metrics().step.tolist() == list(range(40))
    assert store.load().status.tolist() == ["done"]


def test_two_processes_same_run_compute_once(tmp_path):
    cfg = {"steps": 15, "sleep": 0.02}
    procs = [_worker(tmp_path, cfg) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert results[0] == results[1] and results[0]["total"] == sum(range(15))
    run = RunStore(tmp_path).runs()[0]
    assert (run.path / "calls.txt").read_text().count("start=") == 1       # the second process waited and read
    assert run.metrics().step.tolist() == list(range(15))


def test_two_processes_different_runs(tmp_path):
    procs = [_worker(tmp_path, {"steps": 10, "sleep": 0.01, "seed": s}) for s in range(2)]
    for p in procs: p.communicate(timeout=120)
    df = RunStore(tmp_path).load()
    assert sorted(df.status) == ["done", "done"] and (df["result.total"] == sum(range(10))).all()
    m = RunStore(tmp_path).metrics()
    assert isinstance(m, pd.DataFrame) and m.groupby("key").size().tolist() == [10, 10]


# --- keys: resolution inside the store, never a path or a pattern ---------------------------------------------------

def _store_with_runs(root, n=3):
    "A store with `n` finished runs of `square`; returns the store and the keys."
    store = RunStore(root)
    for x in range(n): store.run(square, {"x": x})
    return store, [store.key(square, {"x": x}) for x in range(n)]


def _cli(*argv):
    from effworkbench.cli import main
    return main(list(argv))


def test_runs_rm_refuses_paths_and_globs(tmp_path, capsys):
    "`runs rm ..`, `''`, an absolute path or a glob deletes nothing; a valid unique prefix deletes that run only."
    root = tmp_path / "project" / "runs"
    (tmp_path / "project" / "precious.txt").write_text("keep") if (tmp_path / "project").mkdir() is None else None
    store, keys = _store_with_runs(root, 12)
    other = tmp_path / "elsewhere"; other.mkdir(); (other / "config.json").write_text("{}")
    pattern = next(f"*{k[-1]}" for k in keys if not all(j.startswith(k[-1]) for j in keys))
    for bad in ["..", "", ".", "/", str(other), str(root), "*", pattern, "?" * 16, keys[0].upper(), f"../runs/{keys[0]}",
                f"{keys[0]}/..", " " + keys[0]]:
        assert _cli("runs", "rm", "--root", str(root), bad) == 2, bad
        assert "not a run key" in capsys.readouterr().err, bad
    assert sorted(r.key for r in store.runs()) == sorted(keys)
    assert (tmp_path / "project" / "precious.txt").exists() and (other / "config.json").exists()
    assert _cli("runs", "rm", "--root", str(root), keys[0][:8]) == 0
    assert sorted(r.key for r in store.runs()) == sorted(keys[1:]) and not (root / keys[0]).exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".rm-")]      # the renamed folder is gone too


def test_ambiguous_prefix_lists_runs_and_deletes_none(tmp_path, capsys):
    store, keys = _store_with_runs(tmp_path, 17)                             # 17 keys: two share a first digit
    first = [k[0] for k in keys]
    digit = next(d for d in first if first.count(d) > 1)
    assert _cli("runs", "rm", "--root", str(tmp_path), keys[0][:10], digit) == 2
    err = capsys.readouterr().err
    assert f"'{digit}' is the prefix of {first.count(digit)} runs" in err
    assert all(k in err for k in keys if k.startswith(digit))
    assert len(store.runs()) == 17                                           # not even the first, unambiguous key
    assert _cli("runs", "show", "--root", str(tmp_path), digit) == 2


def test_a_folder_without_config_is_no_run(tmp_path):
    store, keys = _store_with_runs(tmp_path, 1)
    (tmp_path / "abcdef").mkdir()                                            # hex name, but no config.json
    (tmp_path / "abcdef" / "data").write_text("x")
    with pytest.raises(KeyError, match="no run 'abc'"):
        store.rm("abc")
    assert (tmp_path / "abcdef" / "data").exists()


def test_rm_takes_the_runs_lock(tmp_path):
    "A run being computed (its lock held by another process) is not removed."
    store, keys = _store_with_runs(tmp_path, 1)
    code = ("import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / keys[0] / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KeyError, match="being computed by another process"):
            store.rm(keys[0], timeout=0.2)
        assert (tmp_path / keys[0] / "result.json").exists()
    finally:
        holder.kill(); holder.wait()
    assert store.rm(keys[0]) == keys[0] and store.runs() == []


def test_runs_show_needs_a_key(tmp_path, capsys):
    _store_with_runs(tmp_path, 1)
    assert _cli("runs", "show", "--root", str(tmp_path)) == 2
    assert "name the runs to show" in capsys.readouterr().err


# --- properties of keys (hypothesis) ----------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                     max_leaves=10)


def _reorder(obj, rnd):
    "The same JSON value with every dict's keys in another order and lists as tuples."
    if isinstance(obj, dict):
        items = list(obj.items()); rnd.shuffle(items)
        return {k: _reorder(v, rnd) for k, v in items}
    if isinstance(obj, list): return tuple(_reorder(v, rnd) for v in obj)
    return obj


@given(cfg=st.dictionaries(st.text(max_size=6), _json, max_size=5), rnd=st.randoms())
def test_equal_configs_get_equal_keys(cfg, rnd):
    store = RunStore("/nonexistent")
    k = store.key(square, cfg)
    assert k == store.key(square, _reorder(cfg, rnd)) == store.key(square, json.loads(json.dumps(cfg)))
    assert len(k) == 16 and all(c in "0123456789abcdef" for c in k)
    assert store.key(square, {**cfg, "\x00extra": 1}) != k                  # a changed config gets another key


@pytest.fixture(scope="module")
def fenced_store(tmp_path_factory):
    "A store with 5 runs, next to a file and a folder with a config.json that no key may reach."
    base = tmp_path_factory.mktemp("fenced")
    store, keys = _store_with_runs(base / "runs", 5)
    (base / "outside").mkdir(); (base / "outside" / "config.json").write_text("{}")
    (base / "runs" / "not-a-key").mkdir(); (base / "runs" / "not-a-key" / "config.json").write_text("{}")
    return store, keys


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(max_size=20) | st.sampled_from(["..", ".", "/", "*", "?", "[0-9]*", "~", "../outside", "not-a-key"]))
def test_key_resolution_never_leaves_the_store(fenced_store, key):
    store, keys = fenced_store
    try: run = store.get(key)
    except KeyError as e:
        assert isinstance(e, ValueError) and str(e)                          # a RunKeyError (a ConfigError) with a message
        return
    assert run.path.parent == store.root and run.key in keys and run.key.startswith(key) and key


# --- corrupt files, stale temp files, strict JSON ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "result.json", "error.json"])
@pytest.mark.parametrize("content", ['{"y": 4, "pi', "[]", "null", "\xff\xfe"])
def test_a_corrupt_run_is_listed_and_the_rest_still_read(tmp_path, capsys, name, content):
    store, keys = _store_with_runs(tmp_path, 3)
    with pytest.raises(ValueError): store.run(square, {"x": 9, "fail": True})
    keys.append(store.key(square, {"x": 9, "fail": True}))
    bad = keys[1] if name != "error.json" else keys[3]
    (tmp_path / bad / name).write_bytes(content.encode("latin-1"))
    with pytest.warns(UserWarning, match="1 corrupt run"):
        df = store.load()
    assert df.set_index("key").status.to_dict() == {**dict.fromkeys(keys, "done"), keys[3]: "failed", bad: "corrupt"}
    assert name in df.set_index("key").error[bad]
    assert df.set_index("key")["result.y"][keys[2]] == 4
    assert _cli("runs", "ls", "--root", str(tmp_path)) == 0
    out, err = capsys.readouterr()
    assert bad in out and "corrupt" in out and keys[0] in out
    assert f"1 corrupt run(s): {bad}" in err
    assert _cli("runs", "show", "--root", str(tmp_path), bad) == 0
    assert "where a JSON object belongs" in capsys.readouterr().out or content.startswith(("{", "\xff"))
    from effworkbench.sweep import sweep
    with pytest.warns(UserWarning, match="corrupt"):
        swept = sweep(square, [{"x": x} for x in range(3)], store=store, executor="serial")
    assert swept["config.x"].tolist() == [0, 1, 2] and swept.status.tolist().count("done") == 3 - (name != "error.json")


def test_stale_temp_files_are_cleaned_when_a_run_is_opened(tmp_path):
    store = RunStore(tmp_path)
    run = Run(tmp_path / store.key(slow_count, {"steps": 2}))
    run.path.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run.path / f".checkpoint.pt.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"\0" * 1_000_000)                                     # what a SIGKILL mid-save leaves
    alive = run.path / f".checkpoint.pt.{os.getppid()}.tmp"                  # a live process's file is kept
    alive.write_bytes(b"\0")
    store.run(slow_count, {"steps": 2})
    assert not stale.exists() and alive.exists()


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(fd): raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def _strict(text):
    def refuse(token): raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_results_and_metrics_with_nan_are_strict_json(tmp_path):
    store = RunStore(tmp_path)
    def diverged(config, run):
        run.log(step=0, loss=float("nan")); run.log(step=1, loss=1.5)
        return {"loss": float("nan"), "best": float("-inf"), "curve": [1.0, float("inf")], "ok": 2.0}
    store.run(diverged, {"x": 1})
    run = store.runs()[0]
    assert _strict(run.result_file.read_text())["curve"] == [1.0, None]
    assert [_strict(line)["loss"] for line in run.metrics_file.read_text().splitlines()] == [None, 1.5]
    row = store.load().iloc[0]
    assert pd.isna(row["result.loss"]) and pd.isna(row["result.best"]) and row["result.ok"] == 2.0
    assert run.metrics().loss.isna().tolist() == [True, False]


def test_non_dict_result_leaves_an_error(tmp_path):
    store = RunStore(tmp_path)
    def returns_list(config, run): return [1, 2]
    with pytest.raises(TypeError, match="must return a dict"):
        store.run(returns_list, {"x": 1})
    run = store.runs()[0]
    assert run.status == "failed" and "must return a dict" in run.error["message"]


def test_a_corrupt_checkpoint_names_the_file_and_the_fix(tmp_path):
    store = RunStore(tmp_path)
    cfg = {"steps": 3}
    run = Run(tmp_path / store.key(slow_count, cfg))
    run.path.mkdir(); atomic_write_json(run.config_file, {"fn": "x", "config": cfg})
    for content in [b"", b"PK\x03\x04garbage", b"\x80\x02c__builtin__\neval\n."]:
        run.checkpoint_file.write_bytes(content)
        with pytest.raises(ValueError) as e:
            store.run(slow_count, cfg)
        msg = str(e.value)
        assert "checkpoint.pt is truncated or corrupt" in msg and f"effwb runs rm {run.key}" in msg
        assert "weights_only=False" not in msg and e.value.__cause__ is None


def test_metrics_lines_that_are_not_utf8_objects(tmp_path, capsys):
    store, keys = _store_with_runs(tmp_path, 1)
    run = store.get(keys[0])
    with open(run.metrics_file, "ab") as f: f.write(b'\xff\xfe{"step": 5}\n[1, 2]\n"text"\n7\n{"step": 1, "y": 2}\n')
    with pytest.warns(UserWarning, match="skipped 4 line"):
        m = run.metrics()
    assert m.step.tolist() == [0, 1]
    with pytest.warns(UserWarning):
        assert _cli("runs", "show", "--root", str(tmp_path), keys[0][:5]) == 0
    assert "metrics: 2 records" in capsys.readouterr().out


def test_runs_ls_shows_status_what_start_and_seconds(tmp_path, capsys):
    store, keys = _store_with_runs(tmp_path, 2)
    nb_cfg = {"notebook": str(tmp_path / "my_notebook.ipynb"), "parameters": {}}
    store.run(lambda c, r: {"ok": 1}, nb_cfg)
    assert _cli("runs", "ls", "--root", str(tmp_path)) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["key", "status", "run", "started", "seconds"]
    assert "runfns.square" in out and "my_notebook.ipynb" in out
    assert time.strftime("%Y-%m-%d") in out
    assert _cli("runs", "ls", "--root", str(tmp_path), "--status", "failed") == 0
    assert capsys.readouterr().out.strip() == f"no failed runs in {tmp_path} (3 runs in all)"


# --- carrying runs between stores (pack / unpack) ---

import io as _io  # noqa: E402
import tarfile  # noqa: E402

from effworkbench.core import ConfigError  # noqa: E402


def _two_stores(tmp_path):
    a, b = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    for steps in (2, 3): a.run(slow_count, {"steps": steps})
    return a, b


def test_pack_and_unpack_carry_finished_runs_with_results_and_metrics(tmp_path):
    a, b = _two_stores(tmp_path)
    with pytest.raises(ValueError): a.run(square, {"x": 1, "fail": True})
    keys = a.pack(tmp_path / "x.tar.gz")
    assert sorted(keys) == sorted(r.key for r in a.runs() if r.status == "done") and len(keys) == 2
    assert b.unpack(tmp_path / "x.tar.gz") == {k: "added" for k in keys}
    for k in keys:
        ra, rb = a.get(k), b.get(k)
        assert rb.status == "done" and rb.result == ra.result and rb.record == ra.record
        assert rb.metrics().equals(ra.metrics())
        assert not rb.checkpoint_file.exists() and not (rb.path / "calls.txt").exists()   # only run files, no weights
        assert (rb.config_file.stat().st_mtime == ra.config_file.stat().st_mtime)        # runs() keeps its order
    assert b.run(slow_count, {"steps": 3}) == a.get(b.key(slow_count, {"steps": 3})).result   # not computed again
    assert not (b.get(b.key(slow_count, {"steps": 3})).path / "calls.txt").exists()
    a.pack(tmp_path / "w.tar.gz", keys=[keys[0][:8]], checkpoints=True)                # a key prefix, with weights
    c = RunStore(tmp_path / "c")
    c.unpack(tmp_path / "w.tar.gz")
    assert torch.load(c.get(keys[0]).checkpoint_file, weights_only=True)["step"] == a.get(keys[0]).load_checkpoint()["step"]


def test_unpack_keeps_finished_runs_and_replaces_unfinished_ones(tmp_path):
    a, b = _two_stores(tmp_path)
    a.pack(tmp_path / "x.tar.gz")
    k2, k3 = b.key(slow_count, {"steps": 2}), b.key(slow_count, {"steps": 3})
    b.run(slow_count, {"steps": 2})
    atomic_write_json(b.get(k2).result_file, {"total": -1.0})                     # a finished run of its own: kept
    (b.root / k3).mkdir(parents=True)
    atomic_write_json(b.root / k3 / "config.json", {"fn": "runfns.slow_count", "config": {"steps": 3}})
    atomic_write_json(b.root / k3 / "error.json", {"message": "killed"})         # a failed one: replaced
    (b.root / k3 / "tables").mkdir(); (b.root / k3 / "tables" / "old.csv").write_text("a\n1\n")
    assert b.unpack(tmp_path / "x.tar.gz") == {k2: "kept", k3: "replaced"}
    assert b.get(k2).result == {"total": -1.0}
    assert b.get(k3).status == "done" and b.get(k3).result == a.get(k3).result
    assert not (b.root / k3 / "error.json").exists() and not (b.root / k3 / "tables" / "old.csv").exists()
    assert not [p for p in b.root.iterdir() if p.name.startswith(".unpack")]    # the staging folder is gone


def _archive(path, members):
    "A .tar.gz of (name, bytes | ('symlink', target)) members."
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple): info.type, info.linkname = tarfile.SYMTYPE, data[1]; tar.addfile(info)
            else: info.size = len(data); tar.addfile(info, _io.BytesIO(data))
    return path


@pytest.mark.parametrize("name,data", [("../evil/config.json", b"{}"), ("/tmp/config.json", b"{}"),
                                       ("0123abcd/run.sh", b"rm -rf /"), ("0123abcd/../../x.json", b"{}"),
                                       ("0123abcd/config.json", ("symlink", "/etc/passwd")), ("NOTHEX/config.json", b"{}"),
                                       ("0123abcd/tables/../../x.csv", b"a")])
def test_unpack_refuses_an_archive_with_anything_but_run_files(tmp_path, name, data):
    a, b = _two_stores(tmp_path)
    key = a.pack(tmp_path / "ok.tar.gz")[0]
    good = [(m.name, tarfile.open(tmp_path / "ok.tar.gz").extractfile(m).read())
            for m in tarfile.open(tmp_path / "ok.tar.gz") if m.name.startswith(key)]
    arc = _archive(tmp_path / "bad.tar.gz", good + [(name, data)])
    with pytest.raises(ConfigError, match="not a file of a run folder"): b.unpack(arc)
    assert not b.root.exists() or [p.name for p in b.root.iterdir()] == []       # nothing taken in, no staging left
    assert not (tmp_path / "evil").exists() and not (tmp_path / "x.json").exists()


def test_unpack_leaves_out_runs_whose_folder_is_not_their_key_or_that_are_unfinished(tmp_path):
    a, b = _two_stores(tmp_path)
    key = a.key(slow_count, {"steps": 2})
    run = a.get(key)
    rec, res = run.config_file.read_bytes(), run.result_file.read_bytes()
    forged = "f" * len(key)                                                     # a result filed under another key
    unfinished = a.key(slow_count, {"steps": 9})
    cfg9 = json.dumps({"fn": "runfns.slow_count", "config": {"steps": 9}}).encode()
    arc = _archive(tmp_path / "m.tar.gz", [(f"{forged}/config.json", rec), (f"{forged}/result.json", res),
                                           (f"{unfinished}/config.json", cfg9), (f"{key}/config.json", rec),
                                           (f"{key}/result.json", res)])
    out = b.unpack(arc)
    assert out[key] == "added" and "not the key" in out[forged] and "unfinished" in out[unfinished]
    assert [r.key for r in b.runs()] == [key]


def test_cli_pack_and_unpack(tmp_path, capsys):
    from effworkbench.cli import main
    a, b = _two_stores(tmp_path)
    arc = str(tmp_path / "cli.tar.gz")
    assert main(["runs", "pack", "--root", str(a.root), "--archive", arc]) == 0
    assert "packed 2 run(s)" in capsys.readouterr().out
    assert main(["runs", "unpack", "--root", str(b.root), "--archive", arc]) == 0
    assert "2 of 2 run(s) taken into" in capsys.readouterr().out
    assert sorted(r.key for r in b.runs()) == sorted(r.key for r in a.runs())
    assert main(["runs", "unpack", "--root", str(b.root)]) == 2                  # no archive named: a usage error
