"""Every verdict a notebook states, recomputed from the committed result tables: a table regenerated with a different
outcome fails here until the notebook's prose (and this list) say what the new tables show."""
import numpy as np
import pytest

from effworkbench.claims import (CLAIMS, Claim, bootstrap_mean, decide, paired_effect, published_variants, stated_experiments,
                                 verdicts)
from effworkbench.core import ConfigError

R, N, U = "reproduced", "not reproduced", "not decided"
STATED = {
    "vision.shapley": {"ranks: exact vs leave-one-out": R, "ranks: sampled": U, "prune 50 %: vs L1": N,
                       "prune 50 %: vs random": U, "prune 75 %: vs L1": N, "prune 75 %: global, normalised": N},
    "vision.early_exit": {"mixed vs joint": N, "mixed vs disjoint": R, "disjoint heads are weak": R},
    "privacy.dp_prune": {"pre-pruning helps, ε = 1, finetune": R, "pre-pruning helps at equal steps, ε = 1, finetune": R,
                         "pre-pruning helps, ε = 1, scratch": R, "pre-pruning helps at equal steps, ε = 1, scratch": N,
                         "dropping helps, ε = 1, finetune": R, "dropping helps at equal steps, ε = 1, finetune": R,
                         "dropping helps, ε = 1, scratch": R, "dropping helps at equal steps, ε = 1, scratch": R,
                         "public pretraining helps, ε = 1": R},
    "rlrs": {"speed-up, dense": R, "speed-up, MoE": R, "speed-up, dense, η re-tuned for both": R,
             "speed-up, MoE, η re-tuned for both": R},
    "compress.d2dmoe": {"Hoyer lowers activation density": R, "dynamic-k beats top-k": U, "half the FFN FLOPs saved within 1 %": N},
    "compress.projected": {"beats hard pruning, 50 % kept": N, "beats hard pruning, 75 % kept": N,
                           "margin grows with tokens, 50 % kept": U, "margin grows with tokens, 75 % kept": U},
    "scaling.granularity": {"G = 2 beats G = 1": R, "G = 4 beats G = 2": R, "G* > 1 at every budget": R,
                            "MoE beats dense at every budget": R},
    "scaling.joint": {"E = 8 beats dense": R, "E = 32 beats E = 8": R, "E = 2 beats dense": R, "MoE more memory-efficient": R},
    "vision.adaglimpse": {"agent vs random": R, "agent vs random, same sizes": R, "agent vs random, same pixels": R,
                          "agent vs centre-zoom": R},
}

# The same claims from a variant's tables: 23's token-choice routing, 30's retraining three times longer, 31's smaller
# experts (64 and 128 per FFN), 31's eight fresh seeds (16–23), which also decide the claim stated before they ran, and
# 21's reuse model made deeper (8 blocks) or wider (256) or trained longer (2000 steps), the last also with a search
# five times longer (1000 steps).
STATED_VARIANTS = {
    ("scaling.granularity", "token_choice"): {"G = 2 beats G = 1": R, "G = 4 beats G = 2": R, "G* > 1 at every budget": R,
                                              "MoE beats dense at every budget": R},
    ("compress.projected", "steps1200"): {"beats hard pruning, 50 % kept": N, "beats hard pruning, 75 % kept": N,
                                          "margin grows with tokens, 50 % kept": U, "margin grows with tokens, 75 % kept": N},
    ("compress.d2dmoe", "experts64"): {"Hoyer lowers activation density": R, "dynamic-k beats top-k": R,
                                       "half the FFN FLOPs saved within 1 %": R},
    ("compress.d2dmoe", "experts128"): {"Hoyer lowers activation density": R, "dynamic-k beats top-k": R,
                                        "half the FFN FLOPs saved within 1 %": R},
    ("rlrs", "depth8"): {"speed-up, dense": R, "speed-up, MoE": R, "speed-up, dense, η re-tuned for both": R,
                         "speed-up, MoE, η re-tuned for both": R},
    ("rlrs", "width256"): {"speed-up, dense": R, "speed-up, MoE": R, "speed-up, dense, η re-tuned for both": R,
                           "speed-up, MoE, η re-tuned for both": R},
    ("rlrs", "steps2000"): {"speed-up, dense": N, "speed-up, MoE": N, "speed-up, dense, η re-tuned for both": N,
                            "speed-up, MoE, η re-tuned for both": U},
    ("rlrs", "steps2000_searchsteps1000"): {"speed-up, dense": U, "speed-up, dense, η re-tuned for both": R},
    ("compress.d2dmoe", "seeds16"): {"Hoyer lowers activation density": R, "dynamic-k beats top-k": R,
                                     "half the FFN FLOPs saved within 1 %": N, "dynamic-k beats top-k, k = 4 and 8": R},
}


