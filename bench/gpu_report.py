"""What a GPU session (bench/gpu_session.sh) brought back, measured against the issues' targets, as markdown tables.

    python bench/gpu_report.py DIR      # DIR: the device call's files (session.log, bench_*.log, d2dmoe_speed_*.csv)

Reads the logs as the benches print them (a bench stopped by its timeout leaves the rows it printed), so a partial session
still reports what it measured. Targets:
  MoE training (bench/moe.py): time(dense FFN) / time(MoE) fwd+bwd at equal active FLOPs ≥ MOE_TARGETS[(E, k, G)];
      activation memory (tensors saved for the backward) ≤ MOE_MEMORY × dense
  dynamic-k inference (bench/d2dmoe.py, E = 32): time / dense ≤ 0.6 at ~17 % of the FLOPs, ≤ 0.3 at ≤ 5 %
  GPT step (bench/gpt.py): MFU against the datasheet peak ≥ 42 % compiled, ≥ 27 % eager, ahead of the plain reference
  DP-SGD step (bench/dp.py): ≤ 1.3 × a plain step
"""
import re
import sys
from pathlib import Path

import pandas as pd

MOE_TARGETS = {(8, 1, 1): 0.85, (32, 4, 4): 0.70, (64, 8, 8): 0.65, (128, 16, 16): 0.60}
MOE_MEMORY = 1.3
DYNAMIC_K = ((0.12, 0.22, 0.6), (0.0, 0.05, 0.3))        # (FLOPs share from, to, time / dense at most), E = 32
GPT_MFU = {"compile": 0.42, "eager": 0.27}
DP_RATIO = 1.3
GPT_COLUMNS = ["ms_per_step", "ms_min", "tokens_per_s", "tflops", "mfu_datasheet", "mfu_gemm", "speed_vs_reference",
               "speed_vs_rope_clip", "speed_vs_rope_clip_min", "paired_vs_reference", "paired_q1", "paired_q3"]


def _read(d: Path, name: str) -> str:
    f = d / name
    return f.read_text(errors="replace") if f.is_file() else ""


def _moe_row(line: str) -> tuple[int, int, int, str, list[float]] | None:
    "(E, k, G, backend, its six numbers) of one of bench/moe.py's rows, or None for any other line."
    t = re.sub(r"\s+\d+ TFLOP/s = .*$", "", line).split()              # on CUDA a row ends with its TFLOP/s
    if len(t) < 10 or not all(x.isdigit() for x in t[:3]): return None
    try: return int(t[0]), int(t[1]), int(t[2]), " ".join(t[3:-6]), [float(x) for x in t[-6:]]
    except ValueError: return None


def moe_rows(text: str) -> pd.DataFrame:
    "bench/moe.py's rows `E k G backend [routing] ms dense/this peakMiB peak/dense savedMiB saved/dense`."
    rows = []
    for r in filter(None, map(_moe_row, text.splitlines())):
        E, k, G, backend, nums = r
        rows.append(dict(E=E, k=k, G=G, backend=backend, ms=nums[0], dense_over_this=nums[1], peak_vs_dense=nums[3],
                         saved_vs_dense=nums[5]))
    return pd.DataFrame(rows, columns=["E", "k", "G", "backend", "ms", "dense_over_this", "peak_vs_dense", "saved_vs_dense"])


SCHEDULES = ("triton", "triton_tma", "triton_persistent")   # the rows bench/moe.py breaks down kernel by kernel


def moe_kernel_table(text: str) -> pd.DataFrame:
    """The kernel breakdowns bench/moe.py prints under its `triton`, `triton_tma` and `triton_persistent` rows, side by side:
    ms per step of each GEMM kernel (a persistent kernel beside the per-tile kernel it replaces) under each schedule, and
    the fastest. Answers, kernel by kernel, whether the TMA copies and the persistent loops pay on this card."""
    ms, where = {}, None
    for line in text.splitlines():
        if (r := _moe_row(line)) is not None:                              # a row; its breakdown lines follow it
            name = r[3].rsplit(" ", 1)                                     # (backend, routing)
            where = (*r[:3], name[-1], name[0]) if len(name) == 2 and name[0] in SCHEDULES else None
            continue
        m = re.match(r"^\s+(_moe_\w+_kernel)\s+([\d.]+)/step\s+([\d.]+) ms", line)
        if m and where is not None:
            E, k, G, routing, sched = where
            ms[(E, k, G, routing, m.group(1).replace("_persistent_kernel", "_kernel"), sched)] = float(m.group(3))
    if not ms: return pd.DataFrame()
    df = pd.Series(ms).unstack(-1).reindex(columns=list(SCHEDULES)).reset_index()
    df.columns = ["E", "k", "G", "routing", "kernel", *[f"{c} ms" for c in SCHEDULES]]
    times = df[[f"{c} ms" for c in SCHEDULES]]
    df["fastest"] = [SCHEDULES[i] for i in times.fillna(float("inf")).to_numpy().argmin(1)]
    return df


