"""The op registry: arity, traits (commutative, kind), parameters and shape/dtype inference.

Semantics follow ggml (``ggml.c``); each entry names the ggml constructor it mirrors. Op traits
live here, not in patterns: the matcher asks the registry whether an op is commutative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .dtypes import F16, F32, I32, DType
from .shape import can_repeat, contiguous_nb, is_contiguous, is_contiguous_rows, nelements, norm_ne


@dataclass(frozen=True)
class Layout:
    """Result of shape inference: dtype, ``ne``/``nb`` (ggml order) and aliasing."""

    dtype: DType
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int] | None = None  # None -> contiguous
    view_of: Any = None  # Tensor whose memory the result aliases (views, SET_ROWS, CPY)
    view_offs: int = 0  # byte offset added to view_of's own offset


class OpCheckError(ValueError):
    """Raised by inference; the caller adds the node name and turns it into a GraphError."""

    def __init__(self, message: str, field: str = "src"):
        super().__init__(message)
        self.field = field


Infer = Callable[[Sequence[Any], dict[str, Any]], Layout]


@dataclass(frozen=True)
class OpDef:
    """Registry entry.

    Attributes:
        name: ggml op name.
        arity: (min, max) number of sources; optional trailing sources may be ``None``.
        kind: ``leaf`` | ``unary`` | ``binary`` | ``row`` | ``view`` | ``matmul`` | ``rows`` | ``rope``
            | ``copy`` | ``attention`` | ``fused`` | ``fused_output``.
        commutative: operands 0 and 1 may be swapped without changing the value (the matcher
            tries both orders).
        params: parameter names and defaults.
        infer: shape/dtype inference and validation.
        ggml: the ggml function whose semantics this op follows.
    """

    name: str
    arity: tuple[int, int]
    kind: str
    infer: Infer
    ggml: str
    commutative: bool = False
    params: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    REGISTRY[op.name] = op
    return op


def get_op(name: str) -> OpDef:
    """Look up an op; raises ``KeyError`` with the list of known ops."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(REGISTRY))}") from None


# ---------------------------------------------------------------------------------------------
# inference helpers


def _need(cond: bool, msg: str, field: str = "src") -> None:
    if not cond:
        raise OpCheckError(msg, field)


def _float(t: Any, what: str) -> None:
    _need(t.dtype in (F32, F16), f"{what} must be f32 or f16, got {t.dtype}")


def _same_type(srcs, params) -> Layout:
    a = srcs[0]
    _float(a, "src[0]")
    return Layout(a.dtype, a.ne)


def _binary(srcs, params) -> Layout:
    a, b = srcs
    _float(a, "src[0]")
    _float(b, "src[1]")
    _need(can_repeat(b.ne, a.ne), f"src[1] ne={list(b.ne)} cannot be broadcast to src[0] ne={list(a.ne)} "
          "(ggml_can_repeat: only src[1] broadcasts)")
    return Layout(a.dtype, a.ne)


def _row(srcs, params) -> Layout:
    a = srcs[0]
    _float(a, "src[0]")
    return Layout(a.dtype, a.ne)


def _reduce_rows(srcs, params) -> Layout:
    """ggml_mean / ggml_sum_rows: src f32/f16 ``ne = [n, r1, r2, r3]`` (any strides) ->
    ``ne = [1, r1, r2, r3]`` (one value per row over ``ne[0]``); f32 result (ggml_mean creates an f32
    tensor; fusec keeps SUM_ROWS f32 too, its row sums are accumulated in f32 registers or wider)."""
    a = srcs[0]
    _float(a, "src[0]")
    return Layout(F32, (1, a.ne[1], a.ne[2], a.ne[3]))


def _concat(srcs, params) -> Layout:
    """ggml_concat(a, b, dim): same dtype, every ``ne[i]`` equal except ``ne[dim]``, which adds up
    (``dim`` in 0..3, ggml order)."""
    a, b = srcs
    dim = int(params["dim"])
    _need(0 <= dim < 4, f"concat dim must be 0..3 (ggml order), got {dim}", "params")
    _need(a.dtype == b.dtype, f"src[0] and src[1] dtypes differ: {a.dtype} vs {b.dtype}")
    _need(all(a.ne[i] == b.ne[i] for i in range(4) if i != dim),
          f"src[0] ne={list(a.ne)} and src[1] ne={list(b.ne)} differ outside dim {dim}")
    ne = list(a.ne)
    ne[dim] += b.ne[dim]
    return Layout(a.dtype, tuple(ne))


