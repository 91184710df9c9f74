"Shapley estimators on games with closed-form values (efficiency, symmetry, convergence), the oracle rank, the channel game on a real CNN, and the pruning plan."
import itertools
import math

import numpy as np
import pytest
import torch

from effworkbench.core import ConfigError
from effworkbench.vision.shapley import (Game, ShapleyConfig, TableGame, all_values, channel_game, compare_estimators, exact_shapley,
                                  kernel_shap, l1_scores, leave_one_out, oracle_importance, oracle_sets, partial_shapley,
                                  permutation_shapley, plan_keep, random_unanimity_game, to_mask, unanimity_game)
from effworkbench.vision.models import prune_channels, resnet_small, vgg_small

torch.set_num_threads(1)


def brute_shapley(v, n):
    "Shapley values as the mean marginal contribution over all n! orders (float64 reference)."
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        S = 0
        for i in order:
            phi[i] += v(S | (1 << i)) - v(S); S |= 1 << i
    return phi / math.factorial(n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_matches_closed_form_and_brute_force(seed):
    g, phi = random_unanimity_game(6, n_terms=15, max_size=4, seed=seed)
    ex = exact_shapley(g)
    assert np.allclose(ex, phi, atol=1e-12)
    assert np.allclose(ex, brute_shapley(g.v, 6), atol=1e-12)


def test_efficiency_on_random_tables():
    rng = np.random.default_rng(0)
    for n in (3, 5, 9):
        V = rng.normal(size=1 << n)
        g = TableGame(V)
        assert abs(exact_shapley(g).sum() - (V[-1] - V[0])) < 1e-10
        assert abs(kernel_shap(g.fresh(), 64, seed=1).sum() - (V[-1] - V[0])) < 1e-10
        assert abs(permutation_shapley(g.fresh(), 3, seed=1).sum() - (V[-1] - V[0])) < 1e-10


def test_symmetry_and_null_player():
    # players 0 and 2 interchangeable, player 3 a null player
    g, phi = unanimity_game(4, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 2.0, (0, 1, 2): -0.5})
    ex = exact_shapley(g)
    assert abs(ex[0] - ex[2]) < 1e-12 and abs(ex[3]) < 1e-12
    for est in (kernel_shap(g.fresh()), partial_shapley(g.fresh(), 4)):
        assert abs(est[0] - est[2]) < 1e-12 and abs(est[3]) < 1e-12


def test_estimators_converge_to_closed_form():
    g, phi = random_unanimity_game(9, n_terms=30, seed=5)
    scale = np.abs(phi).max()
    assert np.allclose(kernel_shap(g.fresh()), phi, atol=1e-10)                # all coalitions: exact
    assert np.allclose(partial_shapley(g.fresh(), 9), phi, atol=1e-10)          # k = n: exact
    e_perm = [np.abs(permutation_shapley(g.fresh(), m, seed=3) - phi).max() for m in (8, 128, 4096)]
    e_kern = [np.abs(kernel_shap(g.fresh(), m, seed=3) - phi).max() for m in (32, 128, 500)]   # of 2⁹ = 512 coalitions
    assert e_perm[2] < e_perm[0] and e_perm[2] < 0.05 * scale, e_perm
    assert e_kern[2] < e_kern[0] and e_kern[2] < 0.05 * scale, e_kern
    e_part = [np.abs(partial_shapley(g.fresh(), k) - phi).max() for k in range(1, 10)]
    assert e_part[-1] < 1e-10 and e_part[-1] < e_part[0]


def test_partial_k1_is_leave_one_out_and_counts():
    g, _ = random_unanimity_game(7, seed=1)
    assert np.allclose(leave_one_out(g), [g.v(1 << i) - g.v(0) for i in range(7)])
    h = g.fresh(); partial_shapley(h, 3)
    assert h.evals == sum(math.comb(7, s) for s in range(4))
    with pytest.raises(ConfigError): partial_shapley(g, 0)


def test_permutation_is_exact_for_additive_games():
    w = np.array([0.3, -1.0, 2.0, 0.5, 0.0])
    g = Game(5, lambda z: float(w[z].sum()))
    assert np.allclose(permutation_shapley(g, 1, seed=4), w) and np.allclose(kernel_shap(g.fresh(), 40, seed=0), w)   # any full-rank design


def test_oracle_sets_by_brute_force():
    rng = np.random.default_rng(3)
    V = rng.random(1 << 6); V[0] = 0.0
    g = TableGame(V)
    sets = oracle_sets(g)
    for m, S in enumerate(sets, start=1):
        best = min((V[to_mask(c)] for c in itertools.combinations(range(6), m)))
        assert len(S) == m and V[to_mask(S)] == best
    imp = oracle_importance(g)
    assert all(imp[i] == sum(i not in S for S in sets) for i in range(6))


