"""The cluster executor and notebooks as runs.

A real head node (`ray start --head` in a subprocess, token auth, its own temp dir and HOME) takes a sweep whose driver is
killed mid-way; a second sweep resumes it without re-running finished runs. A notebook grid runs through papermill, on
the process pool and on Ray. `ray stop` always runs at the end."""
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from effworkbench.store import RunStore
from effworkbench.sweep import RayExecutor, get_executor, notebook_grid, notebook_run, sweep

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from sweep_ray_fns import CONFIGS  # noqa: E402

CRASHES = [{"x": 1, "how": "sigkill"}, {"x": 2, "how": "ok"}, {"x": 3, "how": "ok"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    "A one-node Ray cluster with 2 CPUs; yields its address and the environment its drivers need."
    if importlib.util.find_spec("ray") is None: pytest.skip("ray is not installed (the [dist] extra)")
    tmp = Path(tempfile.mkdtemp(prefix="effwb-ray-"))    # short: Ray's unix sockets live under --temp-dir
    (tmp / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    start = [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={tmp / 'ray'}",
             "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={_free_port()}"]
    log = tmp / "ray_start.log"   # a file, not a pipe: Ray's daemons inherit it and never close it
    try:
        for attempt in range(2):   # a loaded machine can make the raylet give up on its agents; the retry starts warm
            with open(log, "a") as f:
                rc = subprocess.run(start, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=180).returncode
            if rc == 0: break
            subprocess.run([ray_cli, "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        else:
            pytest.fail(f"ray start failed twice:\n{log.read_text()[-4000:]}")
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        subprocess.run([ray_cli, "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


# Sweeps on the cluster run in driver processes, which get the cluster's environment (Ray reads its auth settings once
# per process) and can be killed. A driver runs a plan: a list of (run function 'module:name', configs, store root, output).
DRIVER = """
import importlib, json, sys
from effworkbench.store import RunStore
from effworkbench.sweep import RayExecutor, sweep
address, plan = sys.argv[1], json.loads(open(sys.argv[2]).read())
if len(plan) > 1:   # one connection, so the sweeps share Ray's worker processes; a single sweep connects by itself
    import ray
    ray.init(address=address)
for fn_spec, configs, root, out in plan:
    module, name = fn_spec.split(":")
    fn = getattr(importlib.import_module(module), name)
    sweep(fn, configs, store=RunStore(root), executor=RayExecutor(address=address)).to_json(out, orient="records")
"""


def ray_driver(ray_head, plan: list, work: Path) -> subprocess.Popen:
    "Start a driver process that runs the sweeps of `plan` on the cluster one after another."
    (work / "plan.json").write_text(json.dumps([[fn, configs, str(root), str(out)] for fn, configs, root, out in plan]))
    with open(work / "driver.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", DRIVER, ray_head["address"], str(work / "plan.json")],
                                env=ray_head["env"], stdout=log, stderr=subprocess.STDOUT)


def finish(driver: subprocess.Popen, work: Path, timeout: float = 180):
    "Wait for a driver to succeed."
    rc = driver.wait(timeout)
    assert rc == 0, f"driver failed ({rc}):\n{(work / 'driver.log').read_text()[-4000:]}"


def read_sweep(path: Path) -> pd.DataFrame:
    "A sweep's DataFrame as the driver wrote it."
    return pd.DataFrame(json.loads(path.read_text()))


def _calls(store: RunStore) -> dict[str, int]:
    "Executions per run (lines of its calls.txt)."
    return {r.key: len((r.path / "calls.txt").read_text().splitlines()) for r in store.runs()
            if (r.path / "calls.txt").exists()}


def write_square_notebook(path: Path):
    "A notebook that writes {'square': a*a} to result_path; it fails for a < 0."
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("a = 1\nresult_path = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import json, pathlib\nassert a >= 0, 'a must be non-negative'\n"
                                          "if result_path: pathlib.Path(result_path).write_text(json.dumps({'square': a * a}))")]
    nbformat.write(nb, str(path))


@pytest.mark.slow
def test_killed_sweep_resumes_on_a_head_node(ray_head, tmp_path):
    "Kill a sweep's driver mid-way; a new driver finishes it without re-running finished runs, and runs a notebook grid."
    store = RunStore(tmp_path / "runs")
    driver = ray_driver(ray_head, [("sweep_ray_fns:sleepy_square", CONFIGS, store.root, tmp_path / "first.json")], tmp_path)
    try:
        t0 = time.time()
        while sum(r.status == "done" for r in store.runs()) < 2:
            assert driver.poll() is None, f"the driver ended early:\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
            assert time.time() - t0 < 150, "no run finished within 150 s"
            time.sleep(0.1)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done_at_kill = {r.key for r in store.runs() if r.status == "done"}
    calls_at_kill = _calls(store)
    assert 2 <= len(done_at_kill) < len(CONFIGS) - 1, "the kill should land mid-sweep"

    nb = tmp_path / "square.ipynb"
    write_square_notebook(nb)
    finish(ray_driver(ray_head, [("sweep_ray_fns:sleepy_square", CONFIGS, store.root, tmp_path / "resumed.json"),
                                 ("effworkbench.sweep:notebook_run", notebook_grid(nb, a=[2, 5]), tmp_path / "nb_runs",
                                  tmp_path / "notebooks.json"),
                                 ("runfns:crash", CRASHES, tmp_path / "crash_runs", tmp_path / "crashes.json")], tmp_path), tmp_path)

    df = read_sweep(tmp_path / "resumed.json")
    assert df["config.x"].tolist() == list(range(10))
    assert df.status.tolist() == ["failed" if c["fail"] else "done" for c in CONFIGS]
    ok = df[df.status == "done"]
    assert ok["result.y"].tolist() == [x * x for x in ok["config.x"]]
    assert "asked to fail at x=3" in df.error[df["config.x"] == 3].item()   # recorded, and the sweep went on
    assert (store.get(df.key[df["config.x"] == 3].item()).path / "error.json").exists()
    calls = _calls(store)
    assert {k: calls[k] for k in done_at_kill} == {k: calls_at_kill[k] for k in done_at_kill} == dict.fromkeys(done_at_kill, 1)
    assert all(calls[k] >= 1 for k in df.key)                               # every run ran at least once
    assert os.getpid() not in ok["result.pid"].tolist()                     # in Ray's workers, not here

    crashes = read_sweep(tmp_path / "crashes.json")                         # a killed Ray worker fails its run only
    assert crashes.status.tolist() == ["failed", "done", "done"]
    assert crashes.error[0].startswith("worker died: ") and "Crash" in crashes.error[0], crashes.error[0]
    assert RunStore(tmp_path / "crash_runs").get(crashes.key[0]).error["message"] == crashes.error[0]

    nbs = read_sweep(tmp_path / "notebooks.json")                           # notebooks as runs, on the cluster
    assert nbs.status.tolist() == ["done", "done"] and nbs["result.square"].tolist() == [4, 25]
    assert all((tmp_path / "nb_runs" / k / "notebook.ipynb").exists() for k in nbs.key)


def test_notebook_grid_runs_through_papermill(tmp_path):
    nb = tmp_path / "square.ipynb"
    write_square_notebook(nb)
    store = RunStore(tmp_path / "runs")
    configs = notebook_grid(nb, {"label": "t"}, a=[3, -1])
    df = sweep(notebook_run, configs, store=store, executor="process", max_workers=2)
    assert df.status.tolist() == ["done", "failed"]
    assert df["result.square"].iloc[0] == 9
    assert "square.ipynb failed in cell" in df.error.iloc[1] and "AssertionError: a must be non-negative" in df.error.iloc[1]
    for key in df.key:                                   # the executed copy, with papermill's injected parameters
        cells = json.loads((store.get(key).path / "notebook.ipynb").read_text())["cells"]
        injected = [c for c in cells if "injected-parameters" in c["metadata"].get("tags", [])]
        assert len(injected) == 1 and "label" in "".join(injected[0]["source"])
    # an edited notebook does not reuse the old configs: its run refuses to start
    nb.write_text(nb.read_text().replace("a = 1", "a = 2"))
    stale = sweep(notebook_run, configs[:1], store=RunStore(tmp_path / "runs2"), executor="serial")
    assert stale.status.item() == "failed" and "changed after its configs were made" in stale.error.item()
    assert notebook_grid(nb, a=[3])[0]["sha256"] != configs[0]["sha256"]


def test_ray_is_optional(monkeypatch):
    "Importing the sweep module does not import ray; without ray, the executor says how to install it."
    code = "import sys, effworkbench.sweep; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "ray", None)        # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'effworkbench\[dist\]'"):
        get_executor("ray")


def test_local_instance_and_cluster_take_the_same_path(monkeypatch, tmp_path):
    "address=None starts a new local instance of num_cpus; an address joins a cluster, where num_cpus is an error."
    ray = pytest.importorskip("ray")
    seen = []
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: seen.append((address, kw)))
    RayExecutor(num_cpus=2).connect()
    RayExecutor(address="auto").connect()
    assert seen[0][0] == "local" and seen[0][1]["num_cpus"] == 2
    assert seen[1][0] == "auto" and "num_cpus" not in seen[1][1]
    with pytest.raises(ValueError, match="num_cpus"):
        RayExecutor(address="10.0.0.1:6379", num_cpus=2)
    assert isinstance(get_executor("ray", 2), RayExecutor) and get_executor("ray", 2).num_cpus == 2


def test_cluster_use_requires_token_auth_and_the_token_file_is_private(monkeypatch, tmp_path):
    "Joining a cluster without RAY_AUTH_MODE=token is refused; a local instance turns token auth on with a 0600 token file."
    ray = pytest.importorskip("ray")
    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: seen.append((address, os.environ.get("RAY_AUTH_MODE"))))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    for mode in [None, "disabled"]:
        if mode is None: monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        else: monkeypatch.setenv("RAY_AUTH_MODE", mode)
        with pytest.raises(ValueError, match="RAY_AUTH_MODE=token"):
            RayExecutor(address="10.0.0.1:6379").connect()
    assert seen == []
    monkeypatch.delenv("RAY_AUTH_MODE")
    RayExecutor(num_cpus=1).connect()                                      # a local instance: token auth, by default
    token = tmp_path / ".ray" / "auth_token"
    assert seen == [("local", None)] and len(token.read_text()) == 64      # Ray turns token auth on for a new instance
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    token.chmod(0o644)                                                     # what Ray itself writes
    RayExecutor(num_cpus=1).connect()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")                           # joining a cluster: its token file is made private too
    RayExecutor(address="10.0.0.1:6379").connect()
    assert seen[-1] == ("10.0.0.1:6379", "token") and stat.S_IMODE(token.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="RAY_AUTH_MODE=token"):           # explicitly disabled: refused for a local head too
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        RayExecutor(num_cpus=1).connect()


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

LISTEN = """
import json, psutil, sys
from effworkbench.sweep import RayExecutor
ex = RayExecutor(num_cpus=1, _temp_dir=sys.argv[1])
ray = ex.connect()
assert ray.get(ray.remote(lambda: 1).remote()) == 1
procs = psutil.Process().children(recursive=True)
procs += [p for p in psutil.process_iter(["cmdline"]) if sys.argv[1] in " ".join(p.info["cmdline"] or []) and p not in procs]
seen = set()
for p in procs:
    try: seen |= {(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error: pass
print(json.dumps(sorted(seen)))
ex.close()
"""


@pytest.mark.slow
def test_a_local_instance_listens_on_loopback_only(tmp_path):
    "GCS, raylet, dashboard agent and workers of the instance RayExecutor starts bind 127.0.0.1 (Ray's default is every interface)."
    if importlib.util.find_spec("ray") is None: pytest.skip("ray is not installed (the [dist] extra)")
    tmp = Path(tempfile.mkdtemp(prefix="effwb-ray-"))                      # short: Ray's unix sockets live under it
    env = {**os.environ, "HOME": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"): env.pop(var, None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    try:
        proc = subprocess.run([sys.executable, "-c", LISTEN, str(tmp / "ray")], env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {n for n, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen
    assert all(ip in LOOPBACK for _, ip in seen), [s for s in seen if s[1] not in LOOPBACK]
