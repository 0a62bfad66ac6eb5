"""SPEC §7's one exception rule, across the public API: the same bad input, the same exception.

A wrong *type* raises ``InputTypeError`` (a ``TypeError`` and a ``ValueError``); a wrong *value*
raises ``ValueError`` and nothing more specific. The same bad values go through every entry point
that takes an argument of that kind (an integer, a flag, a dtype, a backend name, a real number,
token ids), and each must raise exactly the class the rule names, with a message that names the
argument. A single entry point that still hand-writes its own check with another exception type
fails here.
"""

import math

import numpy as np
import pytest

from longnet_ref import DenseKVCache, DilatedKVCache, InputTypeError, MultiheadDilatedAttention, dilated_attention
from longnet_ref import multiplicity
from longnet_ref import complexity
from longnet_ref import model as lm
from longnet_ref.data import PasskeyTask
from longnet_ref.generate import generate, sample
from longnet_ref.train import TrainConfig

# ---------------------------------------------------------------------------------------------
# the bad values, per kind of argument: (label, value, the class SPEC §7 names)

WRONG_TYPE_INTEGERS = [("a float", 2.5), ("a whole float", 2.0), ("a bool", True), ("a string", "4"), ("None", None), ("a NumPy float", np.float64(2.0))]
WRONG_TYPE_FLAGS = [("an int", 1), ("a string", "yes"), ("None", None), ("a float", 0.0)]
WRONG_TYPE_REALS = [("a string", "hot"), ("a bool", True), ("a complex", 1j)]
NON_FINITE_REALS = [("NaN", math.nan), ("infinity", math.inf)]
BAD_DTYPES = [("float16", "float16"), ("int32", "int32"), ("complex128", "complex128")]
BAD_BACKENDS = [("an unknown name", "torch"), ("a number", 3), ("None", None), ("a case variant", "NumPy")]
BAD_OFFSETS = [("an unknown rule", "blocks"), ("a number", 0)]


def integer_cases(minimum, optional=False):
    """The wrong types (``None`` is no wrong type where it means "not given"), then values below ``minimum``."""
    wrong = [(label, value) for label, value in WRONG_TYPE_INTEGERS if not (optional and value is None)]
    return [(label, value, InputTypeError) for label, value in wrong] + [
        (f"{minimum - 1} (below {minimum})", minimum - 1, ValueError),
        (f"NumPy {minimum - 1}", np.int64(minimum - 1), ValueError),
    ]


def real_cases(minimum=None):
    cases = [(label, value, InputTypeError) for label, value in WRONG_TYPE_REALS]
    cases += [(label, value, ValueError) for label, value in NON_FINITE_REALS]
    if minimum is not None:
        cases.append((f"below {minimum}", minimum - 0.5, ValueError))
    return cases


FLAG_CASES = [(label, value, InputTypeError) for label, value in WRONG_TYPE_FLAGS]
DTYPE_CASES = [(label, value, InputTypeError) for label, value in BAD_DTYPES]
BACKEND_CASES = [(label, value, ValueError) for label, value in BAD_BACKENDS]
OFFSET_CASES = [(label, value, ValueError) for label, value in BAD_OFFSETS]

# ---------------------------------------------------------------------------------------------
# the entry points: (entry point, the argument's name in the message, cases, call with the value)

rng = np.random.default_rng(0)
Q = rng.standard_normal((1, 8, 2, 4))
CONFIG = lm.LongNetConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,))
PARAMS = lm.init_params(CONFIG)
TOKENS = np.array([[1, 2, 3, 4]])


def layer(**changes):
    args = dict(embed_dim=8, num_heads=2, segment_lengths=[4], dilation_rates=[1])
    return MultiheadDilatedAttention(**{**args, **changes})


def dilated_cache(**changes):
    args = dict(batch=1, num_heads=2, head_dim=4, value_dim=4, segment_lengths=[4], dilation_rates=[1])
    return DilatedKVCache(**{**args, **changes})


def dense_cache(**changes):
    return DenseKVCache(**{**dict(batch=1, num_heads=2, head_dim=4, value_dim=4), **changes})


def config(**changes):
    args = dict(vocab_size=11, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,))
    return lm.LongNetConfig(**{**args, **changes})


def attention(**changes):
    args = dict(q=Q, k=Q, v=Q, segment_lengths=[4], dilation_rates=[1])
    return dilated_attention(**{**args, **changes})


