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
