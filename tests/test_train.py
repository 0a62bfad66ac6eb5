"""Training (``longnet_ref.train``), data (``longnet_ref.data``) and ``longnet-ref train``."""

import dataclasses
import itertools
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longnet_ref import model as lm
from longnet_ref.checkpoint import load_checkpoint, save_checkpoint
from longnet_ref.cli import main
from longnet_ref.data import QUERY, Batch, PasskeyTask, TextTask, accuracy, read_text
from longnet_ref.train import (
    AdamW,
    TrainConfig,
    TrainState,
    clip_by_global_norm,
    decays,
    evaluate,
    fit,
    learning_rate,
    train_step,
)
from longnet_ref.validation import InputTypeError
from tests.tolerances import INITIAL_LOSS_NATS
from tests.cli_runs import TINY_TRAIN

from . import oracle
from .tolerances import F32, FLOAT32_RECOMPUTED, HAND_F64, SCALAR_ARITHMETIC, SUMMATION

# ---- schedule, clipping, AdamW ------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    tc = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup=10)
    for t in range(1, 111):
        np.testing.assert_allclose(learning_rate(t, tc), schedule_by_hand(t, 1.0, 0.1, 10, 110), err_msg=str(t), **HAND_F64)
    assert learning_rate(1, TrainConfig(steps=5, lr=0.5, min_lr=0.1, warmup=0)) == pytest.approx(schedule_by_hand(1, 0.5, 0.1, 0, 5))
    assert learning_rate(150, tc) == pytest.approx(0.1)  # past the end (a resumed, extended run): min_lr, not back up
    assert learning_rate(1, tc) == pytest.approx(0.1)
    assert learning_rate(5, tc) == pytest.approx(0.5)
    assert learning_rate(10, tc) == pytest.approx(1.0)
    assert learning_rate(60, tc) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert learning_rate(110, tc) == pytest.approx(0.1)
    lrs = [learning_rate(t, tc) for t in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_clipping_scales_the_global_norm_down_to_the_limit_and_keeps_directions():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}  # global norm 5
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(5.0, rel=HAND_F64["rtol"])
    scale = 1.0 / (5.0 + 1e-6)  # c / (||g|| + 1e-6), as torch.nn.utils.clip_grad_norm_
    assert math.sqrt(sum(float((g**2).sum()) for g in clipped.values())) == pytest.approx(5.0 * scale, rel=HAND_F64["rtol"])
    np.testing.assert_allclose(clipped["a"], [3.0 * scale, 0.0], **HAND_F64)
    np.testing.assert_allclose(clipped["b"], [[4.0 * scale]], **HAND_F64)
    same, _ = clip_by_global_norm(grads, 10.0)
    assert same["a"] is grads["a"]  # under the limit: untouched


def test_first_adamw_step_moves_each_weight_by_lr_times_its_gradients_sign_plus_decay():
    """Step 1: ``m_hat = g``, ``v_hat = g^2``, so the Adam step is ``lr g / (|g| + eps)``; then decay."""
    params = {"h.0.attn.q_proj.weight": np.array([[1.0, -2.0]]), "h.0.attn.q_proj.bias": np.array([1.0]), "wte.weight": np.array([[1.0]])}
    grads = {"h.0.attn.q_proj.weight": np.array([[0.5, -3.0]]), "h.0.attn.q_proj.bias": np.array([2.0]), "wte.weight": np.array([[-1.0]])}
    tc = TrainConfig(lr=0.1, weight_decay=0.5, eps=0.0)
    AdamW.zeros_like(params).step(params, grads, 0.1, tc)
    np.testing.assert_allclose(params["h.0.attn.q_proj.weight"], [[1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1]])
    np.testing.assert_allclose(params["h.0.attn.q_proj.bias"], [0.9])  # biases: no decay
    np.testing.assert_allclose(params["wte.weight"], [[1.1]])  # embedding: no decay


def adamw_by_hand(theta, grads, lrs, beta1, beta2, eps, weight_decay):
    """Loshchilov & Hutter's AdamW for one scalar, in Python floats, step by step (t = 1, 2, ...):

    m_t = b1 m + (1 - b1) g,  v_t = b2 v + (1 - b2) g^2,  m_hat = m_t / (1 - b1^t),  v_hat = v_t / (1 - b2^t)
    theta_t = theta - lr_t (m_hat / (sqrt(v_hat) + eps) + lambda theta)     (decay decoupled from g)
    """
    m = v = 0.0
    trajectory = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        theta = theta - lr * (m_hat / (math.sqrt(v_hat) + eps) + weight_decay * theta)
        trajectory.append(theta)
    return trajectory


