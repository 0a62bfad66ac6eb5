"""The reference runs on any array API library: the spec tests again, on ``array_api_strict``.

``array_api_strict`` implements the array API standard and nothing else (no NumPy-only function,
no implicit conversion), so a NumPy-only call in ``reference.py`` fails here rather than on a
GPU. Every test of ``test_forward_spec.py`` and ``test_backward_spec.py`` runs with
``dilated_attention`` and its backward replaced by wrappers that hand ``array_api_strict``
arrays to ``backend="reference"``, check that the results are ``array_api_strict`` arrays of the
input dtype, and give NumPy arrays back to the unchanged test body. The memory budget is set to
one byte there, so every branch is processed one segment per chunk (the chunked loop is what
runs on a GPU at long N).
"""

import importlib
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import longnet_ref
from longnet_ref import reference
from longnet_ref.index_sets import sparse_segments
from longnet_ref.validation import validate_branches

from . import test_backward_spec, test_forward_spec
from .strategies import problems

xp = pytest.importorskip("array_api_strict")


def to_strict(x):
    return xp.asarray(x)


def to_numpy(x, dtype):
    assert type(x).__module__.startswith("array_api_strict"), f"expected an array_api_strict array, got {type(x).__name__}"
    assert x.dtype == dtype
    return np.from_dlpack(x).copy()


def strict_forward(q, k, v, *args, backend="reference", return_lse=False, **kwargs):
    strict = [to_strict(x) for x in (q, k, v)]
    result = longnet_ref.dilated_attention(*strict, *args, backend="reference", return_lse=True, **kwargs)
    out, lse = (to_numpy(x, strict[0].dtype) for x in result)
    return (out, lse) if return_lse else out


def strict_backward(dout, q, k, v, out, lse, *args, backend="reference", **kwargs):
    strict = [to_strict(x) for x in (dout, q, k, v, out, lse)]
    grads = longnet_ref.dilated_attention_backward(*strict, *args, backend="reference", **kwargs)
    return tuple(to_numpy(g, strict[1].dtype) for g in grads)


SPEC_TESTS = [
    test
    for module in (test_forward_spec, test_backward_spec)
    for name, test in sorted(vars(module).items())
    if name.startswith("test_") and "dilated_attention" in inspect.getsource(test)
]


@pytest.mark.parametrize("spec_test", SPEC_TESTS, ids=lambda t: t.__name__)
def test_the_spec_holds_on_array_api_strict_arrays(spec_test, monkeypatch):
    for module in (test_forward_spec, test_backward_spec):
        monkeypatch.setattr(module, "dilated_attention", strict_forward, raising=False)
        monkeypatch.setattr(module, "dilated_attention_backward", strict_backward, raising=False)
    monkeypatch.setattr(reference, "DEFAULT_MEMORY_BUDGET", 1)  # one segment per chunk
    # A third of each test's examples (at least 10): the NumPy run draws the full count, and
    # array_api_strict plus one-segment chunks are slow. Restored by monkeypatch afterwards.
    own = getattr(spec_test, "_hypothesis_internal_use_settings", None)
    if own is not None:
        fewer = settings(own, max_examples=max(10, own.max_examples // 3))
        monkeypatch.setattr(spec_test, "_hypothesis_internal_use_settings", fewer)
    spec_test()


def test_numpy_is_an_alias_of_the_reference_backend():
    """``backend="numpy"`` dispatches to the very module of ``backend="reference"`` (not a copy)."""
    from longnet_ref.backends import get_backend

    assert get_backend("numpy") is get_backend("reference") is importlib.import_module("longnet_ref.reference")


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(1, 1 << 16))
def test_chunks_cover_every_segment_once_within_the_memory_budget(problem, budget):
    """Chunks are consecutive runs of whole segments; a chunk of several segments keeps its
    live score blocks, 4 of B * Hs * T^2 values per segment, within the budget; and every chunk but
    the last is full: one more segment would exceed the budget (a chunker that never merges
    segments, or merges fewer than fit, fails)."""
    itemsize = np.dtype(problem.dtype).itemsize
    branches = validate_branches(*problem.branches)
    for i, branch in enumerate(branches):
        groups = [g for g in sparse_segments(problem.n, problem.num_heads, branches, problem.offsets) if g.branch == i]
        if not groups:
            continue
        chunks = reference.segment_chunks(groups, problem.batch, itemsize, budget)
        num_segments = -(-problem.n // branch.segment_length)
        assert [s0 for s0, _ in chunks] == [0] + [s1 for _, s1 in chunks[:-1]] and chunks[-1][1] == num_segments
        per_segment = max(problem.batch * g.heads.size * g.positions.shape[1] ** 2 for g in groups)
        for s0, s1 in chunks:
            assert s1 - s0 == 1 or 4 * itemsize * per_segment * (s1 - s0) <= budget
        for s0, s1 in chunks[:-1]:
            assert 4 * itemsize * per_segment * (s1 - s0 + 1) > budget


def test_half_precision_numpy_inputs_are_rejected_with_the_cpu_error():
    q = np.zeros((1, 4, 1, 2), np.float16)
    with pytest.raises(TypeError, match="float32 or float64.*CuPy arrays only"):
        longnet_ref.dilated_attention(q, q, q, [4], [1], backend="reference")
