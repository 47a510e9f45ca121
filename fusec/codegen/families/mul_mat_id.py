"""MUL_MAT_ID kernels (ggml_mul_mat_id): a matrix-vector kernel per (token, expert slot), reading only
the selected experts' weights (the decode case of a Mixture-of-Experts FFN)."""

from __future__ import annotations

from ...errors import CodegenError
from ...ir.tensor import Tensor
from .. import family
from ..env import TYPE_NAMES, render
from ..kernel import Binding, Kernel
from ..layout import ceil_div, layout_params
from .mul_mat import EXT, MAX_GRID, VEC_ROWS, VEC_WG, _vector_name, vec4_ok


@family("mul_mat_id", ops=("MUL_MAT_ID",))
def emit_mul_mat_id(node: Tensor, backend: str) -> Kernel:
    """Kernel for MUL_MAT_ID with ggml_mul_mat_id semantics: ``dst[t][e][m] = sum_k
    as[ids[t][e]][m][k] * b[t][e % B1][k]``.

    Shapes (ggml ``ne``): ``src0`` (as) f32/f16 ``[K, M, n_as, 1]``, one matrix per expert;
    ``src1`` (b) f32 ``[K, B1, T, 1]`` (``B1`` 1: every slot reads the token's vector, or the number
    of slots); ``src2`` (ids) i32 ``[E, T, 1, 1]``; all with any strides (rows contiguous in as);
    ``dst`` f32 ``[M, E, T, 1]``, contiguous. f16 weights are widened, products accumulated in f32.

    Algorithm: the matrix-vector kernel of :mod:`.mul_mat` with the batch index replaced by the
    (slot, token) pair: grid z = ``e + E·t``; each workgroup of 128 threads reads its expert id from
    ``ids``, then reduces 4 rows of that expert's matrix over K (4-vector loads when
    :func:`~.mul_mat.vec4_ok` holds for as and b). Only the selected experts' rows are read, so
    ``n_as`` may be large; every (slot, token) re-reads its expert's rows, which suits decode (few
    tokens), not prompts. An expert id outside ``[0, n_as)`` is clamped on WGSL and not checked on
    CUDA/MSL (as ggml's GPU backends; the interpreter raises).

    Raises :class:`CodegenError` for a node that is not MUL_MAT_ID or more than 65535 (slot,
    token) pairs.
    """
    if node.op != "MUL_MAT_ID":
        raise CodegenError(f"node {node.name!r}: mul_mat_id family renders MUL_MAT_ID, not {node.op}")
    a, b, ids = node.src[0], node.src[1], node.src[2]
    pairs = ids.ne[0] * ids.ne[1]
    if pairs > MAX_GRID:
        raise CodegenError(f"node {node.name!r}: {pairs} (expert slot, token) pairs exceed the grid limit {MAX_GRID}")
    vec4 = vec4_ok(a) and vec4_ok(b)
    tn = TYPE_NAMES[backend]
    bindings = [Binding("src0", a, a.dtype), Binding("src1", b, b.dtype), Binding("ids", ids, ids.dtype),
                Binding("dst", node, node.dtype, write=True)]
    elem_types = [tn[a.dtype], tn[b.dtype], tn[ids.dtype], tn[node.dtype]]
    if vec4:
        elem_types[:2] = [_vector_name(backend, tn[a.dtype]), _vector_name(backend, tn[b.dtype])]
    params = (layout_params("src0", a) + layout_params("src1", b) + layout_params("ids", ids)
              + layout_params("dst", node, ne=False))
    entry = f"mul_mat_id_vec_{a.dtype}_{b.dtype}{'_v4' if vec4 else ''}"
    groups = ceil_div(a.ne[1], VEC_ROWS)
    gx = min(groups, MAX_GRID)
    wg, grid = (VEC_WG, 1, 1), (gx, ceil_div(groups, gx), pairs)
    source = render(f"{backend}/mul_mat_id.{EXT[backend]}.j2", backend=backend, entry=entry, node_name=node.name,
                    bindings=bindings, elem_types=elem_types, params=params, vec4=vec4, wg=wg, vec_rows=VEC_ROWS,
                    ta=tn[a.dtype], threads=VEC_WG)
    return Kernel(backend, "mul_mat_id", entry, source, bindings, params, wg, grid, node, meta={"variant": "vec"})
