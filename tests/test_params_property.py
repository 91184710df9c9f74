"""Property tests of parameter parsing (`effwb run -p`, `effwb train --set a.b=v`) and config coercion: typed values
round-trip, and any input either parses or raises `ConfigError` (never another exception, never a silent default)."""
import ast
import math

import nbformat
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from effworkbench.cli import _run_params, coerce_param, validate_params
from effworkbench.core import ConfigError
from effworkbench.nn.gpt import GPTConfig
from effworkbench.core import apply_sets, coerce_text, parse_set
from effworkbench.train import TrainConfig, train_config_from

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYWORDS = {"true", "false", "null", "none", "yes", "no", "1", "0"}
finite = st.floats(allow_nan=False, allow_infinity=False)
ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


def _is_literal(s: str) -> bool:
    try: ast.literal_eval(s); return True
    except Exception: return False


# ---------------------------------------------------------------- effwb run -p NAME VALUE

@given(st.integers())
def test_int_parameter_round_trips(i):
    assert coerce_param("steps", str(i), 3) == i


@given(finite)
def test_float_parameter_round_trips(x):
    got = coerce_param("lr", repr(x), 0.5)
    assert isinstance(got, float) and (got == x or (x == 0 and got == 0))


@given(st.sampled_from(["true", "True", "TRUE", "1", "yes", "Yes", "false", "False", "0", "no", "NO"]))
def test_bool_parameter_spellings(s):
    assert coerce_param("use_bias", s, True) is (s.lower() in ("true", "1", "yes"))


@given(st.text())
def test_str_parameter_is_taken_verbatim(s):
    assert coerce_param("name", s, "x") == s


@given(st.lists(st.integers(), max_size=5))
def test_list_parameter_round_trips(xs):
    assert coerce_param("widths", repr(xs), [64]) == xs


@given(st.text(max_size=30), st.sampled_from([3, 0.5, True, [1], {"a": 1}, (1, 2)]))
@example("{[]: 1}", {"a": 1}).via("an unhashable key: TypeError inside literal_eval")
@example("(" * 300, [1]).via("too deeply nested")
def test_any_text_parses_to_the_default_type_or_is_a_config_error(s, default):
    "Whatever the shell passes: a value of the default's type, or ConfigError naming the parameter."
    try: got = coerce_param("p", s, default)
    except ConfigError as e: assert "parameter p=" in str(e); return
    if isinstance(default, bool): assert isinstance(got, bool)
    elif isinstance(default, float): assert isinstance(got, float)
    else: assert type(got) is type(default)


@given(st.lists(st.tuples(st.sampled_from(["steps", "lr", "preset", "seed", "name"]), st.text(max_size=5)), max_size=6))
def test_run_params_accept_each_name_once_and_never_preset(pairs):
    names = [k for k, _ in pairs]
    if "preset" in names or len(set(names)) < len(names):
        with pytest.raises(ConfigError, match="--preset|given twice"): _run_params([f"{k}={v}" for k, v in pairs])
    else:
        assert _run_params([f"{k}={v}" for k, v in pairs]) == dict(pairs)


@pytest.fixture(scope="module")
def toy_nb(tmp_path_factory):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("preset = 'smoke'\nsteps = 3\nlr = 0.5\nname = 'a'"); cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    path = tmp_path_factory.mktemp("nb") / "10_toy.ipynb"; nbformat.write(nb, path)
    return path


@SETTINGS
@given(st.dictionaries(ident, st.text(max_size=6), max_size=4), st.sampled_from([None, "smoke", "medium", "full"]))
def test_validate_params_names_every_unknown_parameter(toy_nb, params, preset):
    params.pop("preset", None)
    unknown = sorted(set(params) - {"steps", "lr", "name"})
    try: out = validate_params(toy_nb, params, preset)
    except ConfigError as e:
        if unknown: assert f"no parameter(s) {unknown}" in str(e)
        return
    assert not unknown and set(out) == set(params) | ({"preset"} if preset else set())
    assert isinstance(out.get("steps", 0), int) and isinstance(out.get("lr", 0.0), float)


# ---------------------------------------------------------------- effwb train --set a.b=v

dotted = st.lists(ident, min_size=1, max_size=3).map(".".join)
values = st.one_of(st.integers(), finite, st.booleans(), st.none(),
                   st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=12)
                   .filter(lambda t: not _is_literal(t) and t.lower() not in KEYWORDS and t == t.strip()))


def _spell(v) -> str:
    return {True: "true", False: "false", None: "null"}.get(v, v) if isinstance(v, (bool, type(None))) else \
        (v if isinstance(v, str) else repr(v))


@given(dotted, values)
def test_set_round_trips_key_path_and_value(key, v):
    path, got = parse_set(f"{key}={_spell(v)}")
    assert path == key.split(".")
    assert got == v or (isinstance(v, float) and math.isclose(got, v)) and type(got) is type(v)


