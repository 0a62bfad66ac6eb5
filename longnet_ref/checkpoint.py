"""Checkpoints: the whole training state in one self-describing ``.npz`` file, written atomically.

One file holds

    param/<name>, adam_m/<name>, adam_v/<name>   the parameters and both AdamW moments (arrays)
    __meta__                                     UTF-8 JSON as a uint8 array: the format and its
                                                 version, both configs, the step, AdamW's t, the
                                                 data generator's state, the caller's ``extra``

so it is read with ``allow_pickle=False`` and nothing else needs to travel with it. A save
writes a temporary file in the same directory and renames it over the old one
(``os.replace``, atomic on POSIX): a run killed while saving leaves the previous checkpoint
intact. A load checks every field and every array before building the state; whatever is wrong
(not a file, not a ``.npz``, truncated, another program's ``.npz``, broken or incomplete JSON,
a missing or misshapen array) is one ``ValueError`` naming the file and the problem.
Docs: ``docs/model.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from . import model as lm
from .train import AdamW, TrainConfig, TrainState

FORMAT = "longnet-ref checkpoint"
VERSION = 1
META = "__meta__"
ARRAY_GROUPS = ("param", "adam_m", "adam_v")
"""The three dicts of arrays, stored as ``<group>/<parameter name>``."""


def save_checkpoint(state: TrainState, path, extra: dict | None = None) -> Path:
    """Write ``state`` (and the JSON-serialisable ``extra``) to ``path``, atomically.

    Args:
        state: The training state: configs, params, AdamW moments and step, the data RNG.
        path: The file to write, used as given (``.npz`` by convention); its directory is created.
        extra: More metadata for the caller (the task), returned by :func:`load_checkpoint`.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    arrays = {f"param/{k}": v for k, v in state.params.items()}
    arrays |= {f"adam_m/{k}": v for k, v in state.optimizer.m.items()}
    arrays |= {f"adam_v/{k}": v for k, v in state.optimizer.v.items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": state.config.to_dict(),
        "train": dataclasses.asdict(state.train),
        "step": state.step,
        "adam_t": state.optimizer.t,
        "rng": state.rng.bit_generator.state,
        "extra": extra or {},
    }
    arrays[META] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, arrays)
    return path


def _write_atomically(path: Path, arrays: dict) -> None:
    """``np.savez`` into a temporary file beside ``path``, then rename it over ``path``."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class _Invalid(ValueError):
    pass


def _require(condition, message: str) -> None:
    if not condition:
        raise _Invalid(message)


def _integer_field(meta: dict, name: str) -> int:
    value = meta.get(name)
    _require(name in meta, f"its metadata has no {name!r}")
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{name!r} must be a non-negative integer, got {value!r}")
    return value


def _dict_field(meta: dict, name: str, fields=None) -> dict:
    _require(name in meta, f"its metadata has no {name!r}")
    value = meta[name]
    _require(isinstance(value, dict), f"{name!r} must be a JSON object, got {type(value).__name__}")
    if fields is not None:
        missing, unknown = sorted(set(fields) - set(value)), sorted(set(value) - set(fields))
        _require(not missing, f"{name!r} lacks {', '.join(map(repr, missing))}")
        _require(not unknown, f"{name!r} has unknown fields {', '.join(map(repr, unknown))}")
    return value


def _read_meta(archive, files) -> dict:
    _require(META in files, f"it has no {META!r} entry: not a longnet-ref checkpoint (a foreign .npz, or one written before checkpoints were one file)")
    raw = archive[META]
    _require(raw.dtype == np.uint8 and raw.ndim == 1, f"its {META!r} entry is not UTF-8 JSON bytes")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Invalid(f"its metadata is not valid JSON ({error})") from None
    _require(isinstance(meta, dict), "its metadata is not a JSON object")
    _require(meta.get("format") == FORMAT, f"its metadata's format is {meta.get('format')!r}, not {FORMAT!r}")
    _require(meta.get("version") == VERSION, f"it has format version {meta.get('version')!r}; this version of longnet-ref reads version {VERSION}")
    return meta


def _state(archive, files, meta: dict) -> tuple[TrainState, dict]:
    fields = lambda cls: [f.name for f in dataclasses.fields(cls)]
    try:
        config = lm.LongNetConfig.from_dict(_dict_field(meta, "model", fields(lm.LongNetConfig)))
    except (TypeError, ValueError) as error:
        raise _Invalid(f"'model': {error}") from None
    try:
        train = TrainConfig(**_dict_field(meta, "train", fields(TrainConfig)))
    except (TypeError, ValueError) as error:
        raise _Invalid(f"'train': {error}") from None
    step, adam_t = _integer_field(meta, "step"), _integer_field(meta, "adam_t")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = _dict_field(meta, "rng")
    except (TypeError, ValueError, KeyError) as error:
        raise _Invalid(f"'rng' is not a state of NumPy's {type(rng.bit_generator).__name__} ({error!r})") from None
    extra = _dict_field(meta, "extra")

    expected = {f"{group}/{name}" for group in ARRAY_GROUPS for name in lm.parameter_shapes(config)}
    present = set(files) - {META}
    missing, unknown = sorted(expected - present), sorted(present - expected)
    _require(not missing, f"it lacks the arrays {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    _require(not unknown, f"it has unexpected arrays {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    groups = {group: {name: archive[f"{group}/{name}"] for name in lm.parameter_shapes(config)} for group in ARRAY_GROUPS}
    for group, arrays in groups.items():
        try:
            lm.check_params(config, arrays)
        except (TypeError, ValueError) as error:
            raise _Invalid(f"{group}: {error}") from None
    optimizer = AdamW(groups["adam_m"], groups["adam_v"], adam_t)
    return TrainState(config, train, groups["param"], optimizer, rng, step), extra


def load_checkpoint(path) -> tuple[TrainState, dict]:
    """The state saved by :func:`save_checkpoint`, and its ``extra``; every field checked.

    Args:
        path: The checkpoint file, used as given.

    Returns:
        ``(state, extra)``.

    Raises:
        ValueError: One line, ``checkpoint 'PATH': <what is wrong>``: the file does not exist, is
            a directory, is not a ``.npz`` archive (or is truncated), is another program's
            ``.npz``, or its metadata or arrays are broken, incomplete or inconsistent.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.exists():
        raise ValueError(f"{where} does not exist")
    if path.is_dir():
        raise ValueError(f"{where} is a directory, not a checkpoint file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{where} is not a longnet-ref checkpoint: not a .npz archive (or a truncated one)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = archive.files
            return _state(archive, files, _read_meta(archive, files))
    except _Invalid as error:
        raise ValueError(f"{where}: {error}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, ValueError) as error:  # a damaged member
        raise ValueError(f"{where} is damaged (truncated or corrupt): {error}") from None