def _check_mask(mask, n_kv: int, n_q: int, batch_ne, kv_what: str, q_what: str, batch_what: str) -> None:
    """The attention mask rules shared by SOFT_MAX and FLASH_ATTN_EXT (ggml_soft_max_ext,
    ggml_flash_attn_ext): f32/f16, ``ne[0] == n_kv``, at least ``n_q`` rows, dims 2/3 broadcast over
    ``batch_ne`` (the scores' / q's ne[2], ne[3]), contiguous rows."""
    _need(mask.dtype in (F32, F16), f"mask must be f32 or f16, got {mask.dtype}")
    _need(mask.ne[0] == n_kv, f"mask ne[0]={mask.ne[0]} != {kv_what}={n_kv}")
    _need(mask.ne[1] >= n_q, f"mask ne[1]={mask.ne[1]} < {q_what}={n_q}")
    _need(batch_ne[0] % mask.ne[2] == 0 and batch_ne[1] % mask.ne[3] == 0,
          f"mask ne[2]/ne[3] must divide {batch_what} ne[2]/ne[3]")
    _need(mask.is_contiguous_rows, "mask rows must be contiguous")


def _soft_max(srcs, params) -> Layout:
    a = srcs[0]
    mask = srcs[1] if len(srcs) > 1 else None
    _need(a.dtype == F32, f"src[0] must be f32, got {a.dtype}")
    if mask is not None:
        _check_mask(mask, a.ne[0], a.ne[1], a.ne[2:], "src[0] ne[0]", "src[0] ne[1]", "src[0]")
    return Layout(F32, a.ne)


