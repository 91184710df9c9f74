"FSDP2, expert parallelism and sharded checkpoints on CPU process groups (gloo, 2–4 processes on loopback), checked against one process."
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from effworkbench.core import ConfigError
from effworkbench.distributed import CheckpointManager, ModelOptimizerState, ProgressState, RNGState, comm_bytes, memory_per_rank
from effworkbench.train import CheckpointError, torchrun_command

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from tests_common import fsdp_case, moe_case  # noqa: E402


def _torchrun(n: int, *args: str):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", f"--nproc-per-node={n}", str(HERE / "dist_worker.py"), *args],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_checkpoint_loads_on_one(tmp_path):
    out, ck = tmp_path / "fsdp.pt", tmp_path / "ckpt"
    _torchrun(2, "fsdp", str(out), str(ck))
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2
    model, x, y = fsdp_case()                                   # single process, whole batch
    _, loss = model(x, y)
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{n}: {m}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.step()
    for n, p in model.named_parameters():   # AdamW's first step ≈ lr·g/(|g|+eps): tiny gradients amplify 1e-6 differences
        torch.testing.assert_close(got["params"][n], p.detach(), rtol=1e-6, atol=2e-6, msg=lambda m: f"{n}: {m}")
    # the 2-rank sharded checkpoint loads into one unsharded process: identical tensors
    fresh, _, _ = fsdp_case()
    with torch.no_grad():
        for p in fresh.parameters(): p.zero_()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    prog = ProgressState(0, sched)
    import numpy as np
    from effworkbench.data import LMBatchSampler
    sampler = LMBatchSampler(np.arange(1000), 4, 16, seed=0, rank=0, world_size=1)   # one rank now holds the whole batch
    state = {"app": ModelOptimizerState(fresh, opt2), "progress": prog, "rng": RNGState(), "sampler": sampler}
    assert CheckpointManager(ck).load(state) == 1
    assert prog.step == 1 and sched.last_epoch == 1 and opt2.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert (sampler.seed, sampler.step) == (3, 1)
    for n, p in fresh.named_parameters():
        assert torch.equal(p.detach(), got["params"][n]), n
        assert torch.equal(opt2.state[p]["exp_avg"], got["exp_avg"][n]), n
    assert torch.initial_seed() == 1234                         # rank 0's RNG came back


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(), ("2", "2")], ids=["ep2", "dp2xep2"])
def test_expert_parallel_matches_single_process(tmp_path, mesh):
    out = tmp_path / "ep.pt"
    _torchrun(2 if not mesh else 4, "ep", str(out), *mesh)
    got = torch.load(out, weights_only=True)
    layer, x, w = moe_case()
    world = got["world"]
    x = x.clone().requires_grad_(True)
    y = layer(x)
    b = len(x) // world                                         # the mean of the ranks' means = the global mean
    loss = sum((y[i * b:(i + 1) * b] * w[i * b:(i + 1) * b]).sum() / y[i * b:(i + 1) * b, ..., 0].numel()
               for i in range(world)) / world
    loss.backward()
    torch.testing.assert_close(got["y"], y.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["dx"], x.grad * world, rtol=1e-6, atol=1e-7)  # dx of the rank's own mean
    torch.testing.assert_close(got["router"], layer.router.weight.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got["w_in"], layer.w_in.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got["w_out"], layer.w_out.grad, rtol=1e-6, atol=1e-8)
    assert layer.w_in.grad.abs().sum(dim=(1, 2)).min() > 0      # every expert got tokens: the check is not vacuous


KILLED_SAVE = textwrap.dedent("""
    import sys, time, torch
    from torch.distributed.checkpoint import FileSystemWriter
    from effworkbench.distributed import CheckpointManager
    class StallingWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            fut = super().write_data(plan, planner)
            fut.wait(); print("WRITTEN", flush=True); time.sleep(120)     # the data files are there, no .metadata yet
            return fut
    ck = CheckpointManager(sys.argv[1])
    ck.save(1, {"w": torch.full((256, 256), 1.0)})
    ck.save(2, {"w": torch.full((256, 256), 2.0)})
    ck.save(3, {"w": torch.full((256, 256), 3.0)}, writer=StallingWriter)
""")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    p = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "WRITTEN"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert (root / ".tmp-step-00000003").is_dir()               # the interrupted save, never renamed into place
    ck = CheckpointManager(root)
    assert ck.checkpoints() == [1, 2]                           # two kept
    state = {"w": torch.zeros(256, 256)}
    assert ck.load(state) == 2 and torch.equal(state["w"], torch.full((256, 256), 2.0))
    ck.save(4, {"w": torch.full((256, 256), 4.0)})              # the next save prunes the oldest and the leftover
    assert ck.checkpoints() == [2, 4] and not list(root.glob(".tmp-*"))
    with pytest.raises(ConfigError, match="at least 2"):
        CheckpointManager(root, keep=1)


