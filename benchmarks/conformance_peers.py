"""Run the conformance kit (``longnet_ref.conformance``) on the public implementations of dilated
attention, on CPU, and write ``benchmarks/results/conformance_peers.json``.

    python benchmarks/conformance_peers.py --torchscale /tmp/torchscale --examples 20
    python benchmarks/conformance_peers.py --show benchmarks/results/conformance_peers.json

Needs PyTorch and einops, plus ``dilated-attention-pytorch==0.2.0`` and ``longnet==0.5.7``
installed with ``--no-deps`` (their GPU dependencies are replaced, see REPLACED). ``--show``
prints the docs table from a JSON file and needs neither.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "conformance_peers.json"

REPLACED = {
    "torchscale": "flash_attn_func (flash-attn / xformers, GPU only; None on CPU) in torchscale.component.multihead_attention "
    "replaced by plain softmax attention returning (out, lse) in the same (b, l, h, d) / (b, h, l) layout, scale 1/sqrt(d), "
    "causal = lower-triangular mask; q/k/v/out projections replaced by torch.nn.Identity",
    "fkodom": "xformers.ops (memory_efficient_attention, LowerTriangularMask, AttentionOp) replaced by a stub module whose "
    "memory_efficient_attention is plain softmax attention in the (b, s, h, d) layout, scale 1/sqrt(d), causal = lower-triangular mask",
    "kyegomez": "zeta.nn.attention.flash_attention.FlashAttention (zetascale; on CPU it calls F.scaled_dot_product_attention) "
    "replaced by plain softmax attention over the last two axes, scale 1/sqrt(d), causal = lower-triangular mask; "
    "proj_q/proj_k/proj_v replaced so that q, k, v can differ: the module's own split-and-sparsify runs on k and v and the "
    "results are fed to its attention (the module projects one input x)",
}


def plain_attention(torch, q, k, v, causal, scale=None):
    """softmax(scale q k^T) v over the last two axes: ``q (..., i, d)``, ``k (..., j, d)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("...id,...jd->...ij", q, k) * scale
    if causal:
        i, j = s.shape[-2:]
        s = s.masked_fill(torch.ones(i, j, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


# -- microsoft/torchscale ------------------------------------------------------------------------


def torchscale_forward(torch, path):
    sys.path.insert(0, str(path))
    import torchscale.component.multihead_attention as mha
    from torchscale.component.dilated_attention import DilatedAttention

    def flash_attn_func(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):  # (b, l, h, d)
        assert bias is None and dropout == 0.0
        out, lse = plain_attention(torch, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal, softmax_scale)
        return out.transpose(1, 2), lse  # (b, l, h, d), (b, h, l)

    mha.flash_attn_func = flash_attn_func

    def forward(q, k, v, segment_lengths, dilation_rates, *, causal):
        batch, n, heads, dim = q.shape
        args = types.SimpleNamespace(
            flash_attention=True,
            segment_length=list(segment_lengths),
            dilated_ratio=list(dilation_rates),
            seq_parallel=False,
            xpos_rel_pos=False,
            multiway=False,
            layernorm_eps=1e-5,
        )
        layer = DilatedAttention(args, heads * dim, heads, self_attention=True).to(q.dtype)
        # identity projections as modules, not as weight I: x @ I would mix a NaN into every feature
        layer.q_proj = layer.k_proj = layer.v_proj = layer.out_proj = torch.nn.Identity()
        out, _ = layer(*(x.reshape(batch, n, heads * dim) for x in (q, k, v)), is_causal=causal)
        return out.reshape(batch, n, heads, dim)

    return forward


# -- fkodom/dilated-attention-pytorch 0.2.0 ----------------------------------------------------------


def fkodom_forward(torch):
    class LowerTriangularMask:
        pass

    def memory_efficient_attention(query, key, value, op=None, attn_bias=None):  # (b, s, h, d)
        out, _ = plain_attention(torch, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), isinstance(attn_bias, LowerTriangularMask))
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, ops.LowerTriangularMask, ops.AttentionOp = memory_efficient_attention, LowerTriangularMask, object
    xformers = types.ModuleType("xformers")
    xformers.ops = ops
    sys.modules.update({"xformers": xformers, "xformers.ops": ops})
    from dilated_attention_pytorch.dilated_attention import DilatedAttention

    def forward(q, k, v, segment_lengths, dilation_rates, *, causal):
        return DilatedAttention(list(segment_lengths), list(dilation_rates))(q, k, v, is_causal=causal)

    return forward


# -- kyegomez/LongNet 0.5.7 ----------------------------------------------------------------------


def kyegomez_forward(torch):
    class FlashAttention(torch.nn.Module):
        def __init__(self, causal=False, dropout=0.0, flash=True):
            super().__init__()
            self.causal = causal

        def forward(self, q, k, v, mask=None, attn_bias=None):  # (b, h, n, d)
            return plain_attention(torch, q, k, v, self.causal)[0]

    for name in ("zeta", "zeta.nn", "zeta.nn.attention", "zeta.nn.attention.flash_attention"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["zeta.nn.attention.flash_attention"].FlashAttention = FlashAttention
    from long_net.attention import DilatedAttention

    class Capture(torch.nn.Module):
        """A projection that returns a stored tensor, or records its input (the sparsified x)."""

        def __init__(self):
            super().__init__()
            self.stored = self.seen = None

        def forward(self, x):
            self.seen = x
            return x if self.stored is None else self.stored

    def forward(q, k, v, segment_lengths, dilation_rates, *, causal):
        batch, n, heads, dim = q.shape
        assert heads == 1 and len(segment_lengths) == 1  # one head, one branch: the module's own domain
        layer = DilatedAttention(dim, 1, dilation_rates[0], segment_lengths[0], causal=causal, dtype=q.dtype, device="cpu")
        layer.proj_q, layer.proj_k, layer.proj_v = Capture(), Capture(), Capture()
        sparse = []
        for x in (k, v):  # the module's own split-and-sparsify of k and v
            layer(x.reshape(batch, n, dim))
            sparse.append(layer.proj_q.seen)
        layer.proj_k.stored, layer.proj_v.stored = sparse
        out = layer(q.reshape(batch, n, dim))
        return out.reshape(batch, -1, 1, dim)

    return forward


PEERS = {
    "torchscale": dict(name="microsoft/torchscale DilatedAttention", offsets="torchscale", domain=["dv_equals_d"]),
    "fkodom": dict(name="dilated-attention-pytorch 0.2.0 (fkodom)", offsets="paper", domain=["dv_equals_d", "n_multiple_of_w"]),
    "kyegomez": dict(name="longnet 0.5.7 (kyegomez)", offsets="paper", domain=["dv_equals_d", "one_branch", "one_head"]),
}


def run(args) -> dict:
    import torch

    from longnet_ref.conformance import check

    torch.set_num_threads(1)
    makers = {
        "torchscale": lambda: torchscale_forward(torch, args.torchscale),
        "fkodom": lambda: fkodom_forward(torch),
        "kyegomez": lambda: kyegomez_forward(torch),
    }
    results = {"command": " ".join(["python", "benchmarks/conformance_peers.py", *sys.argv[1:]]), "torch": torch.__version__, "peers": {}}
    for key, peer in PEERS.items():
        entry = {"name": peer["name"], "offsets": peer["offsets"], "domain": peer["domain"], "replaced": REPLACED[key]}
        try:
            forward = makers[key]()
        except Exception as error:  # noqa: BLE001 (record why it cannot run)
            entry.update(runs=False, why=f"{type(error).__name__}: {error}")
        else:
            report = check(forward, offsets=peer["offsets"], domain=peer["domain"], framework="torch", max_examples=args.examples, seed=args.seed)
            entry.update(runs=True, report=json.loads(report.to_json()))
            print(f"== {peer['name']}\n{report}\n", flush=True)
        results["peers"][key] = entry
    return results


def table(results: dict) -> str:
    """The docs table: one row per section, one column per implementation."""
    peers = results["peers"]
    lines = ["| section | " + " | ".join(p["name"] for p in peers.values()) + " |", "| --- |" + " --- |" * len(peers)]
    sections = next(p["report"]["sections"] for p in peers.values() if p["runs"])
    for i, section in enumerate(sections):
        cells = [p["report"]["sections"][i]["status"] if p["runs"] else "cannot run" for p in peers.values()]
        lines.append(f"| {section['section']} {section['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counterexamples(results: dict) -> str:
    lines = []
    for p in results["peers"].values():
        if not p["runs"]:
            lines.append(f"- **{p['name']}**: cannot run: {p['why']}")
            continue
        for f in p["report"]["failures"]:
            lines.append(f"- **{p['name']}**, {f['section']}: {f['message']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchscale", type=Path, default=Path("/tmp/torchscale"), help="directory holding the torchscale package")
    parser.add_argument("--examples", type=int, default=20, help="configurations per section")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--show", type=Path, help="print the docs table from this JSON file and exit (no torch needed)")
    args = parser.parse_args(argv)
    if args.show:
        results = json.loads(args.show.read_text())
        print(table(results))
        print()
        print(counterexamples(results))
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("skipped: PyTorch is not installed (pip install torch einops)")
        return 0
    results = run(args)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
