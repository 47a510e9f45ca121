"""Kernel generation: IR node -> :class:`Kernel` (source + bindings + params + launch geometry).

Each *family* (``fusec/codegen/families/<name>.py``) renders one template per backend
(``templates/<backend>/<name>.*.j2``) and covers a set of ops; a FUSED node names its family in
``params["kernel"]`` (from the pattern's ``rewrite ... kernel NAME``) and the family renders it from
the node's decomposition, never from pattern text.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable

from ..errors import CodegenError
from ..ir.graph import Graph
from ..ir.tensor import Tensor
from .kernel import BACKENDS, Binding, Kernel, KernelSequence, Scratch

EmitFn = Callable[[Tensor, str], Kernel]

FAMILIES: dict[str, EmitFn] = {}
SEQUENCE_FAMILIES: dict[str, Callable[[Tensor, str], KernelSequence]] = {}
OP_FAMILY: dict[str, str] = {}
NO_KERNEL_OPS = frozenset({"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE", "FUSED_OUTPUT"})
"""Ops that run no kernel: leaves, pure views, and FUSED_OUTPUT (written by its FUSED node's kernel)."""


def family(name: str, ops: tuple[str, ...] = ()):
    """Register ``fn(node, backend) -> Kernel`` as family ``name``, the default for ``ops``."""

    def deco(fn: EmitFn) -> EmitFn:
        FAMILIES[name] = fn
        for op in ops:
            OP_FAMILY[op] = name
        return fn

    return deco


def sequence_family(name: str):
    """Register ``fn(node, backend) -> KernelSequence`` as the multi-kernel form of family ``name``
    (used by :func:`emit_all`; the family's :func:`family` function stays the single-kernel form)."""

    def deco(fn: Callable[[Tensor, str], KernelSequence]) -> Callable[[Tensor, str], KernelSequence]:
        SEQUENCE_FAMILIES[name] = fn
        return fn

    return deco


_loaded = False


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    from . import families

    for mod in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{mod.name}")
    from . import diskcache  # render cache (memory + disk) behind every family's ``render``

    diskcache.install()
    _loaded = True


def family_of(node: Tensor) -> str:
    """The family that renders ``node``; raises :class:`CodegenError` when none does."""
    _load_families()
    if node.op == "FUSED":
        fam = node.params.get("kernel")
        if fam not in FAMILIES:
            raise CodegenError(f"node {node.name!r}: unknown kernel family {fam!r} "
                               f"(known: {', '.join(sorted(FAMILIES))})")
        return fam
    if node.op not in OP_FAMILY:
        raise CodegenError(f"node {node.name!r}: no kernel template for op {node.op}")
    return OP_FAMILY[node.op]


def needs_kernel(node: Tensor) -> bool:
    """False for leaves and pure views (they are addressing, not computation) and for FUSED_OUTPUT
    (the extra output of a multi-output FUSED node, written by that node's kernel)."""
    return node.op not in NO_KERNEL_OPS


def emit(node: Tensor, backend: str) -> Kernel:
    """Generate the kernel computing ``node`` for ``backend`` (``wgsl`` | ``cuda`` | ``msl``).

    Raises :class:`CodegenError` for an unknown backend, an op without a template, or a node the
    family's template cannot handle (the message names the node and the reason).
    """
    if backend not in BACKENDS:
        raise CodegenError(f"unknown codegen backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    t0 = time.perf_counter()
    k = FAMILIES[family_of(node)](node, backend)
    _check_extra_outputs(node, [k])
    k = _shareable(k, node)
    _diskcache().STATS.emit_s += time.perf_counter() - t0
    return k


def emit_all(node: Tensor, backend: str) -> KernelSequence:
    """Every dispatch computing ``node`` for ``backend``, with the scratch buffers they share.

    A family registered with :func:`sequence_family` (``flash_attn``) returns its multi-kernel form
    (e.g. a mask pre-pass, the attention kernel writing split partials, a reduction); every other
    family returns ``KernelSequence(node, [emit(node, backend)], [])``. :func:`emit` stays the
    single-kernel form (for ``flash_attn`` a self-contained kernel without skipping or split).
    Raises :class:`CodegenError` as :func:`emit` does.
    """
    if backend not in BACKENDS:
        raise CodegenError(f"unknown codegen backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    fam = family_of(node)
    if fam not in SEQUENCE_FAMILIES:
        return KernelSequence(node, [emit(node, backend)], [])
    t0 = time.perf_counter()
    seq = SEQUENCE_FAMILIES[fam](node, backend)
    _check_extra_outputs(node, seq.kernels)
    seq.kernels = [_shareable(k, node) for k in seq.kernels]
    names = [sc.name for sc in seq.scratch]
    bad = [b.scratch for k in seq.kernels for b in k.bindings if b.scratch is not None and b.scratch not in names]
    if len(set(names)) != len(names) or bad:
        raise CodegenError(f"node {node.name!r}: family {fam} binds unknown or duplicate scratch buffers "
                           f"{bad or names}")
    _diskcache().STATS.emit_s += time.perf_counter() - t0
    return seq


def _check_extra_outputs(node: Tensor, kernels: list[Kernel]) -> None:
    """Multi-output FUSED nodes: some kernel must write each extra output ``decomposition.outputs[k]``
    (k >= 1; its FUSED_OUTPUT node's memory). Raises :class:`CodegenError` naming the node, the
    family and the outputs nobody writes, so a family that ignores extra outputs fails loudly."""
    sub = node.decomposition
    if node.op != "FUSED" or sub is None or len(sub.outputs) < 2:
        return
    written = {id(b.tensor) for k in kernels for b in k.bindings if b.write and b.tensor is not None}
    missing = [f"{k} ({o.name!r})" for k, o in enumerate(sub.outputs) if k > 0 and id(o) not in written]
    if missing:
        raise CodegenError(f"node {node.name!r}: kernel family {node.params.get('kernel')!r} does not write extra "
                           f"output(s) {', '.join(missing)} of the multi-output FUSED node")


def _diskcache():
    from . import diskcache  # noqa: PLC0415

    return diskcache


NODES_LINE = "// nodes: "


def _shareable(k: Kernel, node: Tensor) -> Kernel:
    """Move the ``// nodes: ...`` header line out of the source into ``k.meta["nodes"]``, so that
    nodes with the same dtypes, structure and tuning share one source text (and one compiled
    pipeline/module, whose caches key on the text). ``fusec compile`` writes the line back, listing
    every node that uses the kernel (:func:`with_nodes_header`)."""
    if NODES_LINE in k.source:
        k.source = _strip_nodes_lines(k.source)
    k.meta.setdefault("nodes", [node.name])
    return k


def _strip_nodes_lines(src: str) -> str:
    """``src`` without the lines that start with :data:`NODES_LINE` (scans only for the marker)."""
    out: list[str] = []
    i = 0
    while (j := src.find(NODES_LINE, i)) >= 0:
        if j == 0 or src[j - 1] == "\n":
            e = src.find("\n", j)
            out.append(src[i:j])
            i = len(src) if e < 0 else e + 1
        else:
            out.append(src[i:j + len(NODES_LINE)])
            i = j + len(NODES_LINE)
    out.append(src[i:])
    return "".join(out)


def with_nodes_header(source: str, nodes: list[str]) -> str:
    """``source`` with a ``// nodes: a, b, ...`` line after its first (header) line."""
    first, _, rest = source.partition("\n")
    return f"{first}\n{NODES_LINE}{', '.join(nodes)}\n{rest}"


def emit_graph(graph: Graph, backend: str) -> list[Kernel]:
    """Kernels for every computing node of ``graph``, in execution (topological) order."""
    from .._gc import paused  # noqa: PLC0415

    with paused():  # see fusec._gc
        return [emit(t, backend) for t in graph.nodes if needs_kernel(t)]


__all__ = ["BACKENDS", "Binding", "FAMILIES", "Kernel", "KernelSequence", "OP_FAMILY", "SEQUENCE_FAMILIES", "Scratch",
           "emit", "emit_all", "emit_graph", "family", "family_of", "needs_kernel", "sequence_family",
           "with_nodes_header"]
