"""longnet_ref: the reference implementation of LongNet's dilated attention (arXiv 2307.02486).

The public contract of SPEC §6. Docs: https://longnet-ref docs (``mkdocs serve``).
"""

from .attention import dilated_attention, dilated_attention_backward
from .decode import DenseKVCache, DilatedKVCache
from .dense import dense_attention, dense_attention_backward
from .multiplicity import multiplicity
from .nn import MultiheadDilatedAttention

__all__ = [
    "DenseKVCache",
    "DilatedKVCache",
    "MultiheadDilatedAttention",
    "dense_attention",
    "dense_attention_backward",
    "dilated_attention",
    "dilated_attention_backward",
    "multiplicity",
]
__version__ = "0.1.0"
