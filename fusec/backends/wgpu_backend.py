"""The WebGPU backend: generated WGSL kernels run through wgpu-py.

Persistent leaves (weights, KV caches) live in storage buffers owned by :class:`WgpuBackend`.
:meth:`WgpuBackend.compile` plans the graph's memory (:func:`fusec.runtime.plan.plan_buffers`,
verified with :meth:`~fusec.runtime.plan.BufferPlan.check`), generates one WGSL kernel per
computing node (several for a node whose family emits a :class:`~fusec.codegen.KernelSequence`,
whose scratch buffers the plan places) and builds everything that does not change between runs: scratch and input
buffers, pipelines, parameter uniforms and bind groups. :meth:`WgpuExecutable.run` writes the
inputs, records every dispatch into one compute pass of one command encoder (WebGPU orders the
storage accesses of successive dispatches), submits once and reads the outputs back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import BackendError, CodegenError
from ..ir.graph import Graph
from ..ir.tensor import Tensor
from ..runtime.plan import BufferPlan, binding_root, plan_buffers
from . import wgpu_runtime as rt
from .base import Backend, Executable

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32))


def _bytes4(a: np.ndarray) -> bytes:
    raw = np.ascontiguousarray(a).tobytes()
    return raw + b"\0" * (-len(raw) % 4)


def emit_kernel(node: Tensor, backend: str):
    """The generated kernel of ``node`` for codegen backend ``backend`` (``wgsl`` | ``cuda``).

    Raises :class:`BackendError` ``no <backend> kernel for op X (node 'name')`` when no kernel
    family covers the op (or a FUSED node's family is unknown), and :class:`BackendError` with
    codegen's reason when the family cannot render this node.
    """
    from .. import codegen  # noqa: PLC0415  (families load lazily)

    codegen._load_families()
    fam = node.params.get("kernel") if node.op == "FUSED" else codegen.OP_FAMILY.get(node.op)
    if fam is None or fam not in codegen.FAMILIES:
        detail = f": unknown kernel family {fam!r}" if node.op == "FUSED" else ""
        raise BackendError(f"no {backend} kernel for op {node.op} (node '{node.name}'){detail}")
    try:
        return codegen.emit(node, backend)
    except CodegenError as e:
        raise BackendError(f"no {backend} kernel for node '{node.name}' ({node.op}): {e}") from None


def emit_kernels(node: Tensor, backend: str):
    """All dispatches of ``node`` (a :class:`fusec.codegen.KernelSequence`: kernels in order plus
    the node's scratch buffers); errors as :func:`emit_kernel`."""
    from .. import codegen  # noqa: PLC0415  (families load lazily)

    codegen._load_families()
    fam = node.params.get("kernel") if node.op == "FUSED" else codegen.OP_FAMILY.get(node.op)
    if fam is None or fam not in codegen.FAMILIES:
        return codegen.KernelSequence(node, [emit_kernel(node, backend)], [])  # raises the usual error
    try:
        return codegen.emit_all(node, backend)
    except CodegenError as e:
        raise BackendError(f"no {backend} kernel for node '{node.name}' ({node.op}): {e}") from None


class _ScratchRef:
    """A kernel binding of a node's scratch buffer (resolved through the plan's node scratch)."""

    __slots__ = ("name", "node")

    def __init__(self, node: Tensor, name: str) -> None:
        self.node, self.name = node, name


def check_inputs(backend: str, leaves: list[Tensor],
                 inputs: Mapping[str, np.ndarray]) -> list[tuple[Tensor, np.ndarray]]:
    """Validate run inputs against the graph's non-weight ``leaves``; returns ``(leaf, array)`` pairs.

    Each value must be an array of exactly the leaf's dtype (float32 / float16 / int32) with the
    leaf's element count (any shape). Raises :class:`BackendError`, prefixed with ``backend``, for
    an unknown name, a missing leaf, a wrong dtype or a wrong size -- nothing is converted silently.
    """
    known = {t.name: t for t in leaves}
    unknown = sorted(set(inputs) - set(known))
    if unknown:
        raise BackendError(f"{backend} backend: unknown input(s) {', '.join(map(repr, unknown))}; the graph's inputs "
                           f"are {', '.join(map(repr, sorted(known))) or 'none'}")
    missing = [n for n in known if n not in inputs]
    if missing:
        raise BackendError(f"{backend} backend: no value for input(s) {', '.join(map(repr, missing))}")
    out = []
    for name, t in known.items():
        a = np.asarray(inputs[name])
        if a.dtype != t.dtype.np:
            raise BackendError(f"{backend} backend: input {name!r} is {a.dtype}, the graph needs {t.dtype} "
                               f"(convert it with .astype(np.{t.dtype.np.name}))")
        if a.size != t.nelements:
            raise BackendError(f"{backend} backend: input {name!r} has {a.size} elements {a.shape}, the graph "
                               f"needs {t.nelements} (ne={list(t.ne)})")
        out.append((t, a))
    return out


class WgpuBackend(Backend):
    """WGSL kernels on the default WebGPU adapter (lavapipe on CPU-only Linux).

    Persistent leaves are stored as storage buffers keyed by leaf name; SET_ROWS/CPY into them
    (KV caches) update them in place across runs.
    """

    name = "wgpu"

    def __init__(self) -> None:
        self._store: dict[str, tuple[object, np.dtype, tuple[int, ...]]] = {}  # name -> (buffer, dtype, shape)

    @classmethod
    def available(cls) -> bool:
        """True when wgpu-py imports and a WebGPU adapter exists."""
        return rt.available()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Upload ``weights`` (name -> float32/float16/int32 array, any shape) to device buffers.

        A name already stored whose buffer is large enough is overwritten in place (compiled
        executables keep their bindings); otherwise a new buffer replaces it. Raises
        :class:`BackendError` for another dtype.
        """
        for name, arr in weights.items():
            a = np.asarray(arr)
            if a.dtype not in _DTYPES:
                raise BackendError(f"wgpu backend: weight {name!r} has unsupported dtype {a.dtype} "
                                   "(expected float32, float16 or int32)")
            data = _bytes4(a)
            old = self._store.get(name)
            if old is not None and old[0].size >= len(data):
                if data:
                    rt.device().queue.write_buffer(old[0], 0, data)
                buf = old[0]
            else:
                buf = rt.storage_buffer(len(data), data)
            self._store[name] = (buf, a.dtype, a.shape)

    def read_weight(self, name: str) -> np.ndarray:
        """A host copy of the stored leaf ``name`` (shape and dtype as given to :meth:`set_weights`).

        Raises :class:`BackendError` when no such leaf is stored.
        """
        if name not in self._store:
            raise BackendError(f"wgpu backend: no weight named {name!r} is stored")
        buf, dtype, shape = self._store[name]
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return np.frombuffer(rt.read_buffer(buf, n), dtype=dtype).reshape(shape).copy()

    def weight_buffer(self, leaf: Tensor):
        """The storage buffer of the weight leaf ``leaf``; raises :class:`BackendError` when it was
        never stored or its dtype / element count differ from the leaf's."""
        entry = self._store.get(leaf.name)
        if entry is None:
            raise BackendError(f"wgpu backend: weight {leaf.name!r} (ne={list(leaf.ne)}, {leaf.dtype}) "
                               "was never set with set_weights")
        buf, dtype, shape = entry
        if dtype != leaf.dtype.np or int(np.prod(shape, dtype=np.int64)) != leaf.nelements:
            raise BackendError(f"wgpu backend: stored weight {leaf.name!r} is {dtype}{list(shape)}, the graph "
                               f"needs {leaf.dtype} ne={list(leaf.ne)}")
        return buf

    def compile(self, graph: Graph) -> WgpuExecutable:
        """Plan buffers and build kernels, pipelines, uniforms and bind groups for ``graph``.

        Raises :class:`BackendError` for an op without a WGSL kernel (``no wgsl kernel for op X
        (node 'name')``), a kernel that does not compile, or an unsafe buffer plan.
        """
        return WgpuExecutable(self, graph)


class WgpuExecutable(Executable):
    """A graph compiled for a :class:`WgpuBackend`.

    Attributes:
        graph: the compiled graph.
        plan: its buffer plan.
        kernels: the WGSL kernels in dispatch order.
    """

    def __init__(self, backend: WgpuBackend, graph: Graph) -> None:
        from ..codegen import needs_kernel  # noqa: PLC0415

        self.backend = backend
        self.graph = graph
        seqs = [emit_kernels(t, "wgsl") for t in graph.nodes if needs_kernel(t)]
        scratch = {q.node: [(sc.name, sc.nbytes) for sc in q.scratch] for q in seqs if q.scratch}
        self.plan: BufferPlan = plan_buffers(graph, scratch)
        self.plan.check()
        self.kernels = [k for q in seqs for k in q.kernels]
        self._roots: list[list] = []  # per kernel: the graph root (or node scratch) of each binding
        for k in self.kernels:
            extra = self.plan.extra_outputs(k.node)
            roots = [_ScratchRef(k.node, b.scratch) if b.scratch is not None else binding_root(k.node, b.tensor, extra)
                     for b in k.bindings]
            self.plan.check_kernel(k.node, [(r, b.write) for r, b in zip(roots, k.bindings, strict=True)
                                            if b.scratch is None])
            self._roots.append(roots)
        self._inputs = [t for t in graph.leaves if "weight" not in t.flags]
        self._weights = [t for t in graph.leaves if "weight" in t.flags]
        self._buffers = {s.index: rt.storage_buffer(s.size) for s in self.plan.slots if s.kind != "weight"}
        self._pipelines = [rt.pipeline(k) for k in self.kernels]
        self._uniforms = [rt.uniform_buffer(rt.pack_params(k)) for k in self.kernels]
        self._groups: list = []
        self._bound: dict[str, object] = {}  # weight name -> buffer the bind groups use
        if all(t.name in backend._store for t in self._weights):
            self._bind()

    # -- buffers -------------------------------------------------------------------------------------
    def _buffer(self, root):
        if isinstance(root, _ScratchRef):
            return self._buffers[self.plan.scratch_slot(root.node, root.name).index]
        slot = self.plan.slot(root)
        return self.backend.weight_buffer(root) if slot.kind == "weight" else self._buffers[slot.index]

    def _bind(self) -> None:
        self._bound = {t.name: self.backend.weight_buffer(t) for t in self._weights}
        self._groups = [rt.bind_group(k, [self._buffer(r) for r in roots], u)
                        for k, roots, u in zip(self.kernels, self._roots, self._uniforms, strict=True)]

    def patch_params(self, index: int, params: list) -> None:
        """Replace the parameter values of kernel ``index`` (same names and types, new values) and
        rewrite its uniform buffer in place; bind groups and pipelines stay. Used by the graph
        cache for dynamic view offsets. Raises :class:`BackendError` for another parameter list."""
        k = self.kernels[index]
        if [(n, t) for n, t, _ in params] != [(n, t) for n, t, _ in k.params]:
            raise BackendError(f"wgpu backend: kernel {index} ({k.entry}, node {k.node.name if k.node else '?'!r}): "
                               "patched parameters must keep the names and types of the compiled ones")
        k.params = list(params)
        rt.device().queue.write_buffer(self._uniforms[index], 0, rt.pack_params(k))

    # -- running ---------------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once; see :meth:`fusec.backends.base.Executable.run`.

        ``inputs`` must name exactly the graph's non-weight leaves, each an array of the leaf's
        dtype and element count. Raises :class:`BackendError` for an unknown, missing, wrongly
        sized or wrongly typed input, or a weight never stored.
        """
        vals = check_inputs("wgpu", self._inputs, inputs)
        current = {t.name: self.backend.weight_buffer(t) for t in self._weights}
        if (not self._groups and self.kernels) or any(current[n] is not b for n, b in self._bound.items()):
            self._bind()
        dev = rt.device()
        for t, a in vals:
            dev.queue.write_buffer(self._buffers[self.plan.slot(t).index], 0, _bytes4(a))
        enc = dev.create_command_encoder()
        if self.kernels:
            cpass = enc.begin_compute_pass()
            for k, pipe, group in zip(self.kernels, self._pipelines, self._groups, strict=True):
                cpass.set_pipeline(pipe)
                cpass.set_bind_group(0, group)
                cpass.dispatch_workgroups(*k.grid)
            cpass.end()
        dev.queue.submit([enc.finish()])
        raw: dict[int, bytes] = {}
        out: dict[str, np.ndarray] = {}
        for o in self.graph.outputs:
            slot = self.plan.slot(o)
            if slot.index not in raw:
                raw[slot.index] = rt.read_buffer(self._buffer(o.root), o.root.span_bytes)
            out[o.name] = np.ndarray(shape=o.ne[::-1], dtype=o.dtype.np, buffer=raw[slot.index],
                                     offset=o.view_offs, strides=o.nb[::-1]).copy()
        return out


__all__ = ["WgpuBackend", "WgpuExecutable", "check_inputs", "emit_kernel", "emit_kernels"]
