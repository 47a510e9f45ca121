"""``copy`` family: CPY (into another tensor's memory, converting the dtype) and CONT."""

from __future__ import annotations

from ...ir.tensor import Tensor
from .. import family
from ..kernel import Binding, Kernel
from ..layout import layout_params
from .elementwise import emit_move


@family("copy", ops=("CPY", "CONT"))
def emit_copy(node: Tensor, backend: str) -> Kernel:
    """Kernel copying ``src0`` element by element (ggml_cpy / ggml_cont / ggml_cont_4d).

    Element ``t`` in flat row-major order of ``src0.ne`` (ggml order, ``ne0`` fastest) is written to
    element ``t`` in flat row-major order of the destination's ``ne``; the two shapes may differ as
    long as their element counts match (a reshaping copy, as ggml_cpy allows).

    * CPY: the destination is ``src[1]``'s memory: ``dst`` binds the ROOT buffer of ``src[1]`` and is
      addressed with its view's element offset and strides (any strided view); the result aliases it.
    * CONT: the destination is the node's own contiguous memory of shape ``node.ne`` (``params["ne"]``
      reshapes).

    Dtypes: f32 <-> f16 (converted through f32, f16 rounded to nearest even), or equal types (i32 too).
    One thread per element. Bindings: ``src0``, ``dst`` (written). Raises
    :class:`fusec.errors.CodegenError` for an unknown backend or strides that are not whole elements.
    """
    a = node.src[0]
    params = layout_params("src", a) + layout_params("dst", node)
    return emit_move(node, backend, family="copy", op=node.op, src=Binding("src0", a, a.dtype),
                     dst=Binding("dst", node, node.dtype, write=True), extra=[], params=params,
                     n_threads=node.nelements)
