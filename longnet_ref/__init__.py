"""longnet_ref: the reference implementation of LongNet's dilated attention (arXiv 2307.02486).

The public contract of SPEC §6 (the five attention functions), the drop-in layer
``MultiheadDilatedAttention``, the decoding caches ``DilatedKVCache`` / ``DenseKVCache`` and the
``InputTypeError`` raised for a wrong type (SPEC §7); re-exported, nothing else. One submodule is
public API too and imported here, so ``longnet_ref.complexity`` works after ``import longnet_ref``:
``complexity`` (exact pair/FLOP counts, the paper's closed forms, path lengths).
The specification is ``docs/spec.md``; the documentation site is built from ``docs/`` with
``mkdocs serve`` (or ``mkdocs build --strict``), and starts at ``docs/overview.md``.
"""

from . import complexity
from .attention import dilated_attention, dilated_attention_backward
from .validation import InputTypeError
from .decode import DenseKVCache, DilatedKVCache
from .dense import dense_attention, dense_attention_backward
from .multiplicity import multiplicity
from .nn import MultiheadDilatedAttention

__all__ = [
    "DenseKVCache",
    "DilatedKVCache",
    "InputTypeError",
    "MultiheadDilatedAttention",
    "complexity",
    "dense_attention",
    "dense_attention_backward",
    "dilated_attention",
    "dilated_attention_backward",
    "multiplicity",
]
__version__ = "0.1.0"
