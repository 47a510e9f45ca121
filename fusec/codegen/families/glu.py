"""``glu`` family: SWIGLU and GEGLU, split (two sources) and single-tensor forms."""

from __future__ import annotations

from ...errors import CodegenError
from ...ir.tensor import Tensor
from .. import family
from ..kernel import Binding, Kernel
from ..layout import elem_strides
from .elementwise import Operand, emit_map

ACTIVATION = {"SWIGLU": "silu", "GEGLU": "gelu"}
"""Activation applied to the gated half (``templates/common/elementwise.j2::act_fn``)."""


@family("glu", ops=tuple(ACTIVATION))
def emit_glu(node: Tensor, backend: str) -> Kernel:
    """Kernel for a gated linear unit, ``dst = act(gate) * linear`` (ggml_swiglu / ggml_geglu and their
    ``_split`` forms; act = SiLU for SWIGLU, the GELU tanh approximation for GEGLU; f32 arithmetic).

    Forms:
        * split: ``src0`` (gate) and ``src1`` (linear), same ``ne`` and dtype, any strides;
          ``dst`` has their ``ne``.
        * single tensor: ``src0`` ``ne = [2n, ne1, ne2, ne3]``; the gate is the first half of each row,
          the linear part the second (ggml's ``swapped = false``); ``dst`` ``ne = [n, ne1, ne2, ne3]``.
          Both halves are operands reading the one ``src0`` binding.

    ``dst`` is contiguous, f32 or f16 as the sources. One thread per element, or 4 per thread (``_v4``)
    when ``ne0 % 4 == 0`` and every operand reads 4 aligned consecutive elements.

    Bindings: ``src0`` [, ``src1``], ``dst`` (written). Raises :class:`fusec.errors.CodegenError` for
    ``params["swapped"]`` true (not supported), an unknown backend, or strides that are not whole elements.
    """
    if node.params.get("swapped"):
        raise CodegenError(f"node {node.name!r}: swapped GLU (linear half first) is not supported")
    a = node.src[0]
    b = node.src[1] if len(node.src) > 1 else None
    srcs = [Binding("src0", a, a.dtype)]
    if b is not None:
        srcs.append(Binding("src1", b, b.dtype))
        operands = [Operand.of("src0", "src0", a), Operand.of("src1", "src1", b)]
    else:
        half = node.ne[0] * elem_strides(a)[0]
        operands = [Operand.of("src0", "gate", a, ne=node.ne),
                    Operand.of("src0", "lin", a, ne=node.ne, extra_offs=half)]
    return emit_map(node, backend, family="glu", op=node.op, srcs=srcs, operands=operands,
                    act=ACTIVATION[node.op])
