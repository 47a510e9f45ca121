"""The rewrite driver: find matches, resolve overlaps, replace each accepted match with a FUSED
node, repeat to a fixed point, and report."""

from __future__ import annotations

from collections.abc import Sequence

from .._gc import paused
from ..dsl.ast import Capture, Pattern
from ..dsl.checker import check_unique
from ..errors import GraphError
from ..ir.builder import GraphBuilder
from ..ir.graph import Graph
from ..ir.ops import REGISTRY, OpCheckError
from ..ir.tensor import Tensor
from .clone import clone_graph, copy_params, copy_tensor
from .fuse import make_fused_node, make_fused_outputs
from .match import GraphIndex, MatchResult, NoMatch, find_matches
from .report import AppliedMatch, FusionReport, NotFused, PatternStats


def select(found: Sequence[MatchResult], index: GraphIndex) -> tuple[list[MatchResult], list[NoMatch]]:
    """Resolve overlaps greedily: sort by (benefit desc, root's topological index asc, pattern
    name asc) and accept a match when its op nodes are disjoint from those already accepted.
    Returns (accepted in that order, losers with ``kind="overlap"``)."""
    order = sorted(found, key=lambda m: (-m.benefit, index.topo[id(m.root)], m.pattern.name))
    owner: dict[int, MatchResult] = {}
    accepted: list[MatchResult] = []
    lost: list[NoMatch] = []
    for m in order:
        clash = next((owner[id(t)] for t in m.nodes if id(t) in owner), None)
        if clash is None:
            accepted.append(m)
            for t in m.nodes:
                owner[id(t)] = m
            continue
        rank = "higher-benefit" if clash.benefit > m.benefit else "equal-benefit earlier"
        lost.append(NoMatch(m.pattern.name, m.root.name, "overlap",
                            f"overlaps {rank} match {clash.pattern.name} at '{clash.root.name}'",
                            m.pattern.file, m.pattern.line, m.root))
    return accepted, lost


def decomposition(m: MatchResult) -> Graph:
    """The FUSED node's decomposition: placeholders ``fused_input = i`` for ``m.sources`` (same
    dtype/ne/nb and input/weight flags as the outer tensors, named after the pattern variables),
    copies of the matched nodes, outputs = copies of the root then of ``m.outputs`` (multi-output
    fusion), in order."""
    b = GraphBuilder()
    local: dict[int, Tensor] = {}
    for i, (name, s) in enumerate(zip(m.source_names, m.sources, strict=True)):
        ph = b.leaf(name, s.dtype, s.ne, sorted(s.flags - {"output"}))
        ph.nb = tuple(s.nb)
        ph.params = {"fused_input": i}
        local.setdefault(id(s), ph)
    for t in m.nodes:
        local[id(t)] = copy_tensor(b, t, [None if s is None else local[id(s)] for s in t.src], flags=False)
    return b.build([local[id(m.root)]] + [local[id(t)] for t in m.outputs])


def fused_params(m: MatchResult) -> dict:
    """FUSED params: ``{"pattern", "kernel", "fused_op", **captures}``."""
    p = m.pattern
    return {"pattern": p.name, "kernel": p.kernel, "fused_op": p.fused_op, **copy_params(m.captures)}


def op_rewrite_params(m: MatchResult) -> dict:
    """Params of the op a ``rewrite op`` match produces: the pattern's literals, captures resolved."""
    return {k: (copy_params(m.captures[v.name]) if isinstance(v, Capture) else v)
            for k, v in m.pattern.rewrite_params.items()}


def check_op_rewrite(m: MatchResult) -> NoMatch | None:
    """Whether a ``rewrite op`` match may replace its root: the registry's shape/dtype inference must
    accept the new op on the bound sources and give exactly the root's dtype and ``ne`` (a value of its
    own, not a view). Returns a ``where``-kind :class:`NoMatch` (reported as "why not fused?") or None."""
    p = m.pattern
    opdef = REGISTRY[p.fused_op]
    srcs = [m.bindings[v] for v in p.leaves]
    params = {**opdef.params, **op_rewrite_params(m)}
    call = f"rewrite op {p.fused_op}({', '.join(p.leaves)})"
    try:
        lay = opdef.infer(srcs, params)
    except OpCheckError as e:
        why = f"{call} is invalid here: {e}"
    except (KeyError, TypeError, ValueError) as e:
        why = f"{call} has bad params: {e}"
    else:
        if lay.view_of is not None:
            why = f"{call} would alias another tensor's memory"
        elif (lay.dtype, tuple(lay.ne)) != (m.root.dtype, tuple(m.root.ne)):
            why = (f"{call} gives {lay.dtype} ne={list(lay.ne)}, the root '{m.root.name}' is {m.root.dtype} "
                   f"ne={list(m.root.ne)}")
        else:
            return None
    return NoMatch(p.name, m.root.name, "where", why, p.file, p.rewrite_pos.line, m.root)