def test_compare_estimators_table():
    g, _ = random_unanimity_game(6, seed=0)
    df = compare_estimators(TableGame(all_values(g)), perms=(1, 64), kernel=(8, 62), seeds=(0, 1))
    ex = df[df.estimator == "exact"].iloc[0]
    assert ex.evals == 64 and ex.rho_exact == 1.0
    assert (df[df.estimator == "partial"].set_index("budget").loc[6, "rho_exact"] > 0.999)
    assert (df.evals <= 64).all()


def test_channel_game_matches_pruned_model():
    "v(S) of the channel game equals the accuracy drop of the physically pruned model (BatchNorm, eval)."
    torch.manual_seed(0)
    m = vgg_small(width=4, groups=2)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d): mod.running_mean.normal_(); mod.weight.normal_()
    m.eval()
    x, y = torch.rand(48, 1, 32, 32), torch.randint(0, 10, (48,))
    full = float((m(x).argmax(1) == y).float().mean())
    for metric in ("acc", "loss"):
        g = channel_game(m, "2", x, y, metric)
        assert g.n == 8 and g.v(0) == 0.0
        removed = [1, 4, 5]
        small = prune_channels(m, {"2": [c for c in range(8) if c not in removed]})
        out = small(x)
        if metric == "acc": assert abs(g.v(to_mask(removed)) - (full - float((out.argmax(1) == y).float().mean()))) < 1e-9
        else:
            with torch.no_grad(): lf, lp = float(torch.nn.functional.cross_entropy(m(x), y)), float(torch.nn.functional.cross_entropy(out, y))
            assert abs(g.v(to_mask(removed)) - (lp - lf)) < 1e-5
    assert (m.gates()["2"].mask == 1).all()


def test_plan_keep_rules():
    sc = {"0": np.array([5.0, 1.0, 3.0, 2.0]), "1": np.arange(8, dtype=float)}
    k = plan_keep(sc, 0.25, "layer")
    assert k["0"].tolist() == [0, 2, 3] and k["1"].tolist() == [2, 3, 4, 5, 6, 7]
    k = plan_keep(sc, 0.25, "global")                                           # 3 lowest: 1:0, 1:1, 0:1
    assert k["0"].tolist() == [0, 2, 3] and k["1"].tolist() == list(range(2, 8))
    k = plan_keep(sc, 0.5, "global", groups=4)
    assert all(len(v) % 4 == 0 and len(v) >= 4 for v in k.values())
    r = resnet_small(width=8, norm="group", groups=4)
    small = prune_channels(r, plan_keep(l1_scores(r), 0.6, "layer", groups=4))
    assert all(n % 4 == 0 for n in small.config["mids"]) and small(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError, match="scope"): plan_keep(sc, 0.5, "random")


def test_l1_scores_are_filter_norms():
    m = vgg_small(width=4, groups=2)
    s = l1_scores(m)
    assert np.allclose(s["3"], m.blocks[3].conv.weight.detach().abs().sum((1, 2, 3)).numpy())


def test_bench_presets():
    assert ShapleyConfig.for_preset("medium").exact_layers == ["1"]
    with pytest.raises(ConfigError): ShapleyConfig.for_preset("smoke", widht=4)


@pytest.mark.parametrize("n", [2, 5, 10])
def test_kernel_shap_budget_is_distinct_evaluations(n):
    "kernel_shap(game, n_evals) evaluates exactly n_evals distinct coalitions (∅ and N included), capped at 2ⁿ."
    g, _ = random_unanimity_game(n, max_size=min(3, n), seed=n)
    for m in sorted({3, n + 1, 2 * n, max(3, (1 << n) // 2), (1 << n) - 1, 1 << n, 4 << n}):
        h = g.fresh(); phi = kernel_shap(h, m, seed=0)
        assert h.evals == min(m, 1 << n), (m, h.evals)
        assert abs(phi.sum() - (g.v(g.grand) - g.v(0))) < 1e-10
    h = g.fresh(); kernel_shap(h, None)
    assert h.evals == 1 << n
    with pytest.raises(ConfigError, match="n_evals"): kernel_shap(g.fresh(), 2)


@pytest.mark.parametrize("groups, min_keep", [(1, 3), (2, 3), (4, 6), (4, 1)])
def test_plan_keep_floor_with_min_keep_and_groups(groups, min_keep):
    "Nearly everything removed: each layer keeps the floor, ≥ min_keep and a multiple of groups (so GroupNorm still fits)."
    sc = {"a": np.arange(8, dtype=float), "b": np.arange(16, dtype=float)[::-1].copy()}
    floor = groups * math.ceil(max(min_keep, groups) / groups)
    for scope in ("layer", "global"):
        k = plan_keep(sc, 0.95, scope, groups=groups, min_keep=min_keep)
        for name, v in k.items():
            assert len(v) == floor and len(v) % groups == 0 and len(v) >= min_keep, (scope, name, v)
            assert v.tolist() == sorted(np.argsort(-sc[name], kind="stable")[:floor].tolist())   # the highest scores
