"""Structural keys of graphs: what a compiled executable depends on, and what it does not.

Two graphs with the same :func:`structural_key` rewrite to the same fused graph, generate the same
kernel sources and get the same buffer plan, so one compiled executable serves both; what differs
between them are *slots*, values bound or patched at replay time. This is the key of
:class:`fusec.runtime.cache.GraphCache` (the idea of Burn's "relative" graph structure and
llama.cpp's ``can_reuse``: tensors are named by their position in the graph, not by identity).

**In the key** (per node, in the graph's topological order):

* ``op``, ``dtype``, ``ne`` and ``nb`` (ggml order; shapes set the buffer plan, the launch grid and
  some tuning choices such as vector widths);
* every op parameter (``eps``, ``scale``, ``mode``, view ``ne``/``nb``/``offset``, FUSED
  ``pattern``/``kernel``/captures, ...) except the offset of a view marked dynamic (below). Scalar
  parameters such as ``eps`` are runtime kernel parameters and would not need to be in the key, but
  some of them select code (``max_bias == 0`` skips ALiBi, rope ``mode``), they are constant for a
  model, and keying on all of them means a hit never has to re-derive kernel parameters from them;
* the topology: each source and each view's memory owner as the *position* of that tensor in the
  graph's node order (``None`` for an absent optional source);
* flags (``input``/``weight``/``output``) and the names of leaves and outputs: weights and KV caches
  are bound by leaf name, inputs are written by name, outputs are returned by name. Names of other
  nodes are not in the key (no kernel source contains them, see ``fusec.codegen._shareable``);
* a FUSED node's decomposition, by its own structural key (recursively).

A FUSED node that writes into one of its sources (``fusec.rewrite.fuse.fused_alias_input``: a
decomposition ending in SET_ROWS) is keyed like SET_ROWS: its memory owner is that source's root
(the view-owner position above), its ``nb`` are the destination's.

``view_offs`` is not keyed separately: it follows from the views' ``offset`` parameters and the
topology.

**Slots** (not in the key; bound or patched on replay):

1. the *data* of every non-weight leaf (``inp_tokens``, ``inp_pos`` (positions), ``k_idxs`` and
   ``v_idxs`` (KV write indices), ``kq_mask`` (mask contents)): only their name, dtype and shape are
   keyed. They are written into the executable's input buffers by ``Executable.run``; the cache
   checks each array's dtype, shape and device first (:class:`InputSpec.check`).
2. the byte ``offset`` of a VIEW node whose params carry ``"dynamic_offset": True`` (a view that
   slides over a buffer from step to step). Only ``offset % DYN_OFFSET_ALIGN`` is keyed, because
   alignment selects vectorized kernel variants. On a hit the cache writes the new offset into the
   cached graph (the view and every view of it), re-derives the kernel parameters of the kernels
   touching those tensors and patches them in place (``Executable.patch_params``).

Weights are not slots: they live in the backend's persistent store under their names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FusecError
from ..ir.dtypes import DType
from ..ir.graph import Graph
from ..ir.tensor import Tensor

DYN_OFFSET_ALIGN = 16
"""Bytes: a dynamic view offset is keyed modulo this (16 B = one 4-vector of f32, two of f16)."""


class CacheError(FusecError):
    """A graph-cache request that cannot be served: a replay with an input of the wrong shape,
    dtype or device, a missing or unknown input, or a slot the executable cannot patch. The message
    names the input or node."""


@dataclass(frozen=True)
class InputSpec:
    """What a replay must bind for one non-weight leaf.

    Attributes:
        name: leaf name.
        dtype: element type.
        ne: ggml shape (4 entries, innermost first); numpy arrays have shape ``ne[::-1]`` (leading
            size-1 axes may be dropped or added).
    """

    name: str
    dtype: DType
    ne: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy shape ``ne[::-1]`` without leading 1s (``(n_tokens,)``, ``(n_tokens, n_kv)``)."""
        return _squeeze(tuple(self.ne[::-1]))

    def check(self, value: Any) -> np.ndarray:
        """``value`` as the array to bind, or :class:`CacheError` naming the input.

        Accepted: a host ``numpy.ndarray`` of exactly ``dtype`` whose shape is :attr:`shape` up to
        leading size-1 axes. Anything else (a list, a device array, float64 for an f32 input, a
        transposed or resized array) is refused; nothing is converted.
        """
        if not isinstance(value, np.ndarray):
            raise CacheError(f"graph cache: input {self.name!r} is a {type(value).__module__}.{type(value).__name__}, "
                             f"expected a host numpy.ndarray of {self.dtype} with shape {self.shape}")
        if value.dtype != self.dtype.np:
            raise CacheError(f"graph cache: input {self.name!r} is {value.dtype}, the cached graph needs "
                             f"{self.dtype} (shape {self.shape})")
        if _squeeze(value.shape) != self.shape:
            raise CacheError(f"graph cache: input {self.name!r} has shape {tuple(value.shape)}, the cached graph "
                             f"needs {self.shape} (ne={list(self.ne)})")
        return value


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(int(v) for v in shape[i:])


