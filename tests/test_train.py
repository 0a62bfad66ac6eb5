"""Training (``longnet_ref.train``), data (``longnet_ref.data``) and ``longnet-ref train``."""

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
from longnet_ref.cli import main
from longnet_ref.data import QUERY, PasskeyTask, TextTask, read_text
from longnet_ref.checkpoint import load_checkpoint, save_checkpoint
from tests.tolerances import INITIAL_LOSS_NATS
from longnet_ref.train import (
    AdamW,
    TrainConfig,
    TrainState,
    clip_by_global_norm,
    decays,
    learning_rate,
    train_step,
)

# ---- schedule, clipping, AdamW ------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    tc = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup=10)
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
    assert norm == pytest.approx(5.0)
    assert math.sqrt(sum(float((g**2).sum()) for g in clipped.values())) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-5)
    same, _ = clip_by_global_norm(grads, 10.0)
    assert same["a"] is grads["a"]  # under the limit: untouched


def test_first_adamw_step_moves_each_weight_by_lr_times_its_gradients_sign_plus_decay():
    """Step 1: ``m_hat = g``, ``v_hat = g^2``, so the Adam step is ``lr g / (|g| + eps)``; then decay."""
    params = {"h.0.attn.q_proj.weight": np.array([[1.0, -2.0]]), "h.0.attn.q_proj.bias": np.array([1.0]),
              "wte.weight": np.array([[1.0]])}
    grads = {"h.0.attn.q_proj.weight": np.array([[0.5, -3.0]]), "h.0.attn.q_proj.bias": np.array([2.0]),
             "wte.weight": np.array([[-1.0]])}
    tc = TrainConfig(lr=0.1, weight_decay=0.5, eps=0.0)
    AdamW.zeros_like(params).step(params, grads, 0.1, tc)
    np.testing.assert_allclose(params["h.0.attn.q_proj.weight"], [[1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1]])
    np.testing.assert_allclose(params["h.0.attn.q_proj.bias"], [0.9])  # biases: no decay
    np.testing.assert_allclose(params["wte.weight"], [[1.1]])  # embedding: no decay


def test_weight_decay_applies_to_linear_matrices_only():
    names = lm.parameter_shapes(lm.LongNetConfig(n_layers=1))
    decayed = {n for n in names if decays(n)}
    assert decayed == {f"h.0.attn.{p}_proj.weight" for p in ("q", "k", "v", "out")} | {
        "h.0.mlp.fc1.weight", "h.0.mlp.fc2.weight"}


# ---- checkpoints ------------------------------------------------------------------------------------


def small_state(seed=0):
    task = PasskeyTask(16, num_keys=4, num_fillers=5)
    config = lm.LongNetConfig(vocab_size=task.vocab_size, d_model=16, n_layers=2, n_heads=4,
                              segment_lengths=(4, 8), dilation_rates=(1, 2), dtype="float32", seed=seed)
    return TrainState.fresh(config, TrainConfig(steps=20, batch_size=3, warmup=2, seed=seed)), task


def test_a_resumed_checkpoint_repeats_the_uninterrupted_run_bit_for_bit(tmp_path):
    uninterrupted, task = small_state()
    for _ in range(4):
        train_step(uninterrupted, task)

    interrupted, _ = small_state()
    for _ in range(3):
        train_step(interrupted, task)
    path = save_checkpoint(interrupted, tmp_path / "ckpt.npz")
    del interrupted
    resumed, _ = load_checkpoint(path)
    assert resumed.step == 3
    train_step(resumed, task)

    assert resumed.step == uninterrupted.step == 4
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


@pytest.mark.parametrize("edit, message", [
    (drop("rng"), "no 'rng'"),
    (drop("model"), "no 'model'"),
    (drop("train"), "no 'train'"),
    (drop("step"), "no 'step'"),
    (drop("adam_t"), "no 'adam_t'"),
    (drop("format"), "format"),
    (change("version", 99), "version 99"),
    (change("step", -1), "'step' must be a non-negative integer"),
    (change("step", "3"), "'step' must be a non-negative integer"),
    (change("rng", {"bit_generator": "MT19937"}), "'rng' is not a state"),
    (change("rng", [1, 2]), "'rng' must be a JSON object"),
    (change("train", {"steps": 3}), "'train' lacks"),
    (lambda raw: raw.replace(b'"d_model": 16', b'"d_model": 17'), "'model'"),
    (lambda raw: raw[:-5], "not valid JSON"),
    (lambda raw: b"\xff\xfe" + raw, "not valid JSON"),
    (lambda raw: b"[1, 2]", "not a JSON object"),
])
def test_every_field_of_a_checkpoint_is_checked_on_load(tmp_path, edit, message):
    state, _ = small_state()
    path = save_checkpoint(state, tmp_path / "ckpt.npz")
    rewrite_meta(path, edit)
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a .npz archive (or a truncated one)"),
    ("foreign", "no '__meta__' entry"),
    ("text", "not a .npz archive"),
    ("missing array", "lacks the arrays adam_m/h.0.attn.k_proj.bias"),
    ("wrong shape", "got (3,)"),
    ("wrong dtype", "float64"),
    ("directory", "is a directory"),
])
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
        assert (batch.tokens[b, first[b]:first[b] + 4] == batch.targets[b, -1]).all()
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

SMALL = ["--n", "16", "--steps", "4", "--batch", "2", "--d-model", "16", "--heads", "4", "--layers", "1",
         "--segment-lengths", "4,8", "--dilation-rates", "1,2", "--eval-every", "2", "--backend", "numpy", "--quiet"]


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
    assert [r["lr"] for r in records] == pytest.approx([3e-3 * t / 4 for t in (1, 2, 3, 4)], rel=1e-12)
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
