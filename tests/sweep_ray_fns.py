"Run functions for the Ray sweep tests, importable by Ray's workers (the test's head node has tests/ on its PYTHONPATH)."
import os
import time

CONFIGS = [{"x": x, "fail": x == 3} for x in range(10)]   # x=3 fails on purpose


def sleepy_square(config, run):
    "Appends a line to calls.txt in its run folder on every execution, sleeps, then returns x² (or fails on demand)."
    with open(run.path / "calls.txt", "a") as f: f.write(f"{os.getpid()}\n")
    time.sleep(config.get("sleep", 0.5))
    if config.get("fail"): raise ValueError(f"asked to fail at x={config['x']}")
    return {"y": config["x"] ** 2, "pid": os.getpid()}
