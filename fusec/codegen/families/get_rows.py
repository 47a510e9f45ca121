"""``get_rows`` family: GET_ROWS, gathering rows by i32 index."""

from __future__ import annotations

from ...ir.tensor import Tensor
from .. import family
from ..kernel import Binding, Kernel
from ..layout import layout_params
from .elementwise import emit_move


@family("get_rows", ops=("GET_ROWS",))
def emit_get_rows(node: Tensor, backend: str) -> Kernel:
    """Kernel gathering rows (ggml_get_rows).

    Shapes (ggml ``ne``, innermost first): ``src0`` ``[n, R, a2, a3]`` (f32/f16, or i32), any strides;
    ``src1`` i32 row indices ``[k, a2, a3, 1]``, any strides; ``dst`` contiguous ``[n, k, a2, a3]``,
    f32 (i32 for an i32 source), with ``dst[i3][i2][i1][i0] = src0[i3][i2][src1[i3][i2][i1]][i0]``.
    Indices outside ``[0, R)`` are not checked (as ggml; WGSL clamps the read, CUDA/MSL read out of
    bounds). One thread per element of ``dst``.

    Bindings: ``src0``, ``src1``, ``dst`` (written). Raises :class:`fusec.errors.CodegenError` for an
    unknown backend or strides that are not whole elements.
    """
    a, idx = node.src
    params = (layout_params("dst", node, nb=False, offs=False) + layout_params("src", a, ne=False)
              + layout_params("idx", idx, ne=False))
    return emit_move(node, backend, family="get_rows", op=node.op, src=Binding("src0", a, a.dtype),
                     dst=Binding("dst", node, node.dtype, write=True), extra=[Binding("src1", idx, idx.dtype)],
                     params=params, n_threads=node.nelements)
