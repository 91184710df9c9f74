"bench/gpu_report.py reads a GPU session's logs as the benches print them and measures them against the targets."
import pandas as pd

from tests_common import load_bench

gr = load_bench("gpu_report")

MOE_LOG = """\
   E   k   G  backend                       ms dense/this  peak MiB peak/dense saved MiB saved/dense
              dense                      1.000       1.00    100.00       1.00    50.00        1.00
              routing uniform: busiest expert 1.38× the mean load, 0 empty; plan 0.05 ms by counting, 0.2 ms by sort
   8   1   1  triton uniform             1.100       0.91    110.00       1.10    60.00        1.20   401 TFLOP/s =  51% of GEMM peak,  41% of datasheet
   8   1   1  triton_atomic uniform      1.300       0.77    110.00       1.10    60.00        1.20
   8   1   1  torch uniform              1.700       0.59    200.00       2.00    90.00        1.80
   8   1   1  plain_grouped_mm uniform     1.600       0.63    210.00       2.10    95.00        1.90
   8   1   1  triton skewed              1.400       0.71    110.00       1.10    70.00        1.40
  32   4   4  triton uniform             2.000       0.50    150.00       1.50    60.00        1.20
  32   4   4  triton_tuned uniform       1.300       0.77    150.00       1.50    60.00        1.20
  32   4   4  layer_triton (router)      2.100       0.48    150.00       1.50    65.00        1.30
"""

GPT_LOG = """\
               name    mode  ms_per_step  ms_min  tokens_per_s  tflops  mfu_datasheet  mfu_gemm  speed_vs_reference  speed_vs_rope_clip  speed_vs_rope_clip_min  paired_vs_reference  paired_q1  paired_q3
          reference   eager        100.0    99.0     1.6e+05   250.0          0.253     0.32                   1               1.1                   1.1                    1          1          1
    workbench model   eager         95.0    94.0     1.7e+05   263.0          0.280     0.33                1.05               1.1                   1.1                 1.04       1.02       1.06
  workbench trainer compile         60.0    59.0     2.7e+05   416.0          0.421     0.53                0.99               1.0                   1.0                 0.99       0.98       1.01

head + loss, forward and backward, N = 16384 rows, d = 768, V = 50304, torch.bfloat16:
                               loss    ms  ms_min  speed_vs_reference  peak_mb  rows_per_block
    F.cross_entropy, float32 logits 20.1   19.9                   1     9000           16384
linear_cross_entropy 2^27 (default) 12.0   11.9                1.68     1300            2668
"""

DP_LOG = """\
step                                   s/step              IQR  × plain           IQR  fastest ÷ fastest   CPU s  CPU × plain           IQR
plain SGD step                         0.4291   [0.3852, 0.4427]     1.00   [1.00, 1.00]               1.00   0.853         1.00   [1.00, 1.00]
DP, book-keeping (this library)        0.5554   [0.5036, 0.5909]     1.25   [1.22, 1.32]               1.26   1.110         1.30   [1.28, 1.33]
DP, bk, 50% unstruct. + 50% random     0.5920   [0.5355, 0.6126]     1.36   [1.34, 1.41]               1.35   1.179         1.37   [1.34, 1.41]
"""


def test_moe_rows_and_verdicts():
    rows = gr.moe_rows(MOE_LOG)
    assert len(rows) == 8 and set(rows.backend) >= {"triton uniform", "layer_triton (router)"}   # dense and routing lines skipped
    v = gr.moe_verdicts(rows).set_index(["E, k, G", "routing"])
    r = v.loc[("8, 1, 1", "uniform")]
    assert r["best Triton row"] == "triton uniform" and r["dense/MoE"] == 0.91 and r["met"]
    assert r["torch backend"] == 0.59 and r["plain grouped_mm"] == 0.63
    assert not v.loc[("8, 1, 1", "skewed"), "met"]                                  # 0.71 < 0.85
    r = v.loc[("32, 4, 4", "uniform")]                                              # the best Triton row, router rows aside
    assert r["best Triton row"] == "triton_tuned uniform" and r["met"]              # 0.77 ≥ 0.70, memory 1.2 ≤ 1.3
    assert ("64, 8, 8", "uniform") not in v.index                                   # not measured: no row


