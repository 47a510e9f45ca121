"""Buffer planning for a (fused) graph: which device buffer holds each root tensor.

The plan is made on the graph a backend actually runs -- *after* fusion -- so that the memory a
FUSED node reads is the memory of its real sources. Every root (non-view) tensor gets a *slot*:

* ``weight`` slots: leaves flagged ``weight`` (model weights and KV caches); owned by the
  backend's persistent store and bound by leaf name.
* ``input`` slots: the other leaves; written by every run.
* ``scratch`` slots: results of computing nodes. Two results share a scratch slot only when their
  lifetimes are disjoint: a result is live from the node that computes it to the last node that
  reads or writes its memory, directly, through views (of views), or as a FUSED node's source.
  Graph outputs (and the roots of output views) stay live to the end and are never reused.
  The extra outputs of a multi-output FUSED node (``FUSED_OUTPUT`` nodes) are written by the FUSED
  node's kernel: they are live from the FUSED node on, and their own node executes nothing.

The safety rule (the bug class of ggml's ``ggml_cuda_check_fusion_memory_ranges``): a node's
output buffer never aliases a buffer the node reads, except for the deliberate in-place ops
SET_ROWS/CPY, whose output *is* their destination, and FUSED nodes whose decomposition ends in
one of them (``fusec.rewrite.fuse.fused_alias_input``: the FUSED result is a view of the source it
writes, e.g. ROPE -> VIEW -> SET_ROWS into a KV cache); their other sources must not live in the
destination's buffer either (one kernel would read memory it is overwriting). For a multi-output
FUSED node this holds for every buffer it writes (its own and its ``FUSED_OUTPUT`` nodes').
:func:`plan_buffers` never produces such a
plan (a slot freed by a node's last read is only handed to nodes *after* it), and
:meth:`BufferPlan.check` verifies it, so a plan built or edited any other way is refused.

Node scratch (kernel sequences, :class:`fusec.codegen.KernelSequence`): a node may need temporary
buffers of its own for the duration of its dispatches (``plan_buffers(graph, scratch={node: [(name,
nbytes), ...]})``). Each gets a ``scratch`` slot live at that node only: taken from the slots free
*before* the node (never one holding its sources, its output or anything else live then), released
after it. :meth:`BufferPlan.check` verifies that too.

Sizes are bytes; slots are rounded up to :data:`SLOT_ALIGN` bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import BackendError
from ..ir.graph import Graph
from ..ir.ops import VIEW_OPS
from ..ir.tensor import Tensor
from ..rewrite.fuse import fused_alias_input

SLOT_ALIGN = 16
"""Slot sizes are multiples of this many bytes (WebGPU needs 4; 16 keeps vector loads aligned)."""

INPLACE_OPS = frozenset({"SET_ROWS", "CPY"})
"""Ops that write into their destination's memory; their result is a view of it."""

_END = 1 << 62  # lifetime end of graph outputs: after every node


