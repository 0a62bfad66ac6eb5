"""Sequence-parallel training, run by every rank under ``mpiexec -n P`` (``tests/test_distributed.py``).

Each rank computes ``parallel.loss_and_grads`` on its chunk and, *independently*, the
single-process ``model.loss_and_grads`` on the whole sequence (every rank draws the same
sequence from the same seed); the two must agree on every rank, and the gradients must be
bit-identical across ranks. Collective calls come first, assertions after, so a failed assertion
on one rank cannot leave the others waiting in the next test's collective.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

from longnet_ref import model as lm
from longnet_ref import parallel

from ..tolerances import PARALLEL_MODEL

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
VOCAB = 11


def whole_problem(batch, n, seed, masked=False):
    """The same ``(B, N)`` tokens, targets and mask on every rank (one seed)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (batch, n))
    targets = rng.integers(0, VOCAB, (batch, n))
    mask = rng.random((batch, n)) < 0.4 if masked else None
    return tokens, targets, mask


def relative_error(got, want):
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), np.finfo(want.dtype).tiny))


def compare(config, tokens, targets, mask):
    """``(parallel, whole, every rank's parallel grads)``: all collectives first."""
    local = [parallel.chunk(x, COMM) if x is not None else None for x in (tokens, targets, mask)]
    params = lm.init_params(config)
    loss, grads = parallel.loss_and_grads(config, params, *local, comm=COMM)
    everyone = COMM.allgather({name: g.tobytes() for name, g in grads.items()})
    whole_loss, whole_grads = lm.loss_and_grads(config, params, tokens, targets, mask)
    return (loss, grads), (whole_loss, whole_grads), everyone


def assert_equal_to_one_process(result, dtype):
    (loss, grads), (whole_loss, whole_grads), everyone = result
    bound = PARALLEL_MODEL[np.dtype(dtype)]
    assert abs(loss - whole_loss) <= bound * abs(whole_loss), (RANK, loss, whole_loss)
    for name, want in whole_grads.items():
        assert grads[name].dtype == want.dtype
        error = relative_error(grads[name], want)
        assert error <= bound, f"rank {RANK}: {name} relative error {error:.2e} > {bound:.0e}"
    assert all(other == everyone[0] for other in everyone), "gradients differ between ranks"


# drawn configurations: (w, r) branches that are local, straddle the chunks or span every rank;
# ragged w/r; r > w; fewer heads than the largest r; window blocks inside or across chunks
branch_lists = st.sampled_from(
    [
        ((4, 8), (1, 2)),  # local to a chunk of 8 (P = 2, 4 at N = 8 P)
        ((6, 16), (1, 4)),  # segments straddling chunks; r = 4 > H = 2 below
        ((3, 64), (2, 5)),  # ragged: 3 / 2, 64 / 5; one segment over all ranks
        ((2, 24, 48), (3, 2, 6)),  # r > w in the first branch
    ]
)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    branches=branch_lists,
    heads=st.sampled_from([1, 2, 3]),
    causal=st.booleans(),
    offsets=st.sampled_from(["paper", "torchscale"]),
    backend=st.sampled_from(["numpy", "numba"]),
    seed=st.integers(0, 2**16),
)
def test_drawn_dilated_models_match_one_process_on_every_rank(branches, heads, causal, offsets, backend, seed):
    # derandomize: every rank draws the same examples in the same order, so the collectives match
    config = lm.LongNetConfig(
        vocab_size=VOCAB,
        d_model=4 * heads,
        n_layers=2,
        n_heads=heads,
        segment_lengths=branches[0],
        dilation_rates=branches[1],
        causal=causal,
        offsets=offsets,
        backend=backend,
        seed=seed,
    )
    assert_equal_to_one_process(compare(config, *whole_problem(2, 8 * SIZE, seed)), "float64")


@pytest.mark.parametrize("window", [4, 12])  # a block inside every chunk of 8; blocks across chunks
def test_window_attention_matches_one_process(window):
    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, attention="window", window=window)
    assert_equal_to_one_process(compare(config, *whole_problem(1, 8 * SIZE, 1)), "float64")


def test_float32_matches_one_process():
    # numpy only: the numba kernels' float32 compile would cost every rank ~30 s in a fresh CI
    # checkout; their float32 agreement with numpy is tests/test_numba_backend.py's
    config = lm.LongNetConfig(
        vocab_size=VOCAB,
        d_model=8,
        n_layers=2,
        n_heads=2,
        segment_lengths=(4, 32),
        dilation_rates=(1, 2),
        backend="numpy",
        dtype="float32",
    )
    assert_equal_to_one_process(compare(config, *whole_problem(2, 8 * SIZE, 2)), "float32")


