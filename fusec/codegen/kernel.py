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
        scratch: for a kernel of a :class:`KernelSequence`, the name of the node's scratch buffer
            bound here (``tensor`` is then ``None``); ``None`` for a tensor binding.
        window: ``(byte offset, byte size)`` of the root's buffer bound here (WGSL buffer-binding
            ranges, for a tensor larger than the device's per-binding limit, bound as several
            windows; the offset a multiple of 256 bytes); ``None`` binds the whole buffer. Only the
            wgpu backend honours windows; families emit them for WGSL only.
    """

    name: str
    tensor: Tensor | None
    dtype: DType
    write: bool = False
    scratch: str | None = None
    window: tuple[int, int] | None = None


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
        meta: family-specific facts (role in a sequence, tuning) for reports, tests and benchmarks.
        dynamic_shared: CUDA only: bytes of dynamic shared memory the launch must provide (0: none).
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
    dynamic_shared: int = 0

    def param(self, name: str) -> int | float:
        for n, _, v in self.params:
            if n == name:
                return v
        raise KeyError(name)

    @property
    def suffix(self) -> str:
        return {"wgsl": "wgsl", "cuda": "cu", "msl": "metal"}[self.backend]


@dataclass(frozen=True)
class Scratch:
    """A temporary device buffer private to one node's :class:`KernelSequence`.

    Attributes:
        name: referred to by ``Binding.scratch`` of the sequence's kernels.
        nbytes: size in bytes (the buffer plan rounds it up to its slot alignment).
    """

    name: str
    nbytes: int


@dataclass
class KernelSequence:
    """The dispatches computing one node, in order, and the scratch buffers they share.

    Every family yields one (:func:`fusec.codegen.emit_all`); most hold a single kernel and no
    scratch. Multi-kernel families (``flash_attn``: mask pre-pass, attention, split reduction) bind
    scratch buffers by name (``Binding.scratch``); a backend gives each scratch buffer memory that is
    live only during the node and never aliases the node's inputs or output
    (:func:`fusec.runtime.plan.plan_buffers` with ``scratch``). Kernels run in list order, each seeing
    the writes of the ones before it.

    Attributes:
        node: the IR node computed.
        kernels: the dispatches, in order.
        scratch: the node's scratch buffers (names unique).
    """

    node: Tensor
    kernels: list[Kernel]
    scratch: list[Scratch] = field(default_factory=list)

    def scratch_bytes(self, name: str) -> int:
        for sc in self.scratch:
            if sc.name == name:
                return sc.nbytes
        raise KeyError(name)
