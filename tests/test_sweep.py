"Sweeps: grids, the local process pool, failures recorded without stopping, cached runs skipped."
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effworkbench.store import RunStore
from effworkbench.sweep import ProcessExecutor, SerialExecutor, get_executor, grid, sweep

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from runfns import crash, square  # noqa: E402


def test_grid_dataclass_base():
    @dataclasses.dataclass
    class C:
        x: int = 0
        y: str = "a"
    pts = grid(C(), x=[1, 2], y=["a", "b"])
    assert [(p.x, p.y) for p in pts] == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]


@pytest.mark.parametrize("executor", ["serial", "process", "spawn"])
def test_sweep_records_failures_and_keeps_going(tmp_path, executor):
    ex = ProcessExecutor(2, start_method="spawn") if executor == "spawn" else executor
    configs = grid(x=[1, 2, 3, 4]) + [{"x": 5, "fail": True}]
    df = sweep(square, configs, store=RunStore(tmp_path), executor=ex, max_workers=2)
    assert df["config.x"].tolist() == [1, 2, 3, 4, 5]                     # input order
    assert df.status.tolist() == ["done"] * 4 + ["failed"]
    assert df["result.y"].iloc[:4].tolist() == [1, 4, 9, 16]
    assert "asked to fail" in df.error.iloc[4]
    if executor != "serial":
        assert os.getpid() not in df["result.pid"].iloc[:4].tolist()       # the runs ran in worker processes


def test_sweep_skips_finished_and_retries_failed(tmp_path):
    store = RunStore(tmp_path)
    sweep(square, [{"x": 1}, {"x": 2, "fail": True}], store=store, executor="serial")
    before = {r.key: r.result_file.stat().st_mtime_ns for r in store.runs() if r.status == "done"}
    df = sweep(square, [{"x": 1}, {"x": 2, "fail": True}, {"x": 1}], store=store, executor="serial")
    assert len(df) == 2                                                    # duplicates collapse to one run
    assert {r.key: r.result_file.stat().st_mtime_ns for r in store.runs() if r.status == "done"} == before
    assert df.status.tolist() == ["done", "failed"]


def test_unknown_executor_is_rejected():
    with pytest.raises(ValueError, match="unknown executor"):
        get_executor("slurm")
    assert isinstance(get_executor("serial"), SerialExecutor)


DEATHS = {"sigkill": "worker died: signal 9 (SIGKILL)", "abort": "worker died: signal 6 (SIGABRT)",
          "segfault": "worker died: signal 11 (SIGSEGV)", "os_exit": "worker died: exit code 7",
          "sys_exit": "worker raised SystemExit: 5", "keyboard": "worker raised KeyboardInterrupt: pressed inside the run"}


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dead_workers_are_recorded_and_the_sweep_goes_on(tmp_path, start_method):
    "Every way a worker can die fails its own run only: error.json says how, siblings finish, queued configs run."
    store = RunStore(tmp_path)
    configs = [{"x": 0, "how": "ok", "sleep": 1.0}] + [{"x": i + 1, "how": h} for i, h in enumerate(DEATHS)] + \
              [{"x": 10 + i, "how": "ok"} for i in range(3)]
    if start_method == "spawn": configs = configs[:2] + configs[-2:] + [{"x": 9, "how": "sys_exit"}]
    df = sweep(crash, configs, store=store, executor=ProcessExecutor(2, start_method=start_method))
    assert df["config.x"].tolist() == [c["x"] for c in configs]
    for c, row in zip(configs, df.itertuples()):
        if c["how"] == "ok":
            assert row.status == "done", c
        else:
            assert row.status == "failed" and row.error.startswith(DEATHS[c["how"]]), (c, row.error)
            assert store.get(row.key).error["message"].startswith(DEATHS[c["how"]])   # recorded where `runs show` looks
    assert os.getpid() not in df["result.pid"].dropna().tolist()
    again = sweep(crash, configs, store=store, executor=ProcessExecutor(2, start_method=start_method))   # reruns fail again, and finish
    assert again.status.tolist() == df.status.tolist()


def test_timeout_kills_the_run_and_the_sweep_goes_on(tmp_path):
    store = RunStore(tmp_path)
    t0 = time.time()
    df = sweep(crash, [{"x": 1, "how": "hang"}, {"x": 2}, {"x": 3}], store=store, max_workers=2, timeout=3)
    assert time.time() - t0 < 60
    assert df.status.tolist() == ["failed", "done", "done"]
    assert df.error[0] == "timed out after 3 s: worker killed" == store.get(df.key[0]).error["message"]
    with pytest.raises(ValueError, match="timeout needs"):
        sweep(crash, [{"x": 1}], store=store, executor="serial", timeout=3)