def test_the_loss_is_the_mean_over_every_ranks_unmasked_targets():
    """A partial mask, so ranks hold different numbers of targets (rank 0 none at all)."""
    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4, 16), dilation_rates=(1, 2))
    tokens, targets, mask = whole_problem(2, 8 * SIZE, 3, masked=True)
    mask[:, :8] = False  # rank 0's chunk has no target: its share of the loss is 0, not undefined
    mask[0, -1] = True
    result = compare(config, tokens, targets, mask)
    assert_equal_to_one_process(result, "float64")
    # and the loss is the mean of -log p(target) over the unmasked targets, from the logits
    logits, _ = lm.forward(config, lm.init_params(config), tokens)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    assert result[0][0] == pytest.approx(-picked[mask].mean(), rel=PARALLEL_MODEL[np.dtype("float64")])


def test_a_bad_option_on_one_rank_raises_the_same_error_everywhere():
    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,))
    params = lm.init_params(config)
    tokens = np.zeros((1, 8), np.int64)
    bad = np.full((1, 8), VOCAB) if RANK == SIZE - 1 else tokens  # only the last rank is out of range
    with pytest.raises(ValueError, match=f"rank {SIZE - 1}: targets must lie in"):
        parallel.loss_and_grads(config, params, tokens, bad, comm=COMM)


@pytest.mark.skipif(SIZE < 2, reason="needs 2 ranks")
def test_chunks_of_different_lengths_name_n_and_p():
    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,))
    tokens = np.zeros((1, 8 - (RANK == 1)), np.int64)
    with pytest.raises(ValueError, match=f"N divisible by P = {SIZE}"):
        parallel.loss_and_grads(config, lm.init_params(config), tokens, tokens, comm=COMM)


@pytest.mark.skipif(SIZE < 2, reason="needs 2 ranks")
def test_configs_that_differ_between_ranks_are_refused():
    """The same parameter arrays everywhere (the init does not depend on RoPE), but rank 1 runs its
    attention without RoPE, which the attention exchange cannot see (same shapes, same pattern):
    refused, not a silent mixture of two models."""
    common = dict(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(2,))
    config = lm.LongNetConfig(**common, rope=RANK != 1)
    tokens = np.zeros((1, 8), np.int64)
    with pytest.raises(ValueError, match="same LongNetConfig"):
        parallel.loss_and_grads(config, lm.init_params(lm.LongNetConfig(**common)), tokens, tokens, comm=COMM)


def test_the_stats_hold_every_layers_exchanges_and_the_one_allreduce():
    """``return_stats``: two layers' forward exchanges, then their two backward exchanges, each
    those of one distributed call of the layer's shapes (measured on random arrays of the same
    shapes: the bytes depend on the shapes only); the all-reduced buffer is every parameter and the loss."""
    from longnet_ref import distributed

    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=2, n_heads=2, segment_lengths=(4, 16), dilation_rates=(1, 2))
    tokens, targets, _ = whole_problem(1, 8 * SIZE, 6)
    local = parallel.chunk(tokens, COMM), parallel.chunk(targets, COMM)
    *_, stats = parallel.loss_and_grads(config, lm.init_params(config), *local, comm=COMM, return_stats=True)
    x = np.random.default_rng(RANK).standard_normal((1, 8, 2, 4))  # (B, L, H, D) of one layer
    o, lse, forward = distributed.dilated_attention(x, x, x, [4, 16], [1, 2], comm=COMM, causal=True, return_lse=True, return_stats=True)
    *_, backward = distributed.dilated_attention_backward(x, x, x, x, o, lse, [4, 16], [1, 2], comm=COMM, causal=True, return_stats=True)
    assert forward.records and backward.records
    assert stats.attention.records == forward.records * 2 + backward.records * 2
    assert stats.allreduce_bytes == (lm.parameter_count(config) + 1) * 8  # float64 gradients and the loss


@pytest.mark.skipif(SIZE < 2, reason="needs 2 ranks")
def test_a_mask_without_any_target_and_a_sequence_the_ranks_cannot_share_are_refused():
    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,))
    tokens = np.zeros((1, 8), np.int64)
    with pytest.raises(ValueError, match="mask selects no target on any rank"):
        parallel.loss_and_grads(config, lm.init_params(config), tokens, tokens, np.zeros((1, 8), bool), comm=COMM)
    with pytest.raises(ValueError, match=f"must be divisible by the number of ranks P = {SIZE}"):
        parallel.chunk(np.zeros((1, 8 * SIZE + 1)), COMM)


def test_dense_attention_is_refused_on_every_rank():
    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, attention="dense")
    tokens = np.zeros((1, 8), np.int64)
    with pytest.raises(ValueError, match="'dense' is not sequence-parallel"):
        parallel.loss_and_grads(config, lm.init_params(config), tokens, tokens, comm=COMM)