def test_memory_bound_counts():
    rows = gr.moe_rows(MOE_LOG.replace("0.91    110.00       1.10    60.00        1.20", "0.91    110.00       1.10    60.00        1.40"))
    assert not gr.moe_verdicts(rows).set_index(["E, k, G", "routing"]).loc[("8, 1, 1", "uniform"), "met"]


KERNELS = """\
   8   1   1  triton uniform             1.100       0.91    110.00       1.10    60.00        1.20   401 TFLOP/s =  51% of GEMM peak,  41% of datasheet
                  _moe_up_kernel                             1.0/step    0.300 ms   300 TFLOP/s
                  _moe_rows_kernel                           2.0/step    0.500 ms   360 TFLOP/s
                  _moe_combine_kernel                        1.0/step    0.050 ms
   8   1   1  triton_atomic uniform      1.300       0.77    110.00       1.10    60.00        1.20
                  _moe_up_kernel                             1.0/step    9.000 ms   10 TFLOP/s
   8   1   1  triton_tma uniform         1.000       1.00    110.00       1.10    60.00        1.20
                  _moe_up_kernel                             1.0/step    0.250 ms   360 TFLOP/s
                  _moe_rows_kernel                           2.0/step    0.520 ms   346 TFLOP/s
   8   1   1  triton_persistent uniform  0.900       1.11    110.00       1.10    60.00        1.20
                  _moe_up_persistent_kernel                  1.0/step    0.200 ms   450 TFLOP/s
                  _moe_rows_persistent_kernel                2.0/step    0.600 ms   300 TFLOP/s
   8   1   1  triton skewed              1.400       0.71    110.00       1.10    70.00        1.40
                  _moe_up_kernel                             1.0/step    0.400 ms   225 TFLOP/s
"""


def test_moe_kernel_table():
    "Each kernel's time under the three schedules side by side, a persistent kernel beside the per-tile one it replaces."
    t = gr.moe_kernel_table(KERNELS).set_index(["E", "k", "G", "routing", "kernel"])
    up = t.loc[(8, 1, 1, "uniform", "_moe_up_kernel")]
    assert (up["triton ms"], up["triton_tma ms"], up["triton_persistent ms"], up["fastest"]) == (0.3, 0.25, 0.2, "triton_persistent")
    rows = t.loc[(8, 1, 1, "uniform", "_moe_rows_kernel")]
    assert rows["fastest"] == "triton" and rows["triton_persistent ms"] == 0.6
    assert (8, 1, 1, "uniform", "_moe_combine_kernel") in t.index                  # other kernels: one schedule measured
    sk = t.loc[(8, 1, 1, "skewed", "_moe_up_kernel")]
    assert sk["triton ms"] == 0.4 and pd.isna(sk["triton_tma ms"]) and sk["fastest"] == "triton"
    assert 9.0 not in t["triton ms"].tolist()                                       # the atomic row's breakdown is not a schedule's
    assert len(t) == 4 and gr.moe_kernel_table(MOE_LOG).empty


def test_persistent_by_kernel():
    """The kernels whose persistent loop beat their TMA per-tile launch, in MoEKernelConfig.persistent's spelling; a
    shape whose persistent row was not run names none."""
    log = KERNELS + """\
   8   1   1  triton_tma uniform         1.000       1.00    110.00       1.10    60.00        1.20
                  _moe_dh_kernel                             1.0/step    0.400 ms   300 TFLOP/s
   8   1   1  triton_persistent uniform  0.900       1.11    110.00       1.10    60.00        1.20
                  _moe_dh_persistent_kernel                  1.0/step    0.300 ms   400 TFLOP/s
  32   4   4  triton_tma uniform         1.000       1.00    110.00       1.10    60.00        1.20
                  _moe_up_kernel                             1.0/step    0.250 ms   360 TFLOP/s
  32   4   4  triton_persistent uniform  0.900       1.11    110.00       1.10    60.00        1.20
                  _moe_up_persistent_kernel                  1.0/step    0.260 ms   350 TFLOP/s
"""
    p = gr.persistent_by_kernel(gr.moe_kernel_table(log)).set_index(["E", "k", "G", "routing"]).persistent
    assert p.to_dict() == {(8, 1, 1, "uniform"): "up,dh", (32, 4, 4, "uniform"): "none"}   # rows: 0.6 ms persistent > 0.52
    assert gr.persistent_by_kernel(gr.moe_kernel_table(KERNELS)).persistent.tolist() == ["up"]
    assert gr.persistent_by_kernel(gr.moe_kernel_table(MOE_LOG)).empty


