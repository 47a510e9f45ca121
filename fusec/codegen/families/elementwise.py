"""Shared machinery of the element-wise kernel families (binary, unary, glu, copy, get_rows, set_rows).

Two kernel shapes cover the six families:

* **map** (:func:`emit_map`): one thread per destination element (or per 4 consecutive elements,
  the ``v4`` variant); the destination is a contiguous tensor of its own; every *operand* is a
  strided read of a bound buffer, optionally broadcast (``i % ne``, as ``ggml_can_repeat``); the
  family's template supplies the value expression in f32 registers ``x0, x1, ...``.
* **move** (:func:`emit_move`): one thread per element moved; the family's template computes the
  source and destination element offsets (gathers, scatters, reshaping copies) and the skeleton
  converts the dtype on the way (``f32 <-> f16``).

Templates: ``templates/<backend>/<family>.<ext>.j2`` extend one shared skeleton per family
(``templates/common/elementwise_<family>.j2``, built on ``elementwise_{map,move}.j2``), the same
for all three backends: the dialect macros of ``templates/common/elementwise.j2`` spell each
backend's syntax.
Shapes, strides and offsets are runtime parameters (elements, ggml order); the source depends only
on dtypes, op structure, vector width and workgroup size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import CodegenError
from ...ir.dtypes import DType
from ...ir.tensor import Tensor
from ..env import PARAM_TYPE_NAMES, TYPE_NAMES, render
from ..kernel import Binding, Kernel
from ..layout import ceil_div, elem_offset, elem_strides

WORKGROUP_SIZE = 256
"""Threads per workgroup / block / threadgroup of every element-wise kernel."""
MAX_GRID_DIM = 65535
"""Largest number of workgroups along one grid dimension (WebGPU's default limit, CUDA's y/z)."""
VEC = 4
"""Elements per thread of the vectorized (``v4``) map variant."""
EXT = {"wgsl": "wgsl", "cuda": "cu", "msl": "metal"}

Param = tuple[str, str, int | float]


@dataclass(frozen=True)
class Operand:
    """One strided f32-register read of a map kernel.

    Attributes:
        binding: name of the bound buffer (several operands may read the same buffer).
        prefix: parameter prefix: ``<prefix>_ne0..3``, ``<prefix>_nb0..3`` (element strides),
            ``<prefix>_offs`` (element offset into the bound root buffer).
        ne: shape, ggml order (the destination's, or a divisor of it when ``bcast``).
        nb: strides in elements, ggml order.
        offs: element offset into the root buffer.
        bcast: index with ``i_k % ne_k`` (ggml_can_repeat broadcasting).
    """

    binding: str
    prefix: str
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    offs: int
    bcast: bool = False

    @classmethod
    def of(cls, binding: str, prefix: str, t: Tensor, bcast: bool = False, extra_offs: int = 0,
           ne: Sequence[int] | None = None) -> Operand:
        """The operand reading tensor ``t`` (through its root's memory), ``extra_offs`` elements
        further in and with shape ``ne`` (default ``t.ne``)."""
        shape = tuple(int(v) for v in (ne if ne is not None else t.ne))
        return cls(binding, prefix, shape, elem_strides(t), elem_offset(t) + extra_offs, bcast)  # type: ignore[arg-type]

    def params(self) -> list[Param]:
        ne = [(f"{self.prefix}_ne{i}", "u32", v) for i, v in enumerate(self.ne)] if self.bcast else []
        nb = [(f"{self.prefix}_nb{i}", "u32", v) for i, v in enumerate(self.nb)]
        return ne + nb + [(f"{self.prefix}_offs", "u32", self.offs)]

    def vectorizable(self) -> bool:
        """Four consecutive destination elements read four aligned consecutive elements here."""
        return (self.nb[0] == 1 and self.ne[0] % VEC == 0 and self.offs % VEC == 0
                and all(n == 1 or s % VEC == 0 for n, s in zip(self.ne[1:], self.nb[1:], strict=True)))


def grid_for(n_threads: int, node: Tensor) -> tuple[int, int, int]:
    """Workgroups for ``n_threads`` threads, folded into a 2-D grid (x <= 65535); the kernels
    linearize ``(wid.y * num_workgroups.x + wid.x) * WORKGROUP_SIZE + lid.x`` and return past
    ``n_threads``. Raises :class:`CodegenError` when even the folded grid is too large."""
    groups = max(1, ceil_div(n_threads, WORKGROUP_SIZE))
    gx = min(groups, MAX_GRID_DIM)
    gy = ceil_div(groups, gx)
    if gy > MAX_GRID_DIM:
        raise CodegenError(f"node {node.name!r}: {n_threads} threads exceed a {MAX_GRID_DIM}x{MAX_GRID_DIM} grid")
    return (gx, gy, 1)


def _check_backend(node: Tensor, backend: str) -> None:
    if backend not in EXT:
        raise CodegenError(f"node {node.name!r}: unknown codegen backend {backend!r}")


def _dtype_tag(dtypes: Sequence[DType]) -> str:
    return "_".join(str(d) for d in dtypes)


def _binding_ctx(bindings: Sequence[Binding], backend: str, vec: bool) -> list[dict]:
    return [{"name": b.name, "type": TYPE_NAMES[backend][b.dtype], "dtype": str(b.dtype), "write": b.write,
             "vec": vec} for b in bindings]


def _render(family: str, backend: str, node: Tensor, **ctx) -> str:
    src_names = ", ".join(repr(s.name) for s in node.src if s is not None)
    return render(f"{backend}/{family}.{EXT[backend]}.j2", dialect=backend, wg=WORKGROUP_SIZE, family=family,
                  node_name=node.name, src_names=src_names, **ctx)


def _kernel(family: str, backend: str, entry: str, source: str, bindings: list[Binding], params: list[Param],
            n_threads: int, node: Tensor) -> Kernel:
    return Kernel(backend=backend, family=family, entry=entry, source=source, bindings=bindings, params=params,
                  workgroup_size=(WORKGROUP_SIZE, 1, 1), grid=grid_for(n_threads, node), node=node)


def emit_map(node: Tensor, backend: str, *, family: str, op: str, srcs: Sequence[Binding],
             operands: Sequence[Operand], extra_params: Sequence[Param] = (), allow_vec: bool = True,
             **ctx) -> Kernel:
    """A map kernel writing ``node`` (contiguous, its own memory) from ``operands``.

    Args:
        node: the node computed; its ``ne``/``dtype`` give the destination binding ``dst``.
        backend: ``wgsl`` | ``cuda`` | ``msl``.
        family: template family; renders ``templates/<backend>/<family>.<ext>.j2``.
        op: op name for the entry point and header (``ADD``, ``SILU``...).
        srcs: the read bindings, in binding order (``dst`` follows them).
        operands: the strided reads, register ``x<k>`` for ``operands[k]``.
        extra_params: scalar op parameters (``f32``), appended to the layout parameters.
        allow_vec: the family may use the 4-elements-per-thread variant (taken when the row length
            and every operand's layout allow aligned 4-element loads).
        ctx: extra template variables.

    Raises :class:`CodegenError` for an unknown backend or a layout the kernel cannot address.
    """
    _check_backend(node, backend)
    if not node.is_contiguous or node.is_view:
        raise CodegenError(f"node {node.name!r}: map kernels write a contiguous tensor of their own")
    vec = allow_vec and node.ne[0] % VEC == 0 and all(o.vectorizable() for o in operands)
    width = VEC if vec else 1
    n_threads = node.nelements // width
    dst = Binding("dst", node, node.dtype, write=True)
    bindings = [*srcs, dst]
    params: list[Param] = [("n", "u32", n_threads)]
    params += [(f"dst_ne{i}", "u32", int(v)) for i, v in enumerate(node.ne)]
    for o in operands:
        params += o.params()
    params += list(extra_params)
    entry = f"{op.lower()}_{_dtype_tag([b.dtype for b in bindings])}_v{width}"
    source = _render(
        family, backend, node, entry=entry, op=op, vec=vec, width=width,
        bindings=_binding_ctx(bindings, backend, vec),
        params=[(n, PARAM_TYPE_NAMES[backend][t]) for n, t, _ in params],
        operands=[{"binding": o.binding, "prefix": o.prefix, "bcast": o.bcast,
                   "dtype": str(next(b.dtype for b in bindings if b.name == o.binding))} for o in operands],
        dst_dtype=str(node.dtype), f16=any(b.dtype == DType.F16 for b in bindings), **ctx)
    return _kernel(family, backend, entry, source, bindings, params, n_threads, node)


def emit_move(node: Tensor, backend: str, *, family: str, op: str, src: Binding, dst: Binding,
              extra: Sequence[Binding], params: Sequence[Param], n_threads: int, tag: str = "", **ctx) -> Kernel:
    """A move kernel: thread ``t < n_threads`` reads element ``s`` of ``src`` and writes element ``d``
    of ``dst``, converting dtypes; the family's template computes ``s`` and ``d`` (and may read the
    ``extra`` bindings, e.g. i32 row indices).

    Args:
        node: the node computed.
        backend: ``wgsl`` | ``cuda`` | ``msl``.
        family: template family.
        op: op name for the entry point and header.
        src: the binding read; ``dst``: the binding written (``write=True``).
        extra: further read-only bindings, placed between ``src`` and ``dst``.
        params: the parameter struct after ``n`` (the thread count, always first).
        n_threads: threads launched, one per element moved.
        tag: variant suffix of the entry name.
        ctx: extra template variables.

    Raises :class:`CodegenError` for an unknown backend.
    """
    _check_backend(node, backend)
    bindings = [src, *extra, dst]
    full: list[Param] = [("n", "u32", n_threads), *params]
    entry = f"{op.lower()}_{_dtype_tag([b.dtype for b in bindings])}{tag}"
    source = _render(
        family, backend, node, entry=entry, op=op,
        bindings=_binding_ctx(bindings, backend, False),
        params=[(n, PARAM_TYPE_NAMES[backend][t]) for n, t, _ in full],
        src_dtype=str(src.dtype), dst_dtype=str(dst.dtype), f16=any(b.dtype == DType.F16 for b in bindings), **ctx)
    return _kernel(family, backend, entry, source, bindings, full, n_threads, node)
