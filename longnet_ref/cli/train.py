"""``longnet-ref train``: train the LongNet language model on the passkey task or a text file.

Everything a run could trip over is checked before the banner, the output directory, the kernel
compile or the first step: the backend's extra, the checkpoint to resume and the options that
would contradict it, the task's size, the output directory, and the memory of a step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import model as lm
from ..backends import backend_names, backend_spec, get_backend, install_hint
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import PasskeyTask, TextTask, read_text
from ..train import TrainConfig, TrainState, fit
from .memory import refuse_if_too_big, train_step_bytes
from .options import (
    EXIT_FAILED,
    EXIT_MISSING_EXTRA,
    EXIT_USAGE,
    UsageError,
    check_input_file,
    check_output_dir,
    int_list,
    make_output_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

HELP = "train a small LongNet language model (passkey task or --text FILE)"
DESCRIPTION = """\
Train a small LongNet language model (pre-norm Transformer, dilated attention, RoPE, AdamW) on
passkey retrieval (default: find a key hidden early in a sequence of N tokens) or on the bytes of
a text file (--text FILE). Writes log.json, loss.png (with matplotlib) and checkpoint.npz to --out.

  longnet-ref train                                  # passkey retrieval, N = 256 -> train-passkey/
  longnet-ref train --text README.md --n 512         # next-byte prediction -> train-text/
  longnet-ref train --resume train-passkey/checkpoint.npz --steps 600   # continue a run
  mpiexec -n 4 longnet-ref train --n 4096 --batch 4  # sequence-parallel: 1024 tokens per rank

