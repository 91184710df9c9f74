"""Provenance of committed result tables: each `results/<name>.csv` has a record `results/<name>.env.json` naming the clean
commit that made it (`git_hash`, `git_dirty: false`, a commit in this repository's history), unless it is on the explicit, shrinking allow-list
`results/LEGACY_PROVENANCE.txt` (one `<name>  <reason>` per line) that the reproduction issues work off; and the
notebooks' stored outputs show the committed tables, not older ones."""
import json
import re
import subprocess
import warnings
from pathlib import Path

import pandas as pd
import pytest

from effworkbench.core import git_info, save_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
ALLOW = RESULTS / "LEGACY_PROVENANCE.txt"


def allow_list() -> dict[str, str]:
    out = {}
    for line in ALLOW.read_text().splitlines():
        if not line.strip() or line.startswith("#"): continue
        name, _, reason = line.strip().partition(" ")
        assert reason.strip(), f"{ALLOW.name}: {name} has no reason"
        assert name not in out, f"{ALLOW.name}: {name} listed twice"
        out[name] = reason.strip()
    return out


def problem(name: str) -> str | None:
    "Why the table's record does not name a clean commit, or None."
    env = RESULTS / f"{name}.env.json"
    if not env.is_file(): return f"no record {env.name}"
    rec = json.loads(env.read_text())
    if not re.fullmatch(r"[0-9a-f]{40}", str(rec.get("git_hash"))): return f"no commit (git_hash={rec.get('git_hash')!r})"
    if rec.get("git_dirty") is not False: return f"git_dirty={rec.get('git_dirty')!r}"
    if not in_history(rec["git_hash"]): return f"commit {rec['git_hash'][:10]} is not in this repository's history"
    return None


def in_history(sha: str) -> bool:
    "Whether `sha` is HEAD or an ancestor of it (a record naming a commit that never landed fails). True where the"
    " history cannot tell: no git, or a shallow clone that lacks old commits."
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
    top = run("rev-parse", "--is-shallow-repository")
    if top.returncode != 0 or top.stdout.strip() == "true": return True
    return run("merge-base", "--is-ancestor", sha, "HEAD").returncode == 0


TABLES = sorted(p.stem for p in RESULTS.glob("*.csv"))


@pytest.mark.parametrize("name", TABLES)
def test_committed_table_names_a_clean_commit(name):
    why = problem(name)
    if name in allow_list():
        assert why is not None, f"{name} now names a clean commit: take it off {ALLOW.relative_to(ROOT)}"
    else:
        assert why is None, (f"results/{name}.csv: {why}. Commit the code, rerun the notebook that makes the table and commit "
                             f"the table with its record (tables on {ALLOW.relative_to(ROOT)} are the old ones awaiting that)")


def test_allow_list_names_only_existing_tables():
    assert set(allow_list()) <= set(TABLES), set(allow_list()) - set(TABLES)


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True)


def test_tables_written_after_the_first_are_not_dirty(tmp_path):
    "Rewriting a committed table under results/ is the run's own output: the record stays clean; a code change is dirty."
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n"); (tmp_path / "results").mkdir(); (tmp_path / "results" / "a.csv").write_text("a\n1\n")
    git(tmp_path, "add", "-A"); git(tmp_path, "commit", "-qm", "init")
    (tmp_path / "results" / "a.csv").write_text("a\n2\n")                      # the first table of this run
    info = git_info(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", info["git_hash"]) and info["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_info(tmp_path)["git_dirty"] is True
    assert git_info(tmp_path / "results")["git_dirty"] is True                  # from a subfolder too


def test_save_table_always_records_the_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFWB_RESULTS", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                        # this checkout may be dirty while testing
        save_table(pd.DataFrame({"a": [1]}), "t", "medium", git_dirty=False, git_hash="0" * 40, note="x")
    rec = json.loads((tmp_path / "t.env.json").read_text())
    assert rec["note"] == "x" and rec["git_hash"] == git_info()["git_hash"] and rec["git_dirty"] == git_info()["git_dirty"]


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"      # a table record's `time_utc`, as the notebooks print it


def test_stored_notebook_outputs_show_the_committed_tables():
    """A time stamp in a notebook's stored outputs (`table: preset 'medium', <machine>, <time_utc>`) is that of a
    committed table record: a table republished without `effwb run NAME --in-place` leaves its notebook showing the old
    numbers to anyone who opens it."""
    times = {json.loads(p.read_text()).get("time_utc") for p in RESULTS.glob("*.env.json")}
    stale = []
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
                stale += [f"{nb.name}: {t}" for t in re.findall(STAMP, text) if t not in times]
    assert not stale, (f"stored outputs show tables no longer committed ({', '.join(stale)}): refresh them with "
                       "`.venv/bin/effwb run NAME --in-place` from a clean checkout and commit the notebook")
