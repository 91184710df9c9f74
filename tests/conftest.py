"Shared test set-up: the notebook test's timing table, printed at the end of the session."
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_site"
NOTEBOOK_STAGE_LIMIT_S = 20 * 60  # the whole notebook stage must stay under 20 minutes
NOTEBOOK_TIMES: list[dict] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not NOTEBOOK_TIMES: return
    tr = terminalreporter
    tr.section("notebook smoke times")
    for r in NOTEBOOK_TIMES:
        tr.write_line(f"{r['notebook']:<32} {r['seconds']:7.1f} s  (budget {r['budget']:.0f} s)  {r['status']}")
    total = sum(r["seconds"] for r in NOTEBOOK_TIMES)
    tr.write_line(f"{'total':<32} {total:7.1f} s  (limit {NOTEBOOK_STAGE_LIMIT_S} s)")
    SITE.mkdir(exist_ok=True)
    (SITE / "notebook_times.json").write_text(json.dumps(NOTEBOOK_TIMES, indent=1))


def pytest_sessionfinish(session, exitstatus):
    total = sum(r["seconds"] for r in NOTEBOOK_TIMES)
    if total > NOTEBOOK_STAGE_LIMIT_S:
        print(f"\nnotebook stage took {total:.0f} s, over its {NOTEBOOK_STAGE_LIMIT_S} s limit")
        session.exitstatus = 1