def test_adamw_follows_the_paper_update_over_several_steps():
    """Five steps with changing gradients and learning rates against :func:`adamw_by_hand`: the bias
    corrections ``1 - beta^t`` (not frozen at t = 1), both moments' betas, eps and the decoupled
    decay (decayed matrix vs undecayed bias and embedding) each change the trajectory."""
    tc = TrainConfig(lr=0.05, weight_decay=0.3, beta1=0.8, beta2=0.9, eps=1e-3)
    names = ("h.0.mlp.fc1.weight", "h.0.mlp.fc1.bias", "wte.weight")
    start = {"h.0.mlp.fc1.weight": 1.5, "h.0.mlp.fc1.bias": -0.7, "wte.weight": 0.4}
    gradients = {
        "h.0.mlp.fc1.weight": [0.3, -0.1, 0.02, 0.5, -0.4],
        "h.0.mlp.fc1.bias": [-2.0, 1.0, 0.5, 0.01, 3.0],
        "wte.weight": [0.0, 0.001, -0.2, 0.2, 0.05],
    }
    lrs = [0.05, 0.03, 0.1, 0.02, 0.07]
    params = {name: np.array([[start[name]]]) for name in names}
    optimizer = AdamW.zeros_like(params)
    for step, lr in enumerate(lrs):
        optimizer.step(params, {name: np.array([[gradients[name][step]]]) for name in names}, lr, tc)
        assert optimizer.t == step + 1
        for name in names:
            decay = tc.weight_decay if name == "h.0.mlp.fc1.weight" else 0.0
            expected = adamw_by_hand(start[name], gradients[name][: step + 1], lrs[: step + 1], tc.beta1, tc.beta2, tc.eps, decay)[-1]
            np.testing.assert_allclose(params[name][0, 0], expected, err_msg=f"{name} step {step + 1}", **HAND_F64)


def test_adamw_keeps_the_float32_dtype():
    params = {"h.0.mlp.fc1.weight": np.ones((2, 2), np.float32)}
    optimizer = AdamW.zeros_like(params)
    optimizer.step(params, {"h.0.mlp.fc1.weight": np.full((2, 2), 0.5, np.float32)}, 0.1, TrainConfig())
    assert params["h.0.mlp.fc1.weight"].dtype == np.float32 and optimizer.m["h.0.mlp.fc1.weight"].dtype == np.float32


def schedule_by_hand(t, lr, min_lr, warmup, steps):
    """Linear warm-up ``lr t / warmup`` for ``t <= warmup``, then ``min_lr + (lr - min_lr)(1 + cos(pi p))/2``,
    ``p = (t - warmup) / (steps - warmup)``."""
    if t <= warmup:
        return lr * t / warmup
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))) / 2


def test_train_step_uses_the_schedule_from_step_one_and_applies_that_lr():
    """The first step trains with ``lr_1 = lr / warmup`` (not the 0-based ``lr_0 = 0``); each record
    carries the schedule's value, the loss of the batch drawn from the seeded stream before the
    update, and the gradient norm before clipping; a bias moves by ``lr_1 g / (|g| + eps)``."""
    state, task = small_state(seed=5)
    state.train = TrainConfig(steps=8, batch_size=3, lr=0.01, min_lr=0.002, warmup=3, clip=1e9, eps=1e-12, seed=5)
    before = {name: value.copy() for name, value in state.params.items()}
    batch = task.batch(3, np.random.default_rng(5))  # the first batch of the seed-5 data stream
    loss, grads = lm.loss_and_grads(state.config, before, batch.tokens, batch.targets, batch.mask)
    record = train_step(state, task)
    assert record["step"] == 1 and state.step == 1
    np.testing.assert_allclose(record["lr"], 0.01 / 3, **HAND_F64)
    np.testing.assert_allclose(record["loss"], loss, **FLOAT32_RECOMPUTED)
    np.testing.assert_allclose(record["grad_norm"], math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())), **FLOAT32_RECOMPUTED)
    g = grads["ln_f.bias"].astype(np.float64)
    moved = state.params["ln_f.bias"].astype(np.float64) - before["ln_f.bias"]
    big = np.abs(g) > 1e-4  # where eps and float32 rounding are negligible: the step is lr_1 sign(g)
    assert big.sum() >= 4
    np.testing.assert_allclose(moved[big], -record["lr"] * np.sign(g[big]), **FLOAT32_RECOMPUTED)
    lrs = [record["lr"]] + [train_step(state, task)["lr"] for _ in range(7)]
    np.testing.assert_allclose(lrs, [schedule_by_hand(t, 0.01, 0.002, 3, 8) for t in range(1, 9)], **HAND_F64)


def test_train_step_clips_the_gradient_before_the_moments():
    """With ``clip = c`` below the gradient's norm, the first moment after step 1 is ``(1 - b1) g c / ||g||``
    (Adam's first step is scale-invariant, so the moments are where clipping shows)."""
    state, task = small_state()
    state.train = TrainConfig(steps=8, batch_size=3, clip=0.05, seed=0)
    batch = task.batch(3, np.random.default_rng(0))
    _, grads = lm.loss_and_grads(state.config, state.params, batch.tokens, batch.targets, batch.mask)
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert norm > 0.05
    train_step(state, task)
    for name in ("ln_f.bias", "wte.weight", "h.1.mlp.fc2.weight"):
        expected = (1 - state.train.beta1) * grads[name].astype(np.float64) * 0.05 / norm
        np.testing.assert_allclose(state.optimizer.m[name], expected, err_msg=name, **FLOAT32_RECOMPUTED)


def test_evaluate_reports_the_masked_loss_and_accuracy_of_the_independent_model():
    """``evaluate`` on a passkey batch (mask: the last position only) against the model written out in
    tests/oracle.py, in float64; the library runs the float32 model."""
    state, task = small_state()
    batch = task.batch(6, np.random.default_rng(9))
    params64 = {k: v.astype(np.float64) for k, v in state.params.items()}
    config64 = dataclasses.replace(state.config, dtype="float64")
    result = evaluate(state, batch)
    np.testing.assert_allclose(result["eval_loss"], oracle.lm_loss(config64, params64, batch.tokens, batch.targets, batch.mask), **SUMMATION[F32])
    logits = oracle.lm_logits(config64, params64, batch.tokens)
    assert result["eval_accuracy"] == pytest.approx(float((logits[:, -1].argmax(-1) == batch.targets[:, -1]).mean()))


