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


def crash(config, run):
    "Ends its process the way config['how'] says (or returns x² when how is 'ok'); writes 'started' to its run folder first."
    import ctypes
    import signal
    import sys
    (run.path / "started").write_text(str(os.getpid()))
    time.sleep(config.get("sleep", 0.0))
    how = config.get("how", "ok")
    if how == "sigkill": os.kill(os.getpid(), signal.SIGKILL)
    if how == "abort": os.abort()
    if how == "segfault": ctypes.string_at(0)
    if how == "os_exit": os._exit(7)
    if how == "sys_exit": sys.exit(5)
    if how == "keyboard": raise KeyboardInterrupt("pressed inside the run")
    if how == "hang": time.sleep(600)
    if how == "grandchild_hang":                    # a process the run started, then the run hangs
        import subprocess
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (run.path / "grandchild").write_text(str(g.pid))
        time.sleep(600)
    if how == "own_process":                        # a run may start processes of its own (a DataLoader's workers)
        import multiprocessing as mp
        p = mp.get_context("fork").Process(target=time.sleep, args=(0.1,))
        p.start(); p.join()
        assert p.exitcode == 0
    if how == "not_dict": return [config["x"]]
    return {"y": config["x"] ** 2, "pid": os.getpid()}
