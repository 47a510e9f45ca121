"""``argsort`` family: ARGSORT (ggml_argsort), one workgroup per row, a bitonic sort in workgroup memory."""

from __future__ import annotations

from ...errors import CodegenError
from ...ir.tensor import Tensor
from .. import family
from ..env import TYPE_NAMES, render
from ..kernel import Binding, Kernel
from ..layout import layout_params
from .soft_max import row_grid

TEMPLATES = {"wgsl": "wgsl/argsort.wgsl.j2", "cuda": "cuda/argsort.cu.j2", "msl": "msl/argsort.metal.j2"}
MAX_COLS = 1024
"""Longest row sorted in workgroup memory (indices and values of the padded row: 8 KiB at 1024)."""
MAX_WG = 256


def padded_cols(n: int) -> int:
    """The power of two the bitonic network sorts: the smallest ``2^k >= n``."""
    return 1 << max(0, (int(n) - 1).bit_length())


@family("argsort", ops=("ARGSORT",))
def emit_argsort(node: Tensor, backend: str) -> Kernel:
    """Kernel for ARGSORT with ggml_argsort semantics: per row over ``ne[0]``, the column indices
    ``0..n-1`` ordered by value, ascending (``order`` 0) or descending (1).

    Shapes (ggml ``ne`` order): ``src0`` f32 ``ne = [n, r1, r2, r3]``, any element strides (a view),
    ``n <= 1024``; ``dst`` i32, same ``ne``, contiguous. Algorithm (as ggml's CUDA/Vulkan/Metal
    argsort): the row is loaded into workgroup memory, padded to ``npad`` (the next power of two),
    and sorted by a bitonic network of ``log2(npad)·(log2(npad)+1)/2`` compare-exchange passes
    separated by workgroup barriers; padding sorts after every real column. The comparison is a
    strict total order: equal values are ordered by ascending column index (ggml-cpu's ``std::sort``
    leaves ties unspecified; fusec's interpreter sorts stably, so results match exactly), NaN
    positions are unspecified.

    Launch: one workgroup of ``min(max(npad, 32), 256)`` threads per row, rows folded into a 2-D grid.
    Bindings: ``src0``, ``dst`` (written). Raises :class:`CodegenError` for another op, ``n > 1024``
    (the message names the node) or strides that are not whole elements.
    """
    if node.op != "ARGSORT":
        raise CodegenError(f"node {node.name!r}: argsort family renders ARGSORT, not {node.op}")
    x = node.src[0]
    n = int(x.ne[0])
    if n > MAX_COLS:
        raise CodegenError(f"node {node.name!r}: ARGSORT rows of {n} columns exceed the {MAX_COLS} the "
                           "workgroup-memory bitonic sort holds")
    npad = padded_cols(n)
    wg = min(max(npad, 32), MAX_WG)
    desc = int(node.params.get("order", 0)) == 1
    bindings = [Binding("src0", x, x.dtype), Binding("dst", node, node.dtype, write=True)]
    params = layout_params("src0", x) + layout_params("dst", node, ne=False)
    entry = f"argsort_f32_{'desc' if desc else 'asc'}_n{npad}"
    source = render(TEMPLATES[backend], backend=backend, entry=entry, node_name=node.name, wg=wg, threads=wg,
                    npad=npad, desc=desc, bindings=bindings,
                    elem_types=[TYPE_NAMES[backend][b.dtype] for b in bindings], params=params)
    nrows = x.ne[1] * x.ne[2] * x.ne[3]
    return Kernel(backend, "argsort", entry, source, bindings, params, (wg, 1, 1), row_grid(nrows), node,
                  meta={"npad": npad})