Under mpiexec or srun with more than one rank (detected from the launcher's environment:
PMI_SIZE, OMPI_COMM_WORLD_SIZE or PMIX_SIZE; or forced with --parallel) it trains
sequence-parallel: each rank holds N/P tokens of every sequence (docs: "Training across
machines"), rank 0 alone prints and writes, and a checkpoint written at any P resumes at any P.
"""

# The options that define a run, with their defaults. They are left out of the parsed namespace
# unless given (SUPPRESS), so --resume can refuse the ones that contradict its checkpoint.
DEFAULTS = {
    "text": None,
    "n": 256,
    "passkey_span": 4,
    "attention": "dilated",
    "segment_lengths": [64, 128, 256],
    "dilation_rates": [1, 2, 4],
    "window": None,
    "offsets": "paper",
    "d_model": 64,
    "layers": 2,
    "heads": 4,
    "no_rope": False,
    "steps": 300,
    "batch": 16,
    "lr": 3e-3,
    "warmup": 30,
    "weight_decay": 0.1,
    "clip": 1.0,
    "backend": "numba",
    "dtype": "float32",
    "seed": 0,
}
# option -> (its field in the checkpoint's LongNetConfig or TrainConfig, how the option maps to it)
MODEL_FIELDS = {
    "attention": "attention",
    "segment_lengths": "segment_lengths",
    "dilation_rates": "dilation_rates",
    "window": "window",
    "offsets": "offsets",
    "d_model": "d_model",
    "layers": "n_layers",
    "heads": "n_heads",
    "dtype": "dtype",
    "seed": "seed",
}
TRAIN_FIELDS = {"batch": "batch_size", "lr": "lr", "weight_decay": "weight_decay", "clip": "clip"}
EVAL_SEQUENCES = {"passkey": 64, "text": 8}
"""Held-out sequences per evaluation (drawn once, from seed 10000 + --seed)."""
PROGRESS_LINES = 20
"""Without tqdm, a plain progress line every steps / 20 steps (and at every evaluation)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    hide = argparse.SUPPRESS

    def option(name, *, default_text=None, **kwargs):
        dest = name[2:].replace("-", "_")
        shown = default_text or (",".join(map(str, DEFAULTS[dest])) if isinstance(DEFAULTS[dest], list) else DEFAULTS[dest])
        kwargs["help"] += f" (default: {shown})"
        p.add_argument(name, default=hide, **kwargs)

    option("--text", metavar="FILE", help="train next-byte prediction on this file", default_text="the passkey task")
    option("--n", type=positive_int, help="context length N (tokens per sequence)")
    option("--passkey-span", type=positive_int, help="passkey task: write the key this many times in a row (4 = the largest dilation: one hop)")
    option("--attention", choices=lm.ATTENTION_KINDS, help="attention of every layer")
    option("--segment-lengths", type=int_list, metavar="W1,W2,...", help="dilated attention: segment length w_i of each branch")
    option("--dilation-rates", type=int_list, metavar="R1,R2,...", help="dilated attention: dilation r_i of each branch")
    option("--window", type=positive_int, help="window attention: keys per query", default_text="the cost of the dilated configuration")
    option("--offsets", choices=["paper", "torchscale"], help="head offsets: paper (h mod r) or torchscale (blocks of heads)")
    option("--d-model", type=positive_int, help="model width C")
    option("--layers", type=positive_int, help="number of Transformer blocks")
    option("--heads", type=positive_int, help="attention heads per block")
    option("--no-rope", action="store_true", help="no rotary position embedding", default_text="RoPE on")
    option("--dtype", choices=["float32", "float64"], help="parameter and activation dtype")
    option("--seed", type=non_negative_int, help="seed of the initialisation and the data")
    option(
        "--steps", type=positive_int, help="total steps; with --resume: continue the run up to this many", default_text="300; with --resume: the checkpoint's"
    )
    option("--batch", type=positive_int, help="sequences per step")
    option("--lr", type=positive_float, help="peak AdamW learning rate (min_lr = lr / 10)")
    option("--warmup", type=non_negative_int, help="linear warm-up steps before the cosine decay")
    option("--weight-decay", type=non_negative_float, help="decoupled weight decay on the projection and MLP matrices")
    option("--clip", type=non_negative_float, help="global gradient-norm clip (0: none)")
    option(
        "--backend",
        choices=backend_names(),
        help="numba compiles once (~1-2 min, cached); cupy and cupy-fused need the gpu extra; may differ from the checkpoint's with --resume",
    )
    p.add_argument("--eval-every", type=non_negative_int, default=25, help="evaluate on a fixed held-out batch every k steps (0: never)")
    p.add_argument(
        "--resume", metavar="CHECKPOINT", default=None, help="continue the run of this checkpoint.npz (the model and optimiser options are the checkpoint's)"
    )
    p.add_argument("--checkpoint-every", type=non_negative_int, default=100, help="also write the checkpoint every k steps (0: only at the end)")
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="directory for log.json, loss.png, checkpoint.npz (default: train-passkey or train-text; with --resume: the checkpoint's directory)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument(
        "--blas-threads",
        type=positive_int,
        default=1,
        help="BLAS threads (1: the GEMMs of a small model are too small to share, and spinning BLAS threads on a busy machine cost more than they give)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p.add_argument(
        "--parallel",
        action="store_true",
        help="train sequence-parallel over the MPI ranks even when the launch is not detected "
        "(needs the mpi extra; detected: a launch by mpiexec/srun with more than one rank)",
    )


# ---- the checks, in the order they run --------------------------------------------------------------