def test_fit_trains_to_the_last_step_and_evaluates_every_k_steps_and_at_the_end():
    state, task = small_state()
    state.train = dataclasses.replace(state.train, steps=5)
    seen = []
    records = fit(state, task, eval_every=2, eval_batch=task.batch(4, np.random.default_rng(1)), on_record=seen.append)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and state.step == 5 and seen == records
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 5]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in records)
    for r in records:  # a step trains on batch_size sequences of n tokens
        np.testing.assert_allclose(r["tokens_per_s"] * r["seconds"], state.train.batch_size * task.n, **HAND_F64)


def test_weight_decay_applies_to_linear_matrices_only():
    names = lm.parameter_shapes(lm.LongNetConfig(n_layers=1))
    decayed = {n for n in names if decays(n)}
    assert decayed == {f"h.0.attn.{p}_proj.weight" for p in ("q", "k", "v", "out")} | {"h.0.mlp.fc1.weight", "h.0.mlp.fc2.weight"}


# ---- checkpoints ------------------------------------------------------------------------------------


def small_state(seed=0):
    task = PasskeyTask(16, num_keys=4, num_fillers=5)
    config = lm.LongNetConfig(
        vocab_size=task.vocab_size, d_model=16, n_layers=2, n_heads=4, segment_lengths=(4, 8), dilation_rates=(1, 2), dtype="float32", seed=seed
    )
    return TrainState.fresh(config, TrainConfig(steps=20, batch_size=3, warmup=2, seed=seed)), task


def test_a_resumed_checkpoint_repeats_the_uninterrupted_run_bit_for_bit(tmp_path):
    uninterrupted, task = small_state()
    for _ in range(4):
        train_step(uninterrupted, task)

    interrupted, _ = small_state()
    for _ in range(3):
        train_step(interrupted, task)
    path = save_checkpoint(interrupted, tmp_path / "ckpt.npz")
    resumed, _ = load_checkpoint(path)
    # the loaded state is the saved one, field by field (not merely one that trains alike)
    assert resumed.step == 3 and resumed.optimizer.t == interrupted.optimizer.t == 3
    assert resumed.config == interrupted.config and resumed.train == interrupted.train
    assert resumed.rng.bit_generator.state == interrupted.rng.bit_generator.state
    for name in interrupted.params:
        for got, saved in (
            (resumed.params, interrupted.params),
            (resumed.optimizer.m, interrupted.optimizer.m),
            (resumed.optimizer.v, interrupted.optimizer.v),
        ):
            assert got[name].dtype == saved[name].dtype
            np.testing.assert_array_equal(got[name], saved[name], err_msg=name)
    del interrupted
    train_step(resumed, task)

    assert resumed.step == uninterrupted.step == 4
    assert not np.array_equal(resumed.params["wte.weight"], load_checkpoint(path)[0].params["wte.weight"])  # step 4 moved it
    for name in uninterrupted.params:
        np.testing.assert_array_equal(resumed.params[name], uninterrupted.params[name], err_msg=name)
        np.testing.assert_array_equal(resumed.optimizer.m[name], uninterrupted.optimizer.m[name])
        np.testing.assert_array_equal(resumed.optimizer.v[name], uninterrupted.optimizer.v[name])
    assert resumed.rng.bit_generator.state == uninterrupted.rng.bit_generator.state