def _rope(srcs, params) -> Layout:
    a, pos = srcs[0], srcs[1]
    ff = srcs[2] if len(srcs) > 2 else None
    _float(a, "src[0]")
    _need(pos.dtype == I32, f"positions must be i32, got {pos.dtype}")
    _need(pos.ne[0] == a.ne[2], f"positions ne[0]={pos.ne[0]} != src[0] ne[2]={a.ne[2]}")
    n_dims = int(params["n_dims"])
    _need(0 < n_dims <= a.ne[0] and n_dims % 2 == 0, f"n_dims={n_dims} must be even and <= ne[0]", "params")
    _need(int(params["mode"]) in (0, 2), f"rope mode {params['mode']} not supported (0 normal, 2 neox)",
          "params")
    if ff is not None:
        _need(ff.dtype == F32 and ff.ne[0] >= n_dims // 2, "freq_factors must be f32 with ne[0] >= n_dims/2")
    return Layout(a.dtype, a.ne)


def _mul_mat(srcs, params) -> Layout:
    a, b = srcs
    _float(a, "src[0]")
    _need(b.dtype == F32, f"src[1] must be f32, got {b.dtype}")
    _need(a.ne[0] == b.ne[0], f"src[0] ne[0]={a.ne[0]} != src[1] ne[0]={b.ne[0]} (ggml_can_mul_mat)")
    _need(b.ne[2] % a.ne[2] == 0 and b.ne[3] % a.ne[3] == 0,
          "src[0] ne[2]/ne[3] must divide src[1]'s (ggml_can_mul_mat broadcast)")
    return Layout(F32, (a.ne[1], b.ne[1], b.ne[2], b.ne[3]))


def _get_rows(srcs, params) -> Layout:
    a, idx = srcs
    _need(idx.dtype == I32, f"row indices must be i32, got {idx.dtype}")
    _need(a.ne[2] == idx.ne[1] and idx.ne[3] == 1, "src[1] ne[1] must equal src[0] ne[2]")
    _need(a.ne[3] == idx.ne[2], f"src[0] ne[3]={a.ne[3]} must equal src[1] ne[2]={idx.ne[2]} "
          "(ggml_get_rows indexes src[0]'s dim 3 with src[1]'s dim 2)")
    return Layout(F32 if a.dtype != I32 else I32, (a.ne[0], idx.ne[0], idx.ne[1], idx.ne[2]))


def _set_rows(srcs, params) -> Layout:
    b, c, a = srcs  # ggml order: src0 = rows to write, src1 = indices, src2 = destination
    _need(a.ne[0] == b.ne[0], f"destination ne[0]={a.ne[0]} != rows ne[0]={b.ne[0]}")
    _need(a.ne[2] == b.ne[2] and a.ne[3] == b.ne[3], "destination ne[2]/ne[3] must equal the rows'")
    _need(b.ne[1] == c.ne[0], f"rows ne[1]={b.ne[1]} != indices ne[0]={c.ne[0]}")
    _need(b.ne[2] % c.ne[1] == 0 and b.ne[3] % c.ne[2] == 0 and c.ne[3] == 1, "indices broadcast mismatch")
    _need(c.dtype == I32, f"indices must be i32, got {c.dtype}")
    _need(b.dtype == F32, f"rows must be f32, got {b.dtype}")
    _need(a.dtype in (F32, F16), f"destination must be f32 or f16, got {a.dtype}")
    _need(is_contiguous_rows(a.ne, a.nb, a.dtype.size), "destination rows must be contiguous")
    return Layout(a.dtype, a.ne, a.nb, view_of=a)


def _cpy(srcs, params) -> Layout:
    a, b = srcs
    _need(nelements(a.ne) == nelements(b.ne), f"element counts differ: {nelements(a.ne)} vs {nelements(b.ne)}")
    _need(a.dtype.is_float == b.dtype.is_float, "cannot copy between int and float types")
    return Layout(b.dtype, b.ne, b.nb, view_of=b)


def _cont(srcs, params) -> Layout:
    a = srcs[0]
    ne = norm_ne(params["ne"]) if params.get("ne") else a.ne
    _need(nelements(ne) == nelements(a.ne), "cont: element count changes", "params")
    return Layout(a.dtype, ne)


def _view(srcs, params) -> Layout:
    a = srcs[0]
    ne = norm_ne(params["ne"])
    nb = tuple(int(v) for v in params["nb"])
    _need(len(nb) == 4, "view nb must have 4 entries", "params")
    offset = int(params.get("offset", 0))
    _need(offset >= 0, "view offset must be >= 0", "params")
    end = offset + sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + a.dtype.size
    root_span = a.root.span_bytes
    _need(a.view_offs + end <= root_span,
          f"view reaches byte {a.view_offs + end} past the end of its source ({root_span} bytes)", "params")
    return Layout(a.dtype, ne, nb, view_of=a, view_offs=offset)


def _reshape(srcs, params) -> Layout:
    a = srcs[0]
    ne = norm_ne(params["ne"])
    _need(is_contiguous(a.ne, a.nb, a.dtype.size), "reshape needs a contiguous source (use cont)")
    _need(nelements(ne) == nelements(a.ne), f"reshape changes the element count {a.ne} -> {ne}", "params")
    return Layout(a.dtype, ne, contiguous_nb(ne, a.dtype.size), view_of=a)


def _permute(srcs, params) -> Layout:
    a = srcs[0]
    axes = [int(v) for v in params["axes"]]
    _need(sorted(axes) == [0, 1, 2, 3], f"permute axes must be a permutation of 0..3, got {axes}", "params")
    ne = [0] * 4
    nb = [0] * 4
    for i, ax in enumerate(axes):  # ggml_permute: dim i of a goes to position axes[i]
        ne[ax] = a.ne[i]
        nb[ax] = a.nb[i]
    return Layout(a.dtype, tuple(ne), tuple(nb), view_of=a)


def _transpose(srcs, params) -> Layout:
    return _permute(srcs, {"axes": [1, 0, 2, 3]})


def _glu(srcs, params) -> Layout:
    a = srcs[0]
    b = srcs[1] if len(srcs) > 1 else None
    _float(a, "src[0]")
    if b is None:
        _need(a.ne[0] % 2 == 0, "single-tensor GLU needs an even ne[0]")
        return Layout(a.dtype, (a.ne[0] // 2, *a.ne[1:]))
    _need(tuple(a.ne) == tuple(b.ne), "split GLU operands must have the same shape")
    _need(a.dtype == b.dtype, "split GLU operands must have the same dtype")
    return Layout(a.dtype, a.ne)


def _flash_attn_ext(srcs, params) -> Layout:
    """ggml_flash_attn_ext: q f32 ne=[D, n_q, n_head, n_seq]; k ne=[D, n_kv, n_head_kv, k3] and v
    ne=[Dv, n_kv, n_head_kv', v3] f32/f16 (n_head % n_head_kv == 0, n_seq % k3 == 0: GQA broadcast);
    optional mask f32/f16 ne=[n_kv, >= n_q, m2, m3] (n_head % m2 == 0, n_seq % m3 == 0, rows
    contiguous). Result f32 ne=[Dv, n_head, n_q, n_seq] (ggml's permuted layout)."""
    q, k, v = srcs[0], srcs[1], srcs[2]
    mask = srcs[3] if len(srcs) > 3 else None
    _need(q.dtype == F32, f"q must be f32, got {q.dtype}")
    _float(k, "k")
    _float(v, "v")
    _need(k.ne[0] == q.ne[0], f"k ne[0]={k.ne[0]} != q ne[0]={q.ne[0]} (head size)")
    _need(v.ne[1] == k.ne[1], f"v ne[1]={v.ne[1]} != k ne[1]={k.ne[1]} (n_kv)")
    for t, nm in ((k, "k"), (v, "v")):
        _need(q.ne[2] % t.ne[2] == 0 and q.ne[3] % t.ne[3] == 0,
              f"{nm} ne[2]/ne[3]={t.ne[2]}/{t.ne[3]} must divide q's {q.ne[2]}/{q.ne[3]} (GQA broadcast)")
    if mask is not None:
        _check_mask(mask, k.ne[1], q.ne[1], q.ne[2:], "n_kv", "n_q", "q")
    return Layout(F32, (v.ne[0], q.ne[2], q.ne[1], q.ne[3]))


def _clamp(srcs, params) -> Layout:
    """ggml_clamp(a, min, max): f32/f16 ``a`` of any ``ne`` and strides -> same dtype and ``ne``,
    contiguous; ``min``/``max`` are floats (``max`` may be ``inf``: llama.cpp's MoE weight sum)."""
    a = srcs[0]
    _float(a, "src[0]")
    for k in ("min", "max"):
        _need(isinstance(params.get(k), (int, float)), f"clamp {k} must be a number, got {params.get(k)!r}",
              "params")
    return Layout(a.dtype, a.ne)


SORT_ORDERS = {"asc": 0, "desc": 1}
"""ggml_sort_order values (GGML_SORT_ORDER_ASC = 0, GGML_SORT_ORDER_DESC = 1), ARGSORT's ``order``."""


def _argsort(srcs, params) -> Layout:
    """ggml_argsort(a, order): f32 ``a`` ``ne = [n, r1, r2, r3]`` (any strides) -> i32, same ``ne``,
    contiguous: each row's column indices ``0..n-1`` ordered by value (``order`` 0 ascending, 1
    descending, GGML_SORT_ORDER_*)."""
    a = srcs[0]
    _need(a.dtype == F32, f"src[0] must be f32 (ggml_argsort sorts f32 rows), got {a.dtype}")
    _need(params.get("order") in (0, 1), f"argsort order must be 0 (asc) or 1 (desc), got {params.get('order')!r}",
          "params")
    return Layout(I32, a.ne)


def _mul_mat_id(srcs, params) -> Layout:
    """ggml_mul_mat_id(as, b, ids): ``as`` f32/f16 ``ne = [K, M, n_as, 1]`` (one matrix per expert,
    ``nb[0] <= nb[1]``), ``b`` f32 ``ne = [K, B1, T, 1]``, ``ids`` i32 ``ne = [E, T, 1, 1]`` with
    ``E % B1 == 0`` -> f32 ``ne = [M, E, T, 1]``: ``dst[t][e] = as[ids[t][e]] · b[t][e % B1]``."""
    a, b, ids = srcs
    _float(a, "src[0] (as)")
    _need(b.dtype == F32, f"src[1] (b) must be f32, got {b.dtype}")
    _need(ids.dtype == I32, f"src[2] (ids) must be i32, got {ids.dtype}")
    _need(a.ne[3] == 1, f"src[0] (as) must be 3-D (one matrix per expert), got ne={list(a.ne)}")
    _need(a.nb[0] <= a.nb[1], "src[0] (as) must not be transposed (ggml_is_transposed: nb[0] > nb[1])")
    _need(b.ne[3] == 1, f"src[1] (b) must be 3-D, got ne={list(b.ne)}")
    _need(ids.ne[2] == 1 and ids.ne[3] == 1, f"src[2] (ids) must be 2-D, got ne={list(ids.ne)}")
    _need(ids.ne[1] == b.ne[2], f"src[2] (ids) ne[1]={ids.ne[1]} != src[1] (b) ne[2]={b.ne[2]} (tokens)")
    _need(a.ne[0] == b.ne[0], f"src[0] (as) ne[0]={a.ne[0]} != src[1] (b) ne[0]={b.ne[0]}")
    _need(ids.ne[0] % b.ne[1] == 0, f"src[2] (ids) ne[0]={ids.ne[0]} is not a multiple of src[1] (b) "
          f"ne[1]={b.ne[1]} (b broadcasts over the experts used)")
    return Layout(F32, (a.ne[1], ids.ne[0], b.ne[2], 1))


def _leaf(srcs, params) -> Layout:  # never called: leaves are built directly
    raise OpCheckError("leaf tensors have no inference")


def _fused(srcs, params) -> Layout:  # filled in by the rewriter from the decomposition
    raise OpCheckError("FUSED layout comes from the decomposition")


def _fused_output(srcs, params) -> Layout:
    """Output ``index`` (>= 1) of a multi-output FUSED node: the dtype, ``ne`` and ``nb`` of
    ``decomposition.outputs[index]``, in memory of its own (written by the FUSED node's kernel)."""
    (f,) = srcs
    sub = getattr(f, "decomposition", None)
    _need(getattr(f, "op", None) == "FUSED" and sub is not None, "FUSED_OUTPUT reads a FUSED node")
    k = params.get("index")
    _need(isinstance(k, int) and not isinstance(k, bool) and 1 <= k < len(sub.outputs),
          f"index {k!r} is not an extra output of the FUSED node (it has outputs 1..{len(sub.outputs) - 1})",
          "params")
    out = sub.outputs[k]
    return Layout(out.dtype, tuple(out.ne), tuple(out.nb))


for _op in [
    OpDef("NONE", (0, 0), "leaf", _leaf, "ggml_new_tensor"),
    OpDef("ADD", (2, 2), "binary", _binary, "ggml_add", commutative=True),
    OpDef("SUB", (2, 2), "binary", _binary, "ggml_sub"),
    OpDef("MUL", (2, 2), "binary", _binary, "ggml_mul", commutative=True),
    OpDef("DIV", (2, 2), "binary", _binary, "ggml_div"),
    OpDef("SCALE", (1, 1), "unary", _same_type, "ggml_scale / ggml_scale_bias", params={"s": 1.0, "b": 0.0}),
    OpDef("SILU", (1, 1), "unary", _same_type, "ggml_silu (GGML_UNARY_OP_SILU)"),
    OpDef("GELU", (1, 1), "unary", _same_type, "ggml_gelu (GGML_UNARY_OP_GELU, tanh approximation)"),
    OpDef("TANH", (1, 1), "unary", _same_type, "ggml_tanh (GGML_UNARY_OP_TANH)"),
    OpDef("SIGMOID", (1, 1), "unary", _same_type, "ggml_sigmoid (GGML_UNARY_OP_SIGMOID)"),
    OpDef("SQR", (1, 1), "unary", _same_type, "ggml_sqr (GGML_OP_SQR): x*x"),
    OpDef("SQRT", (1, 1), "unary", _same_type, "ggml_sqrt (GGML_OP_SQRT)"),
    OpDef("RSQRT", (1, 1), "unary", _same_type, "fusec extension (ggml has no RSQRT): 1/sqrt(x), as torch.rsqrt"),
    OpDef("MEAN", (1, 1), "reduce", _reduce_rows, "ggml_mean (GGML_OP_MEAN): row mean over ne[0]"),
    OpDef("SUM_ROWS", (1, 1), "reduce", _reduce_rows, "ggml_sum_rows (GGML_OP_SUM_ROWS): row sum over ne[0]"),
    OpDef("CONCAT", (2, 2), "copy", _concat, "ggml_concat (GGML_OP_CONCAT)", params={"dim": 0}),
    OpDef("SWIGLU", (1, 2), "glu", _glu, "ggml_swiglu / ggml_swiglu_split (GGML_GLU_OP_SWIGLU)"),
    OpDef("GEGLU", (1, 2), "glu", _glu, "ggml_geglu / ggml_geglu_split (GGML_GLU_OP_GEGLU)"),
    OpDef("RMS_NORM", (1, 1), "row", _row, "ggml_rms_norm", params={"eps": 1e-6}),
    OpDef("NORM", (1, 1), "row", _row, "ggml_norm", params={"eps": 1e-5}),
    OpDef("SOFT_MAX", (1, 2), "row", _soft_max, "ggml_soft_max_ext", params={"scale": 1.0, "max_bias": 0.0}),
    OpDef("ROPE", (2, 3), "rope", _rope, "ggml_rope_ext", params={
        "n_dims": 0, "mode": 0, "n_ctx_orig": 0, "freq_base": 10000.0, "freq_scale": 1.0,
        "ext_factor": 0.0, "attn_factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}),
    OpDef("MUL_MAT", (2, 2), "matmul", _mul_mat, "ggml_mul_mat"),
    OpDef("MUL_MAT_ID", (3, 3), "matmul", _mul_mat_id, "ggml_mul_mat_id (GGML_OP_MUL_MAT_ID)"),
    OpDef("ARGSORT", (1, 1), "row", _argsort, "ggml_argsort (GGML_OP_ARGSORT)", params={"order": 0}),
    OpDef("CLAMP", (1, 1), "unary", _clamp, "ggml_clamp (GGML_OP_CLAMP): max(min(x, max), min)",
          params={"min": float("-inf"), "max": float("inf")}),
    OpDef("GET_ROWS", (2, 2), "rows", _get_rows, "ggml_get_rows"),
    OpDef("SET_ROWS", (3, 3), "rows", _set_rows, "ggml_set_rows"),
    OpDef("CPY", (2, 2), "copy", _cpy, "ggml_cpy"),
    OpDef("CONT", (1, 1), "copy", _cont, "ggml_cont / ggml_cont_4d", params={"ne": None}),
    OpDef("VIEW", (1, 1), "view", _view, "ggml_view_4d", params={"ne": None, "nb": None, "offset": 0}),
    OpDef("RESHAPE", (1, 1), "view", _reshape, "ggml_reshape_4d", params={"ne": None}),
    OpDef("PERMUTE", (1, 1), "view", _permute, "ggml_permute", params={"axes": None}),
    OpDef("TRANSPOSE", (1, 1), "view", _transpose, "ggml_transpose"),
    OpDef("FLASH_ATTN_EXT", (3, 4), "attention", _flash_attn_ext, "ggml_flash_attn_ext",
          params={"scale": 1.0, "max_bias": 0.0, "logit_softcap": 0.0}),
    OpDef("FUSED", (0, 64), "fused", _fused, "fusec rewrite (decomposition kept)"),
    OpDef("FUSED_OUTPUT", (1, 1), "fused_output", _fused_output,
          "fusec multi-output fusion: output params.index of the FUSED src[0] (no ggml op)", params={"index": 1}),
]:
    register(_op)

VIEW_OPS = frozenset(n for n, o in REGISTRY.items() if o.kind == "view")
