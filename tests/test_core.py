"Core: device choice and override, seeding, presets as typed configs, quiet progress, the environment report."
import dataclasses
from typing import ClassVar, Literal, Optional

import pytest
import torch

from effworkbench.core import (ConfigError, PresetConfig, env_report, get_device, is_quiet, load_table, progress,
                               project_root, save_table, set_seed)


def test_device_override(monkeypatch):
    monkeypatch.setenv("EFFWB_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("EFFWB_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="EFFWB_DEVICE"):
            get_device()


def test_seed_reproduces_and_rank_differs():
    set_seed(7); a = torch.randn(5)
    set_seed(7); b = torch.randn(5)
    set_seed(7, rank=1); c = torch.randn(5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@dataclasses.dataclass
class Cfg(PresetConfig):
    preset: str = "smoke"
    steps: int = 10
    lr: float = 0.1
    norm: Literal["batch", "group"] = "group"
    width: Optional[int] = None
    presets: ClassVar = {"medium": {"steps": 500}, "full": {"steps": 10_000, "width": 1024}}


def test_preset_config_validation():
    assert Cfg.for_preset("full").width == 1024 and Cfg.for_preset("full").preset == "full"
    assert Cfg.for_preset("medium", width=None).width is None
    with pytest.raises(ConfigError, match="choose one of"):
        Cfg.for_preset(norm="layer")
    with pytest.raises(ConfigError, match="should be int, not bool"):
        Cfg.for_preset(steps=True)
    with pytest.raises(ConfigError, match="no field"):
        Cfg.for_preset(step=3)


def test_progress_is_quiet_under_pytest(monkeypatch):
    assert is_quiet() and progress(range(2)).disable
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.setenv("EFFWB_QUIET", "0")
    assert not is_quiet()


def test_env_report_and_tables(tmp_path, monkeypatch):
    rep = env_report("medium")
    assert rep["preset"] == "medium"
    assert rep["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert rep["git_hash"] is None or len(rep["git_hash"]) == 40
    monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path))
    import pandas as pd
    save_table(pd.DataFrame({"a": [1]}), "t", "medium", note="x")
    df = load_table("t")
    assert df.a.tolist() == [1] and df.attrs["env"]["note"] == "x" and df.attrs["env"]["preset"] == "medium"
    with pytest.raises(ConfigError):
        save_table(df, "t", "large")


def test_project_root_outside_checkout(tmp_path):
    assert project_root(tmp_path) == tmp_path
    assert (project_root() / "nbs").is_dir()
