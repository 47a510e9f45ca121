"""Read a pattern's ``where`` clauses for the facts the generators need.

Only top-level clauses (and ``and``-conjunctions of them) are read; anything else is left to the
matcher, which filters the generated graphs. Facts:

* ``dtype(v) in [..]`` / ``dtype(v) == f16`` -> the dtypes ``v`` may have (positives draw from them)
  and the dtypes it may not (near misses of kind ``dtype``);
* ``dtype(a) == dtype(b)`` -> ``a`` and ``b`` share a dtype (a near miss gives them different ones);
* ``can_repeat(a, b)`` with ``a`` a leaf operand of a commutative op -> a near miss of kind
  ``broadcast_swap`` (``a`` made bigger than ``b`` and swapped into ``src[0]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..dsl.ast import Binary, Call, DTypeLit, Expr, LeafVar, ListExpr, Pattern, PNode, VarRef
from ..ir.dtypes import DType
from ..ir.ops import REGISTRY

ALL_DTYPES = (DType.F32, DType.F16, DType.I32)
FLOATS = (DType.F32, DType.F16)


@dataclass(frozen=True)
class DtypeViolation:
    """Give leaf ``leaf`` dtype ``dtype`` to falsify the clause ``clause`` (its source text)."""

    leaf: str
    dtype: DType
    clause: str


@dataclass(frozen=True)
class BroadcastSwap:
    """Make leaf ``leaf`` bigger than ``other`` (so ``can_repeat(leaf, other)`` fails) and put it in
    ``src[0]`` of the commutative pattern node ``node`` (index in ``Pattern.nodes``)."""

    leaf: str
    other: str
    node: int
    clause: str


@dataclass
class PatternFacts:
    """What :func:`analyze` found. ``allowed``: leaf -> dtypes it may have; ``same``: groups of leaves
    with equal dtypes; ``dtype_violations`` and ``swaps``: near misses derivable from the clauses."""

    allowed: dict[str, set[DType]] = field(default_factory=dict)
    same: list[set[str]] = field(default_factory=list)
    dtype_violations: list[DtypeViolation] = field(default_factory=list)
    swaps: list[BroadcastSwap] = field(default_factory=list)

    def group_of(self, leaf: str) -> set[str]:
        for g in self.same:
            if leaf in g:
                return g
        return {leaf}


def _conjuncts(e: Expr) -> list[Expr]:
    if isinstance(e, Binary) and e.op == "and":
        return _conjuncts(e.left) + _conjuncts(e.right)
    return [e]


def _dtype_of(e: Expr) -> str | None:
    """``v`` when ``e`` is ``dtype(v)``."""
    if isinstance(e, Call) and e.fn == "dtype" and len(e.args) == 1 and isinstance(e.args[0], VarRef):
        return e.args[0].name
    return None


def _lits(e: Expr) -> set[DType] | None:
    if isinstance(e, DTypeLit):
        return {e.value}
    if isinstance(e, ListExpr) and all(isinstance(i, DTypeLit) for i in e.items):
        return {i.value for i in e.items}  # type: ignore[union-attr]
    return None


def analyze(p: Pattern) -> PatternFacts:
    """Collect :class:`PatternFacts` from ``p``'s where clauses (leaf variables only)."""
    facts = PatternFacts()
    leaves = set(p.leaf_vars)
    for w in p.where:
        for e in _conjuncts(w.expr):
            if not isinstance(e, Binary):
                if isinstance(e, Call) and e.fn == "can_repeat":
                    _swap_fact(p, e, w.text, facts)
                continue
            left, right = _dtype_of(e.left), _dtype_of(e.right)
            if e.op in ("in", "==", "!=", "not in") and left in leaves and right is None:
                lits = _lits(e.right)
                if lits is None:
                    continue
                ok = lits if e.op in ("in", "==") else set(ALL_DTYPES) - lits
                facts.allowed[left] = facts.allowed.get(left, set(ALL_DTYPES)) & ok
                for d in ALL_DTYPES:
                    if d not in ok:
                        facts.dtype_violations.append(DtypeViolation(left, d, w.text))
            elif e.op == "==" and left in leaves and right in leaves and left != right:
                _union(facts.same, left, right)
                # change the operand that is not the first leaf (the pattern's main input)
                tgt = left if p.leaf_vars.index(left) > p.leaf_vars.index(right) else right
                for d in FLOATS:
                    facts.dtype_violations.append(DtypeViolation(tgt, d, w.text))
    return facts


def _union(groups: list[set[str]], a: str, b: str) -> None:
    ga = next((g for g in groups if a in g), None)
    gb = next((g for g in groups if b in g), None)
    if ga is None and gb is None:
        groups.append({a, b})
    elif ga is None:
        gb.add(a)  # type: ignore[union-attr]
    elif gb is None:
        ga.add(b)
    elif ga is not gb:
        ga |= gb
        groups.remove(gb)


def _swap_fact(p: Pattern, e: Call, text: str, facts: PatternFacts) -> None:
    if len(e.args) != 2 or not all(isinstance(a, VarRef) for a in e.args):
        return
    a, b = e.args[0].name, e.args[1].name  # type: ignore[union-attr]
    if not isinstance(p.vars.get(a), LeafVar):
        return
    for pn in p.nodes:
        if not REGISTRY[pn.op].commutative or len(pn.args) < 2:
            continue
        names = [_arg_name(x) for x in pn.args[:2]]
        if a in names:
            facts.swaps.append(BroadcastSwap(a, b, pn.index, text))


def _arg_name(x: object) -> str | None:
    if isinstance(x, LeafVar):
        return x.name
    if isinstance(x, PNode):
        return x.var
    return None
