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


def test_a_copy_without_git_names_its_commit_from_the_manifest(tmp_path):
    "The machine a working tree is sent to has no .git: the manifest gives the commit, and dirty iff a tracked file changed."
    import shutil
    import subprocess
    from effworkbench.core import GIT_MANIFEST, git_info, write_git_manifest
    if not shutil.which("git"): pytest.skip("needs git")
    src, dst = tmp_path / "src", tmp_path / "copy"
    (src / "results").mkdir(parents=True); (src / "pkg").mkdir()
    (src / "pkg" / "a.py").write_text("x = 1\n"); (src / "run.sh").write_text("echo\n"); (src / "results" / "t.csv").write_text("a\n")
    (src / "run.sh").chmod(0o755)
    def g(*a): subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=src, check=True, capture_output=True)
    g("init", "-q"); g("add", "."); g("commit", "-qm", "c")
    write_git_manifest(src)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git"))
    head = git_info(src)["git_hash"]
    assert len(head) == 40 and git_info(dst) == {"git_hash": head, "git_dirty": False}
    (dst / "results" / "t.csv").write_text("b\n")
    assert git_info(dst)["git_dirty"] is False                                  # outputs are not code
    (dst / "pkg" / "a.py").write_text("x = 2\n")
    assert git_info(dst) == {"git_hash": head, "git_dirty": True}
    (dst / "pkg" / "a.py").write_text("x = 1\n"); (dst / "run.sh").unlink()
    assert git_info(dst)["git_dirty"] is True                                   # a missing file is a change too
    (dst / GIT_MANIFEST).unlink()
    assert git_info(dst) == {"git_hash": None, "git_dirty": None}