def test_gpt_and_dp_rows():
    v = gr.gpt_verdicts(gr.gpt_rows(GPT_LOG)).set_index(["row", "mode"])
    assert v.loc[("workbench model", "eager"), "met"]                              # 28 % ≥ 27 %, ahead of the reference
    assert not v.loc[("workbench trainer", "compile"), "met"]                      # 42.1 % but behind the reference
    assert len(v) == 2                                                              # the loss table's rows are not steps
    loss = gr.gpt_loss_table(GPT_LOG)
    assert len(loss) == 4 and loss[0].startswith("head + loss") and "(default)" in loss[-1]
    assert gr.gpt_loss_table(GPT_LOG.split("head + loss")[0]) == []
    dp = gr.dp_rows(DP_LOG)
    assert list(dp.step) == ["plain SGD step", "DP, book-keeping (this library)", "DP, bk, 50% unstruct. + 50% random"]
    assert dp["× plain"].tolist() == [1.0, 1.25, 1.36]
    assert gr.dp_verdicts(dp).met.tolist() == ["", True, ""]                     # only the book-keeping step is judged
    assert gr.dp_verdicts(dp.assign(**{"× plain": [1.0, 1.31, 1.0]})).met.tolist()[1] is False


def test_dynamic_k_bands():
    t = pd.DataFrame({"n_experts": 32, "backend": ["triton-graph"] * 3 + ["torch"], "tau": [0.5, 0.9, 1.0, 1.0],
                      "flops_ratio": [0.17, 0.04, 0.03, 0.03], "time_ratio": [0.55, 0.35, 0.28, 2.0], "k_max": 3,
                      "load_max_over_mean": 2.0})
    v = gr.dynamic_k_verdicts(t).set_index(["backend", "FLOPs band"])
    assert v.loc[("triton-graph", "0.12–0.22"), "met"]
    r = v.loc[("triton-graph", "0.00–0.05")]
    assert r["time / dense"] == 0.28 and r["met"]                                  # the fastest row in the band
    assert not v.loc[("torch", "0.00–0.05"), "met"]


def test_moe_checks():
    log = MOE_LOG + """\
  worst 2.1e-03 (ok, tolerance 0.03)
no host synchronisation, Triton layer:
  E=8 k=1 G=1: sync-debug 'error': ok: no synchronising call; CUDA graph fwd+bwd: ok: replay on a new routing equals eager bitwise
E=  32 triton-graph τ=0.50: capture failed: RuntimeError: operation not permitted when stream is capturing
all checks passed
"""
    lines = gr.moe_checks(log)
    assert lines[0].startswith("routing uniform: busiest expert") and "by counting" in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ["worst", "E=8", "E=", "all"]
    assert not any("triton uniform" in ln for ln in lines)                          # the rows are tabled, not listed


def test_report_of_a_partial_session(tmp_path):
    (tmp_path / "session.log").write_text("=== environment\nimports: all 14 load\n3 passed, 1 failed in 9.1s\n"
                                          "               rlrs unfinished          0\nnoise line\n")
    (tmp_path / "bench_moe.log").write_text(MOE_LOG)
    text = gr.report(tmp_path)
    assert "3 passed, 1 failed" in text and "rlrs unfinished" in text and "noise line" not in text
    assert "| 8, 1, 1 | uniform | triton uniform |" in text
    assert text.count("(nothing measured)") == 5                                   # dynamic-k, GPT, DP: no files; no breakdowns (2 tables)