class _Crafted:
    def __init__(self, target): self.target = target
    def __reduce__(self): return (open, (self.target, "w"))             # unpickling it creates a file


class _CraftedRNG(RNGState):
    "Saves a pickle that runs code in place of the RNG states."
    def __init__(self, target): self.target = target
    def state_dict(self):
        import io
        buf = io.BytesIO(); torch.save([_Crafted(self.target)], buf); buf.seek(0)
        return {"ranks": buf}


def test_rng_state_roundtrips_weights_only_and_refuses_a_crafted_blob(tmp_path):
    import numpy as np
    import random
    ck = CheckpointManager(tmp_path / "ck")
    torch.manual_seed(11); np.random.seed(5); random.seed(3)
    ck.save(1, {"rng": RNGState()})
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0); np.random.seed(0); random.seed(0)
    assert ck.load({"rng": RNGState()}) == 1                          # a weights-only load of the real states works
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and (got[1] == want[1]).all() and got[2] == want[2]
    pwned = tmp_path / "pwned"
    ck.save(2, {"rng": _CraftedRNG(str(pwned))})
    with pytest.raises(CheckpointError, match=r"step-00000002.*weights-only.*resume from step 1"):
        ck.load({"rng": RNGState()})
    assert not pwned.exists()


def test_damaged_sharded_checkpoint_names_the_folder(tmp_path):
    ck = CheckpointManager(tmp_path / "ck")
    ck.save(1, {"w": torch.full((64, 64), 1.0)}); ck.save(2, {"w": torch.full((64, 64), 2.0)})
    for f in ck.path(2).glob("*.distcp"): f.write_bytes(f.read_bytes()[:100])      # shards cut short
    with pytest.raises(CheckpointError, match=r"sharded checkpoint .*step-00000002 cannot be loaded.*resume from step 1") as e:
        ck.load({"w": torch.zeros(64, 64)})
    assert "weights_only" not in str(e.value) and isinstance(e.value, ConfigError)
    (ck.path(1) / ".metadata").write_bytes(b"\x80\x04")                          # a damaged .metadata
    with pytest.raises(CheckpointError, match="step-00000001 cannot be loaded"):
        ck.load({"w": torch.zeros(64, 64)}, step=1)


def test_torchrun_command_forms():
    one = torchrun_command(["cfg.yaml", "--set", "steps=3"], 2)
    assert one[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in one
    assert one[-4:] == ["train", "cfg.yaml", "--set", "steps=3"]
    multi = torchrun_command(["cfg.yaml"], 8, nnodes=4, rdzv_endpoint="node0:29500")
    assert "--nnodes=4" in multi and "--rdzv-endpoint=node0:29500" in multi and "--standalone" not in multi
    with pytest.raises(ConfigError, match="rdzv-endpoint"):
        torchrun_command(["cfg.yaml"], 8, nnodes=2)


def test_cost_model_invariants():
    P = 10_000_000
    # ring all-reduce moves 2(W-1)/W of the gradient bytes per rank; FSDP2 gathers twice and reduce-scatters once
    assert comm_bytes("ddp", P, 1) == 0
    assert comm_bytes("ddp", P, 4) == pytest.approx(2 * 3 / 4 * 4 * P)
    assert comm_bytes("fsdp", P, 4) == pytest.approx(1.5 * comm_bytes("ddp", P, 4))
    m1, m8 = memory_per_rank("fsdp", P, 1), memory_per_rank("fsdp", P, 8)
    assert m8 == pytest.approx(m1 / 8) and memory_per_rank("ddp", P, 8) == m1


@pytest.mark.slow
def test_effwb_train_nproc_launches_torchrun(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus with words {i % 7} and {i % 11}." for i in range(2000)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"corpus: {corpus}\nmax_bytes: null\nsteps: 2\nbatch_size: 4\nwarmup: 1\neval_batches: 1\n"
                   "model: {vocab_size: 320, seq_len: 16, d_model: 16, n_layers: 1, n_heads: 2}\n")
    env = {**os.environ, "EFFWB_RUNS": str(tmp_path / "runs"), "EFFWB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "EFFWB_QUIET": "1"}
    env.pop("LOCAL_RANK", None)
    effwb = Path(sys.executable).with_name("effwb")
    r = subprocess.run([str(effwb), "train", str(cfg), "--nproc", "2"], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    res = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert res["steps"] == 2 and res["tokens"] == 2 * 4 * 16               # the global batch, counted once
    log = (Path(res["path"]) / "metrics.jsonl").read_text()
    assert '"step": 2' in log
