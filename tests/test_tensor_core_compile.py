"""The tensor-core kernels compile, without a GPU: NVRTC (cuda-python) for sm_80 and sm_90.

Every template instantiation the host (``longnet_ref/backends/tensor_core.py``) can launch is
compiled for the virtual architecture compute_80 (PTX: the C++ front end and NVVM, which check
that every wmma type is allowed on Ampere) and to sm_90 machine code (ptxas as well: registers
and spills), so a compile error never waits for a device. The same compile checks, by C++
``static_assert``, that the host's tile sizes and shared-memory sizes are the kernels' own and
that the .cu's copy of the index rules gives the values of ``longnet_ref.index_sets``. Machine code for sm_80 too would
double the ~20 s of CPU the ptxas step costs. NVRTC needs the CUDA headers ``mma.h`` (with ``crt/mma.h``), ``cuda_fp16.h`` and
``cuda_bf16.h``: the ``nvidia-cuda-runtime-cu12`` and ``nvidia-cuda-nvcc-cu12`` wheels (the
``test`` extra) ship them. Skipped, with the reason, only where those packages are absent.
This proves the source compiles; it says nothing about the kernels' results or speed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from longnet_ref import index_sets
from longnet_ref.backends import tensor_core_tiles as tiles


def _find(name):
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


PACKAGES = {"cuda.bindings": "cuda-bindings", "nvidia.cuda_nvrtc": "nvidia-cuda-nvrtc-cu12",
            "nvidia.cuda_runtime": "nvidia-cuda-runtime-cu12", "nvidia.cuda_nvcc": "nvidia-cuda-nvcc-cu12"}  # fmt: skip
ABSENT = [pip for module, pip in PACKAGES.items() if _find(module) is None]
pytestmark = pytest.mark.skipif(bool(ABSENT), reason=f"NVRTC packages not installed: {', '.join(ABSENT)} (pip install -e '.[test]')")


def include_dirs():
    """The CUDA header folders of the NVIDIA wheels: cuda_fp16.h etc. (runtime), crt/mma.h (nvcc)."""
    import nvidia.cuda_nvcc
    import nvidia.cuda_runtime

    return [str(Path(list(m.__path__)[0]) / "include") for m in (nvidia.cuda_runtime, nvidia.cuda_nvcc)]


def host_agreement():
    """C++ ``static_assert``s that the host's numbers (``tensor_core_tiles``) are the kernels' own.

    Appended to the source before compiling: the tile sizes, paddings and every dynamic shared
    memory size the host passes at launch (``shared_bytes``) against the .cu's constants and
    ``ForwardShared``/``BackwardShared`` structs, checked by the compiler, without a GPU.
    """
    checks = [
        f"static_assert(dilated::{name} == {getattr(tiles, name)}, \"{name}: host and kernel differ\");"
        for name in ("WARPS", "ROWS", "BLOCK_Q", "BLOCK_K", "THREADS", "PAD", "FLOAT_PAD")
    ]
    structs = {"forward_branch": "ForwardShared", "backward_keys_branch": "BackwardShared", "backward_queries_branch": "BackwardShared"}
    for kernel, struct in structs.items():
        for dtype, ctype in tiles.DTYPES.items():
            for d in tiles.HEAD_DIMS:
                expected = tiles.shared_bytes(kernel, 2, d, d)
                checks.append(f"static_assert(dilated::{struct}<{ctype}, {d}, {d}>::bytes == {expected}, \"shared_bytes({kernel}, {dtype}, {d})\");")
    return "\n// tests/test_tensor_core_compile.py: the host's numbers\n" + "\n".join(checks + index_rules()) + "\n"


def index_rules():
    """``static_assert``s that the .cu's transcription of the index rules gives ``index_sets``' values.

    ``segment_size`` over short, exact, ragged and empty segments, offsets past a short last
    segment, ``r > w``; ``segment_position`` and ``causal_key_count`` on a few rows. The values on
    the right are computed here by ``longnet_ref.index_sets``, the one home of these rules.
    """
    checks = []
    for n, w, r in [(1, 1, 1), (10, 4, 3), (100, 32, 5), (97, 40, 7), (5, 16, 9), (65536, 2048, 8), (70000, 16384, 8)]:
        for s in range(-(-n // w))[:4]:
            for o in range(min(r, 9)):
                checks.append(f"static_assert(dilated::segment_size({n}, {w}, {r}, {o}, {s}) == {index_sets.segment_size(n, w, r, o, s)}, \"segment_size\");")
                t = max(0, index_sets.segment_size(n, w, r, o, s) - 1)
                checks.append(
                    f"static_assert(dilated::segment_position({w}, {r}, {o}, {s}, {t}) == {index_sets.segment_position(w, r, o, s, t)}, \"segment_position\");"
                )
    checks += [f"static_assert(dilated::causal_key_count({t}) == {index_sets.causal_key_count(t)}, \"causal_key_count\");" for t in (0, 1, 63, 64)]
    return checks


def compile_all(architecture):
    """NVRTC-compile the kernel source with every instantiation; return (result, log, cubin bytes)."""
    from cuda.bindings import nvrtc

    source = (tiles.SOURCE.read_text() + host_agreement()).encode()
    status, program = nvrtc.nvrtcCreateProgram(source, tiles.SOURCE.name.encode(), 0, [], [])
    assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS
    try:
        for name in tiles.instantiations():
            (status,) = nvrtc.nvrtcAddNameExpression(program, name.encode())
            assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, name
        options = [*tiles.COMPILE_OPTIONS, f"--gpu-architecture={architecture}", "--ptxas-options=-v"]
        options += [f"-I{d}" for d in include_dirs()]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])
        _, size = nvrtc.nvrtcGetProgramLogSize(program)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(program, log)
        cubin_size = 0
        if result == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            get_size = nvrtc.nvrtcGetCUBINSize if architecture.startswith("sm_") else nvrtc.nvrtcGetPTXSize
            _, cubin_size = get_size(program)
            for name in tiles.instantiations():
                status, lowered = nvrtc.nvrtcGetLoweredName(program, name.encode())
                assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS and lowered, name
        return result, log.decode(errors="replace"), cubin_size  # cubin or PTX bytes
    finally:
        nvrtc.nvrtcDestroyProgram(program)


@pytest.mark.parametrize("architecture", tiles.ARCHITECTURES)
def test_every_instantiation_compiles_and_agrees_with_the_host(architecture):
    """Also fails (a static_assert) if tensor_core_tiles' sizes, or the .cu's index rules, drift."""
    from cuda.bindings import nvrtc

    result, log, cubin_size = compile_all(architecture)
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    assert cubin_size > 0
    if architecture.startswith("sm_"):  # machine code: ptxas reported every kernel
        entries = log.count("Compiling entry function")
        assert entries == len(tiles.instantiations()), log  # one kernel per instantiation, none dropped
        # Registers are indexed only by unrolled loops: nothing may go to local memory.
        assert log.count(" 0 bytes spill stores, 0 bytes spill loads") == entries, log