@dataclass(frozen=True)
class DynamicSlot:
    """A dynamic view offset: node position in the graph, its name and its current byte offset."""

    index: int
    name: str
    offset: int


@dataclass(frozen=True)
class StructuralKey:
    """The key of a graph and the slots it leaves open.

    Attributes:
        digest: hex BLAKE2b-128 of the canonical structure (see the module docstring).
        inputs: the non-weight leaves, in node order.
        dynamic: the dynamic view offsets, in node order.
        n_nodes: nodes in the graph (diagnostics).
    """

    digest: str
    inputs: tuple[InputSpec, ...]
    dynamic: tuple[DynamicSlot, ...]
    n_nodes: int

    def __str__(self) -> str:
        return self.digest[:16]


def is_dynamic_view(t: Tensor) -> bool:
    """True for a VIEW node whose byte offset is a slot (``params["dynamic_offset"]`` true)."""
    return t.op == "VIEW" and bool(t.params.get("dynamic_offset"))


def _canon(v: Any) -> Any:
    """Op params as a hashable, type-tagged value (``1`` and ``1.0`` and ``True`` differ)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return ("i", v)
    if isinstance(v, float):
        return ("f", v.hex())
    if isinstance(v, str):
        return ("s", v)
    if isinstance(v, Mapping):
        return ("d", tuple(sorted((str(k), _canon(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return ("l", tuple(_canon(x) for x in v))
    if isinstance(v, DType):
        return ("t", v.value)
    return ("r", type(v).__name__, repr(v))


def _records(graph: Graph, inputs: list[InputSpec] | None, dynamic: list[DynamicSlot] | None) -> list[tuple]:
    pos: dict[int, int] = {id(t): i for i, t in enumerate(graph.nodes)}
    outputs = {id(t) for t in graph.outputs}
    recs: list[tuple] = []
    for i, t in enumerate(graph.nodes):
        params = t.params
        if is_dynamic_view(t):
            params = dict(params)
            off = int(params.get("offset", 0))
            params["offset"] = ("dyn", off % DYN_OFFSET_ALIGN)
            if dynamic is not None:
                dynamic.append(DynamicSlot(i, t.name, off))
        named = t.is_leaf or id(t) in outputs
        sub = _digest(_records(t.decomposition, None, None)) if t.decomposition is not None else None
        recs.append((
            t.op, t.dtype.value, tuple(t.ne), tuple(t.nb),
            _canon(params) if params else (),
            tuple(-1 if s is None else pos[id(s)] for s in t.src),
            -1 if t.view_src is None else pos[id(t.view_src)],
            tuple(sorted(t.flags)),
            t.name if named else None,
            sub,
        ))
        if inputs is not None and t.is_leaf and "weight" not in t.flags:
            inputs.append(InputSpec(t.name, t.dtype, tuple(t.ne)))  # type: ignore[arg-type]
    recs.append(("outputs", tuple(pos[id(o)] for o in graph.outputs)))
    return recs


def _digest(recs: list[tuple]) -> str:
    return hashlib.blake2b(repr(recs).encode(), digest_size=16).hexdigest()


def structural_key(graph: Graph) -> StructuralKey:
    """The :class:`StructuralKey` of ``graph`` (before or after fusion; see the module docstring).

    Deterministic across processes (no ``id()`` or ``Tensor.id`` enters it). Costs one pass over
    the nodes (about 3 µs per node here). Raises nothing for a valid graph.
    """
    inputs: list[InputSpec] = []
    dynamic: list[DynamicSlot] = []
    recs = _records(graph, inputs, dynamic)
    return StructuralKey(_digest(recs), tuple(inputs), tuple(dynamic), len(graph.nodes))


def check_inputs(specs: Sequence[InputSpec], inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate a replay's ``inputs`` against ``specs``; returns them by name.

    Raises :class:`CacheError` naming the first unknown, missing or mismatched input (see
    :meth:`InputSpec.check`).
    """
    known = {s.name for s in specs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise CacheError(f"graph cache: unknown input(s) {', '.join(map(repr, unknown))}; the cached graph's "
                         f"inputs are {', '.join(map(repr, sorted(known))) or 'none'}")
    out: dict[str, np.ndarray] = {}
    for s in specs:
        if s.name not in inputs:
            raise CacheError(f"graph cache: no value for input {s.name!r} ({s.dtype}, shape {s.shape})")
        out[s.name] = s.check(inputs[s.name])
    return out


__all__ = ["DYN_OFFSET_ALIGN", "CacheError", "DynamicSlot", "InputSpec", "StructuralKey", "check_inputs",
           "is_dynamic_view", "structural_key"]
