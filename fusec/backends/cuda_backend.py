"""The CUDA backend: generated CUDA kernels through CuPy, MUL_MAT through cuBLAS (``cupy.matmul``).

Same structure as :mod:`fusec.backends.wgpu_backend`: persistent leaves (weights, KV caches) are
CuPy device arrays owned by :class:`CudaBackend`; :meth:`CudaBackend.compile` plans the graph's
memory (checked with :meth:`~fusec.runtime.plan.BufferPlan.check`), allocates the scratch and input
buffers, generates and compiles one kernel per computing node and packs each kernel's parameter
struct once (a numpy structured scalar, passed by value at every launch: no device-memory load of
the parameters inside the kernels). Every step runs on CuPy's current stream, so kernels and
cuBLAS calls execute in graph order.

CuPy is imported lazily: without it (or without a GPU) :meth:`CudaBackend.available` is False and
constructing the backend raises :class:`~fusec.errors.BackendError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import BackendError
from ..ir.dtypes import F16, F32
from ..ir.graph import Graph
from ..ir.tensor import Tensor
from ..runtime.plan import BufferPlan, binding_root, plan_buffers
from . import cuda_runtime as rt
from .base import Backend, Executable
from .wgpu_backend import check_inputs, emit_kernel

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32))


def _cupy():
    import cupy  # noqa: PLC0415  (optional dependency)

    return cupy


def strided(cp, buf, t: Tensor):
    """A ``cupy.ndarray`` view of tensor ``t`` on ``buf`` (the uint8 device memory of ``t.root``):
    numpy shape ``ne[::-1]``, byte strides ``nb[::-1]``, starting ``view_offs`` bytes in."""
    return cp.ndarray(t.ne[::-1], dtype=t.dtype.np, memptr=buf.data + t.view_offs, strides=t.nb[::-1])


def mul_mat(cp, a, b, dst, a_buf, b_buf, dst_buf) -> None:
    """``dst = b @ a^T`` per batch with ggml's broadcast (``ggml_mul_mat``), through ``cupy.matmul``.

    ``a`` ne=[K, M, A2, A3] (f32 or f16, promoted to f32), ``b`` ne=[K, N, B2, B3] f32 with
    ``B2 = A2*r2``, ``B3 = A3*r3``; ``dst`` ne=[M, N, B2, B3] f32. Batch ``(i3, i2)`` of ``b`` uses
    batch ``(i3 // r3, i2 // r2)`` of ``a``: b's dims 2/3 are split into ``(A, r)`` groups so that
    ``a`` broadcasts over the ``r`` axes. All operands are strided views of their root buffers.
    """
    K, M, A2, A3 = a.ne
    N, B2, B3 = b.ne[1], b.ne[2], b.ne[3]
    r2, r3 = B2 // A2, B3 // A3
    a6 = cp.ndarray((A3, 1, A2, 1, K, M), dtype=a.dtype.np, memptr=a_buf.data + a.view_offs,
                    strides=(a.nb[3], 0, a.nb[2], 0, a.nb[0], a.nb[1]))
    b6 = cp.ndarray((A3, r3, A2, r2, N, K), dtype=b.dtype.np, memptr=b_buf.data + b.view_offs,
                    strides=(b.nb[3] * r3, b.nb[3], b.nb[2] * r2, b.nb[2], b.nb[1], b.nb[0]))
    d6 = cp.ndarray((A3, r3, A2, r2, N, M), dtype=dst.dtype.np, memptr=dst_buf.data + dst.view_offs,
                    strides=(dst.nb[3] * r3, dst.nb[3], dst.nb[2] * r2, dst.nb[2], dst.nb[1], dst.nb[0]))
    if a.dtype != F32:
        a6 = a6.astype(cp.float32)
    d6[...] = cp.matmul(b6, a6)


class CudaBackend(Backend):
    """CUDA kernels and cuBLAS on the current CuPy device.

    Persistent leaves are flat CuPy arrays of their dtype keyed by leaf name; SET_ROWS/CPY into
    them (KV caches) update them in place across runs. Raises :class:`BackendError` on
    construction when CuPy or a CUDA device is missing.
    """

    name = "cuda"

    def __init__(self) -> None:
        if not rt.available():
            raise BackendError("cuda backend: no CUDA device with CuPy on this machine (pip install 'fusec[cuda]')")
        self._cp = _cupy()
        self._store: dict[str, tuple[object, tuple[int, ...]]] = {}  # name -> (flat device array, shape)

    @classmethod
    def available(cls) -> bool:
        """True when CuPy imports and a CUDA device exists."""
        return rt.available()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy ``weights`` (name -> float32/float16/int32 array) to the device; an existing leaf of
        the same dtype and size is overwritten in place. Raises :class:`BackendError` for another dtype."""
        for name, arr in weights.items():
            a = np.asarray(arr)
            if a.dtype not in _DTYPES:
                raise BackendError(f"cuda backend: weight {name!r} has unsupported dtype {a.dtype} "
                                   "(expected float32, float16 or int32)")
            flat = np.ascontiguousarray(a).reshape(-1)
            old = self._store.get(name)
            if old is not None and old[0].dtype == flat.dtype and old[0].size == flat.size:
                old[0].set(flat)
                dev = old[0]
            else:
                dev = self._cp.asarray(flat)
            self._store[name] = (dev, a.shape)

    def read_weight(self, name: str) -> np.ndarray:
        """A host copy of the stored leaf ``name`` (shape and dtype as stored); :class:`BackendError`
        when absent."""
        if name not in self._store:
            raise BackendError(f"cuda backend: no weight named {name!r} is stored")
        dev, shape = self._store[name]
        return self._cp.asnumpy(dev).reshape(shape)

    def weight_memory(self, leaf: Tensor):
        """The device bytes (uint8 view) of weight leaf ``leaf``; :class:`BackendError` when it was
        never stored or its dtype / element count differ from the leaf's."""
        entry = self._store.get(leaf.name)
        if entry is None:
            raise BackendError(f"cuda backend: weight {leaf.name!r} (ne={list(leaf.ne)}, {leaf.dtype}) "
                               "was never set with set_weights")
        dev, shape = entry
        if dev.dtype != leaf.dtype.np or dev.size != leaf.nelements:
            raise BackendError(f"cuda backend: stored weight {leaf.name!r} is {dev.dtype}{list(shape)}, the graph "
                               f"needs {leaf.dtype} ne={list(leaf.ne)}")
        return dev.view(self._cp.uint8)

    def compile(self, graph: Graph) -> CudaExecutable:
        """Plan buffers, generate and compile kernels, pack all parameters for ``graph``.

        Raises :class:`BackendError` for an op without a CUDA kernel (``no cuda kernel for op X
        (node 'name')``), a kernel that does not compile, or an unsafe buffer plan.
        """
        return CudaExecutable(self, graph)


class CudaExecutable(Executable):
    """A graph compiled for a :class:`CudaBackend`.

    Attributes:
        graph: the compiled graph.
        plan: its buffer plan.
        steps: per computing node, ``("mul_mat", node)`` (cuBLAS) or ``("kernel", kernel)``.
    """

    def __init__(self, backend: CudaBackend, graph: Graph) -> None:
        from ..codegen import needs_kernel  # noqa: PLC0415

        cp = backend._cp
        self.backend = backend
        self.graph = graph
        self.plan: BufferPlan = plan_buffers(graph)
        self.plan.check()
        self.steps: list[tuple[str, object]] = []
        self._roots: list[list[Tensor]] = []
        self._param_values = []
        for t in graph.nodes:
            if not needs_kernel(t):
                continue
            if t.op == "MUL_MAT" and t.src[0].dtype in (F32, F16) and t.src[1].dtype == F32:
                self.steps.append(("mul_mat", t))
                self._roots.append([])
                continue
            k = emit_kernel(t, "cuda")
            roots = [binding_root(t, b.tensor) for b in k.bindings]
            self.plan.check_kernel(t, [(r, b.write) for r, b in zip(roots, k.bindings, strict=True)])
            rt.module(k)  # compile now: errors surface at compile time
            self.steps.append(("kernel", k))
            self._roots.append(roots)
            self._param_values.append(rt.params_value(k))  # passed by value at each launch
        self._inputs = [t for t in graph.leaves if "weight" not in t.flags]
        self._weights = [t for t in graph.leaves if "weight" in t.flags]
        self._buffers = {s.index: cp.zeros(s.size, dtype=cp.uint8) for s in self.plan.slots if s.kind != "weight"}

    def _memory(self, root: Tensor):
        slot = self.plan.slot(root)
        return self.backend.weight_memory(root) if slot.kind == "weight" else self._buffers[slot.index]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once; see :meth:`fusec.backends.base.Executable.run`.

        ``inputs`` must name exactly the graph's non-weight leaves, each an array of the leaf's
        dtype and element count. Raises :class:`BackendError` for an unknown, missing, wrongly
        sized or wrongly typed input, or a weight never stored.
        """
        cp = self.backend._cp
        vals = check_inputs("cuda", self._inputs, inputs)
        for t in self._weights:
            self.backend.weight_memory(t)  # validates every weight before launching anything
        for t, a in vals:
            raw = np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8)
            self._buffers[self.plan.slot(t).index][:raw.size].set(raw)
        ki = 0
        for (what, obj), roots in zip(self.steps, self._roots, strict=True):
            if what == "mul_mat":
                node: Tensor = obj  # type: ignore[assignment]
                a, b = node.src
                mul_mat(cp, a, b, node, self._memory(a.root), self._memory(b.root), self._memory(node.root))
            else:
                rt.launch(obj, [self._memory(r) for r in roots], self._param_values[ki])
                ki += 1
        out = {}
        for o in self.graph.outputs:
            out[o.name] = cp.asnumpy(strided(cp, self._memory(o.root), o)).reshape(o.ne[::-1])
        return out


__all__ = ["CudaBackend", "CudaExecutable", "mul_mat", "strided"]
