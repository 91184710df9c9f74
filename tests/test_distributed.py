"FSDP2, expert parallelism and sharded checkpoints on CPU process groups (gloo, 2–4 processes on loopback), checked against one process."
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from effworkbench.core import ConfigError
from effworkbench.distributed import CheckpointManager, RNGState, comm_bytes, memory_per_rank
from effworkbench.store import Run
from effworkbench.train import CheckpointError, Trainer, run_model, torchrun_command

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from tests_common import toy_corpus, trainer_cfg  # noqa: E402


def _torchrun(n: int, *args: str):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", f"--nproc-per-node={n}", str(HERE / "dist_worker.py"), *args],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


def _one_process_step(cfg):
    "The same step in one process on the whole global batch: (trainer, loss, grads, params after the step)."
    t = Trainer(cfg, corpus=toy_corpus())
    t.start_params = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    loss, _ = t.compute_grads(0)
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    t.step = 0
    t.train_step()
    return t, loss, grads


def _first_adamw_step(t, grads):
    """Weights after the first AdamW step from `t.start_params` on `grads`, in float64: clip to `grad_clip` by the global
    norm, then p ← p·(1 − lr·λ) − lr·ĝ/(|ĝ| + ε) (the first step's bias-corrected moments are ĝ and ĝ²), each parameter
    with its own group's lr and λ as `t` set them at step 0."""
    g64 = {n: g.double() for n, g in grads.items()}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g64.values()]))
    scale = min(1.0, t.cfg.grad_clip / (float(norm) + 1e-6)) if t.cfg.grad_clip else 1.0
    hp = {id(p): g for g in t.opt.param_groups for p in g["params"]}
    out = {}
    for n, p in t.model.named_parameters():
        g, grp = scale * g64[n], hp[id(p)]
        out[n] = t.start_params[n].double() * (1 - grp["lr"] * grp["weight_decay"]) - grp["lr"] * g / (g.abs() + grp["eps"])
    return out


