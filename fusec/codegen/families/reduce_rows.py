"""``reduce_rows`` family: MEAN (ggml_mean) and SUM_ROWS (ggml_sum_rows), one workgroup per row."""

from __future__ import annotations

from ...errors import CodegenError
from ...ir.tensor import Tensor
from .. import family
from ..env import TYPE_NAMES, render
from ..kernel import Binding, Kernel
from ..layout import layout_params
from .soft_max import row_grid

TEMPLATES = {"wgsl": "wgsl/reduce_rows.wgsl.j2", "cuda": "cuda/reduce_rows.cu.j2", "msl": "msl/reduce_rows.metal.j2"}
REDUCTIONS = {"MEAN": "mean", "SUM_ROWS": "sum"}


@family("reduce_rows", ops=tuple(REDUCTIONS))
def emit_reduce_rows(node: Tensor, backend: str) -> Kernel:
    """Kernel reducing each row over ``ne[0]``: SUM_ROWS ``sum_i x[i]`` (ggml_sum_rows), MEAN
    ``(sum_i x[i]) / ne0`` (ggml_mean: the row sum divided by ``(float) ne0``).

    Shapes (ggml ``ne`` order, innermost first): ``src0`` f32 or f16 ``ne = [n, r1, r2, r3]``, any
    element strides (a view); ``dst`` f32 ``ne = [1, r1, r2, r3]``, contiguous. Arithmetic: f32
    registers, each thread sums a strided slice of the row, then a workgroup tree reduction (the
    order differs from ggml-cpu's sequential float64 ``ggml_vec_sum_f32``: results agree to f32
    rounding, relative error ~ ``log2(n) * 2^-24``).

    Launch: one workgroup of 64 threads per row (256 when ``n > 1024``), rows folded into a 2-D grid
    (``x <= 65535``). Bindings: ``src0``, ``dst`` (written). Raises :class:`CodegenError` for another
    op or strides that are not whole elements.
    """
    if node.op not in REDUCTIONS:
        raise CodegenError(f"node {node.name!r}: reduce_rows family renders {', '.join(REDUCTIONS)}, not {node.op}")
    x = node.src[0]
    wg = 64 if x.ne[0] <= 1024 else 256
    bindings = [Binding("src0", x, x.dtype), Binding("dst", node, node.dtype, write=True)]
    params = layout_params("src0", x) + layout_params("dst", node, ne=False)
    entry = f"{REDUCTIONS[node.op]}_rows_{x.dtype}_wg{wg}"
    source = render(TEMPLATES[backend], backend=backend, entry=entry, node_name=node.name, wg=wg, threads=wg,
                    reduction=REDUCTIONS[node.op], op=node.op, src_f16=str(x.dtype) == "f16",
                    bindings=bindings, elem_types=[TYPE_NAMES[backend][b.dtype] for b in bindings], params=params)
    nrows = x.ne[1] * x.ne[2] * x.ne[3]
    return Kernel(backend, "reduce_rows", entry, source, bindings, params, (wg, 1, 1), row_grid(nrows), node)
