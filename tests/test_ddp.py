"DDP under torchrun on CPU (gloo): 2 processes give the loss, gradients and update of 1 process on the same global batch."
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effworkbench.train import TrainConfig, Trainer

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, monkeypatch):
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus with words {i % 7} and {i % 11}." for i in range(4000)))
    monkeypatch.setenv("EFFWB_CACHE", str(tmp_path / "cache"))
    kw = {"corpus": str(corpus), "max_bytes": None, "batch_size": 8, "micro_batch": 2, "warmup": 1,
          "model": {"vocab_size": 320, "seq_len": 32, "d_model": 32, "n_layers": 2, "n_heads": 2}}
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "EFFWB_CACHE": str(tmp_path / "cache")}
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", str(HERE / "ddp_worker.py"), json.dumps(kw), str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2
    single = Trainer(TrainConfig.for_preset("smoke", **kw))
    loss, _ = single.compute_grads(0)
    assert loss == pytest.approx(ddp["loss"], rel=1e-6)
    for n, p in single.model.named_parameters():   # two ranks sum in another order: float32 rounding of the tensor's scale
        torch.testing.assert_close(ddp["grads"][n], p.grad, rtol=1e-6, atol=1e-6 * float(p.grad.abs().max()), msg=lambda m: f"{n}: {m}")
    single.step = 0
    single.train_step()
    step_size = max(g["lr"] for g in single.opt.param_groups)      # AdamW moves a weight by about lr: a wrong update by that much
    for n, p in single.model.named_parameters():                    # rounding of the gradients above: far below it
        torch.testing.assert_close(ddp["params"][n], p.detach(), rtol=1e-6, atol=1e-4 * step_size, msg=lambda m: f"{n}: {m}")
