"""``torch.export`` importer: an ExportedProgram (ATen ops) -> a fusec :class:`~fusec.ir.Graph`.

Entry points::

    graph, weights = from_exported_program(ep)        # ep = torch.export.export(model, args)
    values = input_values(ep, args)                    # example inputs by graph-input name (numpy)
    interpret(graph, {**weights, **values})            # == model(*args), to f32 rounding

Conventions:

* **Shapes.** A torch tensor of shape ``(d0, ..., d_{r-1})`` (torch/numpy order, outermost first) is
  the fusec tensor with ggml ``ne = (d_{r-1}, ..., d0)`` (innermost first) padded with 1 to 4 dims;
  ranks above 4 are accepted when their leading dims are 1 (``repeat_kv``'s 5-D expand). Torch
  strides become ggml byte strides ``nb`` in the same reversed order.
* **Views** (view, reshape, transpose, permute, t, unsqueeze, squeeze, expand, slice, select, alias,
  detach, clone, contiguous, dropout in eval, same-dtype ``_to_copy``/``to``) are tracked lazily as
  (base tensor, shape, strides, offset) and become one ggml VIEW / RESHAPE when an op reads them;
  ``expand`` is a VIEW with stride 0; a reshape of a non-contiguous value is a CONT (ggml_cont_4d).
* **Ops** (ggml semantics, :mod:`fusec.ir.ops`): ``linear(x, W, b)`` is ``MUL_MAT(W, x)`` (+ ADD b):
  ggml's ``MUL_MAT(a, b) = b·aᵀ``; ``mm/bmm/matmul(a, b)`` are ``MUL_MAT(bᵀ view, a)``; ``addmm`` adds
  the bias; add/sub/mul/div of two tensors are ADD/SUB/MUL/DIV (operands swapped for commutative ops
  so that the broadcast one is ``src1``; a broadcast ``src0`` is expanded by a stride-0 view); with a
  Python scalar they are ``SCALE(x, s, b)`` (``x/c`` becomes ``x*(1/c)``: one extra f32 rounding
  unless ``1/c`` is exact); ``neg`` is ``SCALE(-1)``; ``pow(x, 2 | 0.5 | -0.5 | 1)`` is SQR / SQRT /
  RSQRT / identity; ``rsqrt``, ``sqrt``, ``silu``, ``sigmoid``, ``tanh``, ``gelu(approximate='tanh')``
  map one to one; ``mean/sum`` over the last dim are MEAN / SUM_ROWS; ``softmax/_softmax`` over the
  last dim is SOFT_MAX; ``embedding`` is GET_ROWS (indices as i32); ``cat`` is a chain of CONCAT;
  ``scaled_dot_product_attention`` is decomposed as llama.cpp does without flash attention:
  ``MUL_MAT(k, q) -> SOFT_MAX{scale, mask} -> MUL_MAT(cont(vᵀ), p)`` (GQA through MUL_MAT's
  broadcast, ``is_causal`` as a constant -inf mask).
* **Inputs.** User inputs become ``input`` leaves named after their placeholder; parameters
  ``weight`` leaves named by their state-dict key (``model.layers.0.mlp.up_proj.weight``). Nodes whose
  value depends on no user input and no parameter (the causal mask, RoPE cos/sin from
  ``inv_freq``...) are **evaluated by torch at import time** and become ``weight`` leaves named after
  the node. Float tensors keep f32/f16; int32/int64 become i32 (values must fit).
* **Errors.** Every op without a mapping is named in one :class:`TorchImportError` (a
  :class:`fusec.errors.FusecError`): ``unsupported ATen ops: aten.foo.default (node 'foo_1'), ...``;
  a supported op used in an unsupported way (``pow(x, 3)``, a mean over another dim, a bool mask
  computed from inputs, a dtype change, dynamic shapes...) raises it naming the node and the reason.

Graph outputs are the program's user outputs (each a contiguous tensor of its own; a view is
copied by CONT), named after the output node.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..errors import FusecError
from ..ir.builder import GraphBuilder
from ..ir.graph import Graph
from ..ir.tensor import Tensor

__all__ = ["TorchImport", "TorchImportError", "from_exported_program", "input_values", "load_exported_program"]


class TorchImportError(FusecError):
    """An ExportedProgram that fusec cannot import (unsupported ops, dtypes, shapes)."""


class TorchImport(NamedTuple):
    """Result of :func:`from_exported_program`: ``graph`` and ``weights`` (leaf name -> numpy array
    in numpy order ``ne[::-1]`` squeezed to the torch shape, the leaf's dtype: float32, float16 or
    int32). Unpacks as ``graph, weights = ...``."""

    graph: Graph
    weights: dict[str, np.ndarray]


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without torch
        raise TorchImportError("importing a torch.export program needs torch (pip install torch)") from None
    return torch


# ---------------------------------------------------------------------------------------------
# shapes


def _contig(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides of ``shape`` (torch order)."""
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= int(d)
    return tuple(reversed(out))


