"Scaling laws: published forms, cost models against the model class, Huber fits recovering planted coefficients, optimisers."
import math

import numpy as np
import pytest

import effworkbench.moe.layers  # noqa: F401  registers the `moe` FFN
from effworkbench.nn.gpt import GPT, GPTConfig, flops_per_token, param_counts
from effworkbench.scaling.laws import (PUBLISHED_DENSE, PUBLISHED_MOE, FineGrainedSpec, JointLaw, JointSpec,
                                  ModelShape, bootstrap, compute_optimal, dense_equivalent_flops, e_hat, fit_law,
                                  joint_lr_rule, joint_optimum, rmse_log, synthetic_runs, total_over_active)

PLANTED_JOINT = JointLaw(a=40.0, alpha=-0.18, delta=0.15, gamma=-0.012, b=60.0, beta=-0.21, omega=0.08, zeta=-0.006, c=1.2)


def test_fine_grained_law_values():
    N, D, G = 1e9, 2e10, 8
    want = 0.47 + (2.1 / G ** 0.58 + 18.1) / N ** 0.115 + 30.8 / D ** 0.147
    assert PUBLISHED_MOE(N, D, G) == pytest.approx(want, rel=1e-14)
    assert PUBLISHED_DENSE(N, D) == pytest.approx(0.47 + 16.3 / N ** 0.126 + 26.7 / D ** 0.127, rel=1e-14)


def test_e_hat_and_chinchilla_reduction():
    assert e_hat(1.0, 2.0, 50.0) == pytest.approx(2.0) and e_hat(1e15, 2.0, 50.0) == pytest.approx(50.0, rel=1e-9)
    assert np.all(np.diff(e_hat(np.arange(1, 100), 1.5, 80.0)) > 0)
    rng = np.random.default_rng(0)
    N, D = 10 ** rng.uniform(5, 10, 100), 10 ** rng.uniform(7, 12, 100)
    for E in (1, 3, 8, 64):
        assert np.allclose(PLANTED_JOINT(N, D, E), PLANTED_JOINT.at_experts(E)(N, D), rtol=1e-12)


def test_joint_lr_rule():
    assert joint_lr_rule(1e8, 4) == pytest.approx(math.exp(8.39164 - 0.81218 * math.log(1e8) - 0.25 * math.log(4)))


@pytest.mark.parametrize("ffn,kw", [("dense", {}), ("moe", {"expansion": 4, "granularity": 4}), ("moe", {"expansion": 2, "top_k": 2})])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_cost_model_matches_the_model_class(ffn, kw, act):
    cfg = GPTConfig(vocab_size=300, seq_len=32, d_model=48, n_layers=3, n_heads=4, ffn=ffn, ffn_kwargs=kw, act=act)
    s = ModelShape.from_gpt(cfg)
    p = s.params()
    allocated = sum(q.numel() for n, q in GPT(cfg).named_parameters() if "norm" not in n)
    assert p.total == allocated and p == param_counts(cfg).excluding("other")
    assert s.flops_per_token() == pytest.approx(flops_per_token(cfg, training=True), rel=1e-12)
    assert s.memory_bytes("training") == 8 * s.memory_bytes("inference")
    if ffn == "dense": assert p.non_embedding == p.active and s.law_params.router == 0


def test_total_over_active_matches_shapes():
    for E in (1, 2, 8, 32):
        s = ModelShape(d=64, n_blocks=2, expansion=E)
        assert s.law_params.non_embedding / s.law_params.active == pytest.approx(total_over_active(E))


def test_fine_grained_fit_recovers_planted_coefficients():
    runs = synthetic_runs(PUBLISHED_MOE, n=150, seed=7)
    spec = FineGrainedSpec(moe=True)
    law, th, _ = fit_law(spec, runs[["N", "D", "Z"]], runs.loss, max_starts=10, seed=1)
    for n in spec.names:      # the granularity term is ~10 % of the N term: g and γ are the least identified
        assert getattr(law, n) == pytest.approx(getattr(PUBLISHED_MOE, n), rel=0.2 if n in ("g", "gamma") else 0.1), n
    assert rmse_log(law, runs[["N", "D", "Z"]].to_numpy(), runs.loss) < 0.005
    ci = bootstrap(spec, runs[["N", "D", "Z"]], runs.loss, th, n_boot=6, extra_starts=1)
    assert (ci.lo <= ci.value).all() and (ci.value <= ci.hi).all()


def test_dense_fit_recovers_planted_coefficients():
    runs = synthetic_runs(PUBLISHED_DENSE, n=100, seed=3, third=(1,))
    law, _, _ = fit_law(FineGrainedSpec(moe=False), runs[["N", "D", "Z"]], runs.loss, max_starts=8)
    for n in ("a", "alpha", "b", "beta", "c"):
        assert getattr(law, n) == pytest.approx(getattr(PUBLISHED_DENSE, n), rel=0.1), n


