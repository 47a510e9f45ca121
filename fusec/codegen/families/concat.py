"""``concat`` family: CONCAT (ggml_concat), one thread per destination element."""

from __future__ import annotations

from ...errors import CodegenError
from ...ir.dtypes import DType
from ...ir.tensor import Tensor
from .. import family
from ..env import PARAM_TYPE_NAMES
from ..kernel import Binding, Kernel
from ..layout import layout_params
from .elementwise import _binding_ctx, _check_backend, _kernel, _render


@family("concat", ops=("CONCAT",))
def emit_concat(node: Tensor, backend: str) -> Kernel:
    """Kernel for CONCAT (ggml_concat(a, b, dim)): destination element ``i`` (ggml index
    ``i0..i3``) is ``a[i]`` when ``i_dim < a.ne[dim]``, else ``b[i]`` with ``i_dim - a.ne[dim]``.

    Shapes (ggml ``ne`` order, innermost first): ``a`` and ``b`` any element strides (views), the
    same dtype (f32, f16 or i32), ``ne`` equal except along ``dim``; ``dst`` contiguous, ``ne[dim] =
    a.ne[dim] + b.ne[dim]``. A pure copy: values are bit-exact. One thread per element;
    ``dim`` is a compile-time constant of the source. Bindings: ``src0`` (a), ``src1`` (b), ``dst``.
    Raises :class:`CodegenError` for an unknown backend, another op, or strides that are not whole
    elements.
    """
    _check_backend(node, backend)
    if node.op != "CONCAT":
        raise CodegenError(f"node {node.name!r}: concat family renders CONCAT, not {node.op}")
    a, b = node.src
    dim = int(node.params["dim"])
    bindings = [Binding("src0", a, a.dtype), Binding("src1", b, b.dtype), Binding("dst", node, node.dtype, write=True)]
    params = [("n", "u32", node.nelements)] + [(f"dst_ne{i}", "u32", int(v)) for i, v in enumerate(node.ne)]
    params += [(f"a_ne{dim}", "u32", int(a.ne[dim]))]
    params += layout_params("a", a, ne=False) + layout_params("b", b, ne=False)
    entry = f"concat_{node.dtype}_dim{dim}"
    source = _render("concat", backend, node, entry=entry, op="CONCAT", dim=dim,
                     bindings=_binding_ctx(bindings, backend, False),
                     params=[(n, PARAM_TYPE_NAMES[backend][t]) for n, t, _ in params],
                     dtype=str(node.dtype), f16=node.dtype == DType.F16)
    return _kernel("concat", backend, entry, source, bindings, params, node.nelements, node)