@pytest.mark.skipif(SIZE < 2, reason="needs 2 ranks")
def test_parameters_that_differ_between_ranks_are_refused():
    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,))
    params = lm.init_params(config)
    params["ln_f.bias"] = params["ln_f.bias"] + RANK  # not replicated
    tokens = np.zeros((1, 8), np.int64)
    with pytest.raises(ValueError, match="same parameters"):
        parallel.loss_and_grads(config, params, tokens, tokens, comm=COMM)


def test_a_checkpoint_written_at_p_ranks_resumes_at_p_and_in_one_process():
    """Two sequence-parallel steps, a checkpoint (rank 0 writes it), two more steps: the run that
    never stopped. Resumed from the checkpoint at the same P it continues bit-identically; resumed
    in one process without MPI it continues to rounding (the sums are grouped by rank)."""
    import shutil
    import tempfile
    from pathlib import Path

    from longnet_ref.data import TextTask
    from longnet_ref.checkpoint import load_checkpoint, save_checkpoint
    from longnet_ref.train import TrainConfig, TrainState, train_step

    config = lm.LongNetConfig(vocab_size=256, d_model=8, n_layers=2, n_heads=2, segment_lengths=(4, 32), dilation_rates=(1, 2))
    task = TextTask(np.random.default_rng(5).integers(0, 256, 4096).astype(np.uint8), 8 * SIZE)
    folder = Path(COMM.bcast(tempfile.mkdtemp() if RANK == 0 else None))
    checkpoint = folder / "checkpoint.npz"
    state = TrainState.fresh(config, TrainConfig(steps=4, batch_size=2, warmup=1))
    for _ in range(2):
        train_step(state, task, comm=COMM)
    if RANK == 0:
        save_checkpoint(state, checkpoint)
    COMM.Barrier()
    losses = [train_step(state, task, comm=COMM)["loss"] for _ in range(2)]  # the run that never stopped
    same_p, _ = load_checkpoint(checkpoint)
    same_p_losses = [train_step(same_p, task, comm=COMM)["loss"] for _ in range(2)]
    one_process, _ = load_checkpoint(checkpoint)
    one_process_losses = [train_step(one_process, task)["loss"] for _ in range(2)]  # no MPI
    COMM.Barrier()
    if RANK == 0:
        shutil.rmtree(folder)
    assert same_p.step == one_process.step == state.step == 4
    assert same_p_losses == losses
    for name, value in state.params.items():
        np.testing.assert_array_equal(same_p.params[name], value, err_msg=name)
        assert relative_error(one_process.params[name], value) <= PARALLEL_MODEL[np.dtype("float64")], name
    assert one_process_losses == pytest.approx(losses, rel=PARALLEL_MODEL[np.dtype("float64")])


def test_the_held_out_evaluation_matches_one_process():
    from longnet_ref import nn

    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4, 16), dilation_rates=(1, 2))
    params = lm.init_params(config)
    tokens, targets, mask = whole_problem(2, 8 * SIZE, 4, masked=True)
    mask[0, 0] = True
    loss, accuracy = parallel.evaluate(config, params, *(parallel.chunk(x, COMM) for x in (tokens, targets, mask)), comm=COMM)
    logits, _ = lm.forward(config, params, tokens)
    whole_loss, _ = nn.cross_entropy_forward(logits, targets, mask)
    assert loss == pytest.approx(float(whole_loss), rel=PARALLEL_MODEL[np.dtype("float64")])
    assert accuracy == ((logits.argmax(-1) == targets)[mask]).mean()


def test_targets_and_a_mask_of_another_shape_than_the_tokens_are_refused_on_every_rank():
    """Checked before any exchange, on every rank: a targets or mask chunk whose shape is not the
    tokens' (or a mask that is not bool) is one ValueError naming it, not an aborted MPI job."""
    config = lm.LongNetConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,))
    params, tokens = lm.init_params(config), np.zeros((1, 8), np.int64)
    with pytest.raises(ValueError, match=r"targets must have the tokens' shape \(1, 8\)"):
        parallel.loss_and_grads(config, params, tokens, np.zeros((1, 7), np.int64), comm=COMM)
    for mask in (np.ones((1, 7), bool), np.ones((1, 8), np.int64)):
        with pytest.raises(ValueError, match=r"mask must be a bool array of the tokens' shape \(1, 8\)"):
            parallel.loss_and_grads(config, params, tokens, tokens, mask, comm=COMM)


def test_a_chunk_is_cut_from_a_batch_of_sequences_only():
    with pytest.raises(ValueError, match=r"x must be at least 2-D \(batch, sequence, ...\), got shape \(8,\)"):
        parallel.chunk(np.zeros(8), COMM)