def _task_of(given: dict, extra: dict | None, checkpoint: str | None):
    """The task and its description for the checkpoint (``extra``), from the options or the checkpoint."""
    if extra is not None:  # --resume: the checkpoint's task; the options may only repeat it
        kind = extra.get("task")
        if kind not in ("passkey", "text") or not isinstance(extra.get("n"), int):
            raise UsageError(f"--resume {checkpoint}: the checkpoint does not say which task it was trained on")
        if kind == "passkey" and "text" in given:
            raise UsageError(f"--text conflicts with the checkpoint (--resume {checkpoint}), trained on the passkey task")
        text = given.get("text", extra.get("text")) if kind == "text" else None
        if kind == "text" and (text is None or ("text" not in given and not Path(text).is_file())):
            where = f" ({text} is gone)" if text else ""
            raise UsageError(f"--resume {checkpoint}: the checkpoint was trained on a text file{where}; give it with --text FILE")
        for option, saved in (("n", extra["n"]), ("passkey_span", extra.get("passkey_span"))):
            if option in given and saved is not None and given[option] != saved:
                raise UsageError(
                    f"--{option.replace('_', '-')} {given[option]} conflicts with the checkpoint's {saved} "
                    f"(--resume {checkpoint}); leave it out to continue the run"
                )
        n, span = extra["n"], extra.get("passkey_span") or 1
    else:
        text, n, span = given.get("text"), given.get("n", DEFAULTS["n"]), given.get("passkey_span", DEFAULTS["passkey_span"])
    if text is not None:
        check_input_file(text, "--text")
        data = read_text(text)
        if data.size < n + 1:
            raise UsageError(f"--text {text} has {data.size} bytes; --n {n} needs at least n + 1 = {n + 1}: use a longer file or a smaller --n")
        return TextTask(data, n), {"task": "text", "n": n, "passkey_span": None, "text": str(Path(text).absolute())}
    shortest = PasskeyTask.shortest(span)
    if n < shortest:
        raise UsageError(
            f"--n {n} is too short for the passkey task with --passkey-span {span}: "
            f"it needs --n >= {shortest} (the key and its copies in the first quarter, then the query)"
        )
    return PasskeyTask(n, span=span), {"task": "passkey", "n": n, "passkey_span": span}


def _resumed_state(given: dict, state: TrainState, checkpoint: str) -> TrainState:
    """Refuse options that contradict the checkpoint; apply ``--steps`` and ``--backend``."""
    c, t = state.config, state.train
    saved = {option: getattr(c, field) for option, field in MODEL_FIELDS.items()}
    saved |= {option: getattr(t, field) for option, field in TRAIN_FIELDS.items()}
    saved |= {"no_rope": not c.rope, "warmup": t.warmup}
    for option, value in saved.items():
        if option in given and _normalised(given[option]) != _normalised(value):
            if option == "warmup" and given[option] >= t.steps and value == t.steps:
                continue  # the warm-up was capped at the run's length
            raise UsageError(
                f"--{option.replace('_', '-')} {_shown(given[option])} conflicts with the checkpoint's "
                f"{_shown(value)} (--resume {checkpoint}); leave it out to continue the run, "
                "or start a new run without --resume"
            )
    steps = given.get("steps", t.steps)
    if steps <= state.step:
        raise UsageError(
            f"--resume {checkpoint}: the checkpoint is at step {state.step} of {t.steps}, so "
            f"--steps {steps} leaves nothing to do; give --steps N with N > {state.step} to continue"
        )
    state.train = dataclasses.replace(t, steps=steps)
    if "backend" in given:
        state.config = dataclasses.replace(c, backend=given["backend"])
    return state


