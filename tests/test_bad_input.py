"""SPEC §7: every class of bad input raises a clear error naming the argument."""

import numpy as np
import pytest

from longnet_ref import InputTypeError, dense_attention, dense_attention_backward, dilated_attention, dilated_attention_backward, multiplicity

B, N, H, D = 2, 16, 3, 4
rng = np.random.default_rng(0)
Q = rng.standard_normal((B, N, H, D))
V = rng.standard_normal((B, N, H, 5))
OUT, LSE = dilated_attention(Q, Q, V, [8], [2], return_lse=True)


def forward(**changes):
    args = dict(q=Q, k=Q, v=V, segment_lengths=[8, 16], dilation_rates=[1, 2])
    args.update(changes)
    return dilated_attention(**args)


def backward(**changes):
    args = dict(dout=OUT, q=Q, k=Q, v=V, out=OUT, lse=LSE, segment_lengths=[8], dilation_rates=[2])
    args.update(changes)
    return dilated_attention_backward(**args)


BAD_FORWARD = [
    ("3-D q", dict(q=Q[0]), ValueError, "q must be 4-D"),
    ("5-D v", dict(v=V[None]), ValueError, "v must be 4-D"),
    ("k of another N", dict(k=Q[:, :8]), ValueError, "k must have the shape of q"),
    ("k of another D", dict(k=Q[..., :2]), ValueError, "k must have the shape of q"),
    ("v of another H", dict(v=V[:, :, :2]), ValueError, "v must have shape"),
    ("v of another B", dict(v=V[:1]), ValueError, "v must have shape"),
    ("mixed dtypes", dict(k=Q.astype(np.float32)), TypeError, "share one dtype"),
    ("float16", dict(q=Q.astype(np.float16), k=Q.astype(np.float16), v=V.astype(np.float16)), TypeError, "float32 or float64"),
    ("integer arrays", dict(q=Q.astype(int)), TypeError, "q must be float32 or float64"),
    ("complex", dict(v=V.astype(complex)), TypeError, "v must be float32 or float64"),
    ("a list, not an array", dict(q=Q.tolist()), TypeError, r"q must be an array \(NumPy, CuPy or array API\)"),
    ("D = 0", dict(q=Q[..., :0], k=Q[..., :0]), ValueError, "head dimension"),
    ("empty branch list", dict(segment_lengths=[], dilation_rates=[]), ValueError, "at least one branch"),
    ("lists of different lengths", dict(dilation_rates=[1]), ValueError, "same length"),
    ("zero segment length", dict(segment_lengths=[0, 16]), ValueError, r"segment_lengths\[0\]"),
    ("negative dilation", dict(dilation_rates=[1, -2]), ValueError, r"dilation_rates\[1\]"),
    ("non-integer segment length", dict(segment_lengths=[8.5, 16]), TypeError, r"segment_lengths\[0\]"),
    ("float dilation, even if whole", dict(dilation_rates=[1.0, 2]), TypeError, r"dilation_rates\[0\]"),
    ("bool dilation", dict(dilation_rates=[True, 2]), TypeError, r"dilation_rates\[0\]"),
    ("a string of lengths", dict(segment_lengths="816"), TypeError, "segment_lengths must be a sequence"),
    ("unknown offsets", dict(offsets="blocks"), ValueError, "offsets must be one of"),
    ("unknown backend", dict(backend="torch"), ValueError, "backend must be one of"),
    ("non-bool causal", dict(causal="yes"), TypeError, "causal must be a bool"),
    ("infinite scale", dict(scale=float("inf")), ValueError, "scale must be finite"),
    ("string scale", dict(scale="0.5"), TypeError, "scale must be a real number"),
]


@pytest.mark.parametrize("case, changes, error, message", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_forward_input_is_rejected_with_a_message_naming_it(case, changes, error, message):
    with pytest.raises(error, match=message):
        forward(**changes)


BAD_BACKWARD = [
    ("lse of the wrong shape", dict(lse=LSE[:, :4]), ValueError, "lse must have shape"),
    ("out of the wrong shape", dict(out=OUT[..., :2]), ValueError, "out must have shape"),
    ("dout of the wrong shape", dict(dout=OUT[:1]), ValueError, "dout must have shape"),
    ("dout of another dtype", dict(dout=OUT.astype(np.float32)), TypeError, "dout must have the dtype of q"),
    ("lse as 4-D", dict(lse=OUT), ValueError, "lse must be 3-D"),
    ("bad branches", dict(segment_lengths=[8, 8]), ValueError, "same length"),
]


@pytest.mark.parametrize("case, changes, error, message", BAD_BACKWARD, ids=[c[0] for c in BAD_BACKWARD])
def test_bad_backward_input_is_rejected_with_a_message_naming_it(case, changes, error, message):
    with pytest.raises(error, match=message):
        backward(**changes)


def test_type_errors_are_also_value_errors():
    """SPEC §7 lists dtype and non-integer w among its ValueError cases and asks for TypeError for
    a wrong type: both clauses catch them."""
    with pytest.raises(ValueError):
        forward(k=Q.astype(np.float32))
    with pytest.raises(TypeError):
        forward(k=Q.astype(np.float32))
    with pytest.raises(InputTypeError):  # exported, so a caller can catch exactly this
        forward(k=Q.astype(np.float32))


def test_dense_attention_rejects_bad_input_and_bias():
    with pytest.raises(ValueError, match="bias must broadcast"):
        dense_attention(Q, Q, V, bias=np.zeros((N + 1, N)))
    with pytest.raises(ValueError, match="q must be 4-D"):
        dense_attention(Q[0], Q, V)
    out, lse = dense_attention(Q, Q, V, return_lse=True)
    with pytest.raises(ValueError, match="lse must have shape"):
        dense_attention_backward(out, Q, Q, V, out, lse[:, 1:])


def test_multiplicity_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_heads"):
        multiplicity(8, -1, [4], [1])
    with pytest.raises(TypeError, match="n must be"):  # a wrong type: the type error, as everywhere
        multiplicity(8.0, 2, [4], [1])
    with pytest.raises(TypeError, match="num_heads must be"):
        multiplicity(8, True, [4], [1])
    with pytest.raises(ValueError, match=r"dilation_rates\[0\]"):
        multiplicity(8, 2, [4], [0])