def _is_contig(shape: Sequence[int], strides: Sequence[int]) -> bool:
    return all(s == c for d, s, c in zip(shape, strides, _contig(shape), strict=True) if d != 1)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


@dataclass(frozen=True)
class _Val:
    """A torch tensor value: ``shape``/``strides``/``offset`` (torch order, elements) over the
    contiguous memory of the fusec tensor ``base``."""

    base: Tensor
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    @classmethod
    def of(cls, t: Tensor, shape: Sequence[int]) -> _Val:
        shape = tuple(int(d) for d in shape)
        return cls(t, shape, _contig(shape), 0)

    @property
    def contiguous(self) -> bool:
        return self.offset == 0 and _is_contig(self.shape, self.strides)

    @property
    def rank(self) -> int:
        return len(self.shape)


# ---------------------------------------------------------------------------------------------
# the importer


_DTYPES = {"torch.float32": "f32", "torch.float16": "f16", "torch.int64": "i32", "torch.int32": "i32"}


class _Unsupported(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Importer:
    def __init__(self, ep):
        self.torch = _torch()
        self.ep = ep
        self.b = GraphBuilder()
        self.weights: dict[str, np.ndarray] = {}
        self.names: set[str] = set()
        self.vals: dict[Any, Any] = {}  # fx node -> _Val | python value | ("const", torch value)
        self.consts: dict[Any, Any] = {}  # fx node -> real value (folded)
        self.leaf_of_const: dict[Any, _Val] = {}
        self.mat: dict[tuple, Tensor] = {}
        self.cur = None  # fx node being imported (for error messages)

    # -- names / leaves ---------------------------------------------------------------------------
    def fresh(self, name: str) -> str:
        n, k = name, 1
        while n in self.names:
            k += 1
            n = f"{name}_{k}"
        self.names.add(n)
        return n

    def dtype_of(self, t, what: str) -> str:
        dt = _DTYPES.get(str(t.dtype))
        if dt is None:
            raise _Unsupported(f"{what} has dtype {t.dtype} (supported: float32, float16, int32/int64 as i32)")
        return dt

    def leaf(self, name: str, value, flag: str) -> _Val:
        """A leaf for a real tensor (weights/constants: value stored) or fake tensor (inputs)."""
        dt = self.dtype_of(value, f"{flag} {name!r}")
        shape = tuple(int(d) for d in value.shape)
        ne = self.ne_of(shape)
        t = self.b.leaf(self.fresh(name), dt, ne, (flag,))
        if flag == "weight":
            arr = value.detach().cpu().contiguous().numpy()
            if dt == "i32":
                if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
                    raise _Unsupported(f"integer constant {name!r} does not fit in i32")
                arr = arr.astype(np.int32)
            self.weights[t.name] = arr
        return _Val.of(t, shape)

    def ne_of(self, shape: Sequence[int]) -> tuple[int, int, int, int]:
        s = [int(d) for d in shape]
        while len(s) > 4 and s[0] == 1:
            s.pop(0)
        if len(s) > 4:
            raise _Unsupported(f"a tensor of shape {list(shape)} has more than 4 dims (ggml tensors have 4)")
        ne = list(reversed(s)) + [1] * (4 - len(s))
        return tuple(ne)  # type: ignore[return-value]

    # -- values ---------------------------------------------------------------------------------
    def materialize(self, v: _Val) -> Tensor:
        """The fusec tensor for value ``v``: its base, a RESHAPE of it, or a VIEW (strided)."""
        base = v.base
        ne = self.ne_of(v.shape)
        if v.contiguous and _numel(v.shape) == base.nelements:
            if tuple(ne) == tuple(base.ne):
                return base
            key = (id(base), "reshape", ne)
            if key not in self.mat:
                self.mat[key] = self.b.reshape(base, ne, name=self.fresh(f"{base.name}_reshape"))
            return self.mat[key]
        s, st = list(v.shape), list(v.strides)
        while len(s) > 4 and s[0] == 1:
            s.pop(0)
            st.pop(0)
        size = base.dtype.size
        nb = [int(x) * size for x in reversed(st)]
        while len(nb) < 4:
            nb.append(nb[-1] * ne[len(nb) - 1] if nb else size)
        key = (id(base), "view", ne, tuple(nb), v.offset)
        if key not in self.mat:
            self.mat[key] = self.b.view(base, ne, nb, v.offset * size, name=self.fresh(f"{base.name}_view"))
        return self.mat[key]

    def cont(self, v: _Val, name: str) -> _Val:
        """``v`` as contiguous memory of its own (CONT when it is a strided view)."""
        if v.contiguous and _numel(v.shape) == v.base.nelements:
            return v
        t = self.b.cont(self.materialize(v), self.ne_of(v.shape), name=self.fresh(name))
        return _Val.of(t, v.shape)

    def val(self, a) -> _Val:
        """The _Val of fx argument ``a`` (a node); folded constants become weight leaves."""
        fx = self.torch.fx
        if not isinstance(a, fx.Node):
            raise _Unsupported(f"expected a tensor argument, got {a!r}")
        if a in self.vals:
            v = self.vals[a]
            if isinstance(v, _Val):
                return v
        if a in self.consts:
            if a not in self.leaf_of_const:
                c = self.consts[a]
                if not isinstance(c, self.torch.Tensor):
                    raise _Unsupported(f"argument {a.name!r} is not a tensor")
                if c.dtype == self.torch.bool:
                    raise _Unsupported(f"boolean tensor {a.name!r} used by an op (only float masks are supported)")
                self.leaf_of_const[a] = self.leaf(a.name, c, "weight")
            return self.leaf_of_const[a]
        raise _Unsupported(f"argument {a.name!r} has no tensor value")

    def arg(self, a):
        """A tensor argument as _Val, or a Python scalar as is."""
        if isinstance(a, self.torch.fx.Node):
            if a in self.consts and not isinstance(self.consts[a], self.torch.Tensor):
                return self.consts[a]
            if a in self.consts and self.consts[a].ndim == 0 and self.consts[a].dtype.is_floating_point:
                return float(self.consts[a])
            return self.val(a)
        return a

    def out_shape(self, node) -> tuple[int, ...]:
        meta = node.meta.get("val")
        if meta is None or not hasattr(meta, "shape"):
            raise _Unsupported("no static output shape in the node's metadata")
        try:
            return tuple(int(d) for d in meta.shape)
        except (TypeError, ValueError):
            raise _Unsupported(f"dynamic shape {list(meta.shape)} (export with static shapes)") from None

    def result(self, node, t: Tensor, exact: bool = True) -> _Val:
        """Wrap a computed tensor as the node's value (torch shape from the node's metadata)."""
        shape = self.out_shape(node)
        if _numel(shape) != t.nelements or (exact and _squeezed(shape) != _squeezed(tuple(reversed(t.ne)))):
            raise _Unsupported(f"internal shape mismatch: fusec ne={list(t.ne)} for torch shape {list(shape)}")
        return _Val.of(t, shape)

    # -- driver ---------------------------------------------------------------------------------
    def run(self) -> TorchImport:
        torch = self.torch
        ep = self.ep
        gm = ep.graph_module
        sig = ep.graph_signature
        kinds = {}
        for spec in sig.input_specs:
            kinds[spec.arg.name] = (spec.kind.name, spec.target, getattr(spec, "persistent", None))
        state = dict(ep.state_dict)
        consts = dict(getattr(ep, "constants", {}) or {})
        nodes = list(gm.graph.nodes)
        # 1. constants and foldable nodes; collect unsupported ops
        dynamic: set = set()
        unsupported: list[str] = []
        for n in nodes:
            if n.op == "placeholder":
                kind, target, _ = kinds.get(n.name, ("USER_INPUT", None, None))
                if kind == "USER_INPUT":
                    dynamic.add(n)
                elif kind == "PARAMETER":
                    dynamic.add(n)  # not folded: stays a weight leaf
                elif kind in ("BUFFER", "CONSTANT_TENSOR", "CUSTOM_OBJ"):
                    self.consts[n] = state[target] if target in state else consts[target]
                else:  # pragma: no cover - other input kinds (tokens)
                    dynamic.add(n)
            elif n.op == "get_attr":
                self.consts[n] = _getattr(gm, n.target)
            elif n.op == "call_function":
                ins = n.all_input_nodes
                if all(i in self.consts for i in ins) and not any(i in dynamic for i in ins):
                    self.consts[n] = self.fold(n)
                    continue
                dynamic.add(n)
                if _key(n.target) not in HANDLERS:
                    unsupported.append(f"{_key(n.target)} (node {n.name!r})")
        if unsupported:
            raise TorchImportError("unsupported ATen ops: " + ", ".join(unsupported))
        # 2. build
        outputs: list[Tensor] = []
        for n in nodes:
            self.cur = n
            try:
                if n.op == "placeholder" and n in dynamic:
                    kind, target, _ = kinds.get(n.name, ("USER_INPUT", None, None))
                    if kind == "PARAMETER":
                        self.vals[n] = self.leaf(str(target), state[target], "weight")
                    else:
                        meta = n.meta.get("val")
                        if meta is None or not isinstance(meta, torch.Tensor):
                            raise _Unsupported("user input without tensor metadata (only tensor inputs are supported)")
                        self.out_shape(n)
                        self.vals[n] = self.leaf(n.name, meta, "input")
                elif n.op == "call_function" and n in dynamic:
                    self.vals[n] = HANDLERS[_key(n.target)](self, n, *n.args, **n.kwargs)
                elif n.op == "output":
                    specs = [s for s in sig.output_specs]
                    flat = list(n.args[0]) if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
                    for spec, a in zip(specs, flat, strict=False):
                        if spec.kind.name != "USER_OUTPUT":
                            raise _Unsupported(f"output kind {spec.kind.name} (buffer mutations are not supported)")
                        outputs.append(self.output(a))
            except _Unsupported as e:
                what = _key(n.target) if n.op == "call_function" else n.op
                raise TorchImportError(f"unsupported ATen ops: {what} (node {n.name!r}: {e.reason})") from None
        if not outputs:
            raise TorchImportError("the program has no tensor output")
        return TorchImport(self.b.build(outputs), self.weights)

    def fold(self, n):
        """Evaluate a node whose inputs are all constants with torch (at import time)."""
        torch = self.torch

        def real(a):
            if isinstance(a, torch.fx.Node):
                return self.consts[a]
            if isinstance(a, (list, tuple)):
                return type(a)(real(x) for x in a)
            if isinstance(a, dict):
                return {k: real(x) for k, x in a.items()}
            return a

        try:
            with torch.no_grad():
                return n.target(*real(n.args), **real(n.kwargs))
        except Exception as e:  # noqa: BLE001 - any torch failure is reported with the node
            raise TorchImportError(f"constant folding of node {n.name!r} ({_key(n.target)}) failed: {e}") from None

    def output(self, a) -> Tensor:
        v = self.arg(a)
        if not isinstance(v, _Val):
            raise _Unsupported(f"output {a!r} is not a tensor")
        t = self.materialize(v)
        if t.is_leaf or t.is_view or t.op in ("RESHAPE",):
            t = self.b.cont(t, t.ne, name=self.fresh(f"{a.name}_out"))
        return t


def _getattr(mod, target: str):
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


def _key(target) -> str:
    if target is operator.getitem:
        return "getitem"
    return str(target)


# ---------------------------------------------------------------------------------------------
# op handlers: fn(importer, node, *args, **kwargs) -> _Val

Handler = Callable[..., Any]
HANDLERS: dict[str, Handler] = {}


def handles(*names: str):
    def deco(fn: Handler) -> Handler:
        for n in names:
            HANDLERS[n] = fn
        return fn

    return deco


def _dim(d: int, rank: int) -> int:
    d = int(d)
    if d < 0:
        d += rank
    if not 0 <= d < max(rank, 1):
        raise _Unsupported(f"dim {d} out of range for rank {rank}")
    return d


# -- views (lazy) ------------------------------------------------------------------------------


@handles("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.view_copy.default")
def _reshape(im: _Importer, n, x, shape):
    v = im.arg(x)
    new = im.out_shape(n)
    if v.contiguous:
        return _Val(v.base, new, _contig(new), 0)
    c = im.cont(v, n.name)
    return _Val(c.base, new, _contig(new), 0)


@handles("aten.transpose.int")
def _transpose(im, n, x, d0, d1):
    v = im.arg(x)
    d0, d1 = _dim(d0, v.rank), _dim(d1, v.rank)
    perm = list(range(v.rank))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permuted(v, perm)


@handles("aten.t.default")
def _t(im, n, x):
    v = im.arg(x)
    return v if v.rank < 2 else _permuted(v, [1, 0])


@handles("aten.permute.default")
def _permute(im, n, x, dims):
    v = im.arg(x)
    return _permuted(v, [_dim(d, v.rank) for d in dims])


def _permuted(v: _Val, perm: Sequence[int]) -> _Val:
    return _Val(v.base, tuple(v.shape[p] for p in perm), tuple(v.strides[p] for p in perm), v.offset)


@handles("aten.unsqueeze.default")
def _unsqueeze(im, n, x, d):
    v = im.arg(x)
    d = _dim(d, v.rank + 1)
    st = v.strides[d] * v.shape[d] if d < v.rank else 1
    return _Val(v.base, v.shape[:d] + (1,) + v.shape[d:], v.strides[:d] + (st,) + v.strides[d:], v.offset)


@handles("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(im, n, x, dims=None):
    v = im.arg(x)
    if dims is None:
        ds = set(range(v.rank))
    elif isinstance(dims, (list, tuple)):
        ds = {_dim(d, v.rank) for d in dims}
    else:
        ds = {_dim(dims, v.rank)}
    keep = [i for i in range(v.rank) if not (i in ds and v.shape[i] == 1)]
    return _Val(v.base, tuple(v.shape[i] for i in keep), tuple(v.strides[i] for i in keep), v.offset)


@handles("aten.expand.default")
def _expand(im, n, x, size, implicit=False):
    v = im.arg(x)
    return _expanded(v, im.out_shape(n))


def _expanded(v: _Val, shape: Sequence[int]) -> _Val:
    """``v`` broadcast to ``shape`` (torch rules): new and size-1 dims get stride 0."""
    shape = tuple(int(d) for d in shape)
    k = len(shape) - v.rank
    st = [0] * k
    for i, (d, s) in enumerate(zip(v.shape, v.strides, strict=True)):
        if d == shape[k + i]:
            st.append(s)
        elif d == 1:
            st.append(0)
        else:
            raise _Unsupported(f"cannot broadcast shape {list(v.shape)} to {list(shape)}")
    return _Val(v.base, shape, tuple(st), v.offset)


@handles("aten.slice.Tensor")
def _slice(im, n, x, dim=0, start=None, end=None, step=1):
    v = im.arg(x)
    d = _dim(dim, v.rank)
    size = v.shape[d]
    s = 0 if start is None else int(start)
    e = size if end is None else int(end)
    s = min(max(s + size if s < 0 else s, 0), size)
    e = min(max(e + size if e < 0 else e, s), size)
    step = int(step)
    length = max(0, -(-(e - s) // step))
    shape = v.shape[:d] + (length,) + v.shape[d + 1:]
    strides = v.strides[:d] + (v.strides[d] * step,) + v.strides[d + 1:]
    return _Val(v.base, shape, strides, v.offset + s * v.strides[d])


@handles("aten.select.int")
def _select(im, n, x, dim, index):
    v = im.arg(x)
    d = _dim(dim, v.rank)
    i = int(index) + (v.shape[d] if int(index) < 0 else 0)
    return _Val(v.base, v.shape[:d] + v.shape[d + 1:], v.strides[:d] + v.strides[d + 1:], v.offset + i * v.strides[d])


@handles("aten.alias.default", "aten.detach.default", "aten.clone.default", "aten.lift_fresh_copy.default")
def _identity(im, n, x, *args, **kwargs):
    return im.arg(x)


@handles("aten.contiguous.default")
def _contiguous(im, n, x, memory_format=None):
    return im.cont(im.arg(x), n.name)


@handles("aten.dropout.default")
def _dropout(im, n, x, p, train):
    if train and float(p) != 0.0:
        raise _Unsupported(f"dropout with p={p} in training mode")
    return im.arg(x)


@handles("aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.type_as.default")
def _to(im, n, x, *args, **kwargs):
    v = im.arg(x)
    meta = n.meta.get("val")
    want = _DTYPES.get(str(getattr(meta, "dtype", "")))
    if want != str(v.base.dtype):
        raise _Unsupported(f"dtype conversion {v.base.dtype} -> {getattr(meta, 'dtype', '?')} (only same-dtype "
                           "casts are supported)")
    return v


@handles("aten._assert_tensor_metadata.default")
def _assert_meta(im, n, *args, **kwargs):
    return None


# -- element-wise ------------------------------------------------------------------------------

_SCALAR = (int, float)


def _float_val(im, v: _Val, what: str) -> None:
    if str(v.base.dtype) not in ("f32", "f16"):
        raise _Unsupported(f"{what} must be a float tensor, got {v.base.dtype}")


def _binary_op(op: str, commutative: bool):
    def handler(im: _Importer, n, a, b, alpha=1):
        a, b = im.arg(a), im.arg(b)
        if alpha != 1:
            if isinstance(b, _SCALAR):
                b = b * alpha
            else:
                b = _Val.of(im.b.scale(im.materialize(b), float(alpha), name=im.fresh(f"{n.name}_alpha")), b.shape)
        if isinstance(a, _SCALAR) and isinstance(b, _SCALAR):
            raise _Unsupported("both operands are Python scalars")
        if isinstance(a, _SCALAR):
            if not commutative:
                if op == "SUB":  # c - x
                    return im.result(n, im.b.scale(im.materialize(b), -1.0, float(a), name=im.fresh(n.name)))
                raise _Unsupported("a Python scalar divided by a tensor")
            a, b = b, a
        if isinstance(b, _SCALAR):
            _float_val(im, a, "the tensor operand")
            s, c = {"ADD": (1.0, float(b)), "SUB": (1.0, -float(b)), "MUL": (float(b), 0.0),
                    "DIV": (1.0 / float(b) if float(b) != 0 else math.inf, 0.0)}[op]
            return im.result(n, im.b.scale(im.materialize(a), s, c, name=im.fresh(n.name)))
        _float_val(im, a, "src[0]")
        _float_val(im, b, "src[1]")
        if a.base.dtype != b.base.dtype:
            raise _Unsupported(f"mixed operand dtypes {a.base.dtype} and {b.base.dtype}")
        out = im.out_shape(n)
        if tuple(a.shape) != out and commutative and tuple(b.shape) == out:
            a, b = b, a
        if tuple(a.shape) != out:
            a = _expanded(a, out)
        t = im.b.op(op, [im.materialize(a), im.materialize(b)], name=im.fresh(n.name))
        return im.result(n, t)

    return handler


for _name, _op, _comm in [("add", "ADD", True), ("sub", "SUB", False), ("mul", "MUL", True), ("div", "DIV", False)]:
    HANDLERS[f"aten.{_name}.Tensor"] = _binary_op(_op, _comm)
    HANDLERS[f"aten.{_name}.Scalar"] = _binary_op(_op, _comm)


@handles("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(im, n, x, other, alpha=1):
    return _binary_op("SUB", False)(im, n, other, x, alpha)


def _unary(op: str):
    def handler(im: _Importer, n, x, *args, **kwargs):
        v = im.arg(x)
        _float_val(im, v, "the operand")
        return im.result(n, im.b.op(op, [im.materialize(v)], name=im.fresh(n.name)))

    return handler


for _name, _op in [("rsqrt", "RSQRT"), ("sqrt", "SQRT"), ("silu", "SILU"), ("sigmoid", "SIGMOID"), ("tanh", "TANH")]:
    HANDLERS[f"aten.{_name}.default"] = _unary(_op)


@handles("aten.gelu.default")
def _gelu(im, n, x, approximate="none"):
    if approximate != "tanh":
        raise _Unsupported(f"gelu(approximate={approximate!r}): fusec's GELU is ggml's tanh approximation")
    return _unary("GELU")(im, n, x)


@handles("aten.neg.default")
def _neg(im, n, x):
    v = im.arg(x)
    _float_val(im, v, "the operand")
    return im.result(n, im.b.scale(im.materialize(v), -1.0, name=im.fresh(n.name)))


@handles("aten.pow.Tensor_Scalar")
def _pow(im, n, x, e):
    ops = {2: "SQR", 0.5: "SQRT", -0.5: "RSQRT"}
    if float(e) == 1.0:
        return im.arg(x)
    if float(e) not in ops:
        raise _Unsupported(f"exponent {e} (supported: 2, 0.5, -0.5, 1)")
    return _unary(ops[float(e)])(im, n, x)


# -- reductions, softmax ---------------------------------------------------------------------


def _last_dim_only(v: _Val, dims, what: str) -> None:
    ds = [dims] if isinstance(dims, int) else list(dims or [])
    if [_dim(d, v.rank) for d in ds] != [v.rank - 1]:
        raise _Unsupported(f"{what} over dims {ds} (only the last dim, ggml ne[0], is supported)")


def _reduce(op: str):
    def handler(im: _Importer, n, x, dims=None, keepdim=False, dtype=None):
        v = im.arg(x)
        _float_val(im, v, "the operand")
        _last_dim_only(v, dims, op.lower())
        return im.result(n, im.b.op(op, [im.materialize(v)], name=im.fresh(n.name)))

    return handler


HANDLERS["aten.mean.dim"] = _reduce("MEAN")
HANDLERS["aten.sum.dim_IntList"] = _reduce("SUM_ROWS")


@handles("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")
def _softmax(im, n, x, dim, dtype_or_half=None):
    v = im.arg(x)
    _last_dim_only(v, dim, "softmax")
    if str(v.base.dtype) != "f32":
        raise _Unsupported("softmax of a non-f32 tensor")
    return im.result(n, im.b.soft_max(im.materialize(v), name=im.fresh(n.name)))


# -- matrix products -----------------------------------------------------------------------------


def _matmul_vals(im: _Importer, n, a: _Val, bv: _Val, name: str) -> Tensor:
    """``a @ b`` for ranks >= 2: ``MUL_MAT(bᵀ, a)`` (ggml: result ne = [N, M, batch...])."""
    if a.rank < 2 or bv.rank < 2:
        raise _Unsupported("matmul with a 1-D operand")
    _float_val(im, a, "the left operand")
    _float_val(im, bv, "the right operand")
    bt = _permuted(bv, [*range(bv.rank - 2), bv.rank - 1, bv.rank - 2])
    batch = tuple(int(d) for d in np.broadcast_shapes(a.shape[:-2], bv.shape[:-2]))
    if tuple(a.shape[:-2]) != batch:
        a = im.cont(_expanded(a, batch + a.shape[-2:]), f"{name}_expand")
    if str(a.base.dtype) != "f32":
        raise _Unsupported("matmul's left operand must be f32 (ggml MUL_MAT src1)")
    return im.b.mul_mat(im.materialize(bt), im.materialize(a), name=im.fresh(name))


@handles("aten.matmul.default", "aten.mm.default", "aten.bmm.default")
def _matmul(im, n, a, b):
    return im.result(n, _matmul_vals(im, n, im.arg(a), im.arg(b), n.name))


@handles("aten.linear.default")
def _linear(im, n, x, w, bias=None):
    v, wv = im.arg(x), im.arg(w)
    if wv.rank != 2:
        raise _Unsupported("linear weight must be 2-D")
    _float_val(im, wv, "the weight")
    if str(v.base.dtype) != "f32":
        raise _Unsupported("linear input must be f32 (ggml MUL_MAT src1)")
    name = n.name if bias is None else f"{n.name}_mm"
    t = im.b.mul_mat(im.materialize(wv), im.materialize(v), name=im.fresh(name))
    if bias is not None:
        t = im.b.add(t, im.materialize(im.arg(bias)), name=im.fresh(n.name))
    return im.result(n, t)


@handles("aten.addmm.default")
def _addmm(im, n, bias, a, b, beta=1, alpha=1):
    t = _matmul_vals(im, n, im.arg(a), im.arg(b), f"{n.name}_mm")
    if alpha != 1:
        t = im.b.scale(t, float(alpha), name=im.fresh(f"{n.name}_alpha"))
    bv = im.materialize(im.arg(bias))
    if beta != 1:
        bv = im.b.scale(bv, float(beta), name=im.fresh(f"{n.name}_beta"))
    return im.result(n, im.b.add(t, bv, name=im.fresh(n.name)))


# -- rows, concat --------------------------------------------------------------------------------


@handles("aten.embedding.default")
def _embedding(im, n, w, ids, *args, **kwargs):
    wv, iv = im.arg(w), im.arg(ids)
    if wv.rank != 2:
        raise _Unsupported("embedding table must be 2-D")
    if str(iv.base.dtype) != "i32":
        raise _Unsupported("embedding indices must be integers")
    flat = _Val(iv.base, (_numel(iv.shape),), (1,), 0) if iv.contiguous else None
    if flat is None:
        c = im.cont(iv, f"{n.name}_ids")
        flat = _Val(c.base, (_numel(iv.shape),), (1,), 0)
    t = im.b.get_rows(im.materialize(wv), im.materialize(flat), name=im.fresh(n.name))
    return im.result(n, t, exact=False)


@handles("aten.cat.default")
def _cat(im, n, tensors, dim=0):
    vals = [im.arg(t) for t in tensors]
    vals = [v for v in vals if _numel(v.shape) > 0]
    if not vals:
        raise _Unsupported("cat of empty tensors")
    rank = vals[0].rank
    d = _dim(dim, rank)
    cur = vals[0]
    for i, v in enumerate(vals[1:]):
        last = i == len(vals) - 2
        t = im.b.concat(im.materialize(cur), im.materialize(v), rank - 1 - d,
                        name=im.fresh(n.name if last else f"{n.name}_{i}"))
        shape = list(cur.shape)
        shape[d] += v.shape[d]
        cur = _Val.of(t, shape)
    return im.result(n, cur.base) if len(vals) > 1 else cur


# -- attention -------------------------------------------------------------------------------------


@handles("aten.scaled_dot_product_attention.default")
def _sdpa(im, n, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    torch = im.torch
    qv, kv, vv = im.arg(q), im.arg(k), im.arg(v)
    if float(dropout_p) != 0.0:
        raise _Unsupported(f"dropout_p={dropout_p}")
    if qv.rank != 4 or kv.rank != 4 or vv.rank != 4:
        raise _Unsupported("q, k, v must be 4-D [batch, heads, tokens, head_dim]")
    for t, nm in ((qv, "q"), (kv, "k"), (vv, "v")):
        if str(t.base.dtype) != "f32":
            raise _Unsupported(f"{nm} must be f32")
    B, H, Tq, D = qv.shape
    Hk, Tk = kv.shape[1], kv.shape[2]
    if H % Hk or B % kv.shape[0]:
        raise _Unsupported("q heads must be a multiple of k/v heads")
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kq = im.b.mul_mat(im.materialize(kv), im.materialize(qv), name=im.fresh(f"{n.name}_kq"))
    mask = None
    if is_causal:
        if attn_mask is not None:
            raise _Unsupported("attn_mask together with is_causal")
        m = torch.zeros(Tq, Tk).masked_fill(~torch.ones(Tq, Tk, dtype=torch.bool).tril(), float("-inf"))
        mask = im.materialize(im.leaf(f"{n.name}_causal_mask", m, "weight"))
    elif attn_mask is not None:
        if attn_mask in im.consts and im.consts[attn_mask].dtype == torch.bool:
            mv = im.consts[attn_mask]
            im.consts[attn_mask] = torch.zeros(mv.shape).masked_fill(~mv, float("-inf"))
        mval = im.arg(attn_mask)
        if str(mval.base.dtype) not in ("f32", "f16"):
            raise _Unsupported("attn_mask must be a float tensor (or a constant bool mask)")
        shape = tuple(mval.shape)
        shape = (1,) * (4 - len(shape)) + shape
        full = (shape[0], shape[1], Tq, Tk)
        mval = _expanded(mval, full)
        mval = im.cont(mval, f"{n.name}_mask") if not _is_contig(mval.shape[-1:], mval.strides[-1:]) or \
            any(s == 0 for s in mval.strides[-2:]) else mval
        mask = im.materialize(mval)
    p = im.b.soft_max_ext(kq, mask, scale=sc, name=im.fresh(f"{n.name}_softmax"))
    vt = im.cont(_permuted(vv, [0, 1, 3, 2]), f"{n.name}_vT")
    out = im.b.mul_mat(im.materialize(vt), p, name=im.fresh(n.name))
    return im.result(n, out)


# ---------------------------------------------------------------------------------------------
# public API


def from_exported_program(ep) -> TorchImport:
    """Import a ``torch.export.ExportedProgram`` into a fusec graph.

    Args:
        ep: the program (``torch.export.export(model, args)``, static shapes; float32 models; core
            ATen or the pre-dispatch ATen graph HF models export to).

    Returns:
        :class:`TorchImport` ``(graph, weights)``: the fusec graph (ggml semantics, ``ne`` order
        innermost first; see the module docstring for the op mapping) and the values of its
        ``weight`` leaves by leaf name (parameters by state-dict key, folded constants by node name).
        Run it with ``interpret(graph, {**weights, **input_values(ep, args)})``.

    Raises:
        TorchImportError: unsupported ATen ops (all of them named, with their nodes), unsupported
            uses of supported ops, dtypes or dynamic shapes.
    """
    return _Importer(ep).run()


def input_values(ep, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The user inputs ``args``/``kwargs`` (as passed to the exported model) as numpy arrays keyed by
    the graph's input names; int64 index tensors become int32 (the graph's i32 leaves). Raises
    :class:`TorchImportError` when the number of tensors differs from the program's user inputs."""
    torch = _torch()
    from torch.utils import _pytree as pytree

    flat = [x for x in pytree.tree_flatten((tuple(args), dict(kwargs or {})))[0] if isinstance(x, torch.Tensor)]
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(flat) != len(names):
        raise TorchImportError(f"{len(flat)} input tensors given for the program's {len(names)} user inputs "
                               f"({', '.join(names)})")
    out = {}
    for nm, x in zip(names, flat, strict=True):
        arr = x.detach().cpu().contiguous().numpy()
        if arr.dtype == np.int64:
            arr = arr.astype(np.int32)
        out[nm] = arr
    return out


def load_exported_program(path: str):
    """``torch.export.load(path)``; raises :class:`TorchImportError` for a missing or unreadable file."""
    torch = _torch()
    try:
        return torch.export.load(path)
    except FileNotFoundError:
        raise TorchImportError(f"no such file: {path}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
        raise TorchImportError(f"cannot load {path} as a torch.export program: {e}") from None