def _check_against_one_process(got, cfg, world):
    assert got["world"] == world
    t, loss, grads = _one_process_step(cfg)
    assert got["loss"] == pytest.approx(loss, rel=1e-6)
    for n, p in t.model.named_parameters():
        torch.testing.assert_close(got["grads"][n], grads[n], rtol=1e-6, atol=1e-8, msg=lambda m: f"{n}: {m}")
    # AdamW's first step is lr·g/(|g|+ε): where |g| is near ε a rounding difference of g (another reduction order) moves
    # the update by up to lr, so the ranks' weights are checked against that step taken on their own gradients, everywhere
    # and tightly, and against one process's weights where |g| ≫ ε
    want, ref = _first_adamw_step(t, got["grads"]), _first_adamw_step(t, grads)
    for n, p in t.model.named_parameters():
        torch.testing.assert_close(ref[n].float(), p.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"one process, {n}: {m}")
        torch.testing.assert_close(got["params"][n].double(), want[n], rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
        big = grads[n].abs() > 1e-6
        torch.testing.assert_close(got["params"][n][big], p.detach()[big], rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
    return t


def _resumed_in_one_process(cfg, run_dir, got):
    "The sharded checkpoint of the ranks, resumed by one plain process: the same step, weights, moments and rank 0's RNG."
    one = Trainer(cfg, Run(run_dir, loggers=()), corpus=toy_corpus())
    assert one.resume() and (one.step, one.tokens) == (1, 8 * 16)
    for n, p in one.model.named_parameters():
        assert torch.equal(p.detach(), got["params"][n]), n
        assert torch.equal(one.opt.state[p]["exp_avg"], got["exp_avg"][n]), n
    assert torch.initial_seed() == 1234                         # rank 0's RNG came back
    model = run_model(cfg, Run(run_dir))                        # the weights alone, in one plain process
    for n, p in model.named_parameters(): assert torch.equal(p.detach(), got["params"][n]), n


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_checkpoint_loads_on_one(tmp_path):
    out, run_dir = tmp_path / "fsdp.pt", tmp_path / "run"
    _torchrun(2, "fsdp", str(out), str(run_dir))
    got = torch.load(out, weights_only=True)
    assert got["scheme"] == "FullyShardedDataParallel"
    cfg = trainer_cfg("fsdp")
    _check_against_one_process(got, cfg, 2)
    assert CheckpointManager(run_dir / "checkpoints").checkpoints() == [1]
    _resumed_in_one_process(cfg, run_dir, got)


@pytest.mark.slow
@pytest.mark.parametrize("ep_degree", [None, 2], ids=["ep2", "dp2xep2"])
def test_expert_parallel_matches_single_process(tmp_path, ep_degree):
    out, run_dir = tmp_path / "ep.pt", tmp_path / "run"
    world = 2 if ep_degree is None else 4
    _torchrun(world, "ep", str(out), str(run_dir), *([str(ep_degree)] if ep_degree else []))
    got = torch.load(out, weights_only=True)
    assert got["scheme"] == "ExpertParallelism"
    cfg = trainer_cfg("ep", moe=True, **({"ep_degree": ep_degree} if ep_degree else {}))
    t = _check_against_one_process(got, cfg, world)
    w_in = t.model.blocks[0].ffn.w_in
    assert w_in.grad is not None and got["grads"]["blocks.0.ffn.w_in"].abs().sum(dim=(1, 2)).min() > 0   # every expert got tokens
    _resumed_in_one_process(cfg, run_dir, got)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ep"])
def test_sharded_resume_is_bit_exact(tmp_path, parallel):
    "4 steps in one go, and 2 steps + a resume from the sharded checkpoint for 2 more: the same weights, bit for bit."
    _torchrun(2, "train", parallel, str(tmp_path / "once"), str(tmp_path / "once_run"), "4")
    _torchrun(2, "train", parallel, str(tmp_path / "half"), str(tmp_path / "resumed_run"), "2")
    _torchrun(2, "train", parallel, str(tmp_path / "resumed"), str(tmp_path / "resumed_run"), "4")
    for rank in (0, 1):
        once = torch.load(f"{tmp_path / 'once'}.{rank}", weights_only=True)
        half = torch.load(f"{tmp_path / 'half'}.{rank}", weights_only=True)
        resumed = torch.load(f"{tmp_path / 'resumed'}.{rank}", weights_only=True)
        assert (once["start"], half["start"], resumed["start"]) == (None, None, 2)   # the second half resumed at step 2
        assert half["step"] == 2 and (once["step"], once["tokens"]) == (resumed["step"], resumed["tokens"]) == (4, 4 * 8 * 16)
        for n, p in once["params"].items():
            assert torch.equal(p, resumed["params"][n]), n
            assert not torch.equal(p, half["params"][n]), n              # the last two steps did change it


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
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "ep"])
def test_effwb_train_nproc_launches_torchrun(tmp_path, parallel):
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus with words {i % 7} and {i % 11}." for i in range(2000)))
    cfg = tmp_path / "cfg.yaml"
    moe = ", ffn: moe, ffn_kwargs: {expansion: 2, top_k: 1, backend: torch}" if parallel == "ep" else ""
    cfg.write_text(f"corpus: {corpus}\nmax_bytes: null\nsteps: 2\nbatch_size: 4\nwarmup: 1\neval_batches: 1\n"
                   f"model: {{vocab_size: 320, seq_len: 16, d_model: 16, n_layers: 1, n_heads: 2{moe}}}\n")
    env = {**os.environ, "EFFWB_RUNS": str(tmp_path / "runs"), "EFFWB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "EFFWB_QUIET": "1"}
    env.pop("LOCAL_RANK", None)
    env.pop("EFFWB_LOG", None)
    effwb = Path(sys.executable).with_name("effwb")
    log = ["--log", "tensorboard"] if parallel == "ddp" and importlib.util.find_spec("tensorboard") else []
    r = subprocess.run([str(effwb), "train", str(cfg), "--nproc", "2", "--set", f"parallel={parallel}",
                        "--save-weights", str(tmp_path / "w.safetensors"), *log],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    res = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert res["steps"] == 2 and res["tokens"] == 2 * 4 * 16               # the global batch, counted once
    run = Path(res["path"])
    assert '"step": 2' in (run / "metrics.jsonl").read_text()
    sharded = parallel != "ddp"
    assert (run / "checkpoint.pt").exists() != sharded and (run / "checkpoints").is_dir() == sharded
    assert (tmp_path / "w.safetensors").stat().st_size > 0                  # the weights, read back in one process
    if log: assert list((run / "tensorboard").glob("events.*"))


def test_checkpoint_state_classes_are_stateful_by_their_methods():
    "dcp calls state_dict/load_state_dict only on objects that pass isinstance(x, Stateful); the classes do not inherit it."
    from torch.distributed.checkpoint.stateful import Stateful
    from effworkbench.distributed import ModelOptimizerState, ProgressState, RNGState, TrainerProgress
    for obj in (ModelOptimizerState(torch.nn.Linear(2, 2)), ProgressState(), RNGState(), TrainerProgress(None)):
        assert isinstance(obj, Stateful), type(obj).__name__
