"""The generated-kernel record shared by every backend.

A :class:`Kernel` is one compute dispatch: source text in a backend dialect, the buffers it binds
(in binding order), the scalar parameter struct it reads, and its launch geometry. Shapes and
strides are *runtime parameters* (elements, ggml order), not baked into the source, so one source
serves every shape that makes the same tuning choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.dtypes import DType
from ..ir.tensor import Tensor

BACKENDS = ("wgsl", "cuda", "msl")
PARAM_TYPES = ("u32", "i32", "f32")


@dataclass(frozen=True)
class Binding:
    """One storage buffer of a kernel.

    Attributes:
        name: identifier in the kernel source (``src0``, ``dst``, ...).
        tensor: the IR tensor read or written; the buffer bound is the memory of ``tensor.root``
            (the element offset of a view travels as a parameter, usually ``offs_<name>``).
        dtype: element type as declared in the kernel (normally ``tensor.dtype``).
        write: the kernel writes this buffer.
    """

    name: str
    tensor: Tensor
    dtype: DType
    write: bool = False


@dataclass
class Kernel:
    """A generated compute kernel plus what a backend needs to launch it.

    Attributes:
        backend: ``"wgsl"`` | ``"cuda"`` | ``"msl"``.
        family: template family (``norm_epilogue``, ``binary``, ...).
        entry: entry-point name (WGSL ``@compute fn``, CUDA ``extern "C" __global__``, MSL ``kernel``).
        source: the full source text.
        bindings: storage buffers, in binding order (WGSL ``@binding(i)``, CUDA argument ``i``, MSL
            ``[[buffer(i)]]``); the parameter struct comes after them.
        params: the parameter struct, in field order: ``(name, type, value)`` with type ``u32`` |
            ``i32`` | ``f32`` (all 4 bytes). WGSL binds it as a uniform buffer, CUDA passes it by
            value, MSL as ``constant Params&``.
        workgroup_size: threads per workgroup / block / threadgroup, (x, y, z).
        grid: number of workgroups / blocks / threadgroups, (x, y, z).
        node: the IR node this kernel computes.
    """

    backend: str
    family: str
    entry: str
    source: str
    bindings: list[Binding]
    params: list[tuple[str, str, int | float]]
    workgroup_size: tuple[int, int, int]
    grid: tuple[int, int, int]
    node: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def param(self, name: str) -> int | float:
        for n, _, v in self.params:
            if n == name:
                return v
        raise KeyError(name)

    @property
    def suffix(self) -> str:
        return {"wgsl": "wgsl", "cuda": "cu", "msl": "metal"}[self.backend]