PERSISTENT_FLAG = {"_moe_up_kernel": "up", "_moe_rows_kernel": "rows", "_moe_dh_kernel": "dh"}   # MoEKernelConfig.persistent's names


def persistent_by_kernel(kernels: pd.DataFrame) -> pd.DataFrame:
    """Per shape and routing, the `MoEKernelConfig.persistent` that `moe_kernel_table` points to: the kernels whose
    persistent loop beat their per-tile launch over the same TMA copies. The tuner times whole layers; this says which of
    its persistent candidates (all three, or one or two alone) the kernels' own times favour."""
    cols = ["E", "k", "G", "routing", "persistent"]
    if kernels.empty: return pd.DataFrame(columns=cols)
    both = kernels[kernels.kernel.isin(PERSISTENT_FLAG)].dropna(subset=["triton_tma ms", "triton_persistent ms"])
    out = []
    for key, g in both.groupby(["E", "k", "G", "routing"], sort=False):
        won = set(g.kernel[g["triton_persistent ms"] < g["triton_tma ms"]].map(PERSISTENT_FLAG))
        out.append(dict(zip(cols, (*key, ",".join(f for f in PERSISTENT_FLAG.values() if f in won) or "none"))))
    return pd.DataFrame(out, columns=cols)


def moe_verdicts(rows: pd.DataFrame) -> pd.DataFrame:
    "Per (E, k, G) and routing: the project's best Triton row against the target, beside its torch backend and the plain grouped GEMM."
    out = []
    for (E, k, G), target in MOE_TARGETS.items():
        r = rows[(rows.E == E) & (rows.k == k) & (rows.G == G)]
        for routing in ("uniform", "skewed"):
            rr = r[r.backend.str.endswith(routing)]
            tri = rr[rr.backend.str.startswith("triton")]
            if tri.empty: continue                                      # no Triton row measured for this shape
            best = tri.loc[tri.dense_over_this.idxmax()]
            def ratio(name):                                            # dense/this of one named row, nan if not run
                hit = rr[rr.backend == f"{name} {routing}"]
                return float(hit.dense_over_this.iloc[0]) if len(hit) else float("nan")
            out.append({"E, k, G": f"{E}, {k}, {G}", "routing": routing, "best Triton row": best.backend,
                        "dense/MoE": best.dense_over_this, "target": target,
                        "torch backend": ratio("torch"), "plain grouped_mm": ratio("plain_grouped_mm"),
                        "saved/dense": best.saved_vs_dense,
                        "met": bool(best.dense_over_this >= target and best.saved_vs_dense <= MOE_MEMORY)})
    return pd.DataFrame(out)


def dynamic_k_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    "bench/d2dmoe.py's table: the fastest row of each backend for E = 32 in each FLOPs band, against its bound."
    out = []
    t = table[table.n_experts == 32]
    for backend, b in t.groupby("backend"):
        for lo, hi, bound in DYNAMIC_K:
            band = b[(b.flops_ratio >= lo) & (b.flops_ratio <= hi)]
            if band.empty: continue
            r = band.loc[band.time_ratio.idxmin()]
            out.append({"backend": backend, "FLOPs band": f"{lo:.2f}–{hi:.2f}", "tau": r.tau, "FLOPs / dense": r.flops_ratio,
                        "time / dense": r.time_ratio, "k_max": r.k_max, "busiest / mean": r.load_max_over_mean,
                        "bound": bound, "met": bool(r.time_ratio <= bound)})
    return pd.DataFrame(out)


def gpt_rows(text: str) -> pd.DataFrame:
    "The final table of bench/gpt.py (name, mode, then the 12 numeric columns)."
    rows = []
    for line in text.splitlines():
        m = re.match(r"^\s*(reference\+rope\+clip|reference|workbench model|workbench trainer)\s+(eager|compile)\s+(.*)$", line)
        if not m: continue
        t = m.group(3).split()
        if len(t) != len(GPT_COLUMNS): continue
        try: rows.append({"name": m.group(1), "mode": m.group(2), **dict(zip(GPT_COLUMNS, map(float, t)))})
        except ValueError: continue
    return pd.DataFrame(rows)


