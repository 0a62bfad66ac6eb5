"""``longnet-ref generate``: what a trained checkpoint does with a prompt.

- A text checkpoint (``train --text FILE``) continues ``--prompt`` byte by byte: the prompt is
  echoed, then exactly ``--max-new-tokens`` sampled bytes are streamed as they are drawn.
- A passkey checkpoint (the default ``train``) takes the passkey as ``--prompt`` (an integer from
  1 to the number of keys), hides it in a sequence of its task (filler drawn from ``--seed``),
  asks for it at the end and prints the model's answer.

Both run the prompt through the model once (prefill) and every new token through the per-layer
KV caches (:mod:`longnet_ref.generate`). Every option and the checkpoint are checked before
anything is printed.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..checkpoint import load_checkpoint
from ..data import PasskeyTask
from ..generate import generate
from .memory import refuse_if_too_big
from .options import (
    UsageError,
    check_input_file,
    non_negative_float,
    non_negative_int,
    positive_int,
)

HELP = "continue a text prompt, or answer a passkey, with a trained checkpoint (KV-cached decoding)"
DESCRIPTION = """\
Run a checkpoint written by longnet-ref train on a prompt, through the model's KV caches.

  text checkpoint (train --text FILE): --prompt is text; the prompt and exactly
      --max-new-tokens sampled bytes are printed, streamed as they are drawn.
  passkey checkpoint (the default train): --prompt is the passkey, an integer from 1 to 8; it is
      hidden in a sequence of the task (filler drawn from --seed) and the model's answer printed.

  longnet-ref generate --checkpoint train-text/checkpoint.npz --prompt "Dilated attention"
  longnet-ref generate --checkpoint train-passkey/checkpoint.npz --prompt 3
"""
SAMPLING = {"max_new_tokens": 200, "temperature": 0.8, "top_k": None}
"""The sampling options (text checkpoints only) and their defaults."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint.npz written by longnet-ref train")
    p.add_argument("--prompt", required=True, help="text to continue (text checkpoint) or the passkey to hide, 1-8 (passkey checkpoint)")
    hide = argparse.SUPPRESS
    p.add_argument(
        "--max-new-tokens", type=non_negative_int, default=hide, help=f"text: bytes to generate after the prompt (default: {SAMPLING['max_new_tokens']})"
    )
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=hide,
        help=f"text: softmax temperature of the sampling, 0 for greedy (default: {SAMPLING['temperature']})",
    )
    p.add_argument("--top-k", type=positive_int, default=hide, help="text: sample among the k most likely bytes only (default: all of them)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampling (text) or of the passkey sequence's filler (passkey)")


def run(args: argparse.Namespace) -> int:
    """Check the checkpoint and the options, then print the continuation or the passkey answer.

    Raises:
        UsageError, ValueError: A bad checkpoint, prompt or option; nothing has been printed.
    """
    check_input_file(args.checkpoint, "--checkpoint")
    state, extra = load_checkpoint(args.checkpoint)
    task = extra.get("task")
    if task == "text" and state.config.vocab_size == 256:
        return _continue_text(args, state)
    if task == "passkey":
        return _answer_passkey(args, state, extra)
    raise UsageError(f"--checkpoint {args.checkpoint}: it does not say which task it was trained on (neither text nor passkey)")


def _continue_text(args, state) -> int:
    options = SAMPLING | {k: v for k, v in vars(args).items() if k in SAMPLING}
    prompt_bytes = os.fsencode(args.prompt)  # the bytes the user typed, whatever the locale
    if not prompt_bytes:
        raise UsageError("--prompt must not be empty")
    config = state.config
    rows = len(prompt_bytes) + options["max_new_tokens"]
    # generate() keeps every token drawn (a small array each, ~100 bytes, then one int64 array)
    needed = {"the generated tokens": rows * (100 + 8)}
    if config.attention == "dense":  # the dense cache keeps every row: (keys, values) x layers x positions,
        itemsize = np.dtype(config.dtype).itemsize  # grown by doubling
        needed["dense KV caches"] = 2 * 2 * config.n_layers * rows * config.d_model * itemsize
    refuse_if_too_big(needed, f"--max-new-tokens {options['max_new_tokens']}", "lower --max-new-tokens")
    prompt = np.frombuffer(prompt_bytes, np.uint8).astype(np.int64)  # (T,)
    out = sys.stdout
    write = out.buffer.write if hasattr(out, "buffer") else (lambda data: out.write(data.decode("latin-1")))
    out.flush()
    write(prompt_bytes)
    out.flush()

    def emit(token):  # (1,) the byte just drawn
        write(bytes([int(token[0])]))
        out.flush()

    generate(config, state.params, prompt, options["max_new_tokens"], temperature=options["temperature"], top_k=options["top_k"], seed=args.seed, on_token=emit)
    write(b"\n")
    out.flush()
    return 0


def _answer_passkey(args, state, extra: dict) -> int:
    given = [f"--{k.replace('_', '-')}" for k in SAMPLING if k in vars(args)]
    if given:
        raise UsageError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to text checkpoints only; a passkey checkpoint answers with its most likely key"
        )
    n, span = extra.get("n"), extra.get("passkey_span")
    try:
        task = PasskeyTask(n, span=span)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--checkpoint {args.checkpoint}: its passkey task is not valid ({error})") from None
    if task.vocab_size != state.config.vocab_size:
        raise UsageError(f"--checkpoint {args.checkpoint}: the model's vocabulary ({state.config.vocab_size}) is not its passkey task's ({task.vocab_size})")
    try:
        key = int(args.prompt)
    except ValueError:
        key = None
    if key is None or not 1 <= key <= task.num_keys:
        raise UsageError(
            f"--prompt: {args.checkpoint} is a passkey-retrieval model, so --prompt is the passkey to "
            f"hide, an integer from 1 to {task.num_keys}, got {args.prompt!r} (to continue text, train "
            "on a file: longnet-ref train --text FILE)"
        )
    batch = task.batch(1, np.random.default_rng(args.seed), keys=[key])
    tokens = batch.tokens[0]  # (N,) filler, the key span times, the query marker last
    where = int(np.flatnonzero(tokens == key)[0])
    answer = int(generate(state.config, state.params, tokens, 1, temperature=0.0)[-1])
    times = f"{span} times from" if span > 1 else "at"
    print(f"passkey {key} hidden {times} position {where} of a {n}-token sequence (filler: --seed {args.seed}); asked for at position {n - 1}")
    print(f"answer: {answer} ({'correct' if answer == key else 'wrong'})")
    return 0