def test_training_is_deterministic_from_the_seed_and_changes_with_it():
    runs = []
    for seed in (0, 0, 1):
        state, task = small_state(seed)
        runs.append([train_step(state, task)["loss"] for _ in range(3)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_loading_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.npz")


def assert_same_state(a, b):
    assert a.step == b.step and a.optimizer.t == b.optimizer.t and a.config == b.config and a.train == b.train
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
        np.testing.assert_array_equal(a.optimizer.m[name], b.optimizer.m[name], err_msg=name)
        np.testing.assert_array_equal(a.optimizer.v[name], b.optimizer.v[name], err_msg=name)
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


def test_a_checkpoint_is_one_file_read_without_pickle(tmp_path):
    state, task = small_state()
    train_step(state, task)
    path = save_checkpoint(state, tmp_path / "ckpt.npz", {"task": "passkey"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]  # no .json beside it, no temporary left
    with np.load(path, allow_pickle=False) as archive:  # every entry loads without pickle
        meta = json.loads(archive["__meta__"].tobytes())
        assert all(archive[name].dtype != object for name in archive.files)
    assert meta["step"] == 1 and meta["extra"] == {"task": "passkey"} and meta["model"]["d_model"] == 16
    loaded, extra = load_checkpoint(path)
    assert extra == {"task": "passkey"}
    assert_same_state(loaded, state)


def failing_write(monkeypatch, after_bytes, then):
    """Make numpy's array writer write ``after_bytes`` bytes of the first array, then call ``then``."""
    import numpy.lib.format as npformat

    def write_array(fp, array, *args, **kwargs):
        fp.write(array.tobytes()[:after_bytes])
        then()

    monkeypatch.setattr(npformat, "write_array", write_array)


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    state, task = small_state()
    path = save_checkpoint(state, tmp_path / "ckpt.npz")
    before, _ = load_checkpoint(path)
    train_step(state, task)

    def disk_full():
        raise OSError(28, "No space left on device")

    failing_write(monkeypatch, 100, disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(state, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]  # the partial file is removed
    after, _ = load_checkpoint(path)
    assert after.step == 0
    assert_same_state(after, before)


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A real kill (SIGKILL: no exception handler, no cleanup runs) in the middle of writing the arrays."""
    script = f"""
import os, signal
import numpy.lib.format as npformat
from tests.test_train import small_state
from longnet_ref.checkpoint import save_checkpoint
from longnet_ref.train import train_step
state, task = small_state()
save_checkpoint(state, {str(tmp_path / "ckpt.npz")!r})
train_step(state, task)
def write_array(fp, array, *args, **kwargs):
    fp.write(array.tobytes()[:100])
    fp.flush()
    os.kill(os.getpid(), signal.SIGKILL)
npformat.write_array = write_array
save_checkpoint(state, {str(tmp_path / "ckpt.npz")!r})
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # the kill did interrupt a write
    state, _ = load_checkpoint(tmp_path / "ckpt.npz")
    assert state.step == 0
    assert_same_state(state, small_state()[0])


def rewrite_meta(path, edit):
    """Rewrite a checkpoint with its metadata bytes changed by ``edit(bytes) -> bytes``."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["__meta__"] = np.frombuffer(edit(arrays["__meta__"].tobytes()), np.uint8)
    np.savez(path, **arrays)


def drop(key):
    return lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != key}).encode()


def change(key, value):
    return lambda raw: json.dumps(json.loads(raw) | {key: value}).encode()


@pytest.mark.parametrize(
    "edit, message",
    [
        (drop("rng"), "no 'rng'"),
        (drop("model"), "no 'model'"),
        (drop("train"), "no 'train'"),
        (drop("step"), "no 'step'"),
        (drop("adam_t"), "no 'adam_t'"),
        (drop("format"), "format"),
        (change("version", 99), "version 99"),
        (change("step", -1), "'step' must be a non-negative integer"),
        (change("step", "3"), "'step' must be a non-negative integer"),
        (change("adam_t", True), "'adam_t' must be a non-negative integer"),  # JSON true is no count (bool is an int in Python)
        (change("rng", {"bit_generator": "MT19937"}), "'rng' is not a state"),
        (change("rng", {"bit_generator": "PCG64", "state": {"state": 1}}), "'rng' is not a state"),  # a KeyError inside NumPy
        (change("rng", [1, 2]), "'rng' must be a JSON object"),
        (change("train", {"steps": 3}), "'train' lacks"),
        (lambda raw: json.dumps(json.loads(raw) | {"train": json.loads(raw)["train"] | {"dropout": 0.1}}).encode(), "'train' has unknown fields 'dropout'"),
        (lambda raw: json.dumps(json.loads(raw) | {"model": json.loads(raw)["model"] | {"dropout": 0.1}}).encode(), "'model' has unknown fields 'dropout'"),
        (lambda raw: raw.replace(b'"d_model": 16', b'"d_model": 17'), "'model'"),
        (lambda raw: raw[:-5], "not valid JSON"),
        (lambda raw: b"\xff\xfe" + raw, "not valid JSON"),
        (lambda raw: b"[1, 2]", "not a JSON object"),
    ],
)
def test_every_field_of_a_checkpoint_is_checked_on_load(tmp_path, edit, message):
    state, _ = small_state()
    path = save_checkpoint(state, tmp_path / "ckpt.npz")
    rewrite_meta(path, edit)
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "not a .npz archive (or a truncated one)"),
        ("foreign", "no '__meta__' entry"),
        ("text", "not a .npz archive"),
        ("missing array", "lacks the arrays adam_m/h.0.attn.k_proj.bias"),
        ("extra array", "unexpected arrays param/h.9.attn.k_proj.bias"),  # a layer the config does not have
        ("wrong shape", "got (3,)"),
        ("wrong dtype", "float64"),
        ("directory", "is a directory"),
    ],
)
def test_a_damaged_or_foreign_checkpoint_is_one_line_naming_the_file(tmp_path, damage, message):
    state, _ = small_state()
    path = save_checkpoint(state, tmp_path / "ckpt.npz")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "foreign":
        np.savez(path, weights=np.ones(3))
    elif damage == "text":
        path = tmp_path / "README.md"
        path.write_text("# not a checkpoint\n")
    elif damage == "directory":
        path = tmp_path
    else:
        name = "adam_m/h.0.attn.k_proj.bias"
        if damage == "missing array":
            del arrays[name]
        elif damage == "extra array":
            arrays["param/h.9.attn.k_proj.bias"] = arrays["param/h.0.attn.k_proj.bias"]
        else:
            arrays[name] = np.ones(3, np.float32) if damage == "wrong shape" else arrays[name].astype(np.float64)
        np.savez(path, **arrays)
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text
    assert "README.npz" not in text


# ---- data ------------------------------------------------------------------------------------------


def test_passkey_batches_hide_one_key_early_and_ask_for_it_at_the_end():
    task = PasskeyTask(64, num_keys=5, num_fillers=7, reach_fraction=0.25)
    batch = task.batch(200, np.random.default_rng(0))
    assert batch.tokens.shape == batch.targets.shape == batch.mask.shape == (200, 64)
    assert (batch.tokens[:, -1] == QUERY).all()
    is_key = (batch.tokens >= 1) & (batch.tokens <= 5)
    assert (is_key.sum(1) == 1).all()  # exactly one passkey per sequence
    where = is_key.argmax(1)
    assert where.max() < 16 and where.min() == 0  # within the first N/4
    np.testing.assert_array_equal(batch.targets[:, -1], batch.tokens[np.arange(200), where])
    assert batch.mask.sum() == 200 and batch.mask[:, -1].all()
    assert task.vocab_size == 13 and batch.tokens.max() < 13
    assert task.chance_loss == pytest.approx(math.log(5))


def test_a_passkey_span_writes_the_key_that_many_times_in_a_row():
    task = PasskeyTask(64, num_keys=5, num_fillers=7, span=4)
    batch = task.batch(50, np.random.default_rng(1))
    is_key = (batch.tokens >= 1) & (batch.tokens <= 5)
    assert (is_key.sum(1) == 4).all()
    first = is_key.argmax(1)
    for b in range(50):
        assert (batch.tokens[b, first[b] : first[b] + 4] == batch.targets[b, -1]).all()
    with pytest.raises(ValueError, match="span"):
        PasskeyTask(8, span=7)


def test_text_batches_are_windows_of_the_file_shifted_by_one(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(200)))
    task = TextTask.from_file(path, 10)
    batch = task.batch(4, np.random.default_rng(0))
    assert batch.tokens.shape == (4, 10)
    np.testing.assert_array_equal(batch.targets, batch.tokens + 1)  # bytes 0..199 count up
    assert batch.mask.all()


@pytest.mark.parametrize("extra", [1, 2, 5])
def test_text_windows_cover_every_start_and_never_run_past_the_end(extra):
    """A text of ``n + extra`` distinct bytes has ``extra`` windows of ``n + 1`` bytes, starting at
    ``0 .. extra - 1``. 400 draws miss one of <= 5 uniformly drawn starts with probability
    ``<= 5 (4/5)^400 ~ 1e-38``; each window must be the file's bytes from its start, shifted by one."""
    n = 12
    data = np.arange(100, 100 + n + extra, dtype=np.uint8)
    task = TextTask(data, n)
    batch = task.batch(400, np.random.default_rng(3))
    starts = batch.tokens[:, 0].astype(int) - 100
    assert set(starts) == set(range(extra))
    for start, tokens, targets in zip(starts, batch.tokens, batch.targets):
        np.testing.assert_array_equal(tokens, data[start : start + n])
        np.testing.assert_array_equal(targets, data[start + 1 : start + n + 1])
    assert batch.tokens.dtype == batch.targets.dtype == np.int64 and batch.mask.all()


def test_accuracy_counts_the_masked_positions_only():
    """Arg-max hits at 3 of the 4 masked positions, misses at every unmasked one: 3/4."""
    logits = np.zeros((2, 3, 4))
    targets = np.array([[1, 2, 3], [0, 1, 2]])
    predicted = np.array([[1, 0, 3], [0, 3, 2]])  # hits at (0,0), (0,2), (1,0), (1,2)
    logits[np.arange(2)[:, None], np.arange(3)[None], predicted] = 1.0
    mask = np.array([[True, True, False], [True, False, True]])  # masked hits 3, misses (0,1)
    batch = Batch(np.zeros((2, 3), np.int64), targets, mask)
    assert accuracy(logits, batch) == pytest.approx(3 / 4)
    assert accuracy(logits, Batch(batch.tokens, targets, ~mask)) == pytest.approx(1 / 2)  # (0,2) hit, (1,1) miss


def test_a_missing_empty_or_short_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_bytes(b"abc")
    with pytest.raises(ValueError, match="fewer than n"):
        TextTask.from_file(tmp_path / "short.txt", 10)


# ---- the command line ------------------------------------------------------------------------------

SMALL = [*TINY_TRAIN, "--steps", "4"]


def test_train_command_writes_a_log_a_plot_and_a_checkpoint_that_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    log = json.loads((out / "log.json").read_text())
    records = log["records"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # the passkey task of N = 16: vocabulary 1 query + 8 keys + 16 fillers; a fresh model is near uniform
    assert abs(records[0]["loss"] - math.log(25)) < INITIAL_LOSS_NATS
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    # warm-up min(30, 4) = 4 steps: lr_t = 3e-3 t / 4
    assert [r["lr"] for r in records] == pytest.approx([3e-3 * t / 4 for t in (1, 2, 3, 4)], rel=HAND_F64["rtol"])
    evaluated = [r["step"] for r in records if "eval_loss" in r]
    assert evaluated == [2, 4]  # --eval-every 2
    assert all(math.isfinite(r["eval_loss"]) and 0 <= r["eval_accuracy"] <= 1 for r in records if "eval_loss" in r)
    assert (out / "loss.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert f"loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}" in printed

    state, _ = load_checkpoint(out / "checkpoint.npz")
    assert state.step == 4
    # --resume with a larger --steps extends the run from the checkpoint
    assert main(["train", *SMALL, "--steps", "6", "--resume", str(out / "checkpoint.npz"), "--out", str(out)]) == 0
    log = json.loads((out / "log.json").read_text())
    assert [r["step"] for r in log["records"]] == [5, 6]
    assert load_checkpoint(out / "checkpoint.npz")[0].step == 6


def test_train_command_on_a_text_file(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["train", *SMALL, "--text", str(text), "--attention", "dense", "--out", str(tmp_path / "r")]) == 0
    log = json.loads((tmp_path / "r" / "log.json").read_text())
    assert log["task"] == "text" and log["model"]["vocab_size"] == 256


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text", "/nonexistent/file.txt"], "does not exist"),
        (["--attention", "sparse"], "--attention: invalid choice: 'sparse'"),
        (["--heads", "3"], "divisible by n_heads"),
        (["--n", "1"], "--n"),
        (["--resume", "/nonexistent/checkpoint.npz"], "does not exist"),
    ],
)
def test_train_command_rejects_bad_input_with_one_line_and_no_traceback(tmp_path, capsys, extra, message):
    try:
        code = main(["train", *SMALL, "--out", str(tmp_path / "r"), *extra])
    except SystemExit as exit_:  # a malformed option, refused by the parser
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_train_command_rejects_an_empty_text_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert main(["train", *SMALL, "--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_evaluate_weights_each_slice_by_its_targets():
    """Eight sequences in slices of 3, 3, 2 (the training batch size): the accuracy is over all eight
    answers. Targets are set from the model's own arg-max so that exactly five are right (three in
    the first slice, none in the second, two in the last): 5/8, not a mean of the slices' rates."""
    state, task = small_state()
    batch = task.batch(8, np.random.default_rng(4))
    logits, _ = lm.forward(state.config, state.params, batch.tokens)
    guess = logits[:, -1].argmax(-1)  # (8,)
    right = np.array([1, 1, 1, 0, 0, 0, 1, 1], bool)
    targets = batch.targets.copy()
    targets[:, -1] = np.where(right, guess, (guess + 1) % state.config.vocab_size)
    result = evaluate(state, Batch(batch.tokens, targets, batch.mask))
    assert result["eval_accuracy"] == pytest.approx(5 / 8)
    # a slice without targets (sequences 3..5 masked out) is skipped, not the end: 3 + 1 right of 5
    right[6] = False
    targets[:, -1] = np.where(right, guess, (guess + 1) % state.config.vocab_size)
    mask = batch.mask.copy()
    mask[3:6] = False
    assert evaluate(state, Batch(batch.tokens, targets, mask))["eval_accuracy"] == pytest.approx(4 / 5)


def test_a_learning_rate_of_zero_and_text_that_is_not_bytes_are_refused():
    """``lr = 0`` would train nothing (the schedule runs from ``lr`` down to ``min_lr <= lr``);
    text is a byte string (vocabulary 256): int64 "bytes" could hold ids past 255."""
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0, min_lr=0.0)
    with pytest.raises(InputTypeError, match="data must be a 1-D uint8 array"):
        TextTask(np.arange(300, 320), 5)


@pytest.mark.parametrize("betas", [(1.0, 0.95), (0.9, 1.0)])
def test_a_beta_of_one_is_refused(betas):
    """``beta = 1`` freezes a moment at zero and makes the bias correction ``1 - beta^t`` zero."""
    with pytest.raises(ValueError, match="beta1 and beta2 must be < 1"):
        TrainConfig(beta1=betas[0], beta2=betas[1])


def test_min_lr_equal_to_lr_is_a_constant_schedule_after_the_warm_up():
    tc = TrainConfig(steps=6, lr=0.01, min_lr=0.01, warmup=2)
    np.testing.assert_allclose([learning_rate(t, tc) for t in range(1, 7)], [0.005, 0.01, 0.01, 0.01, 0.01, 0.01], **HAND_F64)


def test_clip_zero_means_no_clipping():
    """``clip = 0`` turns clipping off (TrainConfig, ``--clip 0: none``): the gradients come back
    untouched, with their norm."""
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    same, norm = clip_by_global_norm(grads, 0.0)
    assert norm == pytest.approx(5.0)
    assert same["a"] is grads["a"] and same["b"] is grads["b"]


def test_the_data_stream_is_seeded_by_the_training_seed_not_the_models():
    """``TrainConfig.seed`` seeds the batches, ``LongNetConfig.seed`` the initialisation: with two
    different seeds, the fresh state's generator draws what ``default_rng(train.seed)`` draws."""
    config = lm.LongNetConfig(vocab_size=7, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,), seed=1)
    state = TrainState.fresh(config, TrainConfig(seed=2))
    np.testing.assert_array_equal(state.rng.integers(0, 2**62, 8), np.random.default_rng(2).integers(0, 2**62, 8))


def test_passkey_keys_given_are_hidden_and_asked_for_and_every_key_and_position_is_drawn():
    """``keys`` fixes the passkeys (each of ``1 .. num_keys`` allowed, ``num_keys`` included): they
    are in the tokens and the targets; drawn keys cover all ``num_keys`` values (400 draws miss
    one of 5 with probability ``5 (4/5)^400 ~ 1e-38``) and every allowed position."""
    task = PasskeyTask(32, num_keys=5, num_fillers=6, span=2)
    keys = np.array([1, 5, 3, 5])
    batch = task.batch(4, np.random.default_rng(0), keys=keys)
    np.testing.assert_array_equal(batch.targets[:, -1], keys)
    for b, key in enumerate(keys):
        assert (batch.tokens[b] == key).sum() == 2 and (batch.tokens[b, :-1] >= 1).all() and batch.tokens[b, -1] == QUERY
    with pytest.raises(ValueError, match="keys must be integers in"):
        task.batch(1, np.random.default_rng(0), keys=[6])
    batch = task.batch(400, np.random.default_rng(1))
    assert set(batch.targets[:, -1].tolist()) == {1, 2, 3, 4, 5}
    # the first copy lies anywhere in [0, N reach_fraction) = [0, 8): 400 draws miss one of 8
    # positions with probability 8 (7/8)^400 ~ 5e-23
    first = np.argmax((batch.tokens >= 1) & (batch.tokens <= 5), axis=1)
    assert set(first.tolist()) == set(range(8))


def test_a_text_of_exactly_n_bytes_is_refused():
    """A window is ``n + 1`` bytes (inputs and shifted targets): ``n`` bytes hold none."""
    with pytest.raises(ValueError, match="fewer than n"):
        TextTask(np.arange(10, dtype=np.uint8), 10)
    assert TextTask(np.arange(11, dtype=np.uint8), 10).batch(2, np.random.default_rng(0)).tokens.shape == (2, 10)


# ---- the edges of every check: the last value accepted, the first refused (found by injected bugs) --


@pytest.mark.parametrize(
    "fields",
    [
        {"warmup": 0},  # no warm-up: the cosine from step 1
        {"steps": 1, "batch_size": 1, "seed": 0},
        {"weight_decay": 0.0, "clip": 0.0, "eps": 0.0},  # no decay, no clipping (--clip 0: none)
        {"min_lr": 0.0},
        {"min_lr": 3e-3, "lr": 3e-3},  # a constant schedule after the warm-up
        {"lr": 1e-12, "min_lr": 0.0},  # any lr > 0
        {"beta1": 0.0, "beta2": 0.0},  # no momentum: m = g, v = g^2
        {"beta1": 0.999999, "beta2": 0.999999},  # any beta < 1
    ],
    ids=lambda fields: ",".join(f"{k}={v}" for k, v in fields.items()),
)
def test_train_config_accepts_every_value_at_the_edge_of_its_range(fields):
    tc = TrainConfig(**fields)
    assert all(getattr(tc, name) == value for name, value in fields.items())


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"warmup": -1}, "warmup"),
        ({"seed": -1}, "seed"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"weight_decay": -1e-9}, "weight_decay"),
        ({"clip": -1e-9}, "clip"),
        ({"eps": -1e-9}, "eps"),
        ({"min_lr": -1e-9}, "min_lr"),
        ({"min_lr": 3e-3 * (1 + 1e-9), "lr": 3e-3}, "min_lr must be <= lr"),
        ({"beta1": -1e-9}, "beta1"),
        ({"beta2": -1e-9}, "beta2"),
    ],
    ids=lambda case: str(case),
)
def test_train_config_refuses_the_first_value_past_each_edge(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_a_zero_beta_is_adam_without_momentum():
    """``beta1 = beta2 = 0``: ``m = g``, ``v = g^2``, the bias corrections are 1, so the first step
    moves each weight by ``lr g / (|g| + eps)`` (written out here by hand)."""
    tc = TrainConfig(beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0)
    g = np.array([0.5, -2.0, 0.0])
    p = {"ln_f.bias": np.array([1.0, 1.0, 1.0])}
    AdamW.zeros_like(p).step(p, {"ln_f.bias": g}, 0.1, tc)
    np.testing.assert_allclose(p["ln_f.bias"], [1.0 - 0.1 * 0.5 / (0.5 + 1e-8), 1.0 + 0.1 * 2.0 / (2.0 + 1e-8), 1.0], **HAND_F64)


def test_each_step_draws_the_next_batch_of_the_seeded_stream():
    """Step ``k`` trains on the ``k``-th batch of ``default_rng(seed)``: after three steps the state's
    generator stands where a fresh one stands after drawing three batches (a stream that restarted
    each step would repeat the first batch forever)."""
    state, task = small_state(seed=7)
    stream = np.random.default_rng(7)
    for _ in range(3):
        train_step(state, task)
        task.batch(state.train.batch_size, stream)
    assert state.rng.bit_generator.state == stream.bit_generator.state
    first = task.batch(state.train.batch_size, np.random.default_rng(7))
    assert not np.array_equal(task.batch(state.train.batch_size, state.rng).tokens, first.tokens)


def test_eval_every_zero_never_evaluates():
    """``eval_every = 0`` means never (``--eval-every 0: never``), even with a held-out batch given."""
    state, task = small_state()
    state.train = dataclasses.replace(state.train, steps=2)
    records = fit(state, task, eval_every=0, eval_batch=task.batch(2, np.random.default_rng(1)))
    assert [r["step"] for r in records] == [1, 2] and not any("eval_loss" in r for r in records)


@pytest.mark.parametrize("span, shortest", [(1, 3), (2, 4), (4, 6), (8, 11)])
def test_the_shortest_passkey_sequence_is_accepted_and_one_token_less_refused(span, shortest):
    """The rule of the error message, ``max(1, floor(n / 4)) + span < n`` (the first copy drawn from
    ``[0, max(1, floor(n / 4)))``), solved by hand: span 1 -> n = 3 (1 + 1 < 3), span 2 -> 4,
    span 4 -> 6, span 8 -> 11 (floor(11 / 4) = 2: 2 + 8 < 11; n = 10 gives 2 + 8 = 10, refused).
    At the shortest ``n`` every batch holds the key ``span`` times before the query."""
    assert PasskeyTask.shortest(span) == shortest
    task = PasskeyTask(shortest, span=span)
    batch = task.batch(20, np.random.default_rng(0))
    for tokens, target in zip(batch.tokens, batch.targets[:, -1]):
        assert (tokens == target).sum() == span and tokens[-1] == QUERY
    with pytest.raises(ValueError, match="span"):
        PasskeyTask(shortest - 1, span=span)


@pytest.mark.parametrize("key, accepted", [(0, False), (1, True), (5, True), (6, False)])
def test_the_passkeys_given_are_one_to_num_keys(key, accepted):
    """Token 0 is the query marker and ``num_keys + 1`` the first filler: neither is a passkey."""
    task = PasskeyTask(16, num_keys=5, num_fillers=6)
    if accepted:
        assert task.batch(1, np.random.default_rng(0), keys=[key]).targets[0, -1] == key
    else:
        with pytest.raises(ValueError, match=r"keys must be integers in \[1, 5\]"):
            task.batch(1, np.random.default_rng(0), keys=[key])


def test_a_text_task_of_one_token_per_window_and_its_chance_loss():
    """``n = 1`` (the smallest context: predict the next byte from one) on two bytes is one window;
    ``n = 0`` is refused. Chance is the uniform distribution over 256 bytes: ``ln 256`` nats."""
    task = TextTask(np.array([7, 9], np.uint8), 1)
    batch = task.batch(3, np.random.default_rng(0))
    assert batch.tokens.tolist() == [[7]] * 3 and batch.targets.tolist() == [[9]] * 3
    assert task.chance_loss == pytest.approx(8 * math.log(2), **SCALAR_ARITHMETIC)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        TextTask(np.array([7, 9], np.uint8), 0)


def test_the_smallest_passkey_vocabulary_and_reach():
    """One key and one filler (vocabulary 3: the query, key 1, filler 2) and a reach so small that
    ``floor(n reach)`` is 0: the key is then always at position 0 (``[0, max(1, 0))``). Zero keys,
    fillers or copies are refused."""
    task = PasskeyTask(8, num_keys=1, num_fillers=1, reach_fraction=1e-9)
    batch = task.batch(5, np.random.default_rng(0))
    assert task.vocab_size == 3 and task.chance_loss == 0.0
    assert batch.tokens.tolist() == [[1, 2, 2, 2, 2, 2, 2, QUERY]] * 5 and batch.targets[:, -1].tolist() == [1] * 5
    for name in ("num_keys", "num_fillers", "span"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            PasskeyTask(8, **{name: 0})


def test_the_largest_reach_leaves_one_free_position_before_the_query():
    """``reach_fraction`` lies in (0, 1): at 0.99 and n = 200 the key may start anywhere in
    ``[0, floor(198))`` = [0, 198), so the last possible key is at 197, position 198 is filler and
    199 the query; 1 itself would put the key range up to the query and is refused."""
    task = PasskeyTask(200, reach_fraction=0.99)
    batch = task.batch(4000, np.random.default_rng(0))
    where = (batch.tokens[:, :-1] == batch.targets[:, -1:]).argmax(axis=1)  # the first copy
    assert where.min() == 0 and where.max() == 197  # 4000 draws miss one of 198 with prob ~ 2e-9
    assert (batch.tokens[:, 198] > task.num_keys).all() and (batch.tokens[:, -1] == QUERY).all()
    for reach in (1, 1.5, 0, -0.5):
        with pytest.raises(ValueError, match="reach_fraction must"):
            PasskeyTask(200, reach_fraction=reach)


def test_a_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist \\(or is not a file\\)"):
        read_text(tmp_path)


@pytest.mark.parametrize("keys", [[1.0], [2.5], np.array([True])], ids=["whole float", "float", "bool"])
def test_passkeys_must_be_integers(keys):
    with pytest.raises(ValueError, match=r"keys must be integers in \[1, 5\]"):
        PasskeyTask(16, num_keys=5, num_fillers=6).batch(1, np.random.default_rng(0), keys=keys)


def test_a_checkpoint_is_saved_into_a_directory_that_does_not_exist_yet(tmp_path):
    """``save_checkpoint``'s promise: "its directory is created"."""
    state, _ = small_state()
    path = save_checkpoint(state, tmp_path / "a" / "b" / "c.npz")
    assert path == tmp_path / "a" / "b" / "c.npz" and load_checkpoint(path)[0].step == 0


def test_a_held_out_batch_without_targets_reports_nothing():
    """No masked position anywhere: there is no mean loss or accuracy to report (not a 0)."""
    state, task = small_state()
    batch = task.batch(4, np.random.default_rng(2))
    assert evaluate(state, Batch(batch.tokens, batch.targets, np.zeros_like(batch.mask))) == {}


def test_a_text_task_takes_a_byte_array_and_draws_at_least_one_window():
    with pytest.raises(InputTypeError, match="data must be a 1-D uint8 array of bytes"):
        TextTask(b"the quick brown fox", 4)  # the bytes object itself, not read_text's array
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        TextTask(np.arange(10, dtype=np.uint8), 4).batch(0, np.random.default_rng(0))


def test_the_optimisers_defaults_are_gpt2_practice():
    """AdamW with nanoGPT's GPT-2 settings, which ``longnet-ref train`` inherits (it sets lr, min_lr,
    warm-up, decay and clipping, not the betas or eps): betas (0.9, 0.95), eps 1e-8, decay 0.1, clip 1."""
    tc = TrainConfig()
    assert (tc.beta1, tc.beta2, tc.eps, tc.weight_decay, tc.clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