def generating(**changes):
    return generate(CONFIG, PARAMS, **{**dict(prompt_tokens=TOKENS[0], max_new_tokens=2), **changes})


def counts(**changes):
    return multiplicity(**{**dict(n=8, num_heads=2, segment_lengths=[4], dilation_rates=[1]), **changes})


ENTRY_POINTS = [
    # integers
    ("MultiheadDilatedAttention", "num_heads", integer_cases(1), lambda v: layer(num_heads=v)),
    ("MultiheadDilatedAttention", "embed_dim", integer_cases(1), lambda v: layer(embed_dim=v)),
    ("MultiheadDilatedAttention", "segment_lengths[0]", integer_cases(1), lambda v: layer(segment_lengths=[v])),
    ("DilatedKVCache", "num_heads", integer_cases(1), lambda v: dilated_cache(num_heads=v)),
    ("DilatedKVCache", "dilation_rates[0]", integer_cases(1), lambda v: dilated_cache(dilation_rates=[v])),
    ("DenseKVCache", "num_heads", integer_cases(1), lambda v: dense_cache(num_heads=v)),
    ("DenseKVCache", "capacity", integer_cases(1, optional=True), lambda v: dense_cache(capacity=v)),
    ("LongNetConfig", "n_heads", integer_cases(1), lambda v: config(n_heads=v)),
    ("LongNetConfig", "window", integer_cases(1, optional=True), lambda v: config(attention="window", window=v)),
    ("LongNetConfig", "segment_lengths[0]", integer_cases(1), lambda v: config(segment_lengths=(v,))),
    ("multiplicity", "num_heads", integer_cases(0), lambda v: counts(num_heads=v)),
    ("multiplicity", "n", integer_cases(0), lambda v: counts(n=v)),
    ("dilated_attention", "segment_lengths[0]", integer_cases(1), lambda v: attention(segment_lengths=[v])),
    ("generate", "max_new_tokens", integer_cases(0), lambda v: generating(max_new_tokens=v)),
    ("generate", "top_k", integer_cases(1, optional=True), lambda v: generating(top_k=v)),
    ("sample", "top_k", integer_cases(1, optional=True), lambda v: sample(np.zeros((1, 5)), rng, top_k=v)),
    ("MultiheadDilatedAttention", "seed", integer_cases(0), lambda v: layer(seed=v)),
    ("LongNetConfig", "seed", integer_cases(0), lambda v: config(seed=v)),
    ("generate", "seed", integer_cases(0), lambda v: generating(seed=v)),
    ("TrainConfig", "steps", integer_cases(1), lambda v: TrainConfig(steps=v)),
    ("TrainConfig", "warmup", integer_cases(0), lambda v: TrainConfig(warmup=v)),
    ("PasskeyTask", "n", integer_cases(2), lambda v: PasskeyTask(n=v)),
    ("PasskeyTask.batch", "batch_size", integer_cases(1), lambda v: PasskeyTask(n=16).batch(v, rng)),
    ("complexity.attended_pairs", "n", integer_cases(0), lambda v: complexity.attended_pairs(v, 2, [4], [1])),
    ("complexity.dilated_flops", "head_dim", integer_cases(1), lambda v: complexity.dilated_flops(8, 2, v, [4], [1])),
    ("complexity.dense_pairs", "num_heads", integer_cases(0), lambda v: complexity.dense_pairs(8, v)),
    ("complexity.geometric_configuration", "ratio", integer_cases(2), lambda v: complexity.geometric_configuration(64, 4, v)),
    ("complexity.path_length", "n", integer_cases(0), lambda v: complexity.path_length(v, 2, [4], [1])),
    # flags
    ("MultiheadDilatedAttention", "causal", FLAG_CASES, lambda v: layer(causal=v)),
    ("DilatedKVCache", "causal", FLAG_CASES, lambda v: dilated_cache(causal=v)),
    ("DenseKVCache", "causal", FLAG_CASES, lambda v: dense_cache(causal=v)),
    ("LongNetConfig", "causal", FLAG_CASES, lambda v: config(causal=v)),
    ("LongNetConfig", "rope", FLAG_CASES, lambda v: config(rope=v)),
    ("multiplicity", "causal", FLAG_CASES, lambda v: counts(causal=v)),
    ("complexity.attended_pairs", "causal", FLAG_CASES, lambda v: complexity.attended_pairs(8, 2, [4], [1], causal=v)),
    ("dilated_attention", "causal", FLAG_CASES, lambda v: attention(causal=v)),
    ("dilated_attention", "return_lse", FLAG_CASES, lambda v: attention(return_lse=v)),
    # dtypes: a dtype= argument, or the arrays' dtype
    ("MultiheadDilatedAttention", "dtype", DTYPE_CASES, lambda v: layer(dtype=v)),
    ("DilatedKVCache", "dtype", DTYPE_CASES, lambda v: dilated_cache(dtype=v)),
    ("DenseKVCache", "dtype", DTYPE_CASES, lambda v: dense_cache(dtype=v)),
    ("LongNetConfig", "dtype", DTYPE_CASES, lambda v: config(dtype=v)),
    ("dilated_attention", "q", DTYPE_CASES, lambda v: attention(q=Q.astype(v), k=Q.astype(v), v=Q.astype(v))),
    ("MultiheadDilatedAttention.forward", "x", DTYPE_CASES, lambda v: layer().forward(np.zeros((1, 4, 8), v))),
    # backend and offsets names
    ("MultiheadDilatedAttention", "backend", BACKEND_CASES, lambda v: layer(backend=v)),
    ("LongNetConfig", "backend", BACKEND_CASES, lambda v: config(backend=v)),
    ("dilated_attention", "backend", BACKEND_CASES, lambda v: attention(backend=v)),
    ("DilatedKVCache.prefill", "backend", BACKEND_CASES, lambda v: dilated_cache().prefill(Q[:, :4, :, :], Q[:, :4, :, :], Q[:, :4, :, :], backend=v)),
    ("MultiheadDilatedAttention", "offsets", OFFSET_CASES, lambda v: layer(offsets=v)),
    ("DilatedKVCache", "offsets", OFFSET_CASES, lambda v: dilated_cache(offsets=v)),
    ("LongNetConfig", "offsets", OFFSET_CASES, lambda v: config(offsets=v)),
    ("multiplicity", "offsets", OFFSET_CASES, lambda v: counts(offsets=v)),
    ("dilated_attention", "offsets", OFFSET_CASES, lambda v: attention(offsets=v)),
    # real numbers
    ("generate", "temperature", real_cases(minimum=0), lambda v: generating(temperature=v)),
    ("sample", "temperature", real_cases(minimum=0), lambda v: sample(np.zeros((1, 5)), rng, temperature=v)),
    ("dilated_attention", "scale", real_cases(), lambda v: attention(scale=v)),
    ("DilatedKVCache", "scale", real_cases(), lambda v: dilated_cache(scale=v)),
    ("TrainConfig", "lr", real_cases(minimum=0), lambda v: TrainConfig(lr=v)),
    ("TrainConfig", "weight_decay", real_cases(minimum=0), lambda v: TrainConfig(weight_decay=v)),
    ("PasskeyTask", "reach_fraction", real_cases(minimum=0), lambda v: PasskeyTask(n=16, reach_fraction=v)),
]

