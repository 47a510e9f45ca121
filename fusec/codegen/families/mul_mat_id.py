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


GLU_ACT = {"SWIGLU": "silu", "GEGLU": "gelu"}


def glu_plan(node: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """``(gate experts, up experts, b, ids, activation)`` of a FUSED ``moe_up_gate_*`` node whose
    decomposition is ``GLU(MUL_MAT_ID(wg, b, ids), MUL_MAT_ID(wu, b, ids))`` (patterns/moe.fuse), the
    tensors being the node's sources. Raises :class:`CodegenError` naming the node otherwise."""
    sub = node.decomposition
    ops = [t for t in sub.nodes if not t.is_leaf] if sub is not None else []
    root = sub.outputs[0] if sub is not None and len(sub.outputs) == 1 else None
    if (root is None or root.op not in GLU_ACT or len(ops) != 3 or len(root.src) != 2
            or any(s is None or s.op != "MUL_MAT_ID" for s in root.src)):
        raise CodegenError(f"node {node.name!r}: mul_mat_id family renders MUL_MAT_ID or a FUSED "
                           "GLU(MUL_MAT_ID(wg, b, ids), MUL_MAT_ID(wu, b, ids)), not this decomposition")
    g, u = root.src
    if g.src[1] is not u.src[1] or g.src[2] is not u.src[2] or g.src[0].ne != u.src[0].ne:
        raise CodegenError(f"node {node.name!r}: the gate and up MUL_MAT_IDs must share b and ids and have "
                           "experts of one shape")

    def outer(t: Tensor) -> Tensor:
        if not (t.is_leaf and "fused_input" in t.params):
            raise CodegenError(f"node {node.name!r}: MUL_MAT_ID operands must be fused inputs")
        return node.src[int(t.params["fused_input"])]

    return outer(g.src[0]), outer(u.src[0]), outer(g.src[1]), outer(g.src[2]), GLU_ACT[root.op]


@family("mul_mat_id", ops=("MUL_MAT_ID",))
def emit_mul_mat_id(node: Tensor, backend: str) -> Kernel:
    """Kernel for MUL_MAT_ID with ggml_mul_mat_id semantics: ``dst[t][e][m] = sum_k
    as[ids[t][e]][m][k] * b[t][e % B1][k]``; or for a FUSED ``GLU(MUL_MAT_ID(wg, b, ids),
    MUL_MAT_ID(wu, b, ids))`` (patterns ``moe_up_gate_swiglu`` / ``_geglu``): both products in one
    pass over b, then ``act(gate) * up`` (SILU / tanh-GELU as ggml_swiglu / ggml_geglu).

    Shapes (ggml ``ne``): ``src0`` (as) f32/f16 ``[K, M, n_as, 1]``, one matrix per expert;
    ``src1`` (b) f32 ``[K, B1, T, 1]`` (``B1`` 1: every slot reads the token's vector, or the number
    of slots); ``src2`` (ids) i32 ``[E, T, 1, 1]``; all with any strides (rows contiguous in as);
    ``dst`` f32 ``[M, E, T, 1]``, contiguous. f16 weights are widened, products accumulated in f32.
    The fused form binds the up experts as ``srcu`` (same shape and dtype as the gate's).

    Algorithm: the matrix-vector kernel of :mod:`.mul_mat` with the batch index replaced by the
    (slot, token) pair: grid z = ``e + E·t``; each workgroup of 128 threads reads its expert id from
    ``ids``, then reduces 4 rows of that expert's matrix (matrices) over K (4-vector loads when
    :func:`~.mul_mat.vec4_ok` holds for the experts and b). Only the selected experts' rows are read,
    so ``n_as`` may be large; every (slot, token) re-reads its expert's rows, which suits decode
    (few tokens), not prompts. An expert id outside ``[0, n_as)`` is clamped on WGSL and not checked
    on CUDA/MSL (as ggml's GPU backends; the interpreter raises).

    WGSL binding limit: expert tensors larger than :data:`WGSL_MAX_BINDING` (128 MiB, WebGPU's
    default ``maxStorageBufferBindingSize``; Qwen3-30B-A3B's ``ffn_up_exps`` is 402 MB in f16) are
    bound as several windows of whole experts (:func:`expert_windows`, bindings ``src0_0``,
    ``src0_1``, ... with :attr:`Binding.window`); each workgroup reads the window holding its expert.

    Raises :class:`CodegenError` for another op or decomposition, or more than 65535 (slot, token)
    pairs.
    """
    if node.op == "FUSED":
        gate, up, b, ids, act = glu_plan(node)
        mats = [("src0", gate), ("srcu", up)]
    elif node.op == "MUL_MAT_ID":
        (a, b, ids), act = node.src[:3], ""
        mats = [("src0", a)]
    else:
        raise CodegenError(f"node {node.name!r}: mul_mat_id family renders MUL_MAT_ID, not {node.op}")
    pairs = ids.ne[0] * ids.ne[1]
    if pairs > MAX_GRID:
        raise CodegenError(f"node {node.name!r}: {pairs} (expert slot, token) pairs exceed the grid limit {MAX_GRID}")
    a = mats[0][1]
    vec4 = all(vec4_ok(m) for _, m in mats) and vec4_ok(b)
    tn = TYPE_NAMES[backend]
    a_type = _vector_name(backend, tn[a.dtype]) if vec4 else tn[a.dtype]
    b_type = _vector_name(backend, tn[b.dtype]) if vec4 else tn[b.dtype]
    mat_bind: list[Binding] = []
    params = []
    n_windows = 0
    for pre, m in mats:
        windows = expert_windows(m, WGSL_MAX_BINDING) if backend == "wgsl" else None
        params += layout_params(pre, m)
        if windows is None:
            mat_bind.append(Binding(pre, m, m.dtype))
            continue
        n_windows = len(windows)  # the same for gate and up (same shape and dtype)
        mat_bind += [Binding(f"{pre}_{i}", m, m.dtype, window=(off, size)) for i, (_, off, size) in enumerate(windows)]
        # element offset of each window's start; experts per window
        params += [(f"{pre}_base{i}", "u32", off // m.dtype.size) for i, (_, off, _) in enumerate(windows)]
        params.append((f"{pre}_per_window", "u32", windows[1][0] if len(windows) > 1 else m.ne[2]))
    bindings = [*mat_bind, Binding("src1", b, b.dtype), Binding("ids", ids, ids.dtype),
                Binding("dst", node, node.dtype, write=True)]
    elem_types = [a_type] * len(mat_bind) + [b_type, tn[ids.dtype], tn[node.dtype]]
    params += layout_params("src1", b) + layout_params("ids", ids) + layout_params("dst", node, ne=False)
    entry = (f"mul_mat_id{'_' + act + '_glu' if act else ''}_vec_{a.dtype}_{b.dtype}{'_v4' if vec4 else ''}"
             f"{f'_w{n_windows}' if n_windows else ''}")
    groups = ceil_div(a.ne[1], VEC_ROWS)
    gx = min(groups, MAX_GRID)
    wg, grid = (VEC_WG, 1, 1), (gx, ceil_div(groups, gx), pairs)
    source = render(f"{backend}/mul_mat_id.{EXT[backend]}.j2", backend=backend, dialect=backend, entry=entry,
                    node_name=node.name, bindings=bindings, elem_types=elem_types, params=params, vec4=vec4, wg=wg,
                    vec_rows=VEC_ROWS, ta=tn[a.dtype], threads=VEC_WG, n_windows=n_windows,
                    mats=[pre for pre, _ in mats], act=act)
    return Kernel(backend, "mul_mat_id", entry, source, bindings, params, wg, grid, node,
                  meta={"variant": "glu" if act else "vec"})
