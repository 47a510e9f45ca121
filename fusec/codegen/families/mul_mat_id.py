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

WGSL_MAX_BINDING = 1 << 27
"""Bytes one WGSL storage binding may cover: WebGPU's default ``maxStorageBufferBindingSize``
(128 MiB, lavapipe's limit too). Larger expert tensors are bound as several windows."""
WINDOW_ALIGN = 256  # WebGPU's largest minStorageBufferOffsetAlignment
MAX_WINDOWS = 16


def expert_windows(a: Tensor, limit: int) -> list[tuple[int, int, int]] | None:
    """How the WGSL kernel binds the expert matrices ``a`` (ne = [K, M, n_as]): ``None`` when the
    root's buffer fits one binding of ``limit`` bytes, else one ``(first expert, byte offset, byte
    size)`` per window: consecutive whole experts, each window starting at a multiple of 256 bytes
    and at most ``limit`` bytes long. Raises :class:`CodegenError` naming the node when one expert
    alone exceeds the limit or more than 16 windows would be needed."""
    if a.root.span_bytes <= limit:
        return None
    size = a.dtype.size
    one = (a.ne[0] - 1) * a.nb[0] + (a.ne[1] - 1) * a.nb[1] + size  # bytes spanned by one expert's matrix
    slack = WINDOW_ALIGN + 4  # start aligned down to 256 bytes, size rounded up to 4 (WebGPU's binding rules)
    per = (limit - slack - one) // a.nb[2] + 1 if limit >= one + slack else 0
    if per < 1:
        raise CodegenError(f"node {a.name!r}: one expert matrix spans {one} bytes, more than a WGSL binding "
                           f"of {limit} bytes holds")
    out = []
    for e0 in range(0, a.ne[2], per):
        last = min(e0 + per, a.ne[2]) - 1
        start = (a.view_offs + e0 * a.nb[2]) // WINDOW_ALIGN * WINDOW_ALIGN
        end = min(-(-(a.view_offs + last * a.nb[2] + one) // 4) * 4, -(-a.root.span_bytes // 4) * 4)
        out.append((e0, start, end - start))
    if len(out) > MAX_WINDOWS:
        raise CodegenError(f"node {a.name!r}: {a.root.span_bytes} bytes of expert matrices need {len(out)} WGSL "
                           f"bindings of {limit} bytes (at most {MAX_WINDOWS})")
    return out


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

    WGSL binding limit: expert tensors larger than :data:`WGSL_MAX_BINDING` (128 MiB, WebGPU's
    default ``maxStorageBufferBindingSize``; Qwen3-30B-A3B's ``ffn_up_exps`` is 402 MB in f16) are
    bound as several windows of whole experts (:func:`expert_windows`, bindings ``src0_0``,
    ``src0_1``, ... with :attr:`Binding.window`); each workgroup reads the window holding its expert.

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
    windows = expert_windows(a, WGSL_MAX_BINDING) if backend == "wgsl" else None
    a_type = _vector_name(backend, tn[a.dtype]) if vec4 else tn[a.dtype]
    b_type = _vector_name(backend, tn[b.dtype]) if vec4 else tn[b.dtype]
    if windows is None:
        a_bind = [Binding("src0", a, a.dtype)]
    else:
        a_bind = [Binding(f"src0_{i}", a, a.dtype, window=(off, size)) for i, (_, off, size) in enumerate(windows)]
    bindings = [*a_bind, Binding("src1", b, b.dtype), Binding("ids", ids, ids.dtype),
                Binding("dst", node, node.dtype, write=True)]
    elem_types = [a_type] * len(a_bind) + [b_type, tn[ids.dtype], tn[node.dtype]]
    params = (layout_params("src0", a) + layout_params("src1", b) + layout_params("ids", ids)
              + layout_params("dst", node, ne=False))
    if windows is not None:  # element offset of each window's start; experts per window
        params += [(f"src0_base{i}", "u32", off // a.dtype.size) for i, (_, off, _) in enumerate(windows)]
        params.append(("src0_per_window", "u32", windows[1][0] if len(windows) > 1 else a.ne[2]))
    entry = f"mul_mat_id_vec_{a.dtype}_{b.dtype}{'_v4' if vec4 else ''}{f'_w{len(windows)}' if windows else ''}"
    groups = ceil_div(a.ne[1], VEC_ROWS)
    gx = min(groups, MAX_GRID)
    wg, grid = (VEC_WG, 1, 1), (gx, ceil_div(groups, gx), pairs)
    source = render(f"{backend}/mul_mat_id.{EXT[backend]}.j2", backend=backend, entry=entry, node_name=node.name,
                    bindings=bindings, elem_types=elem_types, params=params, vec4=vec4, wg=wg, vec_rows=VEC_ROWS,
                    ta=tn[a.dtype], threads=VEC_WG, n_windows=len(windows) if windows else 0)
    return Kernel(backend, "mul_mat_id", entry, source, bindings, params, wg, grid, node, meta={"variant": "vec"})