# token ids: the same bad arrays for the model, the decoder's prompt and the loss's targets
BAD_TOKENS = [
    ("float ids", TOKENS.astype(np.float64), InputTypeError),
    ("bool ids", TOKENS > 2, InputTypeError),
    ("string ids", np.array([["a", "b"]]), InputTypeError),
    ("an id = V", np.array([[1, 11]]), ValueError),
    ("a negative id", np.array([[-1, 2]]), ValueError),
    ("a ragged list", [[1, 2], [3]], ValueError),
]
ENTRY_POINTS += [
    ("model.forward", "tokens", BAD_TOKENS, lambda v: lm.forward(CONFIG, PARAMS, v)),
    ("LongNetLM.forward", "tokens", BAD_TOKENS, lambda v: lm.LongNetLM(CONFIG, PARAMS).forward(v)),
    ("model.loss_and_grads", "targets", BAD_TOKENS[:-1], lambda v: lm.loss_and_grads(CONFIG, PARAMS, TOKENS[:, :2], v)),
    ("generate", "prompt_tokens", BAD_TOKENS, lambda v: generating(prompt_tokens=v)),
]

CASES = [pytest.param(call, name, value, error, id=f"{entry}-{name}-{label}") for entry, name, cases, call in ENTRY_POINTS for label, value, error in cases]


@pytest.mark.parametrize("call, name, value, error", CASES)
def test_the_same_bad_input_raises_the_same_exception_naming_the_argument(call, name, value, error):
    with pytest.raises(ValueError) as raised:  # every bad input is a ValueError (InputTypeError too)
        call(value)
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    assert name in str(raised.value)
    assert "\n" not in str(raised.value)  # one line


