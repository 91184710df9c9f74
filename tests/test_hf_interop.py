"Checkpoints shared with Hugging Face transformers: both directions against transformers' own loader, on tiny random models, offline."
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from effworkbench.core import ConfigError
from effworkbench.nn.gpt import GPT, GPTConfig, LayerNorm, RMSNorm
from effworkbench.compress.projected import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
V, T = 64, 24


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2):
    "Weights large enough that a wrong rotary base, eps, bias or activation moves the logits far beyond the tolerance."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * std
            p.copy_(1 + noise / 2 if p.ndim == 1 and "norm" in n or "ln_" in n and n.endswith("weight") else noise)
    return model.eval()


def set_eps(model: GPT, eps: float):
    for m in model.modules():
        if isinstance(m, (RMSNorm, LayerNorm)): m.eps = eps


def tokens(n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


def close(ours: GPT, theirs, x: torch.Tensor):
    with torch.no_grad(): a, b = ours(x), theirs(x).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return a, b


def llama(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaConfig(**{**base, **kw})


# every Llama field we support, each at a value other than its default
LLAMA_CASES = {
    "plain": {},
    "rope_theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500_000.0}),
    "rope_theta_small": dict(rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    "rms_norm_eps": dict(rms_norm_eps=0.3),
    "tie_word_embeddings": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "head_dim": dict(head_dim=8, hidden_act="silu"),
    "context": dict(max_position_embeddings=24),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_transformers_to_ours(tmp_path, case):
    hf = randomize(transformers.LlamaForCausalLM(llama(**LLAMA_CASES[case])))
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    close(ours, hf, tokens())
    c = hf.config
    assert ours.cfg.rope_base == c.rope_parameters["rope_theta"] and ours.norm_f.eps == c.rms_norm_eps
    assert (ours.cfg.tie_weights, ours.cfg.bias, ours.cfg.seq_len) == (c.tie_word_embeddings, c.attention_bias, c.max_position_embeddings)


OUR_CASES = {
    "plain": {},
    "rope_base": dict(rope_base=500_000.0),
    "rope_base_small": dict(rope_base=100.0),
    "eps": dict(eps=0.3),
    "tie_weights": dict(tie_weights=True),
    "bias": dict(bias=True),
    "d_ff": dict(d_ff=40),
}


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_llama_ours_to_transformers(tmp_path, case):
    kw = dict(OUR_CASES[case]); eps = kw.pop("eps", 1e-6)
    ours = randomize(GPT(GPTConfig(vocab_size=V, seq_len=32, d_model=32, n_layers=2, n_heads=4, act="swiglu", **kw)))
    set_eps(ours, eps)
    save_pretrained(ours, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    close(ours, hf, tokens())
    assert hf.num_parameters() == sum(p.numel() for p in ours.parameters())
    c = hf.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size) == (32, ours.cfg.d_ff, 2, V)
    assert (c.rms_norm_eps, c.tie_word_embeddings, c.rope_parameters["rope_theta"]) == (eps, ours.cfg.tie_weights, ours.cfg.rope_base)
    back = load_pretrained(tmp_path)                                     # and back again, exactly
    with torch.no_grad(): assert torch.equal(back(tokens()), ours(tokens()))


def test_llama_legacy_rope_theta(tmp_path):
    "A transformers-4 config (top-level rope_theta, rope_scaling null) reads the same base as transformers 5 does."
    hf = randomize(transformers.LlamaForCausalLM(llama()))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters"); cfg |= {"rope_theta": 500_000.0, "rope_scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_pretrained(tmp_path)
    assert ours.cfg.rope_base == 500_000.0 == hf.config.rope_parameters["rope_theta"]
    close(ours, hf, tokens())


def test_rope_base_changes_logits(tmp_path):
    "The cases above can see a wrong rotary base: the same weights under base 1e4 are far off."
    hf = randomize(transformers.LlamaForCausalLM(llama(**LLAMA_CASES["rope_theta"])))
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    wrong = GPT(GPTConfig(**{**ours.cfg.to_dict(), "rope_base": 10_000.0})).eval()
    wrong.load_state_dict(ours.state_dict())
    with torch.no_grad(): assert (wrong(tokens()) - hf(tokens()).logits).abs().max() > 1e-2


@pytest.mark.parametrize("kw,field", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), "rope_type='llama3'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0}), "rope_type='linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 2.0, "original_max_position_embeddings": 16}), "rope_type='yarn'"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True, mlp_bias=False), "attention_bias=True"),
    (dict(head_dim=16), "head_dim=16"),
])
def test_llama_refused(tmp_path, kw, field):
    transformers.LlamaForCausalLM(llama(**kw)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace("[", r"\[")):
        load_pretrained(tmp_path)


def test_sharded_both_ways(tmp_path):
    hf = randomize(transformers.LlamaForCausalLM(llama(rope_parameters={"rope_type": "default", "rope_theta": 5e5})))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
    ours = load_pretrained(tmp_path / "hf")
    close(ours, hf, tokens())
    f = save_pretrained(ours, tmp_path / "ours", max_shard_size="20KB")
    assert f.name == "model.safetensors.index.json" and len(list(f.parent.glob("model-*-of-*.safetensors"))) > 1
    close(ours, transformers.LlamaForCausalLM.from_pretrained(f.parent).eval(), tokens())
    f = save_pretrained(ours, tmp_path / "ours")                          # re-saved as one file: the old shards go
    assert f.name == "model.safetensors" and not list(f.parent.glob("model-*-of-*")) and not (f.parent / "model.safetensors.index.json").exists()
    close(load_pretrained(f.parent), hf, tokens())


def test_shards_respect_the_size_limit(tmp_path):
    ours = randomize(GPT(GPTConfig(vocab_size=V, seq_len=32, d_model=32, n_layers=3, n_heads=4, act="swiglu")))
    f = save_pretrained(ours, tmp_path, max_shard_size=10_000)
    index = json.loads(f.read_text())
    shards = sorted(set(index["weight_map"].values()))
    from safetensors.torch import load_file
    sizes = [sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / s)).values()) for s in shards]
    biggest = max(p.numel() * 4 for p in ours.parameters())
    assert len(shards) > 2 and all(s <= max(10_000, biggest) for s in sizes) and sum(sizes) == index["metadata"]["total_size"]


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_both_ways_at_one_position(tmp_path, tie):
    "GPT-2 has learned positions, this GPT rotary ones: the functions agree at a single position (rotary is the identity at t = 0) with wpe = 0."
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=40,
                                  activation_function="gelu", layer_norm_epsilon=0.3, tie_word_embeddings=tie)
    hf = randomize(transformers.GPT2LMHeadModel(cfg))
    with torch.no_grad(): hf.transformer.wpe.weight.zero_()
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="wpe"):
        ours = load_pretrained(tmp_path / "hf")
    assert (ours.cfg.tie_weights, ours.cfg.d_ff, ours.norm_f.eps) == (tie, 40, 0.3)
    x = tokens(1)
    close(ours, hf, x)
    save_pretrained(ours, tmp_path / "ours", "gpt2")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert back.config.tie_word_embeddings == tie and back.config.n_inner == 40
    close(ours, back, x)