def test_joint_fit_recovers_planted_coefficients():
    runs = synthetic_runs(PLANTED_JOINT, n=200, seed=5, N_range=(1e6, 1e11), D_range=(1e8, 1e12), third=(1, 2, 4, 8, 16, 32))
    law, _, _ = fit_law(JointSpec(), runs[["N", "D", "Z"]], runs.loss, max_starts=12, seed=2)
    for n in ("alpha", "beta", "c", "a", "b"):
        assert getattr(law, n) == pytest.approx(getattr(PLANTED_JOINT, n), rel=0.15), n
    for n in ("delta", "gamma", "omega", "zeta"):                          # small exponents: absolute tolerance
        assert abs(getattr(law, n) - getattr(PLANTED_JOINT, n)) < 0.05, n
    X = runs[["N", "D", "Z"]].to_numpy()
    assert rmse_log(law, X, runs.loss) < 0.005


def test_huber_fit_resists_outliers():
    runs = synthetic_runs(PUBLISHED_DENSE, n=80, seed=11, third=(1,))
    bad = runs.copy(); bad.loc[:4, "loss"] *= 1.5                          # five corrupted runs
    law, _, _ = fit_law(FineGrainedSpec(moe=False, delta=1e-3), bad[["N", "D", "Z"]], bad.loss, max_starts=8)
    assert law.alpha == pytest.approx(PUBLISHED_DENSE.alpha, rel=0.1)


def test_compute_optimal_closed_form_and_claims():
    law = PUBLISHED_DENSE
    for F in (1e19, 1e23):
        r = compute_optimal(law, F).iloc[0]
        N_star = (law.alpha * law.a / (law.beta * law.b)) ** (1 / (law.alpha + law.beta)) * (F / 6) ** (law.beta / (law.alpha + law.beta))
        assert r.N == pytest.approx(N_star, rel=1e-4)
    opt = [compute_optimal(PUBLISHED_MOE, 10.0 ** e).query("optimal").G.iloc[0] for e in (18, 21, 24, 26)]
    assert min(opt) > 1 and opt == sorted(opt) and opt[-1] > opt[0]
    m = dense_equivalent_flops(PUBLISHED_MOE, PUBLISHED_DENSE, 1e20) / 1e20
    assert 10 < m < 40


def test_joint_optimum_respects_memory():
    F = 1e19
    free = joint_optimum(PLANTED_JOINT, F)
    best = free[free.optimal].iloc[0]
    M = 0.3 * best.N_total * 2
    capped = joint_optimum(PLANTED_JOINT, F, memory_bytes=M)
    assert (capped.N_total * 2 <= M * 1.0001).all()
    assert capped.loss.min() >= free.loss.min() - 1e-12


@pytest.mark.parametrize("bytes_per_param, ffn_ratio, gated", [(3.0, 4.0, False), (2.0, 2.5, True)])
def test_joint_memory_cap_counts_total_parameters(bytes_per_param, ffn_ratio, gated):
    "A binding cap M puts each E at N_total·bytes = M with N_total = N_act·(N_total/N_act)(E), not at N_act·bytes = M."
    F, experts = 1e19, (1, 4, 16)
    kw = dict(experts=experts, bytes_per_param=bytes_per_param, ffn_ratio=ffn_ratio, gated=gated)
    free = joint_optimum(PLANTED_JOINT, F, **kw)
    M = 0.5 * free.N_act.min() * bytes_per_param                # below every free optimum: binds for every E
    capped = joint_optimum(PLANTED_JOINT, F, memory_bytes=M, **kw)
    assert capped.E.tolist() == list(experts) and capped.memory_capped.all()
    for r in capped.itertuples():
        ratio = total_over_active(r.E, ffn_ratio, gated)
        assert r.N_total == pytest.approx(r.N_act * ratio, rel=1e-9)
        assert r.N_total * bytes_per_param == pytest.approx(M, rel=2e-3)          # at the cap, counted on total parameters
        assert r.memory_gb == pytest.approx(M / 1e9, rel=2e-3)
    assert capped.N_act.iloc[-1] < capped.N_act.iloc[0] / 5                      # more experts: fewer active parameters fit


@pytest.mark.parametrize("bytes_per_param", [2.0, 4.0])
def test_fine_grained_memory_cap_binds_at_N_bytes(bytes_per_param):
    "A cap M below the compute optimum puts every G at N·bytes = M (flagged memory_capped); bytes per parameter ≠ 2 too."
    F, Gs = 1e21, (1, 4, 16)
    free = compute_optimal(PUBLISHED_MOE, F, Gs)
    M = 0.3 * free.N.min() * bytes_per_param
    capped = compute_optimal(PUBLISHED_MOE, F, Gs, memory_bytes=M, bytes_per_param=bytes_per_param)
    assert capped.memory_capped.all() and not free.memory_capped.any()
    assert np.allclose(capped.N * bytes_per_param, M, rtol=2e-3)
    assert (capped.loss.to_numpy() > free.loss.to_numpy()).all()