@given(dotted, st.text(max_size=10))
def test_set_value_keeps_everything_after_the_first_equals(key, rest):
    assume(not _is_literal(f"a={rest}".strip()))
    _, got = parse_set(f"{key}=a={rest}")
    assert got == f"a={rest}".strip()


@given(st.text(max_size=30))
@example("x={[]: 1}").via("an unhashable key: TypeError inside literal_eval")
def test_any_set_text_parses_or_is_a_config_error(s):
    try: path, _ = parse_set(s)
    except ConfigError as e: assert "override" in str(e); return
    assert all(p.isidentifier() for p in path) and "=" in s


def _reference_sets(sets):
    "What `apply_sets` must build, written plainly: None where a set walks through a value that is not a dict."
    d = {}
    for k, v in sets:
        *parents, leaf = k.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict): return None
        node[leaf] = v
    return d


@given(st.lists(st.tuples(dotted, st.integers()), min_size=1, max_size=6))
def test_apply_sets_builds_the_nested_dict_or_names_the_clash(sets):
    want = _reference_sets(sets)
    try: got = apply_sets({}, [f"{k}={v}" for k, v in sets])
    except ConfigError as e:
        assert want is None and "not a config with fields" in str(e); return
    assert got == want


# ---------------------------------------------------------------- config coercion and ranges

@given(finite.filter(lambda x: x > 0), st.sampled_from(["{:e}", "{:E}", "{!r}", "{:.3g}"]))
def test_float_fields_read_numbers_spelled_as_text(x, fmt):
    text = fmt.format(x)
    assert coerce_text(TrainConfig, {"lr": text})["lr"] == float(text)


@given(st.integers(1, 10**9))
def test_int_fields_read_integers_spelled_as_text(n):
    got = coerce_text(TrainConfig, {"steps": str(n), "max_bytes": f"{n:e}" if float(f"{n:e}").is_integer() else str(n)})
    assert got["steps"] == n and isinstance(got["steps"], int) and isinstance(got["max_bytes"], int)


@given(st.text(max_size=10).filter(lambda t: not _is_literal(t.strip()) and "nan" not in t.lower() and "inf" not in t.lower()))
def test_non_numbers_are_left_for_the_type_check(t):
    assume(not t.strip().replace("_", "").isdigit())
    assert coerce_text(TrainConfig, {"lr": t}) == {"lr": t}
    with pytest.raises(ConfigError, match="lr="): TrainConfig.for_preset("smoke", **coerce_text(TrainConfig, {"lr": t}))


sizes = st.integers(-3, 70)


@SETTINGS
@given(st.fixed_dictionaries({}, optional={"vocab_size": sizes, "seq_len": sizes, "d_model": sizes, "n_layers": sizes,
                                           "n_heads": sizes, "d_ff": st.one_of(st.none(), sizes),
                                           "dropout": st.floats(-1, 2), "rope_base": st.floats()}))
def test_gpt_config_is_valid_or_a_config_error(kw):
    "Any sizes: a config the model can be built from, or ConfigError (never ZeroDivisionError)."
    try: c = GPTConfig(**kw)
    except ConfigError: return
    assert min(c.vocab_size, c.seq_len, c.d_model, c.n_layers, c.n_heads, c.d_ff) >= 1
    assert c.d_model % c.n_heads == 0 and c.d_head % 2 == 0 and 0 <= c.dropout < 1 and 0 < c.rope_base < math.inf


@SETTINGS
@given(st.fixed_dictionaries({}, optional={
    "lr": st.one_of(st.floats(), st.text(max_size=6)), "steps": sizes, "batch_size": sizes, "warmup": sizes,
    "val_frac": st.floats(-1, 2), "final_frac": st.floats(-1, 2), "decay_frac": st.floats(-1, 2),
    "weight_decay": st.floats(), "grad_clip": st.floats(), "corpus": st.text(max_size=4),
    "device": st.one_of(st.none(), st.sampled_from(["cpu", "cuda:1", "mps", "bogus", "", "cuda:x"])),
    "micro_batch": st.one_of(st.none(), sizes), "max_bytes": st.one_of(st.none(), sizes)}))
def test_train_config_is_valid_or_a_config_error(kw):
    try: c = TrainConfig.for_preset("smoke", **coerce_text(TrainConfig, kw))
    except ConfigError: return
    assert math.isfinite(c.lr) and c.lr > 0 and c.steps >= 1 and c.batch_size >= 1 and c.warmup >= 0
    assert 0 <= c.val_frac < 1 and 0 <= c.final_frac <= 1 and 0 <= c.decay_frac <= 1 and c.corpus.strip()


@SETTINGS
@given(st.lists(st.text(max_size=20), max_size=4))
def test_train_config_from_any_sets_is_a_config_or_a_config_error(sets):
    try: c = train_config_from(None, sets)
    except ConfigError: return
    assert isinstance(c, TrainConfig)
