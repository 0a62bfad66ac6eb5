"""A NumPy emulation of the tensor-core kernels' tile loop (``backends/cuda/dilated_attention.cu``).

It walks the blocks and tiles of ``tensor_core_tiles.tile_plan`` exactly as the kernels do:
tiles loaded with zeros past the segment, the score tile masked by the plan's ``attended``,
the online softmax per key tile in float32 (max, correction, sum), the weights ``P`` (and
``dS``) rounded to the input dtype before their products, float32 accumulators, per-branch
``o_i, lse_i`` mixed by ``mix_branches``, and the backward's two passes (dK/dV per key tile,
dQ per query tile) with the mixed ``LSE`` and ``Dsum``. The tests compare it with the NumPy
reference, so the algorithm (not the CUDA code) is verified on the CPU.
"""

from __future__ import annotations

import numpy as np

from longnet_ref.backends import tensor_core_tiles as tiles
from longnet_ref.reference import mix_branches

F32 = np.float32


def round_bfloat16(x):
    """float32 -> the nearest bfloat16 (ties to even), returned as float32 (NumPy has no bfloat16)."""
    bits = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(F32))


ROUNDING = {
    "float32": lambda x: x,  # no rounding: the algorithm alone
    "float16": lambda x: x.astype(np.float16).astype(F32),
    "bfloat16": round_bfloat16,
}


def _load(x, b, tile, h):
    """The gathered tile load: rows of ``x[b, :, h]`` at ``tile.positions``, zeros where not valid."""
    return np.where(tile.valid[:, None], x[b, tile.positions, h], 0).astype(F32)  # (rows, D)


def forward(q, k, v, branches, causal, scale, offsets, rounding="float32"):
    """``out, lse`` as the forward kernel computes them (one launch per branch, then SPEC §4)."""
    rnd = ROUNDING[rounding]
    batch, n, heads, _ = q.shape
    branch_out = np.zeros((len(branches), batch, n, heads, v.shape[3]), F32)  # o_i
    branch_lse = np.full((len(branches), batch, n, heads), -np.inf, F32)  # lse_i
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for block in tiles.tile_plan(n, heads, branches, offsets, causal, owner="queries"):
            for b in range(batch):
                for h in block.heads:
                    qt = _load(q, b, block, h)  # (BLOCK_Q, D)
                    m = np.full(tiles.BLOCK_Q, -np.inf, F32)
                    l = np.zeros(tiles.BLOCK_Q, F32)
                    acc = np.zeros((tiles.BLOCK_Q, v.shape[3]), F32)
                    for other in block.others:
                        kt, vt = _load(k, b, other, h), _load(v, b, other, h)  # (BLOCK_K, D), (BLOCK_K, Dv)
                        scores = np.where(other.attended, F32(scale) * (qt @ kt.T), -np.inf).astype(F32)
                        m_new = np.fmax(m, scores.max(axis=1))  # the kernels keep a NaN score instead
                        correction = np.where(m == -np.inf, F32(0), np.exp(m - m_new)).astype(F32)
                        shift = np.where(m_new == -np.inf, F32(0), m_new)
                        p = np.exp(scores - shift[:, None]).astype(F32)  # (BLOCK_Q, BLOCK_K)
                        l = l * correction + p.sum(axis=1)
                        acc = acc * correction[:, None] + rnd(p) @ vt  # P rounded to T for the P V product
                        m = m_new
                    rows = block.valid & (l != 0)
                    branch_out[block.branch, b, block.positions[rows], h] = acc[rows] / l[rows, None]
                    branch_lse[block.branch, b, block.positions[rows], h] = m[rows] + np.log(l[rows])
    out, lse = mix_branches(branch_out, branch_lse)
    return rnd(out), lse


def backward(dout, q, k, v, out, lse, branches, causal, scale, offsets, rounding="float32"):
    """``dq, dk, dv`` as the two backward kernels compute them (SPEC §5, mixed ``LSE`` and ``Dsum``)."""
    rnd = ROUNDING[rounding]
    batch, n, heads, _ = q.shape
    dsum = (dout.astype(F32) * out.astype(F32)).sum(axis=-1)  # (B, N, H)
    lse_read = np.where(lse == -np.inf, np.inf, lse).astype(F32)  # uncovered: P = exp(-inf) = 0
    dq, dk, dv = (np.zeros(x.shape, F32) for x in (q, k, v))

    def stats(b, tile, h):
        return np.where(tile.valid, lse_read[b, tile.positions, h], np.inf), np.where(tile.valid, dsum[b, tile.positions, h], 0)

    with np.errstate(invalid="ignore", over="ignore"):
        for block in tiles.tile_plan(n, heads, branches, offsets, causal, owner="keys"):  # dK, dV
            for b in range(batch):
                for h in block.heads:
                    kt, vt = _load(k, b, block, h), _load(v, b, block, h)
                    dk_acc = np.zeros(kt.shape, F32)
                    dv_acc = np.zeros(vt.shape, F32)
                    for other in block.others:  # query tiles
                        qt, dot = _load(q, b, other, h), _load(dout, b, other, h)
                        lse_q, dsum_q = stats(b, other, h)
                        p_t = np.where(other.attended, np.exp(F32(scale) * (kt @ qt.T) - lse_q[None, :]), 0).astype(F32)
                        ds_t = np.where(other.attended, p_t * ((vt @ dot.T) - dsum_q[None, :]), 0).astype(F32)
                        dv_acc += rnd(p_t) @ dot
                        dk_acc += rnd(ds_t) @ qt
                    dv[b, block.positions[block.valid], h] += dv_acc[block.valid]
                    dk[b, block.positions[block.valid], h] += F32(scale) * dk_acc[block.valid]
        for block in tiles.tile_plan(n, heads, branches, offsets, causal, owner="queries"):  # dQ
            for b in range(batch):
                for h in block.heads:
                    qt, dot = _load(q, b, block, h), _load(dout, b, block, h)
                    lse_q, dsum_q = stats(b, block, h)
                    dq_acc = np.zeros(qt.shape, F32)
                    for other in block.others:  # key tiles
                        kt, vt = _load(k, b, other, h), _load(v, b, other, h)
                        p = np.where(other.attended, np.exp(F32(scale) * (qt @ kt.T) - lse_q[:, None]), 0).astype(F32)
                        ds = np.where(other.attended, p * ((dot @ vt.T) - dsum_q[:, None]), 0).astype(F32)
                        dq_acc += rnd(ds) @ kt
                    dq[b, block.positions[block.valid], h] += F32(scale) * dq_acc[block.valid]
    return tuple(rnd(g) for g in (dq, dk, dv))
