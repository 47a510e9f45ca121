"""Helpers turning IR tensor layouts into kernel parameters (elements, ggml order)."""

from __future__ import annotations

from ..errors import CodegenError
from ..ir.tensor import Tensor

Param = tuple[str, str, int | float]


def elem_strides(t: Tensor) -> tuple[int, int, int, int]:
    """``nb`` in elements; raises :class:`CodegenError` if a stride is not a whole number of elements."""
    size = t.dtype.size
    n0, n1, n2, n3 = t.nb
    if n0 % size or n1 % size or n2 % size or n3 % size:
        raise CodegenError(f"node {t.name!r}: byte strides {list(t.nb)} are not multiples of {size}")
    return (n0 // size, n1 // size, n2 // size, n3 // size)


def elem_offset(t: Tensor) -> int:
    """Offset of ``t`` into its root's memory, in elements."""
    if t.view_offs % t.dtype.size:
        raise CodegenError(f"node {t.name!r}: view offset {t.view_offs} is not a multiple of {t.dtype.size}")
    return t.view_offs // t.dtype.size


_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {}


def _names(prefix: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    names = _NAMES.get(prefix)
    if names is None:
        names = _NAMES[prefix] = (tuple(f"{prefix}_ne{i}" for i in range(4)),
                                  tuple(f"{prefix}_nb{i}" for i in range(4)), f"{prefix}_offs")
    return names


def layout_params(prefix: str, t: Tensor, *, ne: bool = True, nb: bool = True, offs: bool = True) -> list[Param]:
    """Parameters ``<prefix>_ne0..3`` (elements), ``<prefix>_nb0..3`` (element strides) and
    ``<prefix>_offs`` (element offset into the bound root buffer)."""
    ne_names, nb_names, offs_name = _names(prefix)
    out: list[Param] = []
    if ne:
        out += [(k, "u32", int(v)) for k, v in zip(ne_names, t.ne, strict=True)]
    if nb:
        out += [(k, "u32", int(v)) for k, v in zip(nb_names, elem_strides(t), strict=True)]
    if offs:
        out.append((offs_name, "u32", elem_offset(t)))
    return out


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
