"""One parameter accounting: the analytic counters (GPT config, scaling-law shape) agree role by role with what the built
models allocate (GPT, MoE, a dynamic-k conversion, a ViT), and FLOPs follow from the same counts."""
import itertools

import pytest
import torch

from effworkbench.core import PARAM_ROLES, ConfigError, ParamCounts, count_params, transformer_flops
from effworkbench.nn.gpt import GPT, GPTConfig, flops_per_token, measure_params, param_counts
from effworkbench.scaling.laws import ModelShape

STORED = ("embedding", "attention", "experts", "router", "other")

CASES = [dict(), dict(bias=True, norm="layer"), dict(act="swiglu", tie_weights=True),
         dict(ffn="moe", ffn_kwargs={"expansion": 4, "granularity": 2}),
         dict(ffn="moe", act="swiglu", ffn_kwargs={"expansion": 2, "top_k": 2}),
         dict(ffn="moe", ffn_kwargs={"expansion": 4, "granularity": 2, "routing": "dynamic_k"})]


@pytest.mark.parametrize("kw", CASES)
def test_gpt_counts_match_what_is_built(kw):
    cfg = GPTConfig(vocab_size=97, seq_len=8, d_model=32, n_layers=3, n_heads=2, d_ff=48, **kw)
    m, pc = GPT(cfg), param_counts(cfg)
    measured = measure_params(m)
    assert {r: measured[r] for r in STORED} == {r: pc[r] for r in STORED}
    assert pc.total == sum(p.numel() for p in m.parameters())
    assert pc.embedding == 97 * 32 * (1 if cfg.tie_weights else 2)
    if cfg.ffn == "dense": assert measured == pc and pc.active == pc.non_embedding
    else: assert measured.active is None                     # which experts run is decided by the tokens


@pytest.mark.parametrize("kw", [CASES[0], CASES[2], CASES[3], CASES[4]])
def test_flops_are_two_per_active_matmul_weight(kw):
    cfg = GPTConfig(vocab_size=97, seq_len=8, d_model=32, n_layers=3, n_heads=2, d_ff=48, **kw)
    mm = param_counts(cfg, matmul_only=True)
    assert mm.other == 0 and mm.embedding == 97 * 32                       # the head's matmul, tied or not
    assert flops_per_token(cfg) == 2 * (mm.active + mm.embedding) + 4 * 3 * 8 * 32
    assert flops_per_token(cfg, training=True) == transformer_flops(mm.active + mm.embedding, 3, 8, 32, training=True)


@pytest.mark.parametrize("ffn,kw,act", list(itertools.product(["moe"], [{"expansion": 8, "granularity": 4}, {"expansion": 2, "top_k": 2}],
                                                            ["gelu", "swiglu"])))
def test_shape_counts_are_the_gpt_counts(ffn, kw, act):
    cfg = GPTConfig(vocab_size=300, seq_len=32, d_model=48, n_layers=3, n_heads=4, ffn=ffn, ffn_kwargs=kw, act=act)
    s = ModelShape.from_gpt(cfg)
    assert s.params() == param_counts(cfg).excluding("other")                   # a shape has no norms
    assert s.law_params.router == 0 and s.law_params.non_embedding == s.params().non_embedding - s.params().router
    assert s.law_params.active == pytest.approx(s.params().active - s.params().router)


def test_dynamic_k_conversion_moves_ffn_weights_into_experts():
    from effworkbench.compress.d2dmoe import dynamic_k_model, relufy
    torch.manual_seed(0)
    rm = relufy(GPT(GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, act="relu")), 0.0).eval()
    conv, _ = dynamic_k_model(rm, [torch.randint(0, 64, (4, 16))], n_experts=8, router_hidden=16, router_steps=5)
    before, after = measure_params(rm), measure_params(conv)
    assert [after[r] for r in ("embedding", "attention", "experts", "other")] == [before[r] for r in ("embedding", "attention", "experts", "other")]
    assert after.router == sum(p.numel() for n, p in conv.named_parameters() if ".router." in n) > 0


def test_vision_roles():
    from effworkbench.vision.models import vgg_small, vit_small
    pc = count_params(vit_small(dim=32, depth=2, heads=2))
    assert pc.attention == 2 * (32 * 96 + 96 + 32 * 32 + 32) and pc.experts == 2 * (32 * 64 + 64 + 64 * 32 + 32)
    cnn = count_params(vgg_small(width=8))
    assert cnn.other == cnn.total > 0 and cnn.active == cnn.total


def test_param_counts_algebra():
    a = ParamCounts(embedding=5, attention=7, experts=12, router=2, other=1, active_experts=3)
    assert (a.total, a.non_embedding, a.active) == (27, 22, 13)
    assert (3 * a).active == 39 and (a + a).as_dict()["router"] == 4
    assert (a + ParamCounts(experts=4)).active == 17 and (a + ParamCounts(active_experts=None)).active is None
    assert a.excluding("experts").active == 10 and set(a.as_dict()) >= set(PARAM_ROLES)
    with pytest.raises(KeyError, match="counts are"): a["matmul_active"]
    with pytest.raises(ConfigError, match="unknown role"): a.excluding("head")
