"""Graph builder in ggml's vocabulary (``ggml_rms_norm``, ``ggml_mul``, ``ggml_mul_mat``, ...).

Shapes passed to and returned by the builder are ggml ``ne`` tuples (innermost first, up to 4
entries). Every method validates its operands with the op registry and raises
:class:`fusec.errors.GraphError` naming the node on invalid input.

Example::

    b = GraphBuilder()
    x = b.input("x", "f32", (4096, 32))        # 32 rows of 4096
    w = b.weight("w", "f32", (4096,))
    y = b.mul(b.rms_norm(x, eps=1e-6), w, name="y")
    g = b.build([y])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import GraphError
from .dtypes import DType
from .graph import Graph
from .ops import SORT_ORDERS, OpCheckError, get_op
from .shape import contiguous_nb, norm_ne
from .tensor import Tensor


class GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[Tensor] = []
        self._next_id = 0

    # -- core ----------------------------------------------------------------------------------
    def _id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def leaf(self, name: str, dtype: DType | str, ne: Sequence[int], flags: Sequence[str] = ()) -> Tensor:
        """A leaf tensor (op ``NONE``), contiguous, with ``ne`` in ggml order."""
        dt = dtype if isinstance(dtype, DType) else DType.parse(dtype)
        try:
            ne4 = norm_ne(ne)
        except ValueError as e:
            raise GraphError(str(e), node=repr(name), field="ne") from None
        t = Tensor(self._id(), "NONE", (), {}, dt, ne4, contiguous_nb(ne4, dt.size), name, set(flags))
        self.nodes.append(t)
        return t

    def input(self, name: str, dtype: DType | str, ne: Sequence[int]) -> Tensor:
        return self.leaf(name, dtype, ne, ("input",))

    def weight(self, name: str, dtype: DType | str, ne: Sequence[int]) -> Tensor:
        return self.leaf(name, dtype, ne, ("weight",))

    def op(self, op: str, srcs: Sequence[Tensor | None], params: dict[str, Any] | None = None,
           name: str | None = None) -> Tensor:
        """Apply ``op`` (a registry name) to ``srcs``; the generic constructor behind every helper."""
        node_id = self._id()
        nm = name or f"node_{node_id}"
        try:
            opdef = get_op(op)
        except KeyError as e:
            raise GraphError(str(e.args[0]), node=repr(nm), field="op") from None
        full = dict(opdef.params)
        if params:
            full.update(params)
        srcs = tuple(srcs)
        lo, hi = opdef.arity
        while srcs and srcs[-1] is None and len(srcs) > lo:
            srcs = srcs[:-1]
        if not lo <= len(srcs) <= hi:
            raise GraphError(f"{op} takes {lo}..{hi} sources, got {len(srcs)}", node=repr(nm), field="src")
        try:
            present = list(srcs)
            if None in present[:lo]:
                raise OpCheckError("required source is missing")
            lay = opdef.infer(present, full)
        except OpCheckError as e:
            raise GraphError(str(e), node=repr(nm), field=e.field) from None
        except (KeyError, TypeError, ValueError) as e:
            raise GraphError(f"bad op params for {op}: {e}", node=repr(nm), field="params") from None
        nb = lay.nb if lay.nb is not None else contiguous_nb(lay.ne, lay.dtype.size)
        view_src, view_offs = None, 0
        if lay.view_of is not None:
            view_src = lay.view_of.root
            view_offs = lay.view_of.view_offs + lay.view_offs
        t = Tensor(node_id, op, srcs, full, lay.dtype, lay.ne, tuple(nb), nm, set(),
                   view_src, view_offs)
        self.nodes.append(t)
        return t

    def build(self, outputs: Sequence[Tensor]) -> Graph:
        """Finish: a :class:`Graph` of everything reachable from ``outputs`` (plus all nodes built)."""
        return Graph(self.nodes, outputs)

    # -- element-wise ----------------------------------------------------------------------------
    def add(self, a, b, name=None):
        """``a + b`` with ``b`` broadcast to ``a`` (ggml_add)."""
        return self.op("ADD", [a, b], name=name)

    def sub(self, a, b, name=None):
        return self.op("SUB", [a, b], name=name)

    def mul(self, a, b, name=None):
        """``a * b`` with ``b`` broadcast to ``a`` (ggml_mul)."""
        return self.op("MUL", [a, b], name=name)

    def div(self, a, b, name=None):
        return self.op("DIV", [a, b], name=name)

    def scale(self, a, s: float, b: float = 0.0, name=None):
        """``a * s + b`` (ggml_scale / ggml_scale_bias)."""
        return self.op("SCALE", [a], {"s": float(s), "b": float(b)}, name=name)

    def silu(self, a, name=None):
        return self.op("SILU", [a], name=name)

    def gelu(self, a, name=None):
        return self.op("GELU", [a], name=name)

    def tanh(self, a, name=None):
        return self.op("TANH", [a], name=name)

    def sigmoid(self, a, name=None):
        return self.op("SIGMOID", [a], name=name)

    def sqr(self, a, name=None):
        """``x*x`` element-wise (ggml_sqr); f32/f16, same ``ne``."""
        return self.op("SQR", [a], name=name)

    def sqrt(self, a, name=None):
        """``sqrt(x)`` element-wise (ggml_sqrt); f32/f16, same ``ne``."""
        return self.op("SQRT", [a], name=name)

    def rsqrt(self, a, name=None):
        """``1/sqrt(x)`` element-wise (fusec extension, torch.rsqrt); f32/f16, same ``ne``."""
        return self.op("RSQRT", [a], name=name)

    def mean(self, a, name=None):
        """Row mean over ``ne[0]`` (ggml_mean): ``ne = [n, r1, r2, r3]`` -> f32 ``[1, r1, r2, r3]``."""
        return self.op("MEAN", [a], name=name)

    def sum_rows(self, a, name=None):
        """Row sum over ``ne[0]`` (ggml_sum_rows): ``ne = [n, r1, r2, r3]`` -> f32 ``[1, r1, r2, r3]``."""
        return self.op("SUM_ROWS", [a], name=name)

    def concat(self, a, b, dim: int, name=None):
        """``a`` then ``b`` along ggml dimension ``dim`` (0 = ne[0], innermost; ggml_concat); same dtype,
        every other ``ne`` equal."""
        return self.op("CONCAT", [a, b], {"dim": int(dim)}, name=name)

    def swiglu(self, a, b=None, name=None):
        """``silu(a) * b`` (ggml_swiglu_split), or on the two halves of ``a`` when ``b`` is None."""
        return self.op("SWIGLU", [a, b], name=name)

    def geglu(self, a, b=None, name=None):
        return self.op("GEGLU", [a, b], name=name)

    def clamp(self, a, min: float, max: float, name=None):  # noqa: A002  (ggml's parameter names)
        """``max(min(x, max), min)`` element-wise (ggml_clamp); f32/f16, same ``ne``; ``max`` may be
        ``float('inf')``."""
        return self.op("CLAMP", [a], {"min": float(min), "max": float(max)}, name=name)

    # -- row ops ---------------------------------------------------------------------------------
    def argsort(self, a, order: str | int = "asc", name=None):
        """Column indices of each row of ``a`` sorted by value (ggml_argsort): f32 ne=[n, r1, r2, r3]
        -> i32, same ``ne``; ``order`` ``"asc"``/``"desc"`` (or GGML_SORT_ORDER_* 0/1). Raises
        :class:`GraphError` for another dtype or order."""
        o = SORT_ORDERS.get(order, order) if isinstance(order, str) else int(order)
        return self.op("ARGSORT", [a], {"order": o}, name=name)

    def argsort_top_k(self, a, k: int, name=None, argsort_name=None):
        """Indices of the ``k`` largest values of each row, largest first (ggml_argsort_top_k: an
        ARGSORT in descending order, then a VIEW of its first ``k`` columns): f32 ne=[n, r1, r2, r3]
        -> i32 view ne=[k, r1, r2, r3] (row stride ``n``). Raises :class:`GraphError` for
        ``k > n``."""
        if not 1 <= int(k) <= a.ne[0]:
            raise GraphError(f"argsort_top_k: k={k} must be in 1..ne[0]={a.ne[0]}", node=repr(name or "argsort_top_k"),
                             field="params")
        s = self.argsort(a, "desc", name=argsort_name)
        return self.view(s, (int(k), *s.ne[1:]), s.nb, 0, name=name)

    def rms_norm(self, a, eps: float, name=None):
        """``x / sqrt(mean(x^2) + eps)`` over ``ne[0]`` (ggml_rms_norm)."""
        return self.op("RMS_NORM", [a], {"eps": float(eps)}, name=name)

    def norm(self, a, eps: float, name=None):
        """``(x - mean) / sqrt(var + eps)`` over ``ne[0]`` (ggml_norm)."""
        return self.op("NORM", [a], {"eps": float(eps)}, name=name)

    def soft_max_ext(self, a, mask=None, scale: float = 1.0, max_bias: float = 0.0, name=None):
        """``softmax(a*scale + slope*mask)`` over ``ne[0]`` (ggml_soft_max_ext)."""
        return self.op("SOFT_MAX", [a, mask], {"scale": float(scale), "max_bias": float(max_bias)}, name=name)

    def soft_max(self, a, name=None):
        return self.soft_max_ext(a, None, 1.0, 0.0, name=name)

    def rope(self, a, pos, n_dims: int, mode: int = 0, freq_factors=None, n_ctx_orig: int = 0,
             freq_base: float = 10000.0, freq_scale: float = 1.0, ext_factor: float = 0.0,
             attn_factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0, name=None):
        """Rotary embedding (ggml_rope_ext). ``a`` ne = [head_dim, n_head, n_tokens, 1];
        ``pos`` i32 ne = [n_tokens]; mode 0 = normal (adjacent pairs), 2 = neox (halves)."""
        return self.op("ROPE", [a, pos, freq_factors], {
            "n_dims": int(n_dims), "mode": int(mode), "n_ctx_orig": int(n_ctx_orig),
            "freq_base": float(freq_base), "freq_scale": float(freq_scale), "ext_factor": float(ext_factor),
            "attn_factor": float(attn_factor), "beta_fast": float(beta_fast), "beta_slow": float(beta_slow),
        }, name=name)

    def flash_attn_ext(self, q, k, v, mask=None, scale: float = 1.0, max_bias: float = 0.0,
                       logit_softcap: float = 0.0, name=None):
        """Fused attention (ggml_flash_attn_ext): q f32 ne=[D, n_q, n_head, n_seq]; k ne=[D, n_kv,
        n_head_kv, k3], v ne=[Dv, n_kv, n_head_kv, v3] (f32/f16, not transposed; head ``h`` uses kv
        head ``h / (n_head/n_head_kv)``); mask f32/f16 ne=[n_kv, >= n_q, 1|m2, 1|m3] or None. Result
        f32 ne=[Dv, n_head, n_q, n_seq]: ``softmax(softcap*tanh(scale*q.k/softcap) + slope*mask) @ v``
        (no tanh when ``logit_softcap == 0``; ``slope`` is the ALiBi slope, 1 when ``max_bias == 0``).
        Raises :class:`GraphError` for mismatched shapes or dtypes."""
        return self.op("FLASH_ATTN_EXT", [q, k, v, mask], {"scale": float(scale), "max_bias": float(max_bias),
                                                           "logit_softcap": float(logit_softcap)}, name=name)

    # -- matmul / rows ------------------------------------------------------------------------------
    def mul_mat(self, a, b, name=None):
        """``b @ a^T`` per batch (ggml_mul_mat): a ne=[K, M, ...], b ne=[K, N, ...] -> ne=[M, N, ...]."""
        return self.op("MUL_MAT", [a, b], name=name)

    def mul_mat_id(self, as_, b, ids, name=None):
        """Expert matmul (ggml_mul_mat_id): ``as_`` f32/f16 ne=[K, M, n_as] (one matrix per expert),
        ``b`` f32 ne=[K, B1, T] (``B1`` 1 or the experts used), ``ids`` i32 ne=[E, T] (expert of each
        slot, ``E % B1 == 0``) -> f32 ne=[M, E, T] with ``dst[t][e] = as_[ids[t][e]] · b[t][e % B1]``.
        Raises :class:`GraphError` naming the node for mismatched shapes or dtypes."""
        return self.op("MUL_MAT_ID", [as_, b, ids], name=name)

    def get_rows(self, a, idx, name=None):
        """Rows ``a[idx]`` (ggml_get_rows): a ne=[n, rows, ...], idx i32 ne=[k, ...] -> ne=[n, k, ...]."""
        return self.op("GET_ROWS", [a, idx], name=name)

    def set_rows(self, dst, rows, idx, name=None):
        """Write ``rows`` into ``dst`` at row indices ``idx`` (ggml_set_rows); the result is a view of
        ``dst`` (sources in ggml order: rows, idx, dst)."""
        return self.op("SET_ROWS", [rows, idx, dst], name=name)

    def cpy(self, a, b, name=None):
        """Copy ``a`` into ``b``, converting dtype (ggml_cpy); the result is a view of ``b``."""
        return self.op("CPY", [a, b], name=name)

    def cont(self, a, ne: Sequence[int] | None = None, name=None):
        """Contiguous copy of ``a``, optionally reshaped to ``ne`` (ggml_cont / ggml_cont_4d)."""
        return self.op("CONT", [a], {"ne": list(norm_ne(ne)) if ne else None}, name=name)

    # -- views ---------------------------------------------------------------------------------------
    def view(self, a, ne: Sequence[int], nb: Sequence[int] | None = None, offset: int = 0, name=None):
        """View of ``a`` with shape ``ne`` and byte strides ``nb`` (both ggml order, ``nb`` including
        ``nb[0]``; missing trailing strides are packed, default all packed) at byte ``offset`` into
        ``a`` (ggml_view_4d)."""
        ne4 = norm_ne(ne)
        nb4 = list(nb) if nb is not None else [a.dtype.size]
        while len(nb4) < 4:  # higher dims packed after the given ones
            nb4.append(nb4[-1] * ne4[len(nb4) - 1])
        return self.op("VIEW", [a], {"ne": list(ne4), "nb": nb4, "offset": int(offset)}, name=name)

    def reshape(self, a, ne: Sequence[int], name=None):
        return self.op("RESHAPE", [a], {"ne": list(norm_ne(ne))}, name=name)

    def permute(self, a, ax0: int, ax1: int, ax2: int, ax3: int, name=None):
        """ggml_permute: dimension ``i`` of ``a`` moves to position ``axi``."""
        return self.op("PERMUTE", [a], {"axes": [ax0, ax1, ax2, ax3]}, name=name)

    def transpose(self, a, name=None):
        return self.op("TRANSPOSE", [a], name=name)
