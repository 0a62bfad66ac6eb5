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
bit. Docs: ``docs/model.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import model as lm
from .data import PasskeyTask, TextTask, accuracy
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
        check_int(self.seed, "seed")
        for name in ("beta1", "beta2", "eps", "clip", "weight_decay", "min_lr"):
            check_real(getattr(self, name), name, minimum=0)
        check_real(self.lr, "lr", above=0)
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
    """``g * min(1, c / ||g||)`` with ``||g||`` the 2-norm of all gradients as one vector."""
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
# the training state and checkpoints


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


def train_step(state: TrainState, task) -> dict:
    """Draw a batch, compute the loss and gradients, clip, update. Returns the step's record."""
    batch = task.batch(state.train.batch_size, state.rng)
    loss, grads = lm.loss_and_grads(state.config, state.params, batch.tokens, batch.targets, batch.mask)
    grads, norm = clip_by_global_norm(grads, state.train.clip)
    lr = learning_rate(state.step + 1, state.train)
    state.optimizer.step(state.params, grads, lr, state.train)
    state.step += 1
    return {"step": state.step, "loss": loss, "lr": lr, "grad_norm": norm}


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_checkpoint(state: TrainState, path, extra: dict | None = None) -> Path:
    """``path`` (``.npz``): params and AdamW moments; ``path`` with ``.json``: configs, step, RNG state."""
    path = Path(path).with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"param/{k}": v for k, v in state.params.items()}
    arrays |= {f"adam_m/{k}": v for k, v in state.optimizer.m.items()}
    arrays |= {f"adam_v/{k}": v for k, v in state.optimizer.v.items()}
    np.savez(path, **arrays)
    meta = {
        "model": state.config.to_dict(), "train": dataclasses.asdict(state.train), "step": state.step,
        "adam_t": state.optimizer.t, "rng": state.rng.bit_generator.state, **(extra or {}),
    }
    _json_path(path).write_text(json.dumps(meta, indent=1))
    return path


def load_checkpoint(path) -> tuple[TrainState, dict]:
    """The state saved by :func:`save_checkpoint` (and the JSON's other entries)."""
    path = Path(path)
    npz, meta_path = path.with_suffix(".npz"), _json_path(path)
    for p in (npz, meta_path):
        if not p.is_file():
            raise ValueError(f"checkpoint file {str(p)!r} does not exist")
    meta = json.loads(meta_path.read_text())
    config = lm.LongNetConfig.from_dict(meta["model"])
    with np.load(npz) as f:
        take = lambda kind: {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(kind + "/")}
        params, m, v = take("param"), take("adam_m"), take("adam_v")
    lm.check_params(config, params)
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]
    state = TrainState(config, TrainConfig(**meta["train"]), params, AdamW(m, v, meta["adam_t"]), rng, meta["step"])
    return state, meta


# ----------------------------------------------------------------------------------------------
# the loop


def evaluate(state: TrainState, task, batch) -> dict:
    logits, _ = lm.forward(state.config, state.params, batch.tokens)
    from . import nn

    loss, _ = nn.cross_entropy_forward(logits, batch.targets, batch.mask)
    return {"eval_loss": float(loss), "eval_accuracy": accuracy(logits, batch)}


def fit(state: TrainState, task, *, eval_every=0, eval_batch=None, progress=True, on_record=None) -> list[dict]:
    """Train until ``state.train.steps``; a record per step (loss, lr, grad norm, tokens/s, eval)."""
    from tqdm import tqdm

    records = []
    tokens_per_step = state.train.batch_size * task.n
    bar = tqdm(total=state.train.steps, initial=state.step, disable=not progress, unit="step", dynamic_ncols=True)
    while state.step < state.train.steps:
        start = time.perf_counter()
        record = train_step(state, task)
        record["seconds"] = time.perf_counter() - start
        record["tokens_per_s"] = tokens_per_step / record["seconds"]
        if eval_batch is not None and eval_every and (state.step % eval_every == 0 or state.step == state.train.steps):
            record |= evaluate(state, task, eval_batch)
        records.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if on_record is not None:
            on_record(record)
    bar.close()
    return records