def gpt_loss_table(text: str) -> list[str]:
    "bench/gpt.py's head + loss table as printed: its header line and the rows up to the next blank line."
    lines = text.splitlines()
    at = next((i for i, ln in enumerate(lines) if ln.startswith("head + loss")), None)
    if at is None: return []
    end = next((i for i in range(at + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[at:end]


def gpt_verdicts(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    if rows.empty: return pd.DataFrame()
    for _, r in rows[rows.name.str.startswith("workbench")].iterrows():
        target = GPT_MFU[r["mode"]]
        out.append({"row": r["name"], "mode": r["mode"], "MFU (datasheet)": r.mfu_datasheet, "MFU (measured GEMM)": r.mfu_gemm,
                    "target": target, "paired vs reference": r.paired_vs_reference,
                    "met": bool(r.mfu_datasheet >= target and r.paired_vs_reference > 1)})
    return pd.DataFrame(out)


def dp_rows(text: str) -> pd.DataFrame:
    "bench/dp.py's comparison: step name, s/step [IQR], × plain [IQR]."
    rows = []
    for line in text.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}([\d.]+)\s+\[([\d.]+), ([\d.]+)\]\s+([\d.]+)\s+\[([\d.]+), ([\d.]+)\]", line)
        if m: rows.append({"step": m.group(1), "s/step": float(m.group(2)), "× plain": float(m.group(5)),
                           "IQR": f"[{m.group(6)}, {m.group(7)}]"})
    return pd.DataFrame(rows)


def session_summary(text: str) -> list[str]:
    "The environment, the kernel tests' result and the full runs' table from session.log."
    keep = []
    for line in text.splitlines():
        if (line.startswith(("python ", "code ", "imports:", "packed ", "name,")) or "NVIDIA" in line
                or re.search(r"\d+ (passed|failed)", line) or re.match(r"^\s*\S+ +(done|unfinished|failed)\s+\d+\s*$", line)
                or "budget is spent" in line or line.startswith("===")):
            keep.append(line)
    return keep


def dp_verdicts(dp: pd.DataFrame) -> pd.DataFrame:
    "The DP rows with `met` on this library's book-keeping step (× plain ≤ DP_RATIO)."
    if dp.empty: return dp
    return dp.assign(met=[bool(r["× plain"] <= DP_RATIO) if r.step.startswith("DP, book-keeping") else "" for _, r in dp.iterrows()])


def moe_checks(text: str) -> list[str]:
    "bench/moe.py's and bench/d2dmoe.py's checks: kernels against float64, the plan's times, host syncs, CUDA graphs."
    keys = ("worst ", "plan ", "sync-debug", "capture failed", "all checks passed", "SOME CHECKS FAILED", "MISMATCH", "peaks:",
            "dense FFN:", "tuned tiles")
    return [line.strip() for line in text.splitlines() if any(k in line for k in keys)]


def markdown(df: pd.DataFrame) -> str:
    if df.empty: return "(nothing measured)"
    cols = list(df.columns)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)])


def report(d: Path) -> str:
    block = lambda lines: "\n".join(["```", *lines, "```"])
    parts = ["## Session", block(session_summary(_read(d, "session.log")))]
    moe_log = _read(d, "bench_moe.log")
    parts += ["## MoE training (bench/moe.py)", markdown(moe_verdicts(moe_rows(moe_log))), block(moe_checks(moe_log)),
              "### Kernel by kernel: per tile, TMA, persistent (ms per step)", markdown(kernels := moe_kernel_table(moe_log)),
              "### The persistent kernels these times favour (beside the tuner's choice above)", markdown(persistent_by_kernel(kernels))]
    tables = sorted(d.glob("d2dmoe_speed_*.csv"))
    parts += ["## Dynamic-k inference (bench/d2dmoe.py)", markdown(dynamic_k_verdicts(pd.read_csv(tables[0])) if tables else pd.DataFrame())]
    gpt_log = _read(d, "bench_gpt.log")
    parts += ["## GPT step (bench/gpt.py)", markdown(gpt_verdicts(gpt_rows(gpt_log))), block(gpt_loss_table(gpt_log))]
    dp_log = _read(d, "bench_dp.log")                  # the CUDA tests' result and a failed capture, beside the table
    parts += ["## DP-SGD step (bench/dp.py)", markdown(dp_verdicts(dp_rows(dp_log))),
              block([line.strip() for line in dp_log.splitlines() if re.search(r"\d+ (passed|failed)|failed \(|FAILED", line)])]
    anchors = _read(d, "bench_anchors.log").strip().splitlines()[-15:]
    parts += ["## Anchors (the card's baselines)", block(anchors)]
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
