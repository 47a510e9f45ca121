"""Kernel generation: IR node -> :class:`Kernel` (source + bindings + params + launch geometry).

Each *family* (``fusec/codegen/families/<name>.py``) renders one template per backend
(``templates/<backend>/<name>.*.j2``) and covers a set of ops; a FUSED node names its family in
``params["kernel"]`` (from the pattern's ``rewrite ... kernel NAME``) and the family renders it from
the node's decomposition, never from pattern text.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from ..errors import CodegenError
from ..ir.graph import Graph
from ..ir.tensor import Tensor
from .kernel import BACKENDS, Binding, Kernel

EmitFn = Callable[[Tensor, str], Kernel]

FAMILIES: dict[str, EmitFn] = {}
OP_FAMILY: dict[str, str] = {}
NO_KERNEL_OPS = frozenset({"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})


def family(name: str, ops: tuple[str, ...] = ()):
    """Register ``fn(node, backend) -> Kernel`` as family ``name``, the default for ``ops``."""

    def deco(fn: EmitFn) -> EmitFn:
        FAMILIES[name] = fn
        for op in ops:
            OP_FAMILY[op] = name
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
    """False for leaves and pure views (they are addressing, not computation)."""
    return node.op not in NO_KERNEL_OPS


def emit(node: Tensor, backend: str) -> Kernel:
    """Generate the kernel computing ``node`` for ``backend`` (``wgsl`` | ``cuda`` | ``msl``).

    Raises :class:`CodegenError` for an unknown backend, an op without a template, or a node the
    family's template cannot handle (the message names the node and the reason).
    """
    if backend not in BACKENDS:
        raise CodegenError(f"unknown codegen backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    k = FAMILIES[family_of(node)](node, backend)
    return _shareable(k, node)


NODES_LINE = "// nodes: "


def _shareable(k: Kernel, node: Tensor) -> Kernel:
    """Move the ``// nodes: ...`` header line out of the source into ``k.meta["nodes"]``, so that
    nodes with the same dtypes, structure and tuning share one source text (and one compiled
    pipeline/module, whose caches key on the text). ``fusec compile`` writes the line back, listing
    every node that uses the kernel (:func:`with_nodes_header`)."""
    lines = k.source.splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.startswith(NODES_LINE)]
    k.source = "".join(kept)
    k.meta.setdefault("nodes", [node.name])
    return k


def with_nodes_header(source: str, nodes: list[str]) -> str:
    """``source`` with a ``// nodes: a, b, ...`` line after its first (header) line."""
    first, _, rest = source.partition("\n")
    return f"{first}\n{NODES_LINE}{', '.join(nodes)}\n{rest}"


def emit_graph(graph: Graph, backend: str) -> list[Kernel]:
    """Kernels for every computing node of ``graph``, in execution (topological) order."""
    return [emit(t, backend) for t in graph.nodes if needs_kernel(t)]


__all__ = ["BACKENDS", "Binding", "FAMILIES", "Kernel", "OP_FAMILY", "emit", "emit_graph", "family",
           "family_of", "needs_kernel", "with_nodes_header"]