class FusionCycle(Exception):
    """Fusing ``match`` together with the other accepted matches of the round would create a cycle:
    each match alone passes the matcher's cycle check, but contracting several of them can connect a
    declared output to a source through another FUSED node (its node depends on all its sources)."""

    def __init__(self, match: MatchResult):
        super().__init__(match.root.name)
        self.match = match


def apply_matches(g: Graph, accepted: Sequence[MatchResult]) -> Graph:
    """A new graph where each accepted (pairwise disjoint) match is one FUSED node taking its
    root's name and flags; users of the root and graph outputs refer to the FUSED node.

    Multi-output matches (``outputs(...)``): each declared output becomes a ``FUSED_OUTPUT`` node of
    the FUSED node (:func:`fusec.rewrite.fuse.make_fused_outputs`) with the interior value's name and
    flags, and its users outside the match (and graph outputs) refer to it. Such a user may come
    before the root in ``g``'s order; nodes are therefore built on demand, sources first. The
    matcher's cycle check guarantees an order for each match alone; when several multi-output matches
    together would form a cycle, :class:`FusionCycle` names the innermost multi-output match on it
    (:func:`rewrite` then leaves that match for a later round)."""
    b = GraphBuilder()
    mapping: dict[int, Tensor] = {}
    visiting: set[int] = set()  # nodes (matches: their root) being built: meeting one again is a cycle
    stack: list[MatchResult] = []
    roots = {id(m.root): m for m in accepted}
    extra = {id(t): m for m in accepted for t in m.outputs}
    interior = {id(t) for m in accepted for t in m.interior}

    def emit_match(m: MatchResult) -> None:
        t = m.root
        stack.append(m)
        for s in m.sources:
            ensure(s)
        stack.pop()
        if m.pattern.rewrite_kind == "op":  # a canonicalization: the root becomes a plain registry op
            srcs = [mapping[id(m.bindings[v])] for v in m.pattern.leaves]
            node = b.op(m.pattern.fused_op, srcs, op_rewrite_params(m), name=t.name)
            node.flags |= t.flags
            mapping[id(t)] = node
            return
        fused = make_fused_node(b, decomposition(m), [mapping[id(s)] for s in m.sources], fused_params(m), t.name)
        fused.flags |= t.flags
        mapping[id(t)] = fused
        for o, proj in zip(m.outputs, make_fused_outputs(b, fused, [o.name for o in m.outputs]), strict=True):
            proj.flags |= o.flags
            mapping[id(o)] = proj

    def ensure(t: Tensor) -> None:
        if id(t) in mapping:
            return
        m = roots.get(id(t)) or extra.get(id(t))
        key = id(t) if m is None else id(m.root)
        if key in visiting:
            culprit = next((x for x in reversed(stack) if x.outputs), None)
            if culprit is None:  # pragma: no cover - single-output contractions never create cycles
                raise GraphError("rewriting would create a cycle", node=repr(t.name))
            raise FusionCycle(culprit)
        visiting.add(key)
        if m is not None:
            emit_match(m)
        elif id(t) in interior:  # pragma: no cover - the escape check keeps interior values inside
            raise AssertionError(f"interior node {t.name!r} is used outside its match")
        else:
            for s in t.src:
                if s is not None:
                    ensure(s)
            mapping[id(t)] = copy_tensor(b, t, [None if s is None else mapping[id(s)] for s in t.src])
        visiting.discard(key)

    for t in g.nodes:
        if id(t) in interior and id(t) not in extra:
            continue
        ensure(t)
    return b.build([mapping[id(o)] for o in g.outputs])


