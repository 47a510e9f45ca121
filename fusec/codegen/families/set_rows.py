"""``set_rows`` family: SET_ROWS, scattering rows into a destination by i32 index (KV-cache writes)."""

from __future__ import annotations

from ...ir.tensor import Tensor
from .. import family
from ..kernel import Binding, Kernel
from ..layout import layout_params
from .elementwise import emit_move


@family("set_rows", ops=("SET_ROWS",))
def emit_set_rows(node: Tensor, backend: str) -> Kernel:
    """Kernel scattering rows into the destination's memory (ggml_set_rows).

    Sources in ggml order: ``src[0]`` rows f32 ``ne = [n, k, b2, b3]`` (any strides); ``src[1]`` i32
    indices ``ne = [k, c1, c2, 1]`` with ``b2 % c1 == 0``, ``b3 % c2 == 0`` (any strides); ``src[2]`` the
    destination ``ne = [n, R, b2, b3]``, f32 or f16, a view with contiguous rows. For every element:
    ``dst[i3][i2][idx[i3 % c2][i2 % c1][i1]][i0] = rows[i3][i2][i1][i0]``, converted to the
    destination dtype (f16 rounds to nearest even). ``dst`` binds the destination's ROOT buffer
    (``write=True``) at its view's element offset and strides; elements outside the indexed rows are
    untouched. Repeated indices within one ``(i2, i3)`` slice race (ggml-cpu: the last row wins).

    One thread per element written (``n * k * b2 * b3`` threads), so one-element rows (the transposed
    V cache, ``n == 1``) spread over all threads. Bindings: ``src0``, ``src1``, ``dst`` (written).
    Raises :class:`fusec.errors.CodegenError` for an unknown backend or strides that are not whole
    elements.
    """
    rows, idx, _dest = node.src
    params = (layout_params("src", rows) + layout_params("idx", idx)
              + layout_params("dst", node, ne=False))
    return emit_move(node, backend, family="set_rows", op=node.op, src=Binding("src0", rows, rows.dtype),
                     dst=Binding("dst", node, node.dtype, write=True), extra=[Binding("src1", idx, idx.dtype)],
                     params=params, n_threads=rows.nelements)