@pytest.mark.parametrize("experiment", sorted(STATED))
def test_verdicts_from_committed_tables(experiment):
    v = verdicts(experiment)
    assert dict(zip(v.claim, v.verdict)) == STATED[experiment]
    assert (v.lo <= v.estimate).all() and (v.estimate <= v.hi).all() and (v.n >= 3).all()   # ≥ 3 seeds behind every verdict
    assert experiment in CLAIMS


@pytest.mark.parametrize("experiment,variant", sorted(STATED_VARIANTS))
def test_variant_verdicts_from_committed_tables(experiment, variant):
    v = verdicts(experiment, variant=variant)
    assert dict(zip(v.claim, v.verdict)) == STATED_VARIANTS[experiment, variant]
    assert (v.n >= 3).all()


def test_every_claim_set_has_its_stated_verdicts_here():
    assert set(stated_experiments()) == set(STATED)          # a notebook that states claims is checked above


def test_every_published_variant_has_its_stated_verdicts_here():
    published = {(n, v) for n in stated_experiments() for v in published_variants(n)}
    assert published == set(STATED_VARIANTS)                 # a variant's committed tables are checked above too


def test_a_variant_always_publishes_the_tables_its_claims_read():
    "`register_claims` files its tables as those a variant always publishes (else `published_variants` could miss it)."
    from effworkbench.experiment import EXPERIMENTS
    for n in stated_experiments(): assert EXPERIMENTS[n].variant_tables == CLAIMS[n].tables, n
    assert "mup" not in CLAIMS and EXPERIMENTS["mup"].variant_tables == ()      # no claims: a variant publishes every table


def test_decision_rule():
    assert decide(bootstrap_mean([0.01, 0.02, 0.03])) == R
    assert decide(bootstrap_mean([-0.01, -0.02, -0.03])) == N
    assert decide(bootstrap_mean([-0.01, 0.02, 0.03])) == U
    assert decide(bootstrap_mean([0.001, 0.002, -0.001]), margin=0.01) == N                 # no effect that matters
    assert decide(bootstrap_mean([0.85, 0.9, 0.95]), threshold=0.8) == R
    assert decide(bootstrap_mean([0.5])) == U                                              # one seed decides nothing


def test_bootstrap_interval_covers_the_mean_at_its_level():
    rng = np.random.default_rng(0)
    hits = sum(ev.lo < 0 < ev.hi for ev in (bootstrap_mean(rng.normal(0, 1, 30), seed=s) for s in range(200)))
    assert 0.88 <= hits / 200 <= 0.99                                                       # a 95 % interval, roughly


def test_paired_effect_pairs_by_seed():
    import pandas as pd
    t = pd.DataFrame({"m": ["a", "b"] * 3, "seed": [2, 2, 0, 0, 1, 1], "acc": [0.9, 0.5, 0.6, 0.5, 0.7, 0.6]})
    ev = paired_effect(t, "acc", {}, {"m": "a"}, {"m": "b"})
    assert ev.estimate == pytest.approx((0.4 + 0.1 + 0.1) / 3) and ev.n == 3
    with pytest.raises(ConfigError, match="no seed has both"):
        paired_effect(t, "acc", {}, {"m": "a"}, {"m": "c"})
    c = Claim("x", "a beats b", lambda ts: paired_effect(ts["t"], "acc", {}, {"m": "a"}, {"m": "b"}), margin=0.01)
    assert c.verdict({"t": t})["verdict"] == R
