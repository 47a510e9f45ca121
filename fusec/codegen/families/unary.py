"""``unary`` family: SCALE and the activations SILU, GELU, TANH, SIGMOID, SQR, SQRT, RSQRT."""

from __future__ import annotations

from ...ir.tensor import Tensor
from .. import family
from ..kernel import Binding, Kernel
from .elementwise import Operand, emit_map

ACTIVATION = {"SILU": "silu", "GELU": "gelu", "TANH": "tanh", "SIGMOID": "sigmoid", "SQR": "sqr", "SQRT": "sqrt",
              "RSQRT": "rsqrt"}
"""Device helper ``op_<name>`` of each activation op (``templates/common/elementwise.j2::act_fn``)."""


@family("unary", ops=("SCALE", "CLAMP", *ACTIVATION))
def emit_unary(node: Tensor, backend: str) -> Kernel:
    """Kernel for an element-wise unary op, ``dst[i] = f(src0[i])``.

    Ops (ggml semantics, f32 arithmetic): SCALE ``x*s + b`` (ggml_scale / ggml_scale_bias; ``s``,
    ``b`` are f32 parameters), SILU ``x/(1+exp(-x))`` (ggml_silu_f32), GELU
    ``0.5x(1+tanh(sqrt(2/pi)·x·(1+0.044715x²)))`` (ggml_gelu_f32, tanh approximation), TANH,
    SIGMOID ``1/(1+exp(-x))``, SQR ``x*x`` (ggml_sqr), SQRT (ggml_sqrt), RSQRT ``1/sqrt(x)`` (fusec
    extension, torch.rsqrt; a sqrt and a division, never a fast inverse sqrt: exact-rounding on CUDA and
    numpy, within WGSL/MSL's few-ulp sqrt and division accuracy elsewhere), CLAMP ``MAX(MIN(x, max),
    min)`` with ggml's ternaries (ggml_clamp; ``min``/``max`` f32 parameters, ``max`` may be +inf; a NaN
    ``x`` gives ``max`` as ggml-cpu).

    Shapes: ``src0`` any ``ne`` (ggml order) and strides (a view), f32 or f16; ``dst`` contiguous,
    same ``ne`` and dtype. One thread per element, or 4 per thread (``_v4``) when ``ne0 % 4 == 0``
    and ``src0`` reads 4 aligned consecutive elements.

    Bindings: ``src0``, ``dst`` (written). Raises :class:`fusec.errors.CodegenError` for an unknown
    backend or strides that are not whole elements.
    """
    (a,) = node.src
    extra = []
    if node.op == "SCALE":
        extra = [("s", "f32", float(node.params.get("s", 1.0))), ("b", "f32", float(node.params.get("b", 0.0)))]
    elif node.op == "CLAMP":
        extra = [("lo", "f32", float(node.params["min"])), ("hi", "f32", float(node.params["max"]))]
    return emit_map(
        node, backend, family="unary", op=node.op, srcs=[Binding("src0", a, a.dtype)],
        operands=[Operand.of("src0", "src0", a)], extra_params=extra, act=ACTIVATION.get(node.op, ""))
