"""Running a (rewritten) graph on the backend under test and comparing with the reference.

Backends: a name for :func:`fusec.backends.get_backend` or a :class:`~fusec.backends.Backend`
instance. While ``fusec.backends.wgpu_backend`` does not exist, ``"wgpu"`` falls back to
:class:`KernelRunner`: every node is interpreted except FUSED nodes, whose generated WGSL kernel
(``fusec.codegen.emit(node, "wgsl")``) runs through ``fusec.backends.wgpu_runtime.run_kernel``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..backends import Backend, get_backend
from ..errors import BackendError
from ..interp import evaluate
from ..ir.graph import Graph

F32_TOL = 1e-7
"""Max normalized MSE ``sum((out-ref)^2) / sum(ref^2)`` when every tensor is f32."""

F16_TOL = 1e-5
"""Max normalized MSE when any leaf of the example is f16."""


class BackendRunner:
    """Runs graphs on a :class:`Backend`: weight leaves through ``set_weights``, the rest as inputs."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.name

    def run(self, graph: Graph, vals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        weights = {t.name: vals[t.name] for t in graph.leaves if "weight" in t.flags}
        self.backend.set_weights(weights)
        exe = self.backend.compile(graph)
        return exe.run({t.name: vals[t.name] for t in graph.leaves if "weight" not in t.flags})


class KernelRunner:
    """FUSED nodes through their generated WGSL kernel, everything else through the interpreter.

    The kernel reads the interpreter's values of the FUSED node's sources (root memory, flattened)
    and its result replaces the node's value in the outputs (and, for a multi-output node, each
    extra output replaces its ``FUSED_OUTPUT`` node's value); nodes *using* a FUSED node still see
    the decomposition's value (the generated test graphs have the FUSED node as output).
    """

    name = "wgpu (generated kernels via wgpu_runtime.run_kernel)"

    def run(self, graph: Graph, vals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..backends import wgpu_runtime  # noqa: PLC0415
        from ..codegen import emit  # noqa: PLC0415

        env = evaluate(graph, vals)
        out = {t.name: env[t] for t in graph.outputs}
        for node in graph.nodes:
            if node.op != "FUSED":
                continue
            k = emit(node, "wgsl")
            arrays = {}
            sub = node.decomposition
            extra = {id(sub.outputs[k]): k for k in range(1, len(sub.outputs))} if sub is not None else {}
            for b in k.bindings:
                root = b.tensor.root
                if b.tensor is node or root is node:
                    arrays[b.name] = np.zeros(node.nelements, dtype=b.dtype.np)
                elif b.write and id(b.tensor) in extra:  # an extra output of a multi-output node
                    arrays[b.name] = np.zeros(root.nelements, dtype=b.dtype.np)
                else:
                    if not root.is_contiguous:
                        raise BackendError(f"kernel runner: binding {b.name} ({root.name!r}) is not contiguous")
                    arrays[b.name] = env[root].astype(b.dtype.np).ravel()
            res = wgpu_runtime.run_kernel(k, arrays)
            written = [b for b in k.bindings if b.write and b.tensor.root is node]
            if len(written) != 1:
                raise BackendError(f"kernel {k.entry} writes {len(written)} buffers of node {node.name!r}")
            if node.name in out:
                out[node.name] = res[written[0].name][: node.nelements].reshape(node.ne[::-1])
            for b in k.bindings:
                proj = [t for t in graph.nodes if t.op == "FUSED_OUTPUT" and t.src[0] is node
                        and t.params["index"] == extra.get(id(b.tensor))] if b.write else []
                if proj and proj[0].name in out:
                    out[proj[0].name] = res[b.name][: proj[0].nelements].reshape(proj[0].ne[::-1])
        return out


def make_runner(backend: str | Backend) -> BackendRunner | KernelRunner:
    """The runner for ``backend``. Raises :class:`BackendError` when it is not available."""
    if isinstance(backend, Backend):
        return BackendRunner(backend)
    try:
        return BackendRunner(get_backend(backend))
    except BackendError as e:
        if backend != "wgpu" or "cannot be loaded" not in str(e):
            raise
    from ..backends import wgpu_runtime  # noqa: PLC0415

    if not wgpu_runtime.available():
        raise BackendError("backend 'wgpu' is not available on this machine (no WebGPU adapter)")
    return KernelRunner()


SENSITIVITY_FACTOR = 100.0


def compare(out: np.ndarray, ref: np.ndarray, tol: float, sens: np.ndarray | None = None) -> str | None:
    """``None`` when ``out`` equals ``ref`` within ``tol`` (normalized MSE over the finite reference
    entries; non-finite entries must be non-finite at the same places, infinities with the same
    sign); else a one-line reason.

    ``sens`` (same shape as ``ref``), when given, is the reference's own rounding sensitivity: how
    far the reference moves when every float input is perturbed by one unit in the last place (see
    :func:`fusec.proptest.runner.check_positive`). The squared error may then also exceed
    ``tol * sum(ref^2)`` by ``(SENSITIVITY_FACTOR * |sens|)^2`` summed: an output that cancels
    (a dot product of large terms summing to nearly 0) is only defined to the rounding of its terms,
    while a wrong kernel is off by the size of the terms, far above that allowance."""
    if tuple(np.shape(out)) != tuple(np.shape(ref)):
        return f"shape {list(np.shape(out))} != reference {list(np.shape(ref))} (numpy order)"
    a = np.asarray(out, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    fin = np.isfinite(r)
    bad = (np.isfinite(a) != fin) | (np.isinf(r) & (a != r))
    if bad.any():
        return f"{int(bad.sum())} element(s) differ in finiteness from the reference (first at {np.argwhere(bad)[0]})"
    diff = float(np.sum((a[fin] - r[fin]) ** 2))
    den = float(np.sum(r[fin] ** 2))
    err = diff / den if den > 0 else diff
    if sens is not None and not err <= tol:
        slack = float(np.sum((SENSITIVITY_FACTOR * np.asarray(sens, dtype=np.float64)[fin]) ** 2))
        if diff <= tol * den + slack:
            return None
    if not err <= tol:
        worst = np.unravel_index(int(np.argmax(np.where(fin, np.abs(a - r), -1))), r.shape)
        return f"normalized MSE {err:.3e} > {tol:g} (worst at numpy index {tuple(int(i) for i in worst)}: " \
               f"{a[worst]!r} vs {r[worst]!r})"
    return None