def _normalised(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _shown(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _fresh_configs(given: dict, task) -> tuple[lm.LongNetConfig, TrainConfig]:
    o = DEFAULTS | given
    applies = {  # option -> (whether it is read in this run, when it is)
        "window": (o["attention"] == "window", "with --attention window"),
        "passkey_span": (o["text"] is None, "to the passkey task (without --text)"),
    }
    for option, (read, when) in applies.items():
        if option in given and not read:
            raise UsageError(f"--{option.replace('_', '-')} applies only {when}; leave it out")
    config = lm.LongNetConfig(
        vocab_size=task.vocab_size,
        d_model=o["d_model"],
        n_layers=o["layers"],
        n_heads=o["heads"],
        segment_lengths=tuple(o["segment_lengths"]),
        dilation_rates=tuple(o["dilation_rates"]),
        attention=o["attention"],
        window=o["window"],
        offsets=o["offsets"],
        backend=o["backend"],
        rope=not o["no_rope"],
        dtype=o["dtype"],
        seed=o["seed"],
    )
    train = TrainConfig(
        steps=o["steps"],
        batch_size=o["batch"],
        lr=o["lr"],
        min_lr=o["lr"] / 10,
        warmup=min(o["warmup"], o["steps"]),
        weight_decay=o["weight_decay"],
        clip=o["clip"],
        seed=o["seed"],
    )
    return config, train


def _output_dir(args, extra: dict) -> Path:
    """``--out``, checked; a directory holding another run is refused unless ``--overwrite``."""
    default = Path(args.resume).parent if args.resume else Path(f"train-{extra['task']}")
    out = check_output_dir(default if args.out is None else args.out, "--out")
    held = [name for name in ("checkpoint.npz", "log.json") if (out / name).exists()]
    continuing = args.resume is not None and (out / "checkpoint.npz").resolve() == Path(args.resume).resolve()
    if held and not continuing and not args.overwrite:
        raise UsageError(
            f"--out {out} already holds a run ({', '.join(held)}): give --overwrite to replace it, "
            f"--resume {out / 'checkpoint.npz'} to continue it, or another --out"
        )
    return out


LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
"""Environment variables in which MPICH's Hydra (and Slurm's PMI), Open MPI and PMIx launchers
give each process the number of ranks they started."""


def launched_ranks() -> int:
    """The number of ranks the MPI launcher started, from its environment (1 without a launcher)."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _communicator(args):
    """``MPI.COMM_WORLD`` to train sequence-parallel over, or ``None`` for one process."""
    launched = launched_ranks()
    if not args.parallel and launched == 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError as error:
        why = f"launched as one of {launched} MPI ranks" if launched > 1 else "--parallel"
        raise ImportError(f"{why}: sequence-parallel training needs mpi4py and an MPI: {install_hint('mpi')}", name="mpi4py") from error
    comm = MPI.COMM_WORLD
    if comm.Get_size() != launched and launched > 1:
        raise UsageError(
            f"the launcher started {launched} ranks but MPI sees {comm.Get_size()}: mpi4py is built against "
            "another MPI than the mpiexec that ran this (use the mpiexec of the same installation)"
        )
    return comm


def run(args: argparse.Namespace) -> int:
    """``longnet-ref train``: check everything, then build (or resume) the state, fit, write the results.

    Sequence-parallel (under an MPI launcher, or ``--parallel``): every rank runs the checks, the
    ranks agree on the verdict before any training, and rank 0 alone prints and writes.

    Returns:
        ``0`` once the log, the checkpoint (and the plot, with matplotlib) are written.

    Raises:
        UsageError, ValueError: A bad option, file or combination (on any rank); nothing has been written.
        ImportError: The backend's extra, or the mpi extra, is missing.
    """
    comm = _communicator(args)
    if comm is None:
        return _train(args, *_prepare(args, ranks=1), comm=None)
    rank = comm.Get_rank()
    try:
        prepared, failure = _prepare(args, ranks=comm.Get_size()), None
    except (UsageError, ValueError, TypeError, ImportError, OSError) as error:
        prepared, failure = None, error
    failures = comm.allgather(None if failure is None else (rank, isinstance(failure, ImportError), " ".join(str(failure).split())))
    first = next((f for f in failures if f is not None), None)
    if first is not None:  # every rank stops; rank 0 says why, in one line
        failed_rank, missing_extra, message = first
        if rank != 0:
            raise SystemExit(EXIT_MISSING_EXTRA if missing_extra else EXIT_USAGE)
        if failed_rank == 0:
            raise failure
        raise (ImportError if missing_extra else UsageError)(f"rank {failed_rank}: {message}")
    if rank != 0:  # silent: rank 0 prints and writes for everyone
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)
    try:
        return _train(args, *prepared, comm=comm)
    except BaseException as error:  # a rank failing alone would leave the others waiting in a collective
        sys.stderr.write(f"longnet-ref train: error: rank {rank}: {' '.join(str(error).split()) or type(error).__name__}; stopping every rank\n")
        sys.stderr.flush()
        comm.Abort(EXIT_FAILED)
        raise


def _prepare(args, ranks: int):
    """Every check, in order; returns ``(task, state or None, config, train, extra, out)``."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    get_backend(given.get("backend", DEFAULTS["backend"]))  # a missing extra (cupy), before anything else
    state = None
    if args.resume is not None:
        check_input_file(args.resume, "--resume")
        state, extra = load_checkpoint(args.resume)
        task, extra = _task_of(given, extra, args.resume)
        if task.vocab_size != state.config.vocab_size:
            raise UsageError(f"--resume {args.resume}: the model's vocabulary ({state.config.vocab_size}) is not its task's ({task.vocab_size})")
        state = _resumed_state(given, state, args.resume)
        config, train = state.config, state.train
    else:
        task, extra = _task_of(given, None, None)
        config, train = _fresh_configs(given, task)
    if ranks > 1 or args.parallel:
        _check_parallel(config, task.n, ranks)
    # a step, and an evaluation (forwarded in slices of the training batch: train.evaluate), per rank
    parts = train_step_bytes(config, train.batch_size, task.n // ranks)
    if args.eval_every:  # the held-out tokens, targets and mask (int64, int64, bool): every rank holds them
        parts["held-out batch"] = EVAL_SEQUENCES[extra["task"]] * task.n * 17
    per_rank = f" on each of {ranks} ranks" if ranks > 1 else ""
    refuse_if_too_big(
        parts,
        f"a training step of {train.batch_size} x {task.n} tokens{per_rank} (--batch {train.batch_size} "
        f"--n {task.n}, --d-model {config.d_model}, --layers {config.n_layers})",
        "lower --n, --batch, --d-model or --layers",
    )
    out = _output_dir(args, extra)
    return task, state, config, train, extra, out


def _check_parallel(config: lm.LongNetConfig, n: int, ranks: int) -> None:
    """What sequence-parallel training needs, named by option."""
    if n % ranks:
        raise UsageError(f"--n {n} is not divisible by the {ranks} MPI ranks (each rank holds N/P tokens of every sequence): use a multiple of {ranks}")
    if config.attention == "dense":
        raise UsageError("--attention dense is not sequence-parallel (every rank would need all N keys): use dilated or window")
    if not backend_spec(config.backend).distributed:
        raise UsageError(f"--backend {config.backend} cannot train sequence-parallel: use one of {', '.join(backend_names(distributed=True))}")


def _train(args, task, state, config, train, extra, out, *, comm) -> int:
    """Build (or take the resumed) state and fit it, with the BLAS threads of ``--blas-threads``."""
    if state is None:
        state = TrainState.fresh(config, train)
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(args.blas_threads, user_api="blas")
    try:
        return _fit_and_report(args, task, state, extra, out, comm)
    finally:
        limits.restore_original_limits()


class Diverged(ValueError):
    """The training loss became NaN or infinite; ``main`` prints the message and exits with status 2."""


def _title(state: TrainState, extra: dict) -> str:
    c = state.config
    span = extra.get("passkey_span") or 1
    task = "text" if extra["task"] == "text" else "passkey" + (f" span={span}" if span > 1 else "")
    pattern = f" w={list(c.segment_lengths)} r={list(c.dilation_rates)}" if c.attention != "dense" else ""
    return f"{task} N={extra['n']}: {c.attention}{pattern} L={c.n_layers} C={c.d_model} H={c.n_heads}"


def _progress(args, state: TrainState):
    """``(on_step(record), close())``: a tqdm bar if tqdm is installed, else a plain line every few steps."""
    if args.quiet:
        return (lambda record: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        every = max(1, state.train.steps // PROGRESS_LINES)

        def line(record):
            if record["step"] % every == 0 or "eval_loss" in record or record["step"] == state.train.steps:
                text = f"step {record['step']}/{state.train.steps}  loss {record['loss']:.3f}  {record['tokens_per_s']:.0f} tokens/s"
                if "eval_loss" in record:
                    text += f"  held-out loss {record['eval_loss']:.3f} accuracy {record['eval_accuracy']:.3f}"
                print(text, flush=True)

        return line, (lambda: None)
    bar = tqdm(total=state.train.steps, initial=state.step, unit="step", dynamic_ncols=True)

    def update(record):
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")

    return update, bar.close


def _fit_and_report(args, task, state: TrainState, extra: dict, out: Path, comm=None) -> int:
    lead = comm is None or comm.Get_rank() == 0  # the one process that writes
    title = _title(state, extra)
    if comm is not None:
        title += f" (sequence-parallel, P={comm.Get_size()})"
    print(
        f"longnet-ref train: {title}; steps {state.step + 1}-{state.train.steps} of {state.train.batch_size} x "
        f"{task.n} tokens; chance loss {task.chance_loss:.3f}",
        flush=True,
    )
    if state.config.backend == "numba":
        from ..backends.numba_cpu import warm_up

        print(f"numba kernels ready in {warm_up(np.dtype(state.config.dtype)):.1f} s", flush=True)
    held_out = np.random.default_rng(10_000 + state.train.seed)
    eval_batch = task.batch(EVAL_SEQUENCES[extra["task"]], held_out) if args.eval_every else None
    if lead:
        make_output_dir(out, "--out")
    checkpoint = out / "checkpoint.npz"
    show, close = _progress(args, state)

    def on_record(record):
        show(record)
        finite = math.isfinite(record["loss"]) and all(np.isfinite(p).all() for p in state.params.values())
        if not finite:  # diverged: stop before a NaN checkpoint replaces a good one
            raise Diverged(
                f"the loss or the parameters are not finite at step {record['step']} (loss {record['loss']}): training diverged "
                f"(--lr {state.train.lr:g}, --weight-decay {state.train.weight_decay:g}, --clip "
                f"{state.train.clip:g}; a smaller --lr helps); the last checkpoint written is kept"
            )
        if lead and args.checkpoint_every and record["step"] % args.checkpoint_every == 0:
            save_checkpoint(state, checkpoint, extra)

    start = time.perf_counter()
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported once, just above
            records = fit(state, task, eval_every=args.eval_every, eval_batch=eval_batch, on_record=on_record, comm=comm)
    finally:
        close()
    seconds = time.perf_counter() - start
    if not lead:
        return 0
    save_checkpoint(state, checkpoint, extra)
    log = {
        "title": title,
        "model": state.config.to_dict(),
        "train": dataclasses.asdict(state.train),
        **extra,
        "chance_loss": task.chance_loss,
        "seconds": seconds,
        "records": records,
    }
    (out / "log.json").write_text(json.dumps(log, indent=1))
    first, last = records[0], records[-1]
    evals = [r for r in records if "eval_loss" in r]
    summary = f"loss {first['loss']:.3f} -> {last['loss']:.3f}"
    if evals:
        summary += f"; held-out loss {evals[-1]['eval_loss']:.3f}, accuracy {evals[-1]['eval_accuracy']:.3f}"
    print(f"{summary}; {len(records)} step{'s' if len(records) != 1 else ''} in {seconds:.1f} s")
    written = [out / "log.json"]
    try:
        written.append(plot_log(records, out / "loss.png", title, task.chance_loss))
    except ImportError:
        print(f"no loss.png: drawing it needs matplotlib ({install_hint('bench')}); log.json holds every number")
    for path in (*written, checkpoint):
        print(f"wrote {path}")
    return 0


def plot_log(records: list[dict], path, title: str, chance: float | None = None) -> Path:
    """The training (and held-out) loss against the step, with the chance level; needs matplotlib."""
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
