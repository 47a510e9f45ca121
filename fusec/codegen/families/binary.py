"""``binary`` family: ADD, SUB, MUL, DIV with ggml broadcasting of ``src1``."""

from __future__ import annotations

from ...ir.tensor import Tensor
from .. import family
from ..kernel import Binding, Kernel
from .elementwise import Operand, emit_map

SYMBOL = {"ADD": "+", "SUB": "-", "MUL": "*", "DIV": "/"}
"""Infix operator of each op, the same in WGSL, CUDA and MSL."""


@family("binary", ops=tuple(SYMBOL))
def emit_binary(node: Tensor, backend: str) -> Kernel:
    """Kernel for ``dst = src0 <op> src1`` (ggml_add / ggml_sub / ggml_mul / ggml_div).

    Shapes (ggml ``ne``, innermost first): ``src0`` ``[ne0, ne1, ne2, ne3]``, ``src1``
    ``[ne10, ne11, ne12, ne13]`` with ``ne_k % ne1k == 0`` (``ggml_can_repeat``; element
    ``(i0, i1, i2, i3)`` reads ``src1[i3 % ne13][i2 % ne12][i1 % ne11][i0 % ne10]``), ``dst`` contiguous
    with ``src0``'s shape and dtype. Both sources may be any strided view (element strides and offsets
    are runtime parameters); dtypes f32/f16 in any mix, arithmetic in f32 registers.

    One thread per element, or 4 consecutive elements per thread (entry suffix ``_v4``) when
    ``ne0 % 4 == 0`` and both sources read 4 aligned consecutive elements there (unit ``nb0``,
    offsets and higher strides multiples of 4, ``ne10 % 4 == 0``).

    Bindings: ``src0``, ``src1``, ``dst`` (written). Raises :class:`fusec.errors.CodegenError` for an
    unknown backend or strides that are not whole elements.
    """
    a, b = node.src
    return emit_map(
        node, backend, family="binary", op=node.op,
        srcs=[Binding("src0", a, a.dtype), Binding("src1", b, b.dtype)],
        operands=[Operand.of("src0", "src0", a), Operand.of("src1", "src1", b, bcast=True)],
        symbol=SYMBOL[node.op])