def _bytes_saved(m: MatchResult, index: GraphIndex) -> int:
    """Intermediate bytes no longer written and read back: each interior value's ``nbytes`` times
    (1 + its uses); a declared output is still written once, only its reads inside the match go."""
    matched = {id(t) for t in m.nodes}
    out = {id(t) for t in m.outputs}
    saved = 0
    for t in m.interior:
        users = index.users.get(id(t), [])
        if id(t) in out:
            saved += t.nbytes * sum(1 for u in users if id(u) in matched)
        else:
            saved += t.nbytes * (1 + len(users))
    return saved


def rewrite(graph: Graph, patterns: Sequence[Pattern], max_iters: int = 16) -> tuple[Graph, FusionReport]:
    """Fuse every match of ``patterns`` in ``graph`` until no match is left (at most ``max_iters``
    rounds); return the rewritten graph and a :class:`FusionReport`.

    ``graph`` is not mutated: the result is built from fresh tensors (leaves included), with the
    same names, dtypes, ``ne``/``nb`` (ggml order), params, flags and outputs. Each round finds all
    valid matches (:func:`fusec.rewrite.match.find_matches`), accepts them greedily by (benefit
    desc, root topological index asc, pattern name asc) when their op nodes are disjoint, and
    replaces each by a FUSED node (``fusec.rewrite.fuse.make_fused_node``) whose params are
    ``{"pattern", "kernel", "fused_op", **captures}``. The result does not depend on the order of
    ``patterns``. Raises :class:`fusec.errors.PatternError` for duplicate pattern names or a
    where-clause that cannot be evaluated, :class:`fusec.errors.GraphError` if ``graph`` is invalid.
    """
    with paused():  # see fusec._gc: no collector passes over the rewrite's short-lived objects
        return _rewrite(graph, patterns, max_iters)


def _rewrite(graph: Graph, patterns: Sequence[Pattern], max_iters: int) -> tuple[Graph, FusionReport]:
    pats = sorted(patterns, key=lambda p: p.name)
    check_unique(pats)
    report = FusionReport({p.name: PatternStats(p.name, p.file, p.line) for p in pats}, max_iters=max_iters)
    # Round 1 matches on ``graph`` itself (matching never mutates it) and ``apply_matches`` builds
    # fresh tensors, re-running shape inference on every copied node; so ``graph`` is cloned only
    # when nothing fuses (the result must still be a copy). Same result as cloning first.
    g = graph
    fused_keys: set[tuple[str, str]] = set()
    failures: list[NotFused] = []
    converged = False
    for rnd in range(1, max_iters + 1):
        index = GraphIndex.of(g)
        found, failed = find_matches(g, pats, index)
        bad = {id(m): check_op_rewrite(m) for m in found if m.pattern.rewrite_kind == "op"}
        failed += [nm for nm in bad.values() if nm is not None]
        found = [m for m in found if bad.get(id(m)) is None]
        accepted, lost = select(found, index)
        while True:
            try:
                g_next = apply_matches(g, accepted) if accepted else g
                break
            except FusionCycle as e:  # leave that match for a later round (where the matcher sees the cycle)
                m = e.match
                accepted = [a for a in accepted if a is not m]
                lost.append(NoMatch(m.pattern.name, m.root.name, "overlap",
                                    "fused together with the other matches of this round, its declared outputs "
                                    "would feed its own sources (a cycle)", m.pattern.file, m.pattern.line, m.root))
        for f in sorted(failed + lost, key=lambda f: (index.topo[id(f.node)], f.pattern)):
            failures.append(NotFused(f.pattern, f.root, f.kind, f.reason, f.file, f.line, rnd))
        if not accepted:
            converged = True
            break
        for m in accepted:
            st = report.patterns[m.pattern.name]
            saved = _bytes_saved(m, index)
            st.matches += 1
            st.nodes_removed += len(m.nodes) - 1 - len(m.outputs)  # FUSED_OUTPUT nodes are added
            st.bytes_saved += saved
            st.applied.append(AppliedMatch(m.pattern.name, m.root.name, tuple(t.name for t in m.nodes), rnd, saved,
                                           tuple(t.name for t in m.outputs)))
            fused_keys.add((m.pattern.name, m.root.name))
        g = g_next
        report.rounds = rnd
    if g is graph:
        g = clone_graph(graph)
    if not converged:
        report.hit_max_iters = bool(find_matches(g, pats)[0])
    seen: set[tuple[str, str, str]] = set()
    for f in failures:
        key = (f.pattern, f.root, f.reason)
        if (f.pattern, f.root) in fused_keys or key in seen:
            continue
        seen.add(key)
        report.not_fused.append(f)
    return g, report