def plot_log(records: list[dict], path, title: str, chance: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, [r["loss"] for r in records], lw=0.8, alpha=0.6, label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3, label="eval loss")
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", label=f"chance ({chance:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy [nats]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# ``longnet-ref train``


def add_arguments(p) -> None:
    """The ``train`` subcommand's options (``cli.py`` registers the subparser)."""
    from .cli import _int_list  # the CLI's one parser of "w1,w2,..." (imported here: cli imports this module)

    p.add_argument("--text", default=None, help="train next-byte prediction on this file (default: the passkey task)")
    p.add_argument("--n", type=int, default=256, help="context length N")
    p.add_argument("--passkey-span", type=int, default=4,
                   help="passkey task: write the key this many times in a row (4 = the default max dilation: one hop)")
    p.add_argument("--attention", default="dilated", help="dilated | dense | window")
    p.add_argument("--segment-lengths", type=_int_list, default=[64, 128, 256], help="comma-separated w_i")
    p.add_argument("--dilation-rates", type=_int_list, default=[1, 2, 4], help="comma-separated r_i")
    p.add_argument("--window", type=int, default=None, help="window attention: keys per query (default: same cost as dilated)")
    p.add_argument("--offsets", choices=["paper", "torchscale"], default="paper",
                   help="head offsets: paper (h mod r) or torchscale (contiguous blocks of heads)")
    p.add_argument("--d-model", type=int, default=64, help="model width C")
    p.add_argument("--layers", type=int, default=2, help="number of Transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads per block")
    p.add_argument("--no-rope", action="store_true", help="no rotary position embedding")
    p.add_argument("--steps", type=int, default=None, help="total steps (default 300; with --resume: extend the run to this many)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay on the projection and MLP matrices")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--backend", default="numba", help="numba (default; compiles once, ~1-2 min) | numpy | cupy")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter and activation dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data")
    p.add_argument("--eval-every", type=int, default=25, help="evaluate on a fixed held-out batch every k steps")
    p.add_argument("--resume", default=None, help="continue from this checkpoint (.npz)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="also write the checkpoint every k steps (0: only at the end)")
    p.add_argument("--out", default="train-out", help="directory for log.json, loss.png, checkpoint.npz/.json")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="BLAS threads (default 1: the GEMMs of a small model are too small to share, and spinning "
                        "BLAS threads on a busy machine cost more than they give)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def make_task(text, n, span=1):
    if text is not None:
        return TextTask.from_file(text, n)
    return PasskeyTask(n, span=span)


def run(args) -> int:
    """``longnet-ref train``: build (or resume) the state, fit, write the log, the plot and a checkpoint."""
    if args.n < 2:
        raise ValueError(f"--n must be at least 2, got {args.n}")
    task = make_task(args.text, args.n, args.passkey_span)
    extra = {"task": "text" if args.text else "passkey", "n": task.n, "passkey_span": None if args.text else args.passkey_span}
    if args.resume:
        state, meta = load_checkpoint(args.resume)
        if any(meta.get(key) != value for key, value in extra.items()):
            saved = {key: meta.get(key) for key in extra}
            raise ValueError(f"--resume: the checkpoint was trained on {saved}, this run asks for {extra}")
        if args.steps is not None and args.steps > state.train.steps:  # extend: the cosine stretches to the new end
            state.train = dataclasses.replace(state.train, steps=args.steps)
    else:
        config = lm.LongNetConfig(
            vocab_size=task.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
            segment_lengths=tuple(args.segment_lengths), dilation_rates=tuple(args.dilation_rates),
            attention=args.attention, window=args.window, offsets=args.offsets, backend=args.backend,
            rope=not args.no_rope, dtype=args.dtype, seed=args.seed,
        )
        steps = 300 if args.steps is None else args.steps
        train = TrainConfig(
            steps=steps, batch_size=args.batch, lr=args.lr, min_lr=args.lr / 10, warmup=min(args.warmup, steps),
            weight_decay=args.weight_decay, clip=args.clip, seed=args.seed,
        )
        state = TrainState.fresh(config, train)
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(args.blas_threads, user_api="blas")
    try:
        return _fit_and_report(args, task, state, extra)
    finally:
        limits.restore_original_limits()


def _fit_and_report(args, task, state, extra) -> int:
    if state.config.backend == "numba":
        from .backends.numba_cpu import warm_up

        print(f"numba kernels ready in {warm_up(np.dtype(state.config.dtype)):.1f} s")
    eval_batch = task.batch(64 if args.text is None else 8, np.random.default_rng(10_000 + args.seed))  # held out
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = state.config
    title = (f"{'text' if args.text else 'passkey' + (f' span={args.passkey_span}' if args.passkey_span > 1 else '')} N={task.n}: {c.attention} "
             f"{'w=' + str(list(c.segment_lengths)) + ' r=' + str(list(c.dilation_rates)) if c.attention != 'dense' else ''}"
             f" L={c.n_layers} C={c.d_model} H={c.n_heads}")
    print(f"longnet-ref train: {title}; {state.train.steps} steps of {state.train.batch_size} x {task.n} tokens; "
          f"chance loss {task.chance_loss:.3f}")
    def save_now(record):
        if args.checkpoint_every and record["step"] % args.checkpoint_every == 0:
            save_checkpoint(state, out / "checkpoint.npz", extra)

    start = time.perf_counter()
    records = fit(state, task, eval_every=args.eval_every, eval_batch=eval_batch, progress=not args.quiet, on_record=save_now)
    seconds = time.perf_counter() - start
    checkpoint = save_checkpoint(state, out / "checkpoint.npz", extra)
    log = {"title": title, "model": c.to_dict(), "train": dataclasses.asdict(state.train), **extra,
           "chance_loss": task.chance_loss, "seconds": seconds, "records": records}
    (out / "log.json").write_text(json.dumps(log, indent=1))
    plot = plot_log(records, out / "loss.png", title, task.chance_loss)
    if records:
        first, last = records[0], records[-1]
        evals = [r for r in records if "eval_loss" in r]
        summary = f"loss {first['loss']:.3f} -> {last['loss']:.3f}"
        if evals:
            summary += f"; held-out loss {evals[-1]['eval_loss']:.3f}, accuracy {evals[-1]['eval_accuracy']:.3f}"
        print(f"{summary}; {len(records)} steps in {seconds:.1f} s")
    for path in (out / "log.json", plot, checkpoint, _json_path(checkpoint)):
        print(f"wrote {path}")
    return 0


