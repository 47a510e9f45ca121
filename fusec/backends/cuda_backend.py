"""The CUDA backend: generated CUDA kernels through CuPy, MUL_MAT through cuBLAS (``cupy.matmul``).

Same structure as :mod:`fusec.backends.wgpu_backend`: persistent leaves (weights, KV caches) are
CuPy device arrays owned by :class:`CudaBackend`; :meth:`CudaBackend.compile` plans the graph's
memory (checked with :meth:`~fusec.runtime.plan.BufferPlan.check`), allocates the scratch and input
buffers, generates and compiles every computing node's :class:`~fusec.codegen.KernelSequence`
(one kernel for most nodes; for ``flash_attn`` nodes the mask pre-pass, the split-KV attention kernel
and the split reduction, whose node-private scratch buffers -- ``flags``, ``partials`` -- are
planned with the graph, ``plan_buffers(graph, scratch=...)``, exactly as the wgpu backend does) and
packs each kernel's parameter struct once (a numpy structured scalar, passed by value at every
launch: no device-memory load of the parameters inside the kernels). Every step runs on one
stream, so kernels and cuBLAS calls execute in graph order: CuPy's current stream, or -- with
CUDA graphs on -- the backend's own non-blocking stream (:attr:`CudaBackend.stream`; weights,
buffers, uploads and read-backs use it too).

**CUDA graphs** (issue 5 part 4). With ``use_graphs`` (the default unless
``FUSEC_DISABLE_CUDA_GRAPHS=1``) an executable run with a ``backend_state`` dict -- the graph
cache's :attr:`~fusec.runtime.cache.CacheEntry.backend_state`, one per cache entry -- runs its first
step eagerly, then captures the token's whole launch sequence into a ``cupy.cuda.Graph`` (stream
capture on :attr:`CudaBackend.stream`), and every later step replays it: the inputs are copied into
the *same* device buffers, then one ``cudaGraphLaunch``. The graph freezes the kernels' by-value
parameters and every device address; replay needs no re-capture because in fusec's decode graphs all
per-token data (tokens, positions, KV write indices, mask) are input *buffers*, and shapes are keyed.
Scratch buffers of kernel sequences are fixed allocations of the plan, so a
captured graph replays the whole sequence (pre-pass, attention, reduction) without re-capture. What
does invalidate it: a patched dynamic view offset (the graph cache clears ``backend_state``,
the next step re-captures) and a stored leaf given new device memory (``set_weights`` with another
size or dtype bumps a generation counter; a stale graph is re-captured). cuBLAS through CuPy cannot
be captured: CuPy (14.x) refuses any cuBLAS call on a capturing stream (``NotImplementedError:
calling cuBLAS API during stream capture is currently unsupported``), so with graphs on, MUL_MAT runs
fusec's generated ``mul_mat`` kernels (``matmul="kernel"``, the default then). Should a capture fail
anyway (``matmul="cublas"`` with graphs on, or a CUDA error), the entry falls back *loudly* to eager
launches: a :class:`CudaGraphWarning` with the reason, ``backend_state["fallback"]`` holds it, and
the capture is not retried for that entry. Replay is bit-identical to eager launches of the same
kernels (``tests/test_cuda_graphs.py``).

CuPy is imported lazily: without it (or without a GPU) :meth:`CudaBackend.available` is False and
constructing the backend raises :class:`~fusec.errors.BackendError`.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import BackendError
from ..ir.dtypes import F16, F32
from ..ir.graph import Graph
from ..ir.tensor import Tensor
from ..runtime.plan import BufferPlan, binding_root, plan_buffers
from . import cuda_runtime as rt
from .base import Backend, Executable
from .wgpu_backend import _ScratchRef, check_inputs, emit_kernels

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32))
MATMUL_MODES = ("cublas", "kernel")


class CudaGraphWarning(UserWarning):
    """A cache entry could not be captured into a CUDA graph and runs with eager launches (the
    message gives the reason; ``backend_state["fallback"]`` keeps it)."""


def graphs_disabled_by_env() -> bool:
    """True when ``FUSEC_DISABLE_CUDA_GRAPHS=1``."""
    return os.environ.get("FUSEC_DISABLE_CUDA_GRAPHS") == "1"


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
    """CUDA kernels (and cuBLAS) on the current CuPy device.

    Persistent leaves are flat CuPy arrays of their dtype keyed by leaf name; SET_ROWS/CPY into
    them (KV caches) update them in place across runs.

    Args:
        use_graphs: capture each graph-cache entry's launch sequence into a CUDA graph and replay it
            (see the module docstring); ``None`` follows ``FUSEC_DISABLE_CUDA_GRAPHS`` (on unless
            it is ``1``).
        matmul: how plain MUL_MAT nodes run: ``"cublas"`` (``cupy.matmul`` on strided views; f16
            weights widened to f32 first) or ``"kernel"`` (fusec's generated ``mul_mat`` kernels:
            matrix-vector for one token, tiled otherwise). ``None``: ``"kernel"`` with graphs (cuBLAS
            through CuPy cannot be captured), ``"cublas"`` without.
        flash_attn_skip: ``flash_attn`` nodes run the mask pre-pass and skip fully masked KV
            blocks (the default). ``False`` runs the same sequence without the pre-pass (every block
            loaded; split and reduction unchanged): for measuring the skipping and testing it.

    Attributes:
        use_graphs: whether entries are captured and replayed.
        matmul: ``"cublas"`` or ``"kernel"``.
        flash_attn_skip: as the argument.
        stream: the ``cupy.cuda.Stream(non_blocking=True)`` everything of this backend runs on with
            graphs on; ``None`` (CuPy's current stream) without.

    Raises :class:`BackendError` on construction when CuPy or a CUDA device is missing, or for an
    unknown ``matmul``.
    """

    name = "cuda"

    def __init__(self, use_graphs: bool | None = None, matmul: str | None = None,
                 flash_attn_skip: bool = True) -> None:
        if not rt.available():
            raise BackendError("cuda backend: no CUDA device with CuPy on this machine (pip install 'fusec[cuda]')")
        self._cp = _cupy()
        self.use_graphs = (not graphs_disabled_by_env()) if use_graphs is None else bool(use_graphs)
        mm = matmul if matmul is not None else ("kernel" if self.use_graphs else "cublas")
        if mm not in MATMUL_MODES:
            raise BackendError(f"cuda backend: matmul must be one of {', '.join(MATMUL_MODES)}, got {matmul!r}")
        self.matmul = mm
        self.flash_attn_skip = bool(flash_attn_skip)
        self.stream = self._cp.cuda.Stream(non_blocking=True) if self.use_graphs else None
        self._store: dict[str, tuple[object, tuple[int, ...]]] = {}  # name -> (flat device array, shape)
        self._generation = 0  # bumped whenever a stored leaf gets new device memory (addresses change)

    def on_stream(self):
        """Context manager making :attr:`stream` current (a no-op without graphs)."""
        return self.stream if self.stream is not None else contextlib.nullcontext()

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
            with self.on_stream():
                if old is not None and old[0].dtype == flat.dtype and old[0].size == flat.size:
                    old[0].set(flat)  # same memory: bound arguments and captured graphs stay valid
                    dev = old[0]
                else:
                    dev = self._cp.asarray(flat)
                    self._generation += 1
            self._store[name] = (dev, a.shape)

    def read_weight(self, name: str) -> np.ndarray:
        """A host copy of the stored leaf ``name`` (shape and dtype as stored); :class:`BackendError`
        when absent."""
        if name not in self._store:
            raise BackendError(f"cuda backend: no weight named {name!r} is stored")
        dev, shape = self._store[name]
        with self.on_stream():
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
        with self.on_stream():
            return CudaExecutable(self, graph)


def _sequence(node: Tensor, flash_attn_skip: bool):
    """``node``'s :class:`~fusec.codegen.KernelSequence` for CUDA; ``flash_attn`` nodes without the
    mask pre-pass when ``flash_attn_skip`` is False. Errors: :class:`BackendError` as
    :func:`~fusec.backends.wgpu_backend.emit_kernels`."""
    if not flash_attn_skip and (node.op == "FLASH_ATTN_EXT"
                                or (node.op == "FUSED" and node.params.get("kernel") == "flash_attn")):
        from ..codegen import _load_families  # noqa: PLC0415
        from ..codegen.families.flash_attn import emit_flash_attn_seq  # noqa: PLC0415
        from ..errors import CodegenError  # noqa: PLC0415

        _load_families()
        try:
            return emit_flash_attn_seq(node, "cuda", skip=False)
        except CodegenError as e:
            raise BackendError(f"no cuda kernel for node '{node.name}' ({node.op}): {e}") from None
    return emit_kernels(node, "cuda")


class CudaExecutable(Executable):
    """A graph compiled for a :class:`CudaBackend`.

    Attributes:
        graph: the compiled graph.
        plan: its buffer plan.
        steps: in launch order, ``("mul_mat", node)`` (cuBLAS) or ``("kernel", kernel)`` (one per
            kernel of each node's sequence).
        kernels: the generated kernels in launch order (the index :meth:`patch_params` takes).
        sequences: per computing node without a cuBLAS step, its
            :class:`~fusec.codegen.KernelSequence` (kernels and scratch buffers).
        uses_backend_state: True: :meth:`run` accepts the graph cache's per-entry ``backend_state``.
        captures: CUDA graphs captured by this executable (diagnostics).
        last_timing: host seconds of the last :meth:`run`: ``mode`` (``"eager"`` or ``"replay"``),
            ``upload_s`` (input copies), ``launch_s`` (issuing every kernel / the one graph
            launch), ``wait_s`` (synchronizing and reading the outputs back), ``capture_s`` (a
            capture after an eager step, else 0).
    """

    uses_backend_state = True

    def __init__(self, backend: CudaBackend, graph: Graph) -> None:
        from ..codegen import needs_kernel  # noqa: PLC0415

        cp = backend._cp
        self.backend = backend
        self.graph = graph
        self.steps: list[tuple[str, object]] = []
        self.kernels: list = []
        self.sequences: list = []
        for t in graph.nodes:
            if not needs_kernel(t):
                continue
            if (backend.matmul == "cublas" and t.op == "MUL_MAT" and t.src[0].dtype in (F32, F16)
                    and t.src[1].dtype == F32):
                self.steps.append(("mul_mat", t))
                continue
            seq = _sequence(t, backend.flash_attn_skip)
            self.sequences.append(seq)
            self.steps.extend(("kernel", k) for k in seq.kernels)
        scratch = {q.node: [(sc.name, sc.nbytes) for sc in q.scratch] for q in self.sequences if q.scratch}
        self.plan: BufferPlan = plan_buffers(graph, scratch)
        self.plan.check()
        self._roots: list[list] = []  # per step: the graph root (or node scratch) of each binding
        self._param_values = []
        for what, obj in self.steps:
            if what == "mul_mat":
                self._roots.append([])
                continue
            k = obj
            extra = self.plan.extra_outputs(k.node)
            roots = [_ScratchRef(k.node, b.scratch) if b.scratch is not None else binding_root(k.node, b.tensor, extra)
                     for b in k.bindings]
            self.plan.check_kernel(k.node, [(r, b.write) for r, b in zip(roots, k.bindings, strict=True)
                                            if b.scratch is None])
            rt.module(k)  # compile now: errors surface at compile time
            self.kernels.append(k)
            self._roots.append(roots)
            self._param_values.append(rt.params_value(k))  # passed by value at each launch
        self._inputs = [t for t in graph.leaves if "weight" not in t.flags]
        self._weights = [t for t in graph.leaves if "weight" in t.flags]
        self._buffers = {s.index: cp.zeros(s.size, dtype=cp.uint8) for s in self.plan.slots if s.kind != "weight"}
        self._input_dst = [(t, self._buffers[self.plan.slot(t).index]) for t in self._inputs]
        self._calls: list[tuple] = []  # per step: bound launch (see _bind)
        self._bound_gen: int | None = None
        self.captures = 0
        self.last_timing: dict[str, Any] = {}

    def _memory(self, root):
        if isinstance(root, _ScratchRef):
            return self._buffers[self.plan.scratch_slot(root.node, root.name).index]
        slot = self.plan.slot(root)
        return self.backend.weight_memory(root) if slot.kind == "weight" else self._buffers[slot.index]

    def device_array(self, t: Tensor):
        """A ``cupy.ndarray`` view (numpy shape ``ne[::-1]``, ``t``'s dtype and strides) of tensor
        ``t`` of the compiled graph in its planned device memory (a weight: the stored leaf). For
        benchmarks and tests (e.g. poisoning an output with NaN before a replay). Raises
        :class:`BackendError` for a tensor the plan does not hold or a weight never stored."""
        return strided(self.backend._cp, self._memory(t.root), t)

    def _bind(self) -> None:
        """Resolve every step's device memory once per weight generation (validates every weight:
        :class:`BackendError` for one never stored or of another dtype/size)."""
        for t in self._weights:
            self.backend.weight_memory(t)
        calls: list[tuple] = []
        ki = 0
        for (what, obj), roots in zip(self.steps, self._roots, strict=True):
            if what == "mul_mat":
                node: Tensor = obj  # type: ignore[assignment]
                a, b = node.src
                calls.append(("mul_mat", node, self._memory(a.root), self._memory(b.root), self._memory(node.root)))
            else:
                calls.append(("kernel", obj, rt.module(obj), tuple(self._memory(r) for r in roots), ki,
                              rt.uses_pdl(obj)))
                ki += 1
        self._calls = calls
        self._bound_gen = self.backend._generation

    def patch_params(self, index: int, params: list) -> None:
        """Replace the parameter values of kernel ``index`` (in :attr:`kernels`; same names and
        types, new values): the by-value struct of its later launches. Used by the graph cache for
        dynamic view offsets; the cache then clears the entry's ``backend_state``, so a captured
        graph (whose launches froze the old values) is re-captured. cuBLAS steps read view offsets
        at launch time. Raises :class:`BackendError` for another parameter list."""
        k = self.kernels[index]
        if [(n, t) for n, t, _ in params] != [(n, t) for n, t, _ in k.params]:
            raise BackendError(f"cuda backend: kernel {index} ({k.entry}, node {k.node.name if k.node else '?'!r}): "
                               "patched parameters must keep the names and types of the compiled ones")
        k.params = list(params)
        self._param_values[index] = rt.params_value(k)

    # -- running ---------------------------------------------------------------------------------------
    def _upload(self, vals: list[tuple[Tensor, np.ndarray]]) -> None:
        dst = dict((id(t), buf) for t, buf in self._input_dst)
        for t, a in vals:
            raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            dst[id(t)][:raw.size].set(raw)

    def _launch_all(self) -> None:
        cp = self.backend._cp
        pv = self._param_values
        for call in self._calls:
            if call[0] == "kernel":
                _, k, fn, bufs, ki, pdl = call
                if pdl:  # programmatic dependent launch (cuda_runtime): may overlap the previous kernel's tail
                    rt.launch_pdl(fn, k.grid, k.workgroup_size, bufs + (pv[ki],), k.dynamic_shared)
                else:
                    fn(k.grid, k.workgroup_size, bufs + (pv[ki],), shared_mem=k.dynamic_shared)
            else:
                _, node, a_buf, b_buf, d_buf = call
                a, b = node.src
                mul_mat(cp, a, b, node, a_buf, b_buf, d_buf)

    def _outputs(self) -> dict[str, np.ndarray]:
        cp = self.backend._cp
        out = {}
        for o in self.graph.outputs:
            out[o.name] = cp.asnumpy(strided(cp, self._memory(o.root), o)).reshape(o.ne[::-1])
        return out

    def _capture(self, state: dict[str, Any]) -> float:
        """Capture :meth:`_launch_all` into a CUDA graph stored in ``state`` (``graph``, ``pool``,
        ``generation``); on failure ``state["fallback"]`` gets the reason and a
        :class:`CudaGraphWarning` is issued. Returns the host seconds spent."""
        cp = self.backend._cp
        stream = self.backend.stream
        t0 = time.perf_counter()
        # Anything allocated while capturing (cuBLAS temporaries, were cuBLAS capturable) comes from a
        # private pool kept with the graph, so no later allocation can reuse memory the graph writes.
        pool = cp.cuda.MemoryPool()
        err: BaseException | None = None
        graph = None
        with cp.cuda.using_allocator(pool.malloc):
            try:
                stream.begin_capture()
            except Exception as e:  # noqa: BLE001
                err = e
            else:
                try:
                    self._launch_all()
                except Exception as e:  # noqa: BLE001  (NotImplementedError from CuPy's cuBLAS, CUDA errors)
                    err = e
                try:
                    graph = stream.end_capture()
                except Exception as e:  # noqa: BLE001
                    err = err or e
                    graph = None
        if err is None and graph is not None and hasattr(graph, "upload"):
            try:
                graph.upload(stream)  # instantiate on the device now, not at the first replay
            except Exception as e:  # noqa: BLE001
                err = e
        if err is not None or graph is None:
            reason = f"{type(err).__name__}: {err}" if err is not None else "no graph returned"
            state.clear()
            state["fallback"] = reason
            warnings.warn(f"cuda backend: CUDA graph capture failed ({reason}); this graph-cache entry runs with "
                          "eager launches", CudaGraphWarning, stacklevel=4)
            return time.perf_counter() - t0
        state.clear()
        state.update(graph=graph, pool=pool, generation=self.backend._generation)
        self.captures += 1
        return time.perf_counter() - t0

    def run(self, inputs: Mapping[str, np.ndarray], backend_state: dict[str, Any] | None = None
            ) -> dict[str, np.ndarray]:
        """Run the graph once; see :meth:`fusec.backends.base.Executable.run`.

        ``inputs`` must name exactly the graph's non-weight leaves, each an array of the leaf's
        dtype and element count. Raises :class:`BackendError` for an unknown, missing, wrongly
        sized or wrongly typed input, or a weight never stored -- on replays too, before anything
        is copied or launched.

        ``backend_state``: the graph cache's per-entry dict. With graphs on, a run with an empty
        dict launches eagerly, then captures a CUDA graph into it; a run with a captured graph (of
        the current weight generation) copies the inputs into the same device buffers and replays
        it. ``None`` (or graphs off) always launches eagerly. A dict holding ``"fallback"`` (a
        failed capture) launches eagerly without retrying.
        """
        vals = check_inputs("cuda", self._inputs, inputs)
        be = self.backend
        capture_s = 0.0
        with be.on_stream():
            t0 = time.perf_counter()
            if self._bound_gen != be._generation:
                self._bind()
            graphs = backend_state is not None and be.use_graphs
            g = backend_state.get("graph") if graphs else None
            if g is not None and backend_state.get("generation") == be._generation:
                self._upload(vals)
                t1 = time.perf_counter()
                g.launch(be.stream)
                mode = "replay"
            else:
                self._upload(vals)
                t1 = time.perf_counter()
                self._launch_all()
                mode = "eager"
            t2 = time.perf_counter()
            out = self._outputs()  # waits for the stream (device-to-host copies)
            t3 = time.perf_counter()
            if mode == "eager" and graphs and "fallback" not in backend_state:
                capture_s = self._capture(backend_state)
        self.last_timing = {"mode": mode, "upload_s": t1 - t0, "launch_s": t2 - t1, "wait_s": t3 - t2,
                            "capture_s": capture_s}
        return out


__all__ = ["MATMUL_MODES", "CudaBackend", "CudaExecutable", "CudaGraphWarning", "graphs_disabled_by_env",
           "mul_mat", "strided"]