def test_an_input_type_error_is_both_a_type_error_and_a_value_error():
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, ValueError)


def test_the_integer_message_says_what_is_wanted_and_what_was_given():
    with pytest.raises(InputTypeError) as raised:
        layer(num_heads=2.5)
    assert str(raised.value) == "num_heads must be an integer >= 1, got 2.5 (float)"
    with pytest.raises(ValueError) as raised:
        layer(num_heads=0)
    assert str(raised.value) == "num_heads must be an integer >= 1, got 0"


def test_the_backend_message_lists_every_name():
    with pytest.raises(ValueError) as raised:
        layer(backend="torch")
    for name in ("reference", "numpy", "numba", "cupy", "cupy-fused"):
        assert repr(name) in str(raised.value)


@pytest.mark.parametrize("value", [np.int64(2), np.int32(2), np.uint8(2)])
def test_numpy_integers_are_integers(value):
    assert layer(num_heads=value).num_heads == 2
    assert dilated_cache(num_heads=value).num_heads == 2
    assert config(n_heads=value).n_heads == 2


NOT_A_GENERATOR = [("None", None, InputTypeError), ("a seed", 0, InputTypeError), ("the legacy module", np.random, InputTypeError)]


@pytest.mark.parametrize("label, value, error", NOT_A_GENERATOR, ids=[c[0] for c in NOT_A_GENERATOR])
@pytest.mark.parametrize("call", [lambda g: sample(np.zeros((1, 5)), g), lambda g: PasskeyTask(n=16).batch(2, g)], ids=["sample", "PasskeyTask.batch"])
def test_a_random_generator_argument_must_be_a_generator(call, label, value, error):
    with pytest.raises(error, match="rng must be a numpy.random.Generator"):
        call(value)


@pytest.mark.parametrize(
    "logits, error, message",
    [
        (np.zeros(5), ValueError, "logits must be 2-D"),
        (np.zeros((1, 5), np.int64), InputTypeError, "logits must be float32 or float64"),
        (np.full((1, 5), np.nan), ValueError, "logits must not contain NaN"),
    ],
    ids=["1-D", "integers", "NaN"],
)
def test_sample_checks_its_logits(logits, error, message):
    with pytest.raises(ValueError, match=message) as raised:
        sample(logits, rng)
    assert type(raised.value) is error


def test_generate_refuses_an_on_token_that_is_not_callable_before_any_work():
    with pytest.raises(InputTypeError, match="on_token"):
        generating(on_token=3)


def test_the_layer_backward_checks_dy_and_the_cache():
    one = layer()
    y, cache = one.forward(np.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="dy must have the forward output's shape"):
        one.backward(np.zeros((1, 3, 8)), cache)
    with pytest.raises(InputTypeError, match="cache must be the cache returned by attention_forward"):
        one.backward(np.zeros_like(y), None)


def test_the_model_checks_its_params_on_every_forward():
    with pytest.raises(InputTypeError, match="params must be a mapping"):
        lm.forward(CONFIG, None, TOKENS)
    with pytest.raises(InputTypeError, match=r"params\['wte.weight'\] must have dtype float64"):
        lm.forward(CONFIG, {name: value.astype(np.float32) for name, value in PARAMS.items()}, TOKENS)


@pytest.mark.parametrize(
    "call",
    [
        lambda: counts(n=10**7),  # 4 H N^2 = 8e14 bytes
        lambda: dilated_cache(segment_lengths=[10**13]),  # sum ceil(w / r) = 1e13 rows
        lambda: dense_cache(capacity=10**13),
    ],
    ids=["multiplicity", "DilatedKVCache", "DenseKVCache"],
)
def test_an_allocation_beyond_the_machine_is_refused_before_it_is_tried(call):
    with pytest.raises(ValueError, match=r"needs [\d,]+ bytes .* more than this machine's [\d,]+ bytes of memory") as raised:
        call()
    assert type(raised.value) is ValueError


def test_the_layer_names_x_when_its_width_is_not_the_layers():
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 8\)"):
        layer().forward(np.zeros((1, 4, 6)))


def test_a_segment_length_beyond_int64_positions_is_a_value_error_not_an_overflow():
    with pytest.raises(ValueError, match=r"segment_lengths\[0\] must be an integer >= 1 and <= ") as raised:
        attention(segment_lengths=[10**30])
    assert type(raised.value) is ValueError