def test_ctrl_c_stops_queued_runs(tmp_path):
    "SIGINT to the sweep's process: it stops at once; queued configs never start; the running one stays resumable."
    # a terminal's Ctrl-C: SIGINT raises KeyboardInterrupt even where this test runs in a background job (`cmd &` without job
    # control starts it with SIGINT ignored, which Python then keeps); faulthandler on SIGUSR1 says where it hangs, if it does
    code = (f"import sys, faulthandler, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"faulthandler.register(signal.SIGUSR1, all_threads=True); "
            f"sys.path.insert(0, {str(HERE)!r}); import runfns; from effworkbench.store import RunStore; "
            f"from effworkbench.sweep import sweep; "
            f"sweep(runfns.crash, [{{'x': i, 'sleep': 20}} for i in range(6)], store=RunStore({str(tmp_path)!r}), max_workers=1)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/started")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    try: err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        alive = proc.poll() is None
        if alive: proc.send_signal(signal.SIGUSR1); time.sleep(2); proc.kill()
        err = proc.communicate(timeout=60)[1]
        pytest.fail(f"no exit 60 s after SIGINT (sweep process {'still running: its threads' if alive else 'gone, its stderr held open'}):\n{err[-4000:]}")
    assert proc.returncode != 0 and "KeyboardInterrupt" in err and time.time() - t0 < 15
    runs = RunStore(tmp_path).runs()
    assert len(runs) == 1 and runs[0].status == "unfinished"            # not recorded as failed: it resumes next time


def test_failures_that_cannot_be_recorded_still_get_rows(tmp_path):
    "A runs folder nothing can be written to (here: under a file): one row per config, each with its error, and a warning."
    (tmp_path / "file").write_text("not a folder")
    store = RunStore(tmp_path / "file" / "runs")
    for executor in ["serial", "process"]:
        with pytest.warns(UserWarning, match="3 failed run"):
            df = sweep(square, [{"x": 1}, {"x": 2}, {"x": 3, "fail": True}], store=store, executor=executor, max_workers=2)
        assert df["config.x"].tolist() == [1, 2, 3] and df.status.tolist() == ["failed"] * 3
        assert all("Not a directory" in e for e in df.error), df.error.tolist()


def test_a_killed_worker_that_cannot_be_recorded_still_gets_its_row(tmp_path, monkeypatch):
    import effworkbench.sweep as sw
    monkeypatch.setattr(sw, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.warns(UserWarning, match="1 failed run"):
        df = sweep(crash, [{"x": 1, "how": "sigkill"}, {"x": 2}], store=RunStore(tmp_path), max_workers=2)
    assert df.status.tolist() == ["failed", "done"]
    assert df.error[0].startswith("worker died: signal 9") and "not recorded in the store: OSError" in df.error[0]


def test_a_run_returning_a_non_dict_is_a_recorded_failure(tmp_path):
    df = sweep(crash, [{"x": 1, "how": "not_dict"}], store=RunStore(tmp_path), executor="process", max_workers=1)
    assert df.status.item() == "failed" and "must return a dict" in df.error.item()
    assert "must return a dict" in json.loads((tmp_path / df.key.item() / "error.json").read_text())["message"]


def test_a_timed_out_run_takes_its_own_processes_with_it_and_runs_may_start_processes(tmp_path):
    store = RunStore(tmp_path)
    df = sweep(crash, [{"x": 1, "how": "grandchild_hang"}, {"x": 2, "how": "own_process"}], store=store, max_workers=2, timeout=5)
    assert df.status.tolist() == ["failed", "done"], df.error.tolist()
    pid = int((tmp_path / df.key[0] / "grandchild").read_text())
    time.sleep(0.5)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"   # gone, or a zombie nobody reaped yet


@pytest.mark.parametrize("executor", ["serial", "process"])
def test_a_sweep_past_its_chunks_deadline_starts_nothing(tmp_path, monkeypatch, executor):
    "Inside an experiment's chunk whose deadline has passed (`EFFWB_DEADLINE`), no run starts: rows `skipped`, no run folders."
    store = RunStore(tmp_path / "runs")
    sweep(square, [{"x": 1}], store=store, executor=executor, max_workers=2)              # one finished before the deadline
    monkeypatch.setenv("EFFWB_DEADLINE", repr(time.time() - 1))
    df = sweep(square, [{"x": 1}, {"x": 2}, {"x": 3}], store=store, executor=executor, max_workers=2)
    assert df.status.tolist() == ["done", "skipped", "skipped"] and len(list((tmp_path / "runs").iterdir())) == 1
    monkeypatch.setenv("EFFWB_DEADLINE", repr(time.time() + 600))
    assert sweep(square, [{"x": 2}, {"x": 3}], store=store, executor=executor, max_workers=2).status.tolist() == ["done"] * 2
