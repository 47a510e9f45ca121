"""Numpy kernels with ggml-cpu semantics (``ggml/src/ggml-cpu/ops.cpp``, ``vec.h``).

Every kernel reads source arrays of shape ``ne[::-1]`` (4-D, numpy order: ``[ne3, ne2, ne1,
ne0]``) in their stored dtype, possibly non-contiguous. Arithmetic is float32 for f32 and f16
tensors, as ggml's CPU backend does; the engine rounds results to the node's dtype when it stores
them (f16 results are therefore rounded to f16 once, at the end of the op). Row reductions (the
sums of RMS_NORM and NORM, the exp-sum of SOFT_MAX) accumulate in float64, as ggml's
``ggml_float``; MUL_MAT accumulates in float32 (numpy ``matmul``).

Two tables are exported:

* ``COMPUTE[op](node, srcs) -> array``: ops producing a new value of shape ``node.ne[::-1]``
  (float32, or int32 for i32 results); the engine stores it into the node's own memory.
* ``WRITE[op](node, srcs, dst) -> None``: ops that write into their destination's memory in place
  (SET_ROWS, CPY); ``dst`` is the node's window onto that memory.

View ops (VIEW, RESHAPE, PERMUTE, TRANSPOSE) have no kernel: their value is their window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..ir.tensor import Tensor
from .errors import InterpError
from .rope import rope

Arr = np.ndarray
Srcs = Sequence[Arr | None]

F32 = np.float32


def f32(x: Arr) -> Arr:
    """``x`` as float32 (no copy when it already is)."""
    return np.asarray(x, dtype=F32)


def tile_to(b: Arr, shape: tuple[int, ...]) -> Arr:
    """Repeat ``b`` along each axis until it has ``shape`` (``ggml_can_repeat`` broadcast: element
    ``i`` reads ``b[i % b.shape]``, not numpy's size-1 broadcasting)."""
    reps = tuple(s // t for s, t in zip(shape, b.shape, strict=True))
    return np.tile(b, reps) if any(r != 1 for r in reps) else b


# ---------------------------------------------------------------------------------------------
# element-wise


def _binary(fn: Callable[[Arr, Arr], Arr]) -> Callable[[Tensor, Srcs], Arr]:
    def kernel(node: Tensor, srcs: Srcs) -> Arr:
        a, b = f32(srcs[0]), f32(srcs[1])
        return fn(a, tile_to(b, a.shape))

    return kernel


def scale(node: Tensor, srcs: Srcs) -> Arr:
    """``x*s + b`` (ggml_compute_forward_scale_f32: ``ggml_vec_scale_f32`` when ``b == 0``, else
    ``ggml_vec_mad1_f32``)."""
    x = f32(srcs[0])
    s, b = F32(node.params.get("s", 1.0)), F32(node.params.get("b", 0.0))
    return x * s if b == 0 else x * s + b


def silu_f32(x: Arr) -> Arr:
    """``x / (1 + exp(-x))`` (ggml_silu_f32)."""
    return x / (F32(1) + np.exp(-x))


def gelu_f32(x: Arr) -> Arr:
    """``0.5*x*(1 + tanh(sqrt(2/pi)*x*(1 + 0.044715*x^2)))`` (ggml_gelu_f32, the tanh
    approximation; ggml-cpu may instead use its f16 lookup table). Evaluated in float64 and rounded
    once to float32: in float32, ``1 + tanh(z)`` cancels for ``x`` below about -4 and loses most of
    its digits, which would make the reference less accurate than the kernels it judges."""
    xd = np.asarray(x, dtype=np.float64)
    c = np.sqrt(2.0 / np.pi)
    return (0.5 * xd * (1.0 + np.tanh(c * xd * (1.0 + 0.044715 * xd * xd)))).astype(np.float32)


def sigmoid_f32(x: Arr) -> Arr:
    """``1 / (1 + exp(-x))`` (ggml_vec_sigmoid_f32)."""
    return F32(1) / (F32(1) + np.exp(-x))


def _unary(fn: Callable[[Arr], Arr]) -> Callable[[Tensor, Srcs], Arr]:
    def kernel(node: Tensor, srcs: Srcs) -> Arr:
        return fn(f32(srcs[0]))

    return kernel


def _glu(act: Callable[[Arr], Arr]) -> Callable[[Tensor, Srcs], Arr]:
    """GLU kernels (ggml_compute_forward_swiglu / geglu with ``swapped = false``): ``act(a) * b``
    for the split form; for one source of row length ``2*nc``, ``a`` is the first half of each row
    (the gated half) and ``b`` the second half (the linear half)."""

    def kernel(node: Tensor, srcs: Srcs) -> Arr:
        x = f32(srcs[0])
        if len(srcs) > 1 and srcs[1] is not None:
            a, b = x, f32(srcs[1])
        else:
            nc = x.shape[-1] // 2
            a, b = x[..., :nc], x[..., nc:]
        return act(a) * b

    return kernel


# ---------------------------------------------------------------------------------------------
# row ops (reduce over ne[0], the last numpy axis)


def rsqrt_f32(x: Arr) -> Arr:
    """``1/sqrt(x)`` in float32 (fusec's RSQRT; ggml has no such op: torch.rsqrt semantics,
    the same ``1/sqrtf`` formula as ggml_compute_forward_rms_norm_f32's scale)."""
    return F32(1) / np.sqrt(x)


def sum_rows(node: Tensor, srcs: Srcs) -> Arr:
    """Row sums over ``ne[0]`` (ggml_compute_forward_sum_rows_f32: ``ggml_vec_sum_f32`` accumulates
    in ``ggml_float`` = float64, stored as float32): ``ne = [n, r1, r2, r3]`` -> ``[1, r1, r2, r3]``."""
    x = f32(srcs[0])
    return np.sum(x, axis=-1, keepdims=True, dtype=np.float64).astype(F32)


def mean(node: Tensor, srcs: Srcs) -> Arr:
    """Row means over ``ne[0]`` (ggml_compute_forward_mean_f32: the float64 row sum rounded to float32,
    then divided by ``(float) ne00`` in float32): ``ne = [n, r1, r2, r3]`` -> ``[1, r1, r2, r3]``."""
    x = f32(srcs[0])
    return sum_rows(node, srcs) / F32(x.shape[-1])


def concat(node: Tensor, srcs: Srcs) -> Arr:
    """``src0`` then ``src1`` along ggml dimension ``params["dim"]`` (ggml_compute_forward_concat;
    numpy axis ``3 - dim``); values keep their dtype (i32 stays i32, floats become float32)."""
    a, b = np.asarray(srcs[0]), np.asarray(srcs[1])
    out = np.concatenate([a, b], axis=3 - int(node.params["dim"]))
    return out if out.dtype == np.int32 else f32(out)


def rms_norm(node: Tensor, srcs: Srcs) -> Arr:
    """``x / sqrt(mean(x^2) + eps)`` per row (ggml_compute_forward_rms_norm_f32: the sum of squares
    in float64, ``scale = 1/sqrtf(mean + eps)`` in float32)."""
    x = f32(srcs[0])
    mean = (np.sum(np.square(x, dtype=np.float64), axis=-1, keepdims=True) / x.shape[-1]).astype(F32)
    return x * (F32(1) / np.sqrt(mean + F32(node.params["eps"])))


def norm(node: Tensor, srcs: Srcs) -> Arr:
    """``(x - mean) / sqrt(var + eps)`` per row, population variance (ggml_compute_forward_norm_f32:
    mean and the centred sum of squares in float64, the rest in float32)."""
    x = f32(srcs[0])
    n = x.shape[-1]
    mean = (np.sum(x, axis=-1, keepdims=True, dtype=np.float64) / n).astype(F32)
    y = x - mean
    var = (np.sum(np.square(y, dtype=np.float64), axis=-1, keepdims=True) / n).astype(F32)
    return y * (F32(1) / np.sqrt(var + F32(node.params["eps"])))


def alibi_slopes(n_head: int, max_bias: float) -> Arr:
    """ALiBi slope of each head ``h`` in ``0..n_head-1`` (ggml_compute_forward_soft_max_f32):
    ``n_head_log2 = 2^floor(log2(n_head))``, ``m0 = 2^(-max_bias/n_head_log2)``,
    ``m1 = 2^(-max_bias/2/n_head_log2)``; slope = ``m0^(h+1)`` for ``h < n_head_log2`` else
    ``m1^(2*(h - n_head_log2) + 1)``; all 1 when ``max_bias <= 0``. float32, shape ``[n_head]``."""
    if max_bias <= 0.0:
        return np.ones(n_head, dtype=F32)
    n_head_log2 = 1 << int(np.floor(np.log2(n_head)))
    m0 = F32(2.0) ** F32(-max_bias / n_head_log2)
    m1 = F32(2.0) ** F32(-(max_bias / 2.0) / n_head_log2)
    h = np.arange(n_head)
    return np.where(h < n_head_log2, m0 ** (h + 1).astype(F32),
                    m1 ** (2 * (h - n_head_log2) + 1).astype(F32)).astype(F32)


def soft_max(node: Tensor, srcs: Srcs) -> Arr:
    """``softmax(x*scale + slope*mask)`` over ``ne[0]`` (ggml_compute_forward_soft_max_f32).

    The mask (f32 or f16, ``ne = [ne0, >= ne1, ne2', ne3']``) contributes its first ``ne1`` rows
    and is repeated over dims 2 and 3 (``i12 = i02 % ne12``); ``slope`` is the ALiBi slope of head
    ``i02`` (see :func:`alibi_slopes`). ``x*scale + slope*mask`` is float32; ``exp(w - max)`` and
    the row sum are float64. A row whose every logit is ``-inf`` gives NaN, as ggml-cpu's release
    build does (``expf(-inf - -inf)``).
    """
    x = f32(srcs[0])
    w = x * F32(node.params.get("scale", 1.0))
    mask = srcs[1] if len(srcs) > 1 else None
    if mask is not None:
        m = f32(mask)[:, :, : x.shape[2], :]
        m = tile_to(m, x.shape)
        slope = alibi_slopes(x.shape[1], float(node.params.get("max_bias", 0.0)))
        w = w + slope[None, :, None, None] * m
    mx = np.max(w, axis=-1, keepdims=True)
    e = np.exp((w - mx).astype(np.float64))
    return (e / np.sum(e, axis=-1, keepdims=True)).astype(F32)


# ---------------------------------------------------------------------------------------------
# matmul, rows


def mul_mat(node: Tensor, srcs: Srcs) -> Arr:
    """``b · aᵀ`` per batch (ggml_compute_forward_mul_mat): a ``ne = [K, M, a2, a3]`` (f32 or
    f16), b ``ne = [K, N, b2, b3]`` f32 -> f32 ``ne = [M, N, b2, b3]``. a's batches broadcast as
    ggml's ``r2 = b2/a2``, ``r3 = b3/a3``: batch ``i12`` of b uses batch ``i12 / r2`` of a (each
    batch of a serves ``r2`` consecutive batches of b, as grouped-query attention needs).
    The f16 operand is widened to float32 (ggml-cpu instead rounds b to f16 for an f16 a)."""
    a, b = f32(srcs[0]), f32(srcs[1])
    r3, r2 = b.shape[0] // a.shape[0], b.shape[1] // a.shape[1]
    a = np.repeat(np.repeat(a, r3, axis=0), r2, axis=1)
    return np.matmul(b, np.swapaxes(a, -1, -2))


def flash_attn_ext(node: Tensor, srcs: Srcs) -> Arr:
    """Attention in one op (ggml_flash_attn_ext; ggml-cpu
    ``ggml_compute_forward_flash_attn_ext_f16_one_chunk``).

    Sources (numpy order ``ne[::-1]``): q f32 ``ne = [D, n_q, n_head, n_seq]``; k ``ne = [D, n_kv,
    n_head_kv, k3]`` and v ``ne = [Dv, n_kv, n_head_kv', v3]`` (f32 or f16, widened), head ``h``
    reading kv head ``h / (n_head/n_head_kv)`` and sequence ``s`` kv batch ``s / (n_seq/k3)``;
    optional mask (f32 or f16) ``ne = [n_kv, >= n_q, m2, m3]``, rows ``0..n_q-1`` used, repeated over
    heads and sequences (``i2 % m2``, ``i3 % m3``). Params ``scale``, ``max_bias`` (ALiBi slope per
    head, :func:`alibi_slopes`), ``logit_softcap``.

    Per query row: ``s_j = q.k_j * scale``; with ``logit_softcap = c != 0``: ``s_j = c*tanh(q.k_j *
    scale/c)`` (ggml divides ``scale`` by ``c`` first); then ``s_j += slope*mask_j``. Entries whose
    ``slope*mask`` is ``-inf`` are skipped, as ggml-cpu's ``if (mv == -INFINITY) continue``; the
    result is ``sum_j exp(s_j - max) v_j / sum_j exp(s_j - max)``. **Fully masked row** (every
    entry skipped): ggml-cpu's sum ``S`` stays 0 and it scales by ``S_inv = S == 0 ? 0 : 1/S``, so
    the row is **0** (not NaN; the unfused SOFT_MAX gives NaN there).

    Arithmetic in float64 (a stricter reference than ggml-cpu, which rounds q to f16 for f16 K and
    accumulates an f16 V in f16). Result f32 ``ne = [Dv, n_head, n_q, n_seq]`` (numpy
    ``[n_seq, n_q, n_head, Dv]``, ggml's permuted layout)."""
    q = np.asarray(srcs[0], dtype=np.float64)
    k = np.asarray(srcs[1], dtype=np.float64)
    v = np.asarray(srcs[2], dtype=np.float64)
    mask = srcs[3] if len(srcs) > 3 else None
    n_seq, n_head, n_q, _ = q.shape
    k = np.repeat(np.repeat(k, n_seq // k.shape[0], axis=0), n_head // k.shape[1], axis=1)
    v = np.repeat(np.repeat(v, n_seq // v.shape[0], axis=0), n_head // v.shape[1], axis=1)
    scale = float(node.params.get("scale", 1.0))
    softcap = float(node.params.get("logit_softcap", 0.0))
    s = np.matmul(q, np.swapaxes(k, -1, -2))  # [n_seq, n_head, n_q, n_kv]
    if softcap != 0.0:
        s = softcap * np.tanh(s * (scale / softcap))
    else:
        s = s * scale
    masked = np.zeros(s.shape, dtype=bool)
    if mask is not None:
        m = np.asarray(mask, dtype=np.float64)[:, :, :n_q, :]
        m = tile_to(m, (n_seq, n_head, n_q, m.shape[3]))
        slope = alibi_slopes(n_head, float(node.params.get("max_bias", 0.0))).astype(np.float64)
        mv = slope[None, :, None, None] * m
        masked = mv == -np.inf
        s = np.where(masked, 0.0, s + np.where(masked, 0.0, mv))
    mx = np.max(np.where(masked, -np.inf, s), axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(masked, 0.0, np.exp(s - mx))
    den = np.sum(e, axis=-1, keepdims=True)
    out = np.matmul(e, v) / np.where(den == 0.0, 1.0, den)  # fully masked rows: e == 0 -> 0
    return np.ascontiguousarray(np.swapaxes(out, 1, 2)).astype(F32)


def mul_mat_id(node: Tensor, srcs: Srcs) -> Arr:
    """Expert matmul (ggml_compute_forward_mul_mat_id): ``as`` ``ne = [K, M, n_as, 1]`` (f32 or f16,
    widened), ``b`` f32 ``ne = [K, B1, T, 1]``, ``ids`` i32 ``ne = [E, T, 1, 1]`` -> f32 ``ne = [M, E,
    T, 1]`` with ``dst[t][e][m] = sum_k as[ids[t][e]][m][k] * b[t][e % B1][k]``, accumulated in
    float32 (numpy ``matmul``, as :func:`mul_mat`). Like ggml-cpu, the (slot, token) pairs are
    grouped by expert: each used expert's matrix is widened and multiplied once, so memory stays
    O(size of one expert) however many tokens there are.

    Raises :class:`InterpError` for an expert id outside ``[0, n_as)`` (ggml-cpu asserts)."""
    a, b = np.asarray(srcs[0])[0], f32(srcs[1])[0]  # [n_as, M, K], [T, B1, K]
    ids = np.asarray(srcs[2])[0, 0].astype(np.int64)  # [T, E]
    _check_rows(node, ids, a.shape[0])
    n_tok, n_used = ids.shape
    x = b[:, np.arange(n_used) % b.shape[1], :]  # [T, E, K]
    out = np.zeros((n_tok, n_used, a.shape[1]), dtype=F32)
    for ex in np.unique(ids):
        sel = ids == ex
        out[sel] = np.matmul(x[sel], f32(a[ex]).T)
    return out.reshape(1, n_tok, n_used, a.shape[1])


def argsort(node: Tensor, srcs: Srcs) -> Arr:
    """Row-wise argsort over ``ne[0]`` (ggml_compute_forward_argsort_f32): f32 ``ne = [n, r1, r2,
    r3]`` -> i32 of the same ``ne``; row ``r`` holds the column indices ``0..n-1`` ordered by
    ``x[r][i]``, ascending for ``order`` 0 (GGML_SORT_ORDER_ASC), descending for 1.

    Ties: ggml-cpu's ``std::sort`` leaves the order of equal values unspecified; fusec orders equal
    values by ascending column index in both directions (a stable sort), and its kernels do the
    same, so results are deterministic. NaN values sort to unspecified positions (as ggml)."""
    x = f32(srcs[0])
    key = x if int(node.params.get("order", 0)) == 0 else -x
    return np.argsort(key, axis=-1, kind="stable").astype(np.int32)


def clamp(node: Tensor, srcs: Srcs) -> Arr:
    """``MAX(MIN(x, max), min)`` with ggml's ternary macros (ggml_compute_forward_clamp_f32): a NaN
    ``x`` gives ``max`` (``MIN(NaN, max)`` is ``max``), ``min > max`` gives ``min``."""
    x = f32(srcs[0])
    lo, hi = F32(node.params["min"]), F32(node.params["max"])
    m = np.where(x < hi, x, hi)
    return np.where(m > lo, m, lo).astype(F32)


def get_rows(node: Tensor, srcs: Srcs) -> Arr:
    """Gather rows (ggml_compute_forward_get_rows): a ``ne = [n, R, a2, a3]``, indices i32
    ``ne = [k, a2, c2, 1]`` -> ``ne = [n, k, a2, c2]`` with ``dst[i12][i11][i10] =
    a[i12][i11][idx[i12][i11][i10]]``; float sources give f32, i32 gives i32.

    Raises :class:`InterpError` for an index outside ``[0, R)`` or when ``a3`` differs from the
    indices' ``ne[2]`` (ggml reads out of bounds there)."""
    a, idx = srcs[0], np.asarray(srcs[1])
    if a.shape[0] != idx.shape[1]:
        raise InterpError(f"src[0] ne[3]={a.shape[0]} != indices ne[2]={idx.shape[1]}", node=repr(node.name),
                          field="src")
    rows = idx[0].astype(np.int64)  # [c2, a2, k]
    _check_rows(node, rows, a.shape[2])
    i3 = np.arange(rows.shape[0])[:, None, None]
    i2 = np.arange(rows.shape[1])[None, :, None]
    out = a[i3, i2, rows]
    return out if out.dtype == np.int32 else f32(out)


def _check_rows(node: Tensor, rows: Arr, n_rows: int) -> None:
    bad = (rows < 0) | (rows >= n_rows)
    if np.any(bad):
        raise InterpError(f"row index {int(rows[bad].flat[0])} out of range [0, {n_rows})", node=repr(node.name),
                          field="src")


def cont(node: Tensor, srcs: Srcs) -> Arr:
    """Contiguous copy in flat row-major order of ``ne``, reshaped to ``node.ne``
    (ggml_compute_forward_dup / ggml_cont_4d)."""
    return np.reshape(np.array(srcs[0]), node.ne[::-1])


# ---------------------------------------------------------------------------------------------
# in-place writes


def set_rows(node: Tensor, srcs: Srcs, dst: Arr) -> None:
    """Scatter rows into the destination's memory (ggml_compute_forward_set_rows): sources in ggml
    order ``rows`` f32 ``ne = [n, k, b2, b3]``, indices i32 ``ne = [k, c1, c2, 1]`` with ``c1 | b2``,
    ``c2 | b3``, destination ``ne = [n, R, b2, b3]``; for every ``i``, ``i02``, ``i03``:
    ``dst[i03][i02][idx[i03 % c2][i02 % c1][i]] = rows[i03][i02][i]``, converted to the
    destination's dtype (f16 rounds to nearest even). Repeated indices: the last row written wins.

    Raises :class:`InterpError` for an index outside ``[0, R)``."""
    rows, idx = srcs[0], np.asarray(srcs[1])
    b3, b2 = rows.shape[0], rows.shape[1]
    full = np.tile(idx[0], (b3 // idx.shape[1], b2 // idx.shape[2], 1)).astype(np.int64)  # [b3, b2, k]
    _check_rows(node, full, dst.shape[2])
    i3 = np.arange(b3)[:, None, None]
    i2 = np.arange(b2)[None, :, None]
    dst[i3, i2, full] = np.asarray(rows).astype(dst.dtype)


def cpy(node: Tensor, srcs: Srcs, dst: Arr) -> None:
    """Copy ``src[0]`` into the memory of ``src[1]`` (ggml_compute_forward_dup / ggml_cpy): the
    elements are taken in flat row-major order of ``src[0].ne`` and written in flat row-major order
    of the destination's ``ne`` (element-wise when the shapes agree), converting the dtype."""
    np.copyto(dst, np.reshape(srcs[0], dst.shape), casting="unsafe")


COMPUTE: dict[str, Callable[[Tensor, Srcs], Arr]] = {
    "ADD": _binary(np.add),
    "SUB": _binary(np.subtract),
    "MUL": _binary(np.multiply),
    "DIV": _binary(np.divide),
    "SCALE": scale,
    "SILU": _unary(silu_f32),
    "GELU": _unary(gelu_f32),
    "TANH": _unary(np.tanh),
    "SIGMOID": _unary(sigmoid_f32),
    "SQR": _unary(lambda x: x * x),
    "SQRT": _unary(np.sqrt),
    "RSQRT": _unary(rsqrt_f32),
    "MEAN": mean,
    "SUM_ROWS": sum_rows,
    "CONCAT": concat,
    "SWIGLU": _glu(silu_f32),
    "GEGLU": _glu(gelu_f32),
    "RMS_NORM": rms_norm,
    "NORM": norm,
    "SOFT_MAX": soft_max,
    "ROPE": rope,
    "MUL_MAT": mul_mat,
    "MUL_MAT_ID": mul_mat_id,
    "ARGSORT": argsort,
    "CLAMP": clamp,
    "FLASH_ATTN_EXT": flash_attn_ext,
    "GET_ROWS": get_rows,
    "CONT": cont,
}

WRITE: dict[str, Callable[[Tensor, Srcs, Arr], None]] = {
    "SET_ROWS": set_rows,
    "CPY": cpy,
}
