"""Run keys from the resolved config: a `GPTConfig`'s `ffn_kwargs` and a `TrainConfig`'s `param_kwargs` are completed to
the full typed options of their FFN and parameterization before hashing, so equal models get equal keys and different
models different keys."""
import pytest

from effworkbench.core import ConfigError, config_from
from effworkbench.moe.layers import MoEConfig
from effworkbench.mup import MuPOptions
from effworkbench.nn.gpt import GPTConfig
from effworkbench.store import RunStore
from effworkbench.train import TrainConfig, train_run

MODEL = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=1, n_heads=2)
KEY = RunStore("/nonexistent-but-unused").key


def key(**kw) -> str:
    return KEY(train_run, TrainConfig(**kw))


def test_spelled_out_defaults_give_the_same_key():
    moe = lambda kw: GPTConfig(**MODEL, ffn="moe", ffn_kwargs=kw)
    assert key(model=moe({})) == key(model=moe({"expansion": 4})) == key(model=moe({"expansion": 4, "top_k": 1, "tau": 0.5}))
    assert key(model=moe({"lb_weight": "1e-2"})) == key(model=moe({}))           # a YAML 1.1 number as text
    assert key(model=moe(MoEConfig(granularity=2))) == key(model=moe({"granularity": 2}))   # a typed config is accepted
    assert key(model=GPTConfig(**MODEL)) == key(model=GPTConfig(**MODEL, ffn_kwargs={}))
    mup = dict(model=GPTConfig(**MODEL), param="mup")
    assert key(**mup) == key(**mup, param_kwargs={"base_width": 64}) == key(**mup, param_kwargs={"router": "derived"})
    assert key(param="sp") == key(param="sp", param_kwargs={"init_std": 0.02})


def test_different_models_give_different_keys():
    moe = lambda kw: GPTConfig(**MODEL, ffn="moe", ffn_kwargs=kw)
    keys = {key(model=moe({})), key(model=moe({"expansion": 8})), key(model=moe({"granularity": 2})),
            key(model=GPTConfig(**MODEL)), key(model=GPTConfig(**MODEL), param="mup"),
            key(model=GPTConfig(**MODEL), param="mup", param_kwargs={"base_width": 32}),
            key(model=GPTConfig(**MODEL), param="sp", param_kwargs={"init_std": 0.01})}
    assert len(keys) == 7


def test_the_resolved_config_is_what_is_stored():
    c = TrainConfig(model=GPTConfig(**MODEL, ffn="moe"), param="mup")
    assert c.model.ffn_kwargs == MoEConfig().__dict__ and c.param_kwargs == MuPOptions().__dict__
    assert TrainConfig(**c.to_dict()).to_dict() == c.to_dict()                 # rebuilt from its own dict: a fixed point
    dotted = config_from(TrainConfig, "smoke", ["model.ffn=moe", "model.ffn_kwargs.expansion=4", "param=mup",
                                                 "param_kwargs.base_width=64"])
    assert KEY(train_run, dotted) == KEY(train_run, config_from(TrainConfig, "smoke", ["model.ffn=moe", "param=mup"]))


def test_unknown_options_name_the_valid_fields():
    with pytest.raises(ConfigError, match=r"ffn 'moe' has no option\(s\) \['experts'\]; valid options: \['expansion'"):
        GPTConfig(**MODEL, ffn="moe", ffn_kwargs={"experts": 8})
    with pytest.raises(ConfigError, match=r"ffn 'dense' has no option\(s\) \['expansion'\]; valid options: \[\]"):
        GPTConfig(**MODEL, ffn_kwargs={"expansion": 4})
    with pytest.raises(ConfigError, match=r"parameterization 'mup' has no option\(s\) \['width'\]; valid options: \['base_width'"):
        TrainConfig(param="mup", param_kwargs={"width": 64})


def test_relative_schedules_are_keyed_by_their_numbers():
    rl = lambda **o: key(model=GPTConfig(**MODEL), param="rlrs", param_kwargs=o)
    same = {rl(), rl(multipliers={"ffn": [1, 1]}), rl(base="sp", base_kwargs={"init_std": 0.02})}
    assert len(same) == 1                                       # uniform groups and spelled-out defaults change nothing
    assert rl(multipliers={"head": [2, 0.5], "attention": ["0.5", 1]}) == rl(multipliers={"attention": (0.5, 1.0), "head": (2.0, 0.5)})
    assert len({rl(), rl(multipliers={"head": [2, 1]}), rl(multipliers={"head": [1, 2]}), rl(multipliers={"head": [2, 1.000001]}), rl(base="mup")}) == 5
    with pytest.raises(ConfigError, match="unknown relative group"): rl(multipliers={"heads": [2, 1]})
