"Run functions for the store and sweep tests; importable by the worker processes the tests start."
import os
import time

import torch


def slow_count(config, run):
    "Counts to config['steps'], checkpointing a ~1 MB state every step, so a kill can land in the middle of a save."
    state = run.load_checkpoint()
    start = 0 if state is None else int(state["step"])
    total = 0.0 if state is None else float(state["total"])
    with open(run.path / "calls.txt", "a") as f: f.write(f"{os.getpid()} start={start}\n")
    for step in range(start, config["steps"]):
        total += step
        run.log(step=step, total=total)
        run.save_checkpoint({"step": step + 1, "total": total, "weights": torch.full((256, 1024), float(step))})
        time.sleep(config.get("sleep", 0.0))
    return {"total": total, "steps": config["steps"], "resumed_from": start}


def square(config, run):
    "A trivial run function for sweeps; fails on demand."
    if config.get("fail"): raise ValueError(f"asked to fail at x={config['x']}")
    run.log(step=0, y=config["x"] ** 2)
    return {"y": config["x"] ** 2, "pid": os.getpid()}
