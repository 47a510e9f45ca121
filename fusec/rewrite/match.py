"""Structural matching of checked patterns against a graph, the escape check, and where-predicates.

:func:`match_at` answers "does pattern P fuse at node N, and if not, why?" for one candidate root;
:func:`find_matches` runs it over every candidate of a graph (nodes indexed by op). Neither
mutates the graph.

Matching rules (see ``docs/patterns.md``):

* a pattern op node matches a graph node with the same ``op``; literal op params must be equal,
  ``$captures`` bind them (a capture used twice must bind equal values);
* sources are matched in ggml order; for ops the registry marks ``commutative`` the two orders of
  ``src[0]``/``src[1]`` are both tried (original order first);
* a variable used twice must bind the same tensor; two distinct pattern op nodes never bind the
  same graph node; sources the pattern does not write must be absent;
* the *escape check* (always on): an interior node (matched, not the root) must not be a graph
  output nor used by any node outside the match, no leaf/wildcard may bind a matched node, and only
  the root may write into another tensor's memory (SET_ROWS, CPY), and only into the memory of a
  tensor a leaf variable binds (the FUSED node then writes into that source in place, see
  ``fusec.rewrite.fuse.fused_alias_input``). Interior values the pattern
  declares with ``outputs(...)`` (multi-output fusion) are exempt from the first rule: they may be
  graph outputs and have users outside the match (or none); then no source of the match may depend
  on such a value through nodes outside the match (the fused node would need its own output);
* the ``where`` clauses run in order; the first false one is the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._gc import paused
from ..dsl.ast import Absent, Call, Capture, LeafVar, Num, Pattern, PNode, Str, VarRef, Wildcard
from ..dsl.predicates import EvalContext, EvalError, evaluate, show
from ..errors import PatternError
from ..ir.graph import Graph
from ..ir.ops import REGISTRY, VIEW_OPS
from ..ir.tensor import Tensor


@dataclass
class MatchResult:
    """A match that passed the structure, escape and where checks.

    Attributes:
        pattern: the matched pattern.
        root: the graph node the fused node will replace.
        nodes: matched graph op nodes, in ``pattern.nodes`` order (sources before users, root last).
        bindings: every pattern variable (leaf and interior) -> bound tensor.
        captures: capture name (no ``$``) -> op-param value.
        sources: the FUSED node's sources: the rewrite arguments in order, then the tensors matched
            by ``_`` wildcards that are present (pattern order).
        source_names: placeholder names for ``sources`` (variable names; ``_<i>`` for wildcards).
        outputs: the tensors bound to the pattern's ``outputs(...)`` variables, in order (the fused
            node's outputs ``1..``; empty for a single-output pattern).
    """

    pattern: Pattern
    root: Tensor
    nodes: list[Tensor]
    bindings: dict[str, Tensor]
    captures: dict[str, Any]
    sources: list[Tensor]
    source_names: list[str]
    outputs: list[Tensor] = field(default_factory=list)

    @property
    def benefit(self) -> int | float:
        return self.pattern.benefit

    @property
    def interior(self) -> list[Tensor]:
        return self.nodes[:-1]

    def __bool__(self) -> bool:
        return True


@dataclass
class NoMatch:
    """Why ``pattern`` does not fuse at ``root``.

    Attributes:
        pattern: pattern name.
        root: name of the candidate root node.
        kind: ``"structure"`` (the shape of the subgraph differs), ``"escape"`` (an interior value is
            needed outside the match), ``"where"`` (a where-clause is false) or ``"overlap"`` (lost
            to another match; set by the rewriter).
        reason: one line, e.g. ``where dtype(x) in [f32, f16] failed (x is i32)``.
        file, line: the pattern line responsible (the where-clause, the interior's assignment, or
            the ``pattern`` line).
    """

    pattern: str
    root: str
    kind: str
    reason: str
    file: str
    line: int
    node: Tensor | None = field(default=None, repr=False, compare=False)  # the candidate root itself

    def __bool__(self) -> bool:
        return False

    @property
    def message(self) -> str:
        return f"{self.reason} at {self.file}:{self.line}"

    def __str__(self) -> str:
        return self.message


@dataclass
class GraphIndex:
    """Per-graph facts the matcher needs, computed once per round.

    Attributes:
        users: ``id(tensor)`` -> nodes using it (once per source slot), as ``Graph.users``.
        outputs: ``id`` of every graph output.
        topo: ``id(tensor)`` -> position in ``graph.nodes``.
        by_op: op name -> nodes (topological order), as ``Graph.by_op``.
    """

    users: dict[int, list[Tensor]]
    outputs: set[int]
    topo: dict[int, int]
    by_op: dict[str, list[Tensor]]
    _ctx: EvalContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, graph: Graph) -> GraphIndex:
        outs = {id(t) for t in graph.outputs} | {id(t) for t in graph.nodes if "output" in t.flags}
        return cls(graph.users(), outs, {id(t): i for i, t in enumerate(graph.nodes)}, graph.by_op())

    def context(self) -> EvalContext:
        """The where-clause context (use counts, outputs), computed once per index."""
        if self._ctx is None:
            self._ctx = EvalContext({k: len(v) for k, v in self.users.items()}, self.outputs)
        return self._ctx


# ---------------------------------------------------------------------------------------------
# structure


@dataclass(slots=True)
class _State:
    """The partial assignment of one structural match. It is shared and mutated in place: each
    generator below undoes its own additions before it tries its next alternative or finishes, so
    a yielded state is valid until the consumer resumes the generator (a consumer that stops early
    must not reuse it)."""

    nodes: dict[int, Tensor] = field(default_factory=dict)  # id(PNode) -> tensor
    claimed: set[int] = field(default_factory=set)  # id(tensor) of matched op nodes
    leaves: dict[str, Tensor] = field(default_factory=dict)
    captures: dict[str, Any] = field(default_factory=dict)
    wild: list[tuple[Wildcard, Tensor | None]] = field(default_factory=list)

    def copy(self) -> _State:
        return _State(self.nodes.copy(), self.claimed.copy(), self.leaves.copy(), self.captures.copy(),
                      self.wild.copy())


_MISSING = object()


def _param_eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _match_node(pn: PNode, t: Tensor | None, st: _State) -> Iterator[_State]:
    k = id(pn)
    if k in st.nodes:  # a variable used twice: same tensor
        if st.nodes[k] is t:
            yield st
        return
    if t is None or t.op != pn.op or id(t) in st.claimed:
        return
    n = len(pn.args)
    src = t.src
    if len(src) > n and any(s is not None for s in src[n:]):  # sources the pattern does not write: absent
        return
    caps = st.captures
    undo: list[tuple[str, Any]] = []
    for key, want in pn.params.items():
        have = t.params.get(key)
        if isinstance(want, Capture):
            old = caps.get(want.name, _MISSING)
            if old is not _MISSING and not _param_eq(old, have):
                _undo_captures(caps, undo)
                return
            undo.append((want.name, old))
            caps[want.name] = have
        elif not _param_eq(want, have):
            _undo_captures(caps, undo)
            return
    st.nodes[k] = t
    st.claimed.add(id(t))
    srcs = list(src[:n])
    if len(srcs) < n:
        srcs += [None] * (n - len(srcs))
    args = pn.args
    yield from _match_args([(args[i], srcs[i]) for i in range(n)], st)
    if n >= 2 and REGISTRY[pn.op].commutative:
        yield from _match_args([(args[0], srcs[1]), (args[1], srcs[0]), *((args[i], srcs[i]) for i in range(2, n))],
                               st)
    del st.nodes[k]
    st.claimed.discard(id(t))
    _undo_captures(caps, undo)


def _undo_captures(caps: dict[str, Any], undo: list[tuple[str, Any]]) -> None:
    for name, old in reversed(undo):
        if old is _MISSING:
            del caps[name]
        else:
            caps[name] = old


def _shape_check(pn: PNode) -> Callable[[Tensor | None], bool]:
    """A fast necessary condition for ``_match_node(pn, t, ...)`` to yield anything: ops, absent
    trailing sources, literal params and argument kinds along the pattern tree (commutative orders
    included), ignoring what a match state adds (variables bound twice, claimed nodes, captures).
    :func:`find_matches` uses it to skip candidates without a structural match cheaply."""
    op, n = pn.op, len(pn.args)
    lits = [(k, v) for k, v in pn.params.items() if not isinstance(v, Capture)]
    subs = [_arg_check(a) for a in pn.args]
    swap = REGISTRY[op].commutative and n >= 2

    def check(t: Tensor | None) -> bool:
        if t is None or t.op != op:
            return False
        src = t.src
        if len(src) > n and any(s is not None for s in src[n:]):
            return False
        for k, v in lits:
            if not _param_eq(v, t.params.get(k)):
                return False
        if len(src) < n:
            src = (*src, *([None] * (n - len(src))))
        if all(f(s) for f, s in zip(subs, src, strict=False)):
            return True
        return (swap and subs[0](src[1]) and subs[1](src[0])
                and all(f(s) for f, s in zip(subs[2:], src[2:], strict=False)))

    return check


def _present(t: Tensor | None) -> bool:
    return t is not None


def _absent(t: Tensor | None) -> bool:
    return t is None


def _anything(t: Tensor | None) -> bool:
    return True


def _arg_check(arg: Any) -> Callable[[Tensor | None], bool]:
    if isinstance(arg, PNode):
        return _shape_check(arg)
    if isinstance(arg, LeafVar):
        return _present
    if isinstance(arg, Absent):
        return _absent
    return _anything  # Wildcard


def _match_args(pairs: Sequence[tuple[Any, Tensor | None]], st: _State) -> Iterator[_State]:
    if not pairs:
        yield st
        return
    (arg, t), rest = pairs[0], pairs[1:]
    for st2 in _match_arg(arg, t, st):
        yield from _match_args(rest, st2)


def _match_arg(arg: Any, t: Tensor | None, st: _State) -> Iterator[_State]:
    if isinstance(arg, PNode):
        yield from _match_node(arg, t, st)
    elif isinstance(arg, LeafVar):
        if t is None:
            return
        leaves = st.leaves
        if arg.name in leaves:
            if leaves[arg.name] is t:
                yield st
            return
        leaves[arg.name] = t
        yield st
        del leaves[arg.name]
    elif isinstance(arg, Wildcard):
        st.wild.append((arg, t))
        yield st
        st.wild.pop()
    elif isinstance(arg, Absent):
        if t is None:
            yield st


# ---------------------------------------------------------------------------------------------
# checks


def _label(pn: PNode, t: Tensor) -> str:
    return f"'{pn.var}' ('{t.name}')" if pn.var else f"{pn.op} '{t.name}'"


def _escape(p: Pattern, st: _State, idx: GraphIndex) -> tuple[str, int] | None:
    matched = {id(st.nodes[id(pn)]) for pn in p.nodes}
    bound_roots = {id(t.root) for t in st.leaves.values()}
    for pn in p.nodes:
        t = st.nodes[id(pn)]
        if t.view_src is not None and t.op not in VIEW_OPS:
            if pn is p.root and id(t.view_src) in bound_roots:
                readers = {id(s) for s in st.leaves.values() if s.root is t.view_src}
                if len(readers) > 1:  # one kernel would read the memory it overwrites (no ordering)
                    return (f"root {_label(pn, t)} ({t.op}) writes into '{t.view_src.name}', which the match also "
                            "reads through another source", pn.pos.line)
                continue  # the FUSED node writes into that source's memory, as the root does (fuse.py)
            where = "an interior node" if pn is not p.root else "memory no leaf variable binds"
            return (f"matched node {_label(pn, t)} ({t.op}) writes into '{t.view_src.name}' ({where}); only "
                    "the root may write in place, into a fused input's memory", pn.pos.line)
    declared = set(p.outputs)
    for pn in p.nodes[:-1]:
        t = st.nodes[id(pn)]
        if pn.var is not None and pn.var in declared:
            continue  # a declared output: may be a graph output and have users outside the match
        if id(t) in idx.outputs:
            return f"interior {_label(pn, t)} is a graph output", pn.pos.line
        outside = [u for u in idx.users.get(id(t), []) if id(u) not in matched]
        if outside:
            names = ", ".join(f"'{u.name}'" for u in outside)
            return f"interior {_label(pn, t)} escapes: used by {names} outside the match", pn.pos.line
    for name, t in st.leaves.items():
        if id(t) in matched:
            leaf = p.vars[name]
            return f"leaf variable '{name}' is bound to matched node '{t.name}'", leaf.pos.line
    for w, t in st.wild:
        if t is not None and id(t) in matched:
            return f"wildcard '_' is bound to matched node '{t.name}'", w.pos.line
    if declared:
        return _cycle(p, st, idx, matched)
    return None


def _cycle(p: Pattern, st: _State, idx: GraphIndex, matched: set[int]) -> tuple[str, int] | None:
    """A declared output whose outside users lead (through nodes outside the match) to a source of
    the match: fusing would make the FUSED node depend on its own output. Only nodes before the root
    (topological order) can reach a source, so the search stops there."""
    srcs = {id(t) for t in st.leaves.values()} | {id(t) for _, t in st.wild if t is not None}
    limit = idx.topo[id(st.nodes[id(p.root)])]
    by_var = {pn.var: pn for pn in p.nodes if pn.var is not None}
    for name in p.outputs:
        pn = by_var[name]
        t = st.nodes[id(pn)]
        stack = [u for u in idx.users.get(id(t), []) if id(u) not in matched]
        seen: set[int] = set()
        while stack:
            u = stack.pop()
            if id(u) in seen or idx.topo.get(id(u), limit) >= limit:
                continue
            seen.add(id(u))
            if id(u) in srcs:
                return (f"output {_label(pn, t)} reaches source '{u.name}' of the match through nodes outside "
                        "it: the fused node would depend on its own output", pn.pos.line)
            stack.extend(w for w in idx.users.get(id(u), []) if id(w) not in matched)
    return None


def _render(e: Any) -> str:
    if isinstance(e, VarRef):
        return e.name
    if isinstance(e, (Num, Str)):
        return str(e.value)
    if isinstance(e, Call):
        return f"{e.fn}({', '.join(_render(a) for a in e.args)})"
    return "…"


def _explain(trace: list[tuple[Any, Any]]) -> str:
    parts: list[str] = []
    for call, val in trace:
        if call.fn == "dtype" and isinstance(call.args[0], VarRef):
            s = f"{call.args[0].name} is {show(val)}"
        else:
            s = f"{_render(call)} = {show(val)}"
        if s not in parts:
            parts.append(s)
    return ", ".join(parts)


def _where(p: Pattern, st: _State, bindings: dict[str, Tensor], root: Tensor,
           ctx: EvalContext) -> tuple[str, int] | None:
    for w in p.where:
        trace: list[tuple[Any, Any]] = []
        try:
            ok = evaluate(w.expr, bindings, st.captures, ctx, trace)
        except EvalError as e:
            pos = e.expr.pos
            raise PatternError(f"in where-clause '{w.text}' (pattern {p.name}, candidate '{root.name}'): {e}",
                               pos.file, pos.line, pos.column) from None
        if isinstance(ok, Tensor) or not ok:
            why = _explain(trace)
            return f"where {w.text} failed" + (f" ({why})" if why else ""), w.line
    return None


def match_at(pattern: Pattern, graph: Graph, node: Tensor, index: GraphIndex | None = None) -> MatchResult | NoMatch:
    """Try ``pattern`` with its root at ``node`` (a node of ``graph``).

    Runs the structural match (commutative operand orders included), the escape check and the
    where-clauses, and returns the first assignment of the pattern's variables that passes all
    three as a :class:`MatchResult`; otherwise a :class:`NoMatch` (falsy) giving the reason of
    the first structural match tried (or ``kind="structure"`` when none exists). ``index`` may
    be passed to reuse per-graph facts across calls. Raises :class:`PatternError` when a
    where-clause cannot be evaluated (e.g. arithmetic on a dtype).
    """
    idx = index if index is not None else GraphIndex.of(graph)
    ctx = idx.context()
    first: NoMatch | None = None
    for st in _match_node(pattern.root, node, _State()):
        bindings = dict(st.leaves)
        for pn in pattern.nodes:
            if pn.var is not None:
                bindings[pn.var] = st.nodes[id(pn)]
        fail = _escape(pattern, st, idx)
        kind = "escape"
        if fail is None:
            fail = _where(pattern, st, bindings, node, ctx)
            kind = "where"
        if fail is None:
            sources = [st.leaves[v] for v in pattern.leaves]
            names = list(pattern.leaves)
            for i, (_w, t) in enumerate(st.wild):
                if t is not None:
                    sources.append(t)
                    names.append(f"_{i}")
            return MatchResult(pattern, node, [st.nodes[id(pn)] for pn in pattern.nodes], bindings,
                               dict(st.captures), sources, names, [bindings[v] for v in pattern.outputs])
        if first is None:
            first = NoMatch(pattern.name, node.name, kind, fail[0], pattern.file, fail[1], node)
    if first is not None:
        return first
    return NoMatch(pattern.name, node.name, "structure", f"the subgraph at '{node.name}' does not have the shape of "
                   f"{'->'.join(pattern.ops)}", pattern.file, pattern.line, node)


def find_matches(graph: Graph, patterns: Sequence[Pattern],
                 index: GraphIndex | None = None) -> tuple[list[MatchResult], list[NoMatch]]:
    """Every valid match of every pattern in ``graph``, and every structural match that failed.

    Candidates are the nodes whose op is the pattern's root op (``Graph.by_op``). Patterns are
    visited by name and candidates in topological order, so both lists are deterministic and
    independent of the order of ``patterns``. Structural non-matches are not listed.
    """
    with paused():  # see fusec._gc
        return _find_matches(graph, patterns, index)


def _find_matches(graph: Graph, patterns: Sequence[Pattern],
                  index: GraphIndex | None) -> tuple[list[MatchResult], list[NoMatch]]:
    idx = index if index is not None else GraphIndex.of(graph)
    found: list[MatchResult] = []
    failed: list[NoMatch] = []
    for p in sorted(patterns, key=lambda p: p.name):
        shape_ok = _shape_check(p.root)
        for node in idx.by_op.get(p.root_op, []):
            if not shape_ok(node):  # no structural match: match_at would return kind "structure"
                continue
            r = match_at(p, graph, node, idx)
            if isinstance(r, MatchResult):
                found.append(r)
            elif r.kind != "structure":
                failed.append(r)
    return found, failed