def test_gpt2_tanh_gelu_warns_and_refusals(tmp_path):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    hf.save_pretrained(tmp_path / "a")
    with pytest.warns(UserWarning, match="gelu_new"): load_pretrained(tmp_path / "a")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                                         scale_attn_by_inverse_layer_idx=True)).save_pretrained(tmp_path / "b")
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"): load_pretrained(tmp_path / "b")


def test_save_refuses_what_transformers_cannot_compute(tmp_path):
    m = GPT(GPTConfig(vocab_size=V, seq_len=16, d_model=32, n_layers=1, n_heads=4, act="swiglu"))
    m.blocks[0].attn.scale = 1 / 8                                      # μP's 1/d_head
    with pytest.raises(ConfigError, match="attention scale"): save_pretrained(m, tmp_path)
    m = GPT(GPTConfig(vocab_size=V, seq_len=16, d_model=32, n_layers=1, n_heads=4, act="swiglu"))
    m.head.group_mult = {**m.head.group_mult, "head": 0.5}
    with pytest.raises(ConfigError, match="multiplies group outputs"): save_pretrained(m, tmp_path)
    from effworkbench.nn.gpt import make_parameterization
    m = GPT(GPTConfig(vocab_size=V, seq_len=16, d_model=32, n_layers=1, n_heads=4, act="swiglu"), make_parameterization("mup"))
    with pytest.raises(ConfigError, match="mup parameterization"): save_pretrained(m, tmp_path)
    with pytest.raises(ConfigError, match="max_shard_size"): save_pretrained(GPT(GPTConfig(vocab_size=V, seq_len=16, d_model=32, n_layers=1, n_heads=4, act="swiglu")), tmp_path, max_shard_size="lots")


def test_layers_share_one_rotary_table():
    m = GPT(GPTConfig(vocab_size=V, seq_len=64, d_model=32, n_layers=4, n_heads=4))
    ptrs = {(b.attn.rotary.cos.untyped_storage().data_ptr(), b.attn.rotary.sin.untyped_storage().data_ptr()) for b in m.blocks}
    assert len(ptrs) == 1
    m = m.double()                                                       # still one table after a dtype move
    assert len({b.attn.rotary.cos.data_ptr() for b in m.blocks}) == 1 and m.blocks[3].attn.rotary.cos.dtype == torch.float64
    assert sum(b.numel() for b in m.buffers()) == 2 * 64 * 8             # cos and sin, (seq_len, Dh) each, once


def test_config_must_match_tensors_and_arguments(tmp_path):
    transformers.LlamaForCausalLM(llama()).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="num_attention_heads=4 in config.json but 2"): load_pretrained(tmp_path, n_heads=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 11008}))    # a 7B default against the tensors
    with pytest.raises(ConfigError, match="intermediate_size=11008 in config.json but 48"): load_pretrained(tmp_path)
    m = GPT(GPTConfig(vocab_size=V, seq_len=16, d_model=32, n_layers=1, n_heads=4, act="swiglu"))
    with pytest.raises(ConfigError, match="give a folder"): save_pretrained(m, tmp_path / "w.safetensors", max_shard_size="1MB")
    (tmp_path / "other").mkdir(); save_pretrained(m, tmp_path / "other")
    save_pretrained(m, tmp_path / "other" / "w.safetensors")          # a named file leaves the folder's checkpoint alone
    assert (tmp_path / "other" / "model.safetensors").is_file()
