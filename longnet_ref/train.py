"""Training the LongNet language model: AdamW, warm-up + cosine schedule, clipping, checkpoints.

One step, for parameters ``theta`` and gradient ``g`` (all arrays elementwise):

    g      <- g * min(1, c / ||g||_2)                 global-norm clipping (all tensors as one vector)
    m      <- b1 m + (1 - b1) g                       first moment
    v      <- b2 v + (1 - b2) g^2                     second moment
    theta  <- theta - lr_t (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    theta  <- theta - lr_t lambda theta               decoupled weight decay (Loshchilov & Hutter),
                                                      matrices of linear layers only

``lr_t`` rises linearly over ``warmup`` steps, then follows a cosine from ``lr`` to ``min_lr``.
Decayed: the ``(out, in)`` weights of the attention projections and the MLP; not decayed:
biases, LayerNorm gains and the (tied) embedding, as in nanoGPT/GPT-2 practice.

Everything is deterministic from the seed: the data generator's state is saved with the
parameters and the optimiser's moments, so a resumed run repeats the uninterrupted one bit for
bit (checkpoints: :mod:`longnet_ref.checkpoint`). Docs: ``docs/model.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from . import model as lm
from . import nn
from .data import Batch, accuracy
from .validation import check_int, check_real

# ----------------------------------------------------------------------------------------------
# the optimiser


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.warmup, "warmup", minimum=0)
        check_int(self.seed, "seed", minimum=0)
        for name in ("beta1", "beta2", "eps", "clip", "weight_decay", "min_lr"):
            check_real(getattr(self, name), name, minimum=0)
        check_real(self.lr, "lr", above=0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= lr (the cosine decays from lr to min_lr), got {self.min_lr} > {self.lr}")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be < 1, got {self.beta1}, {self.beta2}")


def learning_rate(step: int, tc: TrainConfig) -> float:
    """``lr_t`` for step ``t = 1, 2, ...``: linear warm-up to ``lr``, then cosine down to ``min_lr``."""
    if step <= tc.warmup:
        return tc.lr * step / tc.warmup
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def decays(name: str) -> bool:
    """Weight decay for the matrices of linear layers only (see the module docstring)."""
    return name.endswith(".weight") and ("attn." in name or "mlp." in name)


def clip_by_global_norm(grads: dict, max_norm: float) -> tuple[dict, float]:
    """``g * c / (||g|| + 1e-6)`` when ``||g|| > c`` (else ``g``), with ``||g||`` the 2-norm of all
    gradients as one vector; the ``1e-6`` as in ``torch.nn.utils.clip_grad_norm_``."""
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        grads = {name: g * g.dtype.type(scale) for name, g in grads.items()}
    return grads, norm


@dataclass
class AdamW:
    """Moments ``m``, ``v`` (same names and shapes as the params) and the step count ``t``."""

    m: dict
    v: dict
    t: int = 0

    @classmethod
    def zeros_like(cls, params: dict) -> AdamW:
        return cls({k: np.zeros_like(p) for k, p in params.items()}, {k: np.zeros_like(p) for k, p in params.items()})

    def step(self, params: dict, grads: dict, lr: float, tc: TrainConfig) -> None:
        """One AdamW update of ``params`` in place (the equations of the module docstring)."""
        self.t += 1
        bias1, bias2 = 1 - tc.beta1**self.t, 1 - tc.beta2**self.t
        for name, p in params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            m *= tc.beta1
            m += (1 - tc.beta1) * g
            v *= tc.beta2
            v += (1 - tc.beta2) * np.square(g)
            if decays(name):
                p -= p.dtype.type(lr * tc.weight_decay) * p
            p -= p.dtype.type(lr) * (m / bias1) / (np.sqrt(v / bias2) + p.dtype.type(tc.eps))


# ----------------------------------------------------------------------------------------------
# the training state


@dataclass
class TrainState:
    config: lm.LongNetConfig
    train: TrainConfig
    params: dict
    optimizer: AdamW
    rng: np.random.Generator  # the data stream
    step: int = 0

    @classmethod
    def fresh(cls, config: lm.LongNetConfig, train: TrainConfig) -> TrainState:
        params = lm.init_params(config)
        return cls(config, train, params, AdamW.zeros_like(params), np.random.default_rng(train.seed))


def train_step(state: TrainState, task, *, comm=None) -> dict:
    """Draw a batch, compute the loss and gradients, clip, update. Returns the step's record.

    With an MPI ``comm``, sequence-parallel: every rank draws the same batch from its copy of the
    (replicated) state, keeps its chunk of every sequence and calls ``parallel.loss_and_grads``,
    whose gradients are identical on every rank, so the updated states stay identical.
    """
    batch = task.batch(state.train.batch_size, state.rng)
    if comm is None:
        loss, grads = lm.loss_and_grads(state.config, state.params, batch.tokens, batch.targets, batch.mask)
    else:
        from . import parallel  # imports mpi4py: only when asked for

        chunks = (parallel.chunk(x, comm) for x in (batch.tokens, batch.targets, batch.mask))
        loss, grads = parallel.loss_and_grads(state.config, state.params, *chunks, comm=comm)
    grads, norm = clip_by_global_norm(grads, state.train.clip)
    lr = learning_rate(state.step + 1, state.train)
    state.optimizer.step(state.params, grads, lr, state.train)
    state.step += 1
    return {"step": state.step, "loss": loss, "lr": lr, "grad_norm": norm}


# ----------------------------------------------------------------------------------------------
# the loop


def evaluate(state: TrainState, batch, *, comm=None) -> dict:
    """Held-out loss and accuracy of ``batch``, forwarded in slices of at most the training batch size.

    Slicing bounds the memory of an evaluation by that of a training step's forward (a held-out
    batch of 64 sequences of 16K tokens forwarded at once needs 4x a step of 16); the mean is
    over every masked position of the whole batch, as if it were forwarded at once. With an MPI
    ``comm`` each slice is forwarded sequence-parallel (``parallel.evaluate``): every rank holds
    the whole batch and keeps its chunk.
    """
    size, total, loss_sum, hits = state.train.batch_size, 0, 0.0, 0.0
    for start in range(0, batch.tokens.shape[0], size):
        part = Batch(*(x[start : start + size] for x in (batch.tokens, batch.targets, batch.mask)))
        count = int(part.mask.sum())
        if count == 0:
            continue
        if comm is None:
            logits, _ = lm.forward(state.config, state.params, part.tokens)
            loss, _ = nn.cross_entropy_forward(logits, part.targets, part.mask)
            correct = accuracy(logits, part)
        else:
            from . import parallel  # imports mpi4py: only when asked for

            chunks = (parallel.chunk(x, comm) for x in (part.tokens, part.targets, part.mask))
            loss, correct = parallel.evaluate(state.config, state.params, *chunks, comm=comm)
        loss_sum += float(loss) * count
        hits += correct * count
        total += count
    return {"eval_loss": loss_sum / total, "eval_accuracy": hits / total} if total else {}


def fit(state: TrainState, task, *, eval_every=0, eval_batch=None, on_record=None, comm=None) -> list[dict]:
    """Train until ``state.train.steps``; a record per step (loss, lr, grad norm, tokens/s, eval).

    Every ``eval_every`` steps (and at the last) the record also holds :func:`evaluate` of
    ``eval_batch``. ``on_record(record)`` is called after each step (progress, checkpoints).
    ``comm``: an MPI communicator to train sequence-parallel over its ranks (:func:`train_step`).
    """
    records = []
    tokens_per_step = state.train.batch_size * task.n
    while state.step < state.train.steps:
        start = time.perf_counter()
        record = train_step(state, task, comm=comm)
        record["seconds"] = time.perf_counter() - start
        record["tokens_per_s"] = tokens_per_step / record["seconds"]
        if eval_batch is not None and eval_every and (state.step % eval_every == 0 or state.step == state.train.steps):
            record |= evaluate(state, eval_batch, comm=comm)
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records
