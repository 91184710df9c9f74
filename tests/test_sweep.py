"Sweeps: grids, the local process pool, failures recorded without stopping, cached runs skipped."
import dataclasses
import os
import sys
from pathlib import Path

import pytest

from effworkbench.store import RunStore
from effworkbench.sweep import ProcessExecutor, SerialExecutor, get_executor, grid, sweep

sys.path.insert(0, str(Path(__file__).parent))
from runfns import square  # noqa: E402


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