def _align(n: int) -> int:
    return max(SLOT_ALIGN, -(-n // SLOT_ALIGN) * SLOT_ALIGN)


@dataclass
class Slot:
    """One buffer of the plan.

    Attributes:
        index: position in :attr:`BufferPlan.slots`.
        kind: ``"weight"`` | ``"input"`` | ``"scratch"``.
        size: bytes (a multiple of :data:`SLOT_ALIGN`); the largest root it holds, rounded up.
        name: the leaf name for ``weight``/``input`` slots, ``None`` for scratch.
    """

    index: int
    kind: str
    size: int
    name: str | None = None


@dataclass(frozen=True)
class PlanStats:
    """Memory totals of a plan, in bytes.

    Attributes:
        weight_bytes: persistent leaves (weights, KV caches) used by the graph.
        input_bytes: per-run input leaves.
        scratch_bytes_no_reuse: intermediate results if each had a buffer of its own.
        scratch_bytes: intermediate results with slot reuse (the scratch buffers allocated).
        n_results: intermediate roots planned.
        n_scratch_slots: scratch buffers.
    """

    weight_bytes: int
    input_bytes: int
    scratch_bytes_no_reuse: int
    scratch_bytes: int
    n_results: int
    n_scratch_slots: int

    @property
    def bytes_no_reuse(self) -> int:
        """Inputs plus scratch without reuse (weights excluded: they live in the backend's store)."""
        return self.input_bytes + self.scratch_bytes_no_reuse

    @property
    def bytes_with_reuse(self) -> int:
        """Inputs plus scratch with reuse."""
        return self.input_bytes + self.scratch_bytes


@dataclass
class BufferPlan:
    """Where every root tensor of ``graph`` lives, and for how long.

    Attributes:
        graph: the planned graph; nodes execute in ``graph.nodes`` order.
        slots: the buffers.
        slot_of: root tensor -> slot index (views resolve through :meth:`slot`).
        live: scratch root -> ``(first, last)`` node indices (into ``graph.nodes``) during which its
            memory must stay intact; ``last`` is a huge number for graph outputs.
        node_scratch: node -> {scratch name -> (slot index, bytes)} for nodes planned with scratch
            buffers (live during that node only).
    """

    graph: Graph
    slots: list[Slot]
    slot_of: dict[Tensor, int]
    live: dict[Tensor, tuple[int, int]] = field(default_factory=dict)
    node_scratch: dict[Tensor, dict[str, tuple[int, int]]] = field(default_factory=dict)
    _extra: dict[Tensor, dict[int, Tensor]] | None = field(default=None, repr=False, compare=False)

    # -- queries -------------------------------------------------------------------------------
    def extra_outputs(self, node: Tensor) -> dict[int, Tensor]:
        """The ``FUSED_OUTPUT`` nodes of ``node`` by output index (empty for a single-output node)."""
        if self._extra is None:
            self._extra = fused_outputs(self.graph)
        return self._extra.get(node, {})

    def slot(self, t: Tensor) -> Slot:
        """The slot holding ``t``'s memory (its root's slot for a view).

        Raises :class:`BackendError` when the root has no slot.
        """
        try:
            return self.slots[self.slot_of[t.root]]
        except KeyError:
            raise BackendError(f"buffer plan: tensor {t.root.name!r} has no buffer slot") from None

    def scratch_slot(self, node: Tensor, name: str) -> Slot:
        """The slot of ``node``'s scratch buffer ``name``; raises :class:`BackendError` when the node
        was planned without it."""
        try:
            return self.slots[self.node_scratch[node][name][0]]
        except KeyError:
            raise BackendError(f"buffer plan: node {node.name!r} has no scratch buffer {name!r}") from None

    def stats(self) -> PlanStats:
        """Bytes without reuse vs with reuse (see :class:`PlanStats`)."""
        scratch = [s for s in self.slots if s.kind == "scratch"]
        naive = sum(_align(r.span_bytes) for r in self.live)
        naive += sum(_align(n) for bufs in self.node_scratch.values() for _, n in bufs.values())
        return PlanStats(
            weight_bytes=sum(s.size for s in self.slots if s.kind == "weight"),
            input_bytes=sum(s.size for s in self.slots if s.kind == "input"),
            scratch_bytes_no_reuse=naive,
            scratch_bytes=sum(s.size for s in scratch),
            n_results=len(self.live),
            n_scratch_slots=len(scratch),
        )

    # -- verification ------------------------------------------------------------------------------
    def check(self) -> None:
        """Verify the plan; raises :class:`BackendError` naming the offending node.

        Checked: every root has a slot of the right kind and size; scratch roots sharing a slot
        have disjoint lifetimes; and the safety rule -- no computing node's output slot is a slot
        it reads (sources, sources of FUSED nodes, memory reached through views), other than
        SET_ROWS/CPY (or a FUSED node ending in one) writing their own destination
        (:func:`destination`; their other sources must not live in that slot either); for a
        multi-output FUSED node, neither is the slot of any of its ``FUSED_OUTPUT`` nodes (two
        FUSED_OUTPUT nodes of one output are refused).
        """
        order = self.graph.nodes
        for t in order:
            root = t.root
            if root not in self.slot_of:
                raise BackendError(f"buffer plan: node {t.name!r} ({t.op}): its memory ({root.name!r}) has no slot")
            k = self.slot_of[root]
            if not 0 <= k < len(self.slots):
                raise BackendError(f"buffer plan: node {root.name!r}: slot {k} does not exist")
            slot = self.slots[k]
            want = _slot_kind(root)
            if slot.kind != want:
                raise BackendError(f"buffer plan: node {root.name!r} needs a {want} slot, got slot {k} ({slot.kind})")
            if want != "scratch" and slot.name != root.name:
                raise BackendError(f"buffer plan: leaf {root.name!r} is bound to slot {k} of {slot.name!r}")
            if slot.size < root.span_bytes:
                raise BackendError(f"buffer plan: node {root.name!r} needs {root.span_bytes} bytes, "
                                   f"slot {k} has {slot.size}")
        extra = fused_outputs(self.graph)
        for node in order:
            w = written_root(node)
            if w is None:
                continue
            dest = destination(node)
            for wr in [w, *(t.root for t in extra.get(node, {}).values())]:
                ws = self.slot_of[wr]
                for s in node.src:
                    if s is None or (s is dest and wr is w):
                        continue
                    if self.slot_of[s.root] == ws:
                        what = "its output" if wr is w else f"its extra output {wr.name!r}"
                        raise BackendError(
                            f"buffer plan: node {node.name!r} ({node.op}) writes slot {ws}, which also holds "
                            f"{s.root.name!r} that the node reads: {what} would overwrite its own input")
        live = lifetimes(self.graph)  # recomputed: the plan's own record is not trusted
        by_slot: dict[int, list[Tensor]] = {}
        for r in live:
            by_slot.setdefault(self.slot_of[r], []).append(r)
        for k, roots in by_slot.items():
            roots.sort(key=lambda r: live[r][0])
            for a, b in zip(roots, roots[1:], strict=False):
                if live[b][0] <= live[a][1]:
                    raise BackendError(f"buffer plan: node {b.name!r} reuses slot {k} while {a.name!r} is still live")
        self._check_node_scratch(live)

    def _check_node_scratch(self, live: dict[Tensor, tuple[int, int]]) -> None:
        """Node scratch: scratch-kind slots large enough, distinct per node, and not holding any root
        live at the node (its sources and output included) nor another node's scratch at the same node."""
        index = {id(t): i for i, t in enumerate(self.graph.nodes)}
        for node, bufs in self.node_scratch.items():
            if id(node) not in index:
                raise BackendError(f"buffer plan: scratch planned for {node.name!r}, which is not in the graph")
            i = index[id(node)]
            busy = {self.slot_of[r]: r.name for r, (a, b) in live.items() if a <= i <= b}
            busy.update({self.slot_of[r]: r.name for r in read_roots(node)})
            seen: dict[int, str] = {}
            for name, (k, nbytes) in bufs.items():
                if not 0 <= k < len(self.slots) or self.slots[k].kind != "scratch":
                    raise BackendError(f"buffer plan: scratch {name!r} of node {node.name!r} needs a scratch slot, "
                                       f"got slot {k}")
                if self.slots[k].size < nbytes:
                    raise BackendError(f"buffer plan: scratch {name!r} of node {node.name!r} needs {nbytes} bytes, "
                                       f"slot {k} has {self.slots[k].size}")
                if k in busy:
                    raise BackendError(f"buffer plan: scratch {name!r} of node {node.name!r} shares slot {k} with "
                                       f"{busy[k]!r}, live at that node")
                if k in seen:
                    raise BackendError(f"buffer plan: scratch {name!r} and {seen[k]!r} of node {node.name!r} "
                                       f"share slot {k}")
                seen[k] = name


    def check_kernel(self, node: Tensor, accesses: list[tuple[Tensor, bool]]) -> None:
        """Check one generated kernel's buffers against the safety rule.

        ``accesses`` lists ``(root, write)`` for each buffer the kernel binds (graph roots, see
        :func:`binding_root`). Raises :class:`BackendError` naming ``node`` when a written buffer is
        also bound for reading under another root, or a root has no slot.
        """
        for w, is_write in accesses:
            if not is_write:
                continue
            ws = self.slot(w).index
            for r, r_write in accesses:
                if r is not w and not r_write and self.slot(r).index == ws:
                    raise BackendError(f"buffer plan: kernel of node {node.name!r} ({node.op}) writes slot {ws} "
                                       f"({w.name!r}) that it also reads as {r.name!r}")


def binding_root(node: Tensor, t: Tensor, extra: Mapping[int, Tensor] | None = None) -> Tensor:
    """The graph root whose memory a kernel of ``node`` binds for tensor ``t``.

    ``t`` is a graph tensor (a source of ``node``, ``node`` itself, or a view of either) or, for a
    FUSED node, a tensor of its decomposition: a placeholder (``params["fused_input"] = i``)
    stands for ``node.src[i]``, the decomposition's output 0 for ``node`` and its output ``k >= 1``
    (multi-output fusion) for ``extra[k]``, the node's ``FUSED_OUTPUT`` of index k
    (:meth:`BufferPlan.extra_outputs`). Raises :class:`BackendError` for a decomposition-internal
    tensor (it has no memory of its own) or an extra output without its ``FUSED_OUTPUT`` node.
    """
    sub = node.decomposition
    if sub is not None and any(t is d for d in sub.nodes):
        if t.is_leaf and "fused_input" in t.params:
            src = node.src[int(t.params["fused_input"])]
            if src is not None:
                return src.root
        if t.root is sub.outputs[0].root:
            return node.root
        for k, o in enumerate(sub.outputs[1:], start=1):
            if t is o:
                if extra is None or k not in extra:
                    raise BackendError(f"node {node.name!r}: its kernel writes extra output {k} ({t.name!r}), "
                                       "but the graph has no FUSED_OUTPUT node for it")
                return extra[k].root
        raise BackendError(f"node {node.name!r}: its kernel binds {t.name!r}, an internal tensor of the "
                           "decomposition that has no memory")
    return t.root


def _slot_kind(root: Tensor) -> str:
    if root.is_leaf:
        return "weight" if "weight" in root.flags else "input"
    return "scratch"


def _executes_nothing(node: Tensor) -> bool:
    return node.is_leaf or node.op in VIEW_OPS or node.op == "FUSED_OUTPUT"


def fused_outputs(graph: Graph) -> dict[Tensor, dict[int, Tensor]]:
    """FUSED node -> {output index k >= 1 -> its ``FUSED_OUTPUT`` node}, for the multi-output FUSED
    nodes of ``graph``. Raises :class:`BackendError` when two FUSED_OUTPUT nodes claim the same
    output (the kernel writes one buffer per output)."""
    out: dict[Tensor, dict[int, Tensor]] = {}
    for t in graph.nodes:
        if t.op == "FUSED_OUTPUT":
            f, k = t.src[0], int(t.params["index"])
            have = out.setdefault(f, {})
            if k in have:
                raise BackendError(f"buffer plan: FUSED_OUTPUT nodes {have[k].name!r} and {t.name!r} both claim "
                                   f"output {k} of {f.name!r}")
            have[k] = t
    return out


def written_root(node: Tensor) -> Tensor | None:
    """The root whose memory executing ``node`` writes: the node itself for computing ops, the
    destination's root for SET_ROWS/CPY and for FUSED nodes writing into a source (their result is a
    view of it), ``None`` for leaves, pure views and FUSED_OUTPUT (its memory is written by its FUSED
    node, which also writes its own root)."""
    if _executes_nothing(node):
        return None
    return node.root


def destination(node: Tensor) -> Tensor | None:
    """The source an in-place node writes into (SET_ROWS ``src[2]``, CPY ``src[1]``, a FUSED node's
    ``src[fused_alias_input]``); ``None`` for nodes computing into memory of their own."""
    if node.is_leaf or node.op in VIEW_OPS or not node.is_view:
        return None
    if node.op == "FUSED" and node.decomposition is not None:
        i = fused_alias_input(node.decomposition)
        return None if i is None else node.src[i]
    slot = _DEST_SRC.get(node.op)
    return None if slot is None else node.src[slot]


_DEST_SRC = {"SET_ROWS": 2, "CPY": 1}  # ggml source order: the destination of the in-place ops


def read_roots(node: Tensor) -> list[Tensor]:
    """Roots whose memory executing ``node`` reads: the roots of its sources (a FUSED node reads
    exactly its sources; its decomposition's placeholders stand for them). Empty for leaves,
    pure views and FUSED_OUTPUT (they execute nothing)."""
    if _executes_nothing(node):
        return []
    out: list[Tensor] = []
    for s in node.src:
        if s is not None and all(s.root is not r for r in out):
            out.append(s.root)
    return out


def lifetimes(graph: Graph) -> dict[Tensor, tuple[int, int]]:
    """Lifetime of every computed root of ``graph``: ``(first, last)`` indices into ``graph.nodes``.

    ``first`` is the node computing it (for a ``FUSED_OUTPUT``: its FUSED node, whose kernel writes
    it); ``last`` the last node reading or writing its memory (directly, through views of any depth,
    as a FUSED source, as a SET_ROWS/CPY destination), or a number larger than any index when the
    root or a view of it is a graph output.
    """
    live: dict[Tensor, list[int]] = {}
    pos = {id(t): i for i, t in enumerate(graph.nodes)}
    for i, t in enumerate(graph.nodes):
        if not t.is_leaf and not t.is_view:
            first = pos[id(t.src[0])] if t.op == "FUSED_OUTPUT" else i
            live[t] = [first, i]
    for i, t in enumerate(graph.nodes):
        for r in [*read_roots(t), written_root(t)]:
            if r is not None and r in live:
                live[r][1] = max(live[r][1], i)
    for t in graph.outputs:
        if t.root in live:
            live[t.root][1] = _END
    return {r: (a, b) for r, (a, b) in live.items()}


def plan_buffers(graph: Graph, scratch: Mapping[Tensor, Sequence[tuple[str, int]]] | None = None) -> BufferPlan:
    """Plan the buffers of ``graph`` (typically after fusion); see the module docstring.

    ``scratch`` maps a node of ``graph`` to the ``(name, nbytes)`` scratch buffers its kernel
    sequence needs (names unique per node); each gets a scratch slot live at that node only.

    Scratch slots are reused best-fit (the smallest free slot that is large enough, else the
    largest free slot grown to fit, else a new slot). A slot is freed only *after* the node
    that last uses its root, so it can never be the output of a node that reads it.

    Returns a :class:`BufferPlan`; raises :class:`BackendError` for a leaf that is a view or two
    leaves of the same name with different kinds (a weight and an input both named ``x``).
    """
    order = graph.nodes
    slots: list[Slot] = []
    slot_of: dict[Tensor, int] = {}
    by_name: dict[str, int] = {}
    # leaves: one dedicated slot per name
    for t in order:
        if not t.is_leaf:
            continue
        if t.is_view:
            raise BackendError(f"buffer plan: leaf {t.name!r} is a view; leaves must own their memory")
        kind = _slot_kind(t)
        k = by_name.get(t.name)
        if k is None:
            k = len(slots)
            slots.append(Slot(k, kind, _align(t.span_bytes), t.name))
            by_name[t.name] = k
        elif slots[k].kind != kind:
            raise BackendError(f"buffer plan: leaf name {t.name!r} is used by a weight and an input")
        else:
            slots[k].size = max(slots[k].size, _align(t.span_bytes))
        slot_of[t] = k

    live = lifetimes(graph)
    expiring: dict[int, list[Tensor]] = {}
    born: dict[int, list[Tensor]] = {}
    for r, (first, last) in live.items():
        expiring.setdefault(last, []).append(r)
        born.setdefault(first, []).append(r)  # a FUSED node and its FUSED_OUTPUT nodes are born together

    free: list[int] = []

    def take(need: int) -> int:
        fits = [k for k in free if slots[k].size >= need]
        if fits:
            k = min(fits, key=lambda k: (slots[k].size, k))
        elif free:
            k = max(free, key=lambda k: (slots[k].size, -k))
            slots[k].size = need
        else:
            k = len(slots)
            slots.append(Slot(k, "scratch", need))
        if k in free:
            free.remove(k)
        return k

    want = {id(n): (n, list(bufs)) for n, bufs in (scratch or {}).items() if bufs}
    node_scratch: dict[Tensor, dict[str, tuple[int, int]]] = {}
    for i, t in enumerate(order):
        for r in born.get(i, ()):
            slot_of[r] = take(_align(r.span_bytes))
        if id(t) in want:  # after the output: the free list holds nothing live at node i
            bufs = node_scratch[t] = {}
            for name, nbytes in want.pop(id(t))[1]:
                if name in bufs:
                    raise BackendError(f"buffer plan: node {t.name!r} asks for scratch {name!r} twice")
                bufs[name] = (take(_align(int(nbytes))), int(nbytes))
        for r in expiring.get(i, ()):  # freed only after node i ran: never node i's own output
            free.append(slot_of[r])
        for k, _ in node_scratch.get(t, {}).values():
            free.append(k)
    if want:
        n = next(iter(want.values()))[0]
        raise BackendError(f"buffer plan: scratch requested for {n.name!r}, which is not in the graph")
    return BufferPlan(graph, slots, slot_of, live, node_scratch)


__all__ = ["INPLACE_OPS", "SLOT_ALIGN", "BufferPlan", "PlanStats", "Slot", "binding_root", "destination",
           "fused_outputs", "lifetimes",
           "plan_buffers", "read_roots", "written_root"]
