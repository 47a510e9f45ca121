"""The graph cache: build, rewrite, generate and compile a graph once per *structure*; replay it.

:class:`GraphCache` maps the :func:`~fusec.runtime.key.structural_key` of a graph (before fusion)
to a :class:`CacheEntry`: the rewritten graph, its fusion report, the compiled
:class:`~fusec.backends.base.Executable` (kernels, pipelines, bind groups, buffer plan) and the
cold costs of making it. A second, cheaper index maps caller-chosen *build parameters* (for a
decode step: ``(n_tokens, n_kv)`` and everything else the builder reads) to the structural key, so
that a caller who knows its next graph would be built from the same parameters reuses the entry
without building anything (llama.cpp's ``llm_graph_result::can_reuse``).

On a **hit** nothing is built, rewritten, rendered or compiled: the inputs are validated against
the entry's input slots (name, dtype, shape, host array; :class:`~fusec.runtime.key.CacheError`
naming the input otherwise) and written into the executable's input buffers by
``Executable.run``; dynamic view offsets that changed are patched in place (the cached graph's
views are updated, the kernels touching them re-emitted -- the source must not change -- and their
parameter uniforms rewritten with ``Executable.patch_params``). On a **miss** (a new structure,
e.g. the padded KV length grew) the graph is rewritten and compiled and the entry inserted (least
recently used entries beyond ``max_entries`` are dropped).

``FUSEC_DISABLE_GRAPH_CACHE=1`` (or ``enabled=False``) turns the cache off: every step builds,
rewrites and compiles, and nothing is kept; inputs are still validated.

A backend may attach per-entry state that is only valid while the entry's parameters are
unchanged -- e.g. a captured CUDA graph, whose kernel arguments are frozen at capture -- in
:attr:`CacheEntry.backend_state`; the cache clears it whenever it patches the entry's parameters.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends.base import Backend, Executable
from ..ir.graph import Graph
from ..ir.ops import VIEW_OPS
from ..ir.tensor import Tensor
from ..rewrite.fuse import fused_alias_input
from .key import CacheError, StructuralKey, check_inputs, is_dynamic_view, structural_key

PHASES = ("build_s", "rewrite_s", "codegen_s", "compile_s", "run_s")
"""Host-time phases of a step, seconds: graph build, match+rewrite, kernel codegen (render and
parameters), backend compile (pipelines, buffers, bind groups; the numpy backend has none), and
encode+launch (``Executable.run``: input upload, dispatch recording, submission and, since the
host waits for the logits, execution and read-back)."""


def cache_disabled_by_env() -> bool:
    """True when ``FUSEC_DISABLE_GRAPH_CACHE=1``."""
    return os.environ.get("FUSEC_DISABLE_GRAPH_CACHE") == "1"


@dataclass
class CacheEntry:
    """One compiled structure.

    Attributes:
        key: the structural key of the graph it was built from.
        graph: the graph that runs (after rewriting).
        executable: the backend's compiled executable.
        report: the ``FusionReport`` of the rewrite (``None`` without patterns).
        cold: the cold costs, seconds, keyed by the first four :data:`PHASES`.
        dyn_views: the cached graph's dynamic views, in ``key.dynamic`` order.
        hits: replays served.
        backend_state: free slot for backends (a captured CUDA graph...); cleared on every patch.
    """

    key: StructuralKey
    graph: Graph
    executable: Executable
    report: Any
    cold: dict[str, float]
    dyn_views: list[Tensor] = field(default_factory=list)
    hits: int = 0
    backend_state: dict[str, Any] = field(default_factory=dict)

    @property
    def cold_s(self) -> float:
        """Build + rewrite + codegen + compile seconds of the miss that created the entry."""
        return sum(self.cold.values())


@dataclass
class CacheStats:
    """Counters of a :class:`GraphCache`.

    Attributes:
        hits, misses: lookups served from an entry / that built one (every step when disabled).
        reused_without_build: hits found from the build parameters alone (no graph was built).
        patched: hits that patched dynamic parameters.
        saved_s: estimated host seconds saved: per hit, the entry's cold cost minus the hit's own
            lookup/validation/patch time.
        totals: host seconds per phase (:data:`PHASES` plus ``lookup_s``) over all steps.
        steps: steps run.
    """

    hits: int = 0
    misses: int = 0
    reused_without_build: int = 0
    patched: int = 0
    saved_s: float = 0.0
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*PHASES, "lookup_s"), 0.0))
    steps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "reused_without_build": self.reused_without_build,
                "patched": self.patched, "saved_s": self.saved_s, "steps": self.steps, "totals": dict(self.totals)}


def _view_parent(t: Tensor) -> Tensor | None:
    """The tensor whose memory (and offset) a view-producing node extends."""
    if t.op in VIEW_OPS:
        return t.src[0]
    if t.op == "SET_ROWS":
        return t.src[2]
    if t.op == "CPY":
        return t.src[1]
    if t.op == "FUSED" and t.decomposition is not None:
        i = fused_alias_input(t.decomposition)  # a FUSED node writing into that source
        return None if i is None else t.src[i]
    return None


class GraphCache:
    """Compiled graphs of one backend, keyed by structure (see the module docstring).

    Args:
        backend: the backend that compiles and runs the graphs.
        patterns: fusion patterns for ``fusec.rewrite.rewrite``; ``None`` runs graphs unfused.
        enabled: ``None`` follows ``FUSEC_DISABLE_GRAPH_CACHE``; ``False`` disables.
        max_entries: entries kept (least recently used dropped first); ``None`` for no limit.

    Attributes:
        stats: :class:`CacheStats`.
        last_timing: the phase times (:data:`PHASES`, ``lookup_s``, ``hit``, ``reused``) of the
            last :meth:`step`.
    """

    def __init__(self, backend: Backend, patterns: Sequence[Any] | None = None, *, enabled: bool | None = None,
                 max_entries: int | None = 64) -> None:
        self.backend = backend
        self.patterns = None if patterns is None else list(patterns)
        self.enabled = (not cache_disabled_by_env()) if enabled is None else bool(enabled)
        self.max_entries = max_entries
        self.stats = CacheStats()
        self.last_timing: dict[str, Any] = {}
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._by_params: dict[Hashable, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def entries(self) -> list[CacheEntry]:
        """Entries, least recently used first."""
        return list(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self._by_params.clear()

    # -- lookup ------------------------------------------------------------------------------------
    def can_reuse(self, params: Hashable) -> CacheEntry | None:
        """The entry a graph built from ``params`` would map to, if one was already built from
        them (nothing is built). ``None`` when disabled or unknown."""
        if not self.enabled:
            return None
        digest = self._by_params.get(params)
        entry = self._entries.get(digest) if digest is not None else None
        if entry is not None:
            self._entries.move_to_end(digest)  # type: ignore[arg-type]
        return entry

    def get(self, graph: Graph, params: Hashable | None = None, *, build_s: float = 0.0) -> tuple[CacheEntry, bool]:
        """The entry for ``graph`` (unfused, as built): ``(entry, hit)``.

        A hit patches the entry's dynamic view offsets from ``graph``; a miss rewrites and
        compiles ``graph`` and inserts it (unless disabled). ``params``, when given, is remembered
        for :meth:`can_reuse`. ``build_s`` is the caller's build time, recorded as the entry's
        cold build cost. Raises :class:`CacheError` for a dynamic offset that cannot be patched and
        the rewriter's and backend's errors on a miss.
        """
        t0 = time.perf_counter()
        key = structural_key(graph)
        timing = self.last_timing = dict.fromkeys(PHASES, 0.0)
        timing.update(build_s=build_s, hit=False, reused=False)
        entry = self._entries.get(key.digest) if self.enabled else None
        if entry is not None:
            self._entries.move_to_end(key.digest)
            self._patch_dynamic(entry, {i: s.offset for i, s in enumerate(key.dynamic)})
            if params is not None:
                self._by_params[params] = key.digest
            timing.update(hit=True, lookup_s=time.perf_counter() - t0)
            return entry, True
        entry = self._compile(graph, key, build_s, timing, t0)
        if self.enabled:
            self._entries[key.digest] = entry
            if params is not None:
                self._by_params[params] = key.digest
            while self.max_entries is not None and len(self._entries) > self.max_entries:
                old, _ = self._entries.popitem(last=False)
                self._by_params = {p: d for p, d in self._by_params.items() if d != old}
        return entry, False

    def _compile(self, graph: Graph, key: StructuralKey, build_s: float, timing: dict[str, Any],
                 t0: float) -> CacheEntry:
        from .._gc import paused  # noqa: PLC0415
        from ..codegen import diskcache  # noqa: PLC0415

        t1 = time.perf_counter()
        report = None
        run_graph = graph
        if self.patterns is not None:
            from ..rewrite import rewrite  # noqa: PLC0415

            run_graph, report = rewrite(graph, self.patterns)
        t2 = time.perf_counter()
        emit0 = diskcache.STATS.emit_s
        with paused():  # see fusec._gc: codegen + plan allocate many short-lived objects
            exe = self.backend.compile(run_graph)
        t3 = time.perf_counter()
        codegen = diskcache.STATS.emit_s - emit0
        cold = {"build_s": build_s, "rewrite_s": t2 - t1, "codegen_s": codegen,
                "compile_s": max(0.0, t3 - t2 - codegen)}
        timing.update(cold, lookup_s=t1 - t0)
        dyn = [t for t in run_graph.nodes if is_dynamic_view(t)]
        names = [t.name for t in dyn]
        if [s.name for s in key.dynamic] != names or len(set(names)) != len(names):
            raise CacheError("graph cache: dynamic views must keep unique names through the rewrite; got "
                             f"{[s.name for s in key.dynamic]} before and {names} after")
        return CacheEntry(key, run_graph, exe, report, cold, dyn)

    # -- patching ------------------------------------------------------------------------------------
    def patch_dynamic(self, entry: CacheEntry, offsets: Mapping[str, int]) -> int:
        """Set dynamic view offsets of ``entry`` by view name (bytes); returns how many changed.

        Raises :class:`CacheError` for an unknown name, an offset that leaves the view's memory or
        changes its alignment class (a different structure: build that graph instead).
        """
        idx = {t.name: i for i, t in enumerate(entry.dyn_views)}
        bad = sorted(set(offsets) - set(idx))
        if bad:
            raise CacheError(f"graph cache: no dynamic view named {', '.join(map(repr, bad))} "
                             f"(dynamic views: {', '.join(map(repr, idx)) or 'none'})")
        return self._patch_dynamic(entry, {idx[n]: int(v) for n, v in offsets.items()})

    def _patch_dynamic(self, entry: CacheEntry, offsets: Mapping[int, int]) -> int:
        from .key import DYN_OFFSET_ALIGN  # noqa: PLC0415

        changed: dict[int, int] = {}
        for i, new in offsets.items():
            v = entry.dyn_views[i]
            old = int(v.params.get("offset", 0))
            if new == old:
                continue
            if (new - old) % DYN_OFFSET_ALIGN:
                raise CacheError(f"graph cache: dynamic view {v.name!r}: offset {new} is not {old} modulo "
                                 f"{DYN_OFFSET_ALIGN} bytes (another structure)")
            if new < 0 or v.view_offs + (new - old) + v.span_bytes > v.root.span_bytes:
                raise CacheError(f"graph cache: dynamic view {v.name!r}: offset {new} puts it outside its "
                                 f"source ({v.root.span_bytes} bytes)")
            changed[i] = new - old
        if not changed:
            return 0
        moved: dict[int, int] = {}  # id(tensor) -> byte delta
        for i, delta in changed.items():
            v = entry.dyn_views[i]
            v.params["offset"] = int(v.params.get("offset", 0)) + delta
            v.view_offs += delta
            moved[id(v)] = delta
        for t in entry.graph.nodes:  # views of moved views move with them
            p = _view_parent(t)
            if id(t) not in moved and p is not None and id(p) in moved:
                t.view_offs += moved[id(p)]
                moved[id(t)] = moved[id(p)]
        self._repatch_kernels(entry, moved)
        entry.backend_state.clear()
        self.stats.patched += 1
        return len(changed)

    def _repatch_kernels(self, entry: CacheEntry, moved: Mapping[int, int]) -> None:
        kernels = getattr(entry.executable, "kernels", None)
        if not kernels:
            return  # an interpreting executable (numpy) reads the patched graph directly
        patch = getattr(entry.executable, "patch_params", None)
        if patch is None:
            raise CacheError(f"graph cache: the {self.backend.name} executable cannot patch kernel parameters; "
                             "dynamic view offsets need Executable.patch_params")
        from ..codegen import emit  # noqa: PLC0415

        for i, k in enumerate(kernels):
            node = k.node
            if node is None or not (id(node) in moved or any(s is not None and id(s) in moved for s in node.src)):
                continue
            fresh = emit(node, k.backend)
            if fresh.source != k.source or fresh.grid != k.grid:
                raise CacheError(f"graph cache: patching the dynamic offset changed the kernel of node "
                                 f"{node.name!r}; the offset must be keyed")
            patch(i, fresh.params)

    # -- running ---------------------------------------------------------------------------------------
    def run(self, entry: CacheEntry, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the entry's input slots and run its executable once.

        Raises :class:`CacheError` naming the first unknown, missing or mismatched input (wrong
        dtype, shape, or not a host numpy array); nothing runs then.
        """
        vals = check_inputs(entry.key.inputs, inputs)
        return self._execute(entry, vals)

    def _execute(self, entry: CacheEntry, vals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``Executable.run``; an executable with ``uses_backend_state`` (CUDA: captured graphs) also
        gets the entry's :attr:`~CacheEntry.backend_state` -- only while the cache keeps entries, so
        a disabled cache never captures state it would throw away."""
        ex = entry.executable
        if self.enabled and getattr(ex, "uses_backend_state", False):
            return ex.run(vals, backend_state=entry.backend_state)
        return ex.run(vals)

    def step(self, params: Hashable, build: Callable[[], Graph],
             inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], CacheEntry]:
        """One step: reuse the entry of ``params`` if known (no build), else build, look up by
        structure (hit or miss), then run with ``inputs``. Updates :attr:`stats` and
        :attr:`last_timing`; returns ``(outputs, entry)``."""
        t0 = time.perf_counter()
        entry = self.can_reuse(params)
        if entry is not None:
            hit, reused = True, True
            timing = self.last_timing = dict.fromkeys(PHASES, 0.0)
            timing.update(hit=True, reused=True, lookup_s=time.perf_counter() - t0)
        else:
            graph = build()
            t1 = time.perf_counter()
            entry, hit = self.get(graph, params, build_s=t1 - t0)
            reused = False
            timing = self.last_timing
        t2 = time.perf_counter()
        vals = check_inputs(entry.key.inputs, inputs)
        timing["lookup_s"] = timing.get("lookup_s", 0.0) + (time.perf_counter() - t2)
        t2 = time.perf_counter()
        out = self._execute(entry, vals)
        timing["run_s"] = time.perf_counter() - t2
        st = self.stats
        st.steps += 1
        if hit:
            entry.hits += 1
            st.hits += 1
            st.reused_without_build += int(reused)
            overhead = timing.get("build_s", 0.0) + timing.get("lookup_s", 0.0)
            st.saved_s += max(0.0, entry.cold_s - overhead)
        else:
            st.misses += 1
        for k in (*PHASES, "lookup_s"):
            st.totals[k] += float(timing.get(k, 0.0))
        return out, entry


__all__ = ["PHASES", "CacheEntry", "CacheError", "CacheStats", "GraphCache", "cache_disabled_by_env"]
