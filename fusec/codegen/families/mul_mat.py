"""MUL_MAT kernels (ggml_mul_mat): a tiled matrix-matrix kernel and a matrix-vector kernel for
``N == 1`` (decode), chosen from the shapes."""

from __future__ import annotations

from ...errors import CodegenError
from ...ir.tensor import Tensor
from .. import family
from ..env import TYPE_NAMES, render
from ..kernel import Binding, Kernel
from ..layout import ceil_div, elem_offset, elem_strides, layout_params

MAX_GRID = 65535
TILE = 64  # tiled variant: TILE x TILE outputs per workgroup of 16 x 16 threads (4 x 4 each), k-slices of 16
TILE_K = 16
VEC_WG = 128  # matrix-vector variant: threads per workgroup
VEC_ROWS = 4  # matrix-vector variant: output rows per workgroup
EXT = {"wgsl": "wgsl", "cuda": "cu", "msl": "metal"}
VECTOR_TYPES = {"wgsl": "vec4<{}>", "cuda": "{}4", "msl": "{}4"}


def vec4_ok(t: Tensor) -> bool:
    """True when every row of ``t`` can be read as 4-element vectors: contiguous rows, ``ne[0]``,
    row strides and offset all multiples of 4 elements (16-byte aligned for f32, 8 for f16)."""
    nb = elem_strides(t)
    return nb[0] == 1 and t.ne[0] % 4 == 0 and all(s % 4 == 0 for s in nb[1:]) and elem_offset(t) % 4 == 0


def _vector_name(backend: str, scalar: str) -> str:
    if backend == "cuda" and scalar == "half":
        return "fusec_half4"
    return VECTOR_TYPES[backend].format(scalar)


@family("mul_mat", ops=("MUL_MAT",))
def emit_mul_mat(node: Tensor, backend: str) -> Kernel:
    """Kernel for MUL_MAT with ggml_mul_mat semantics: ``dst[b3][b2][n][m] = sum_k a[a3][a2][m][k] *
    b[b3][b2][n][k]`` (result = b·aᵀ per batch).

    ``src[0]`` a: f32 or f16 ``ne = [K, M, A2, A3]``; ``src[1]`` b: f32 ``ne = [K, N, B2, B3]``; both
    with any strides (views of the KV cache, permuted Q). a broadcasts over dims 2/3 as ggml does
    (``r2 = B2/A2``, ``r3 = B3/A3``: batch ``i2`` of b uses batch ``i2 / r2`` of a, grouped-query
    attention). Result f32 ``ne = [M, N, B2, B3]``; f16 weights are widened to f32 and every product
    is accumulated in f32.

    Variants: ``N == 1`` gives the matrix-vector kernel (``mul_mat_vec_*``: 128 threads reduce 4 rows
    over K, rows folded into a 2-D grid; ``_v4`` reads both operands as 4-vectors when
    :func:`vec4_ok` holds for both); otherwise the tiled kernel (``mul_mat_*_tile64``: 64 x 64 output
    tiles staged through workgroup memory in k-slices of 16). Batches go to grid z.

    Raises :class:`CodegenError` for a node that is not MUL_MAT or more than 65535 batches.
    """
    if node.op != "MUL_MAT":
        raise CodegenError(f"node {node.name!r}: mul_mat family renders MUL_MAT, not {node.op}")
    a, b = node.src[0], node.src[1]
    batches = b.ne[2] * b.ne[3]
    if batches > MAX_GRID:
        raise CodegenError(f"node {node.name!r}: {batches} matmul batches exceed the grid limit {MAX_GRID}")
    gemv = b.ne[1] == 1
    vec4 = gemv and vec4_ok(a) and vec4_ok(b)
    tn = TYPE_NAMES[backend]
    bindings = [Binding("src0", a, a.dtype), Binding("src1", b, b.dtype), Binding("dst", node, node.dtype, write=True)]
    elem_types = [tn[a.dtype], tn[b.dtype], tn[node.dtype]]
    if vec4:
        elem_types[:2] = [_vector_name(backend, tn[a.dtype]), _vector_name(backend, tn[b.dtype])]
    params = layout_params("src0", a) + layout_params("src1", b) + layout_params("dst", node, ne=False)
    params += [("r2", "u32", b.ne[2] // a.ne[2]), ("r3", "u32", b.ne[3] // a.ne[3])]
    if gemv:
        entry = f"mul_mat_vec_{a.dtype}_{b.dtype}{'_v4' if vec4 else ''}"
        groups = ceil_div(a.ne[1], VEC_ROWS)
        gx = min(groups, MAX_GRID)
        wg, grid = (VEC_WG, 1, 1), (gx, ceil_div(groups, gx), batches)
    else:
        entry = f"mul_mat_{a.dtype}_{b.dtype}_tile{TILE}"
        wg, grid = (TILE // 4, TILE // 4, 1), (ceil_div(a.ne[1], TILE), ceil_div(b.ne[1], TILE), batches)
        if max(grid) > MAX_GRID:
            raise CodegenError(f"node {node.name!r}: tiled matmul grid {grid} exceeds {MAX_GRID} per dimension")
    source = render(f"{backend}/mul_mat.{EXT[backend]}.j2", backend=backend, gemv=gemv, entry=entry,
                    node_name=node.name, bindings=bindings,
                    elem_types=elem_types, params=params, vec4=vec4, wg=wg, tile=TILE, tile_k=TILE_K,
                    vec_rows=VEC_ROWS, ta=tn[a.dtype], threads=wg[0] * wg[1])
    return Kernel(backend, "mul_mat", entry, source, bindings, params, wg, grid, node,
                  meta={"variant": "vec" if gemv else "tile"})
