"""Helpers turning IR tensor layouts into kernel parameters (elements, ggml order)."""

from __future__ import annotations

from ..errors import CodegenError
from ..ir.tensor import Tensor

Param = tuple[str, str, int | float]


def elem_strides(t: Tensor) -> tuple[int, int, int, int]:
    """``nb`` in elements; raises :class:`CodegenError` if a stride is not a whole number of elements."""
    size = t.dtype.size
    if any(s % size for s in t.nb):
        raise CodegenError(f"node {t.name!r}: byte strides {list(t.nb)} are not multiples of {size}")
    return tuple(s // size for s in t.nb)  # type: ignore[return-value]


def elem_offset(t: Tensor) -> int:
    """Offset of ``t`` into its root's memory, in elements."""
    if t.view_offs % t.dtype.size:
        raise CodegenError(f"node {t.name!r}: view offset {t.view_offs} is not a multiple of {t.dtype.size}")
    return t.view_offs // t.dtype.size


def layout_params(prefix: str, t: Tensor, *, ne: bool = True, nb: bool = True, offs: bool = True) -> list[Param]:
    """Parameters ``<prefix>_ne0..3`` (elements), ``<prefix>_nb0..3`` (element strides) and
    ``<prefix>_offs`` (element offset into the bound root buffer)."""
    out: list[Param] = []
    if ne:
        out += [(f"{prefix}_ne{i}", "u32", int(v)) for i, v in enumerate(t.ne)]
    if nb:
        out += [(f"{prefix}_nb{i}", "u32", int(v)) for i, v in enumerate(elem_strides(t))]
    if offs:
        out.append((f"{prefix}_offs", "u32", elem_offset(t)))
    return out


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
