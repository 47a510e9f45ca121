"""Hypothesis strategies derived from a pattern's declaration (no per-pattern code).

:func:`positive_cases` realizes the match statements in order with ``GraphBuilder.op``: the main
leaf (first leaf argument of the first op) gets a random ``ne``; every other leaf is given the
first shape, among candidates derived from the value it is combined with (same shape,
ggml-broadcastable masks, one row, a scalar, ...), that the op registry accepts; a leaf operand of
a commutative op may also be the larger operand (the matched value broadcasting into it, built as
``src[0]``), and commutative operands are swapped at random; dtypes follow the
pattern's ``dtype(..)`` clauses; captured op params come from :data:`PARAM_VALUES`. Only graphs on
which the pattern matches (structure, escape check, where clauses) are kept.

:func:`near_miss_cases` mutates a positive case so that exactly one precondition breaks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from ..dsl.ast import Capture, LeafVar, Pattern, PNode, Wildcard
from ..errors import GraphError
from ..ir.dtypes import DType
from ..ir.ops import REGISTRY
from ..rewrite.match import MatchResult, match_at
from .analysis import ALL_DTYPES, FLOATS, PatternFacts
from .case import (
    BROADCAST_SWAP,
    DTYPE,
    EXTRA_USER,
    INTERIOR_OUTPUT,
    Case,
    LeafSpec,
    node_name,
    realize,
    wildcard_name,
)

ROW_LENGTHS = (1, 2, 3, 511, 1024, 1025, 4096, 8192, 16896)
"""Row lengths (``ne[0]``) drawn with priority: tiny, around workgroup sizes, model widths."""

MAX_ELEMENTS = 1 << 18
"""Upper bound on the main leaf's element count (keeps CPU reference runs fast)."""

PARAM_VALUES: dict[str, tuple[Any, ...]] = {
    "eps": (1e-6, 0.0, 1e-5, 1e-4, 0.1, 1.0),
    "s": (1.0, 0.5, 2.0, -1.0, 0.125),
    "b": (0.0, 0.5, -1.0),
    "scale": (1.0, 0.125, 0.5, 2.0),
    "max_bias": (0.0,),
    "mode": (0, 2),
    "freq_base": (10000.0, 500000.0, 1e6),
    "freq_scale": (1.0, 0.5, 0.25),
    "ext_factor": (0.0,),
    "attn_factor": (1.0,),
}
"""Meaningful values for captured op params, by param name (first value = shrink target); params
not listed fall back to the registry default ``REGISTRY[op].params``."""


def _leaf_args(pn: PNode) -> list[tuple[int, str]]:
    out = []
    for pos, a in enumerate(pn.args):
        if isinstance(a, LeafVar):
            out.append((pos, a.name))
        elif isinstance(a, Wildcard):
            out.append((pos, wildcard_name(pn, pos)))
    return out


def main_leaf(p: Pattern) -> str | None:
    """The first leaf argument of the first op (its shape is drawn; the others derive from it)."""
    for pn in p.nodes:
        la = _leaf_args(pn)
        if la:
            return la[0][1]
    return None


@st.composite
def ne_strategy(draw) -> tuple[int, int, int, int]:
    """A main-leaf ``ne``: row length from :data:`ROW_LENGTHS` or 1..17000, 1..4 dims, at most
    :data:`MAX_ELEMENTS` elements."""
    row = draw(st.one_of(st.sampled_from(ROW_LENGTHS), st.integers(1, 17000)))
    ndim = draw(st.integers(1, 4))
    ne = [row]
    budget = MAX_ELEMENTS // row
    for _ in range(ndim - 1):
        d = draw(st.integers(1, max(1, min(budget, 64))))
        ne.append(d)
        budget = max(1, budget // d)
    return tuple(ne + [1] * (4 - len(ne)))  # type: ignore[return-value]


def _dtype_choices(facts: PatternFacts, leaf: str) -> list[DType]:
    allowed = set(ALL_DTYPES)
    for member in facts.group_of(leaf):
        allowed &= facts.allowed.get(member, set(ALL_DTYPES))
    floats = [d for d in FLOATS if d in allowed]
    return floats or [d for d in ALL_DTYPES if d in allowed] or list(FLOATS)


def _shape_candidates(draw, ref: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Shapes that broadcast INTO ``ref`` (``can_repeat(shape, ref)``), in a drawn order: the same
    shape, a mask of full/1 dims, one row, a scalar; and a matmul-like shape sharing ``ne[0]``."""
    mask = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    k = draw(st.integers(1, 8))
    cands = [tuple(ref), tuple(v if m else 1 for v, m in zip(ref, mask, strict=True)), (ref[0], 1, 1, 1),
             (1, 1, 1, 1), (ref[0], k, ref[2], ref[3])]
    return _dedup(draw(st.permutations(cands)))


def _outer_candidates(draw, ref: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Shapes strictly LARGER than ``ref`` that ``ref`` broadcasts into (``can_repeat(ref, shape)``),
    in a drawn order: a dim of size 1 expanded (``x`` row ``[n,1,1,1]`` -> ``w`` ``[n,k,1,1]``) and one
    dim doubled (ggml's tiling broadcast). At most ``4 * MAX_ELEMENTS`` elements."""
    k = draw(st.integers(2, 4))
    d = draw(st.integers(0, 3))
    ones = [i for i in range(1, 4) if ref[i] == 1]
    cands = [tuple(v * 2 if i == d else v for i, v in enumerate(ref))]
    if ones:
        e = ones[draw(st.integers(0, len(ones) - 1))]
        cands.insert(0, tuple(k if i == e else v for i, v in enumerate(ref)))
    fit = [c for c in cands if c[0] * c[1] * c[2] * c[3] <= 4 * MAX_ELEMENTS]
    return _dedup(draw(st.permutations(fit)))


def _dedup(cands) -> list[tuple[int, int, int, int]]:
    out: list[tuple[int, int, int, int]] = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def _int_candidates(draw, ref: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    k = draw(st.integers(1, 8))
    return [(ref[2], 1, 1, 1), (k, ref[2], ref[3], 1), (ref[1], 1, 1, 1)]


def _draw_params(draw, pn: PNode, captured: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    defaults = REGISTRY[pn.op].params
    for key, want in pn.params.items():
        if isinstance(want, Capture):
            if want.name not in captured:
                table = PARAM_VALUES.get(key) or (defaults.get(key),)
                captured[want.name] = draw(st.sampled_from(table))
            out[key] = captured[want.name]
        else:
            out[key] = want
    return out


def _builds(p: Pattern, case: Case, upto: int) -> bool:
    try:
        realize(p, case, upto)
        return True
    except GraphError:
        return False


@st.composite
def positive_cases(draw, p: Pattern, facts: PatternFacts) -> Case:
    """Cases whose graph the pattern matches at the root (others are rejected with ``assume``)."""
    main = main_leaf(p)
    group_dtype: dict[frozenset[str], DType] = {}
    captured: dict[str, Any] = {}
    case = Case(p.name, {}, {})
    swaps: set[int] = set()
    for pn in p.nodes:
        case.params[pn.index] = _draw_params(draw, pn, captured)
        commutative = REGISTRY[pn.op].commutative and len(pn.args) >= 2
        swap = commutative and draw(st.booleans())
        new = [(pos, n) for pos, n in _leaf_args(pn) if n not in case.leaves]
        for pos, name in new:
            arg = pn.args[pos]
            if isinstance(arg, Wildcard) and pos >= REGISTRY[pn.op].arity[0] and draw(st.booleans()):
                case.absent = case.absent | {name}
                continue
            if isinstance(arg, Wildcard):
                choices = list(FLOATS)
            else:
                key = frozenset(facts.group_of(name))
                if key not in group_dtype:
                    group_dtype[key] = draw(st.sampled_from(_dtype_choices(facts, name)))
                choices = [group_dtype[key]]
            dt = draw(st.sampled_from(choices))
            if name == main:
                case.leaves[name] = LeafSpec(dt, draw(ne_strategy()))
                continue
            built = realize(p, case, pn.index - 1) if pn.index > 0 else None
            ref = _reference_ne(p, pn, case, built, main)
            into = _shape_candidates(draw, ref)
            # a leaf operand of a commutative op may also be the LARGER operand, the matched value
            # broadcasting into it (then it is src[0]: ggml only broadcasts src[1]); about 1 in 3
            larger = commutative and pos < 2 and draw(st.integers(0, 2)) == 2
            outer = _outer_candidates(draw, ref) if commutative and pos < 2 else []
            cands = [(dt, ne) for ne in (outer + into if larger else into + outer)]
            if not (isinstance(arg, LeafVar) and name in facts.allowed and DType.I32 not in facts.allowed[name]):
                cands += [(DType.I32, ne) for ne in _int_candidates(draw, ref)]
            pending = [n for _, n in new if n not in case.leaves and n != name and n not in case.absent]
            orders = [swap, not swap] if commutative else [False]
            # the first (shape, operand order) the registry accepts; a larger leaf keeps its shape and
            # takes whichever order builds (it must be src[0]), the others keep the drawn order if any
            # candidate builds in it
            trials = ([(c, s) for c in cands for s in orders] if larger else
                      [(c, s) for s in orders for c in cands])
            chosen = None
            for (cdt, ne), attempt_swap in trials:
                trial = replace(case, leaves={**case.leaves, name: LeafSpec(cdt, ne),
                                              **{n: LeafSpec(dt, ref) for n in pending}},
                                swaps=frozenset(swaps | ({pn.index} if attempt_swap else set())))
                if _builds(p, trial, pn.index):
                    chosen = (LeafSpec(cdt, ne), attempt_swap)
                    break
            assume(chosen is not None)
            assert chosen is not None
            case.leaves[name] = chosen[0]
            swap = chosen[1]
        if swap and not _builds(p, replace(case, swaps=frozenset(swaps | {pn.index})), pn.index):
            swap = False
        if swap:
            swaps.add(pn.index)
        case.swaps = frozenset(swaps)
        assume(_builds(p, case, pn.index))
    case.value_seed = draw(st.integers(0, 2**32 - 1))
    # multi-output patterns: the declared outputs get users outside the match (the point of
    # declaring them), are graph outputs, both, or neither (then the extra output is simply unused)
    case.out_uses = {v: draw(st.sampled_from(OUT_USES)) for v in p.outputs}
    r = realize(p, case)
    assume(isinstance(match_at(p, r.graph, r.root), MatchResult))
    return case


def _reference_ne(p: Pattern, pn: PNode, case: Case, built, main: str | None) -> tuple[int, ...]:
    """The shape a new leaf of ``pn`` derives from: the first operand of ``pn`` already built."""
    for pos, a in enumerate(pn.args):
        if isinstance(a, PNode) and built is not None:
            return built.tensors[node_name(p, a)].ne
        name = a.name if isinstance(a, LeafVar) else (wildcard_name(pn, pos) if isinstance(a, Wildcard) else None)
        if name is not None and name in case.leaves:
            return case.leaves[name].ne
    if main is not None and main in case.leaves:
        return case.leaves[main].ne
    return (1, 1, 1, 1)


OUT_USES = ("user", "both", "output", "none")
"""How a positive case uses a declared output outside the match (first = shrink target)."""


def _escapable(p: Pattern) -> list[str]:
    """Interior values that must stay inside the match: not the root, not declared in ``outputs(...)``."""
    return [node_name(p, pn) for pn in p.nodes[:-1] if pn.var is None or pn.var not in p.outputs]


def near_miss_kinds(p: Pattern, facts: PatternFacts) -> list[str]:
    """The near-miss kinds derivable from ``p``: ``extra_user`` and ``interior_output`` when it has
    an interior value that is not a declared output, ``dtype`` / ``broadcast_swap`` when its where
    clauses restrict them."""
    kinds = [EXTRA_USER, INTERIOR_OUTPUT] if _escapable(p) else []
    if facts.dtype_violations:
        kinds.append(DTYPE)
    if facts.swaps:
        kinds.append(BROADCAST_SWAP)
    return kinds


@st.composite
def near_miss_cases(draw, p: Pattern, facts: PatternFacts, kind: str | None = None) -> Case:
    """A positive case mutated to break exactly one precondition: of kind ``kind``, or of any kind
    of :func:`near_miss_kinds` when ``None``. The pattern must not fire at its root."""
    base = draw(positive_cases(p, facts))
    if kind is None:
        kind = draw(st.sampled_from(near_miss_kinds(p, facts)))
    if kind in (EXTRA_USER, INTERIOR_OUTPUT):
        return replace(base, variant=kind, target=draw(st.sampled_from(_escapable(p))))
    if kind == DTYPE:
        for v in draw(st.permutations(facts.dtype_violations)):
            spec = base.leaves.get(v.leaf)
            if spec is None or spec.dtype == v.dtype:
                continue
            case = replace(base, leaves={**base.leaves, v.leaf: LeafSpec(v.dtype, spec.ne)}, variant=DTYPE,
                           target=f"{v.leaf} made {v.dtype}: breaks '{v.clause}'")
            if _builds(p, case, len(p.nodes) - 1):
                return case
        assume(False)
    sw = draw(st.sampled_from(facts.swaps))
    built = realize(p, base)
    other = built.tensors.get(sw.other)
    assume(other is not None and sw.leaf in base.leaves)
    assert other is not None
    pn = p.nodes[sw.node]
    pos = next(i for i, a in enumerate(pn.args[:2]) if isinstance(a, LeafVar) and a.name == sw.leaf)
    swaps = (base.swaps - {sw.node}) | ({sw.node} if pos == 1 else set())
    for d in draw(st.permutations(range(4))):
        ne = tuple(v * 2 if i == d else v for i, v in enumerate(other.ne))
        case = replace(base, leaves={**base.leaves, sw.leaf: LeafSpec(base.leaves[sw.leaf].dtype, ne)},
                       swaps=frozenset(swaps), variant=BROADCAST_SWAP,
                       target=f"{sw.leaf} bigger than {sw.other}: breaks '{sw.clause}'")
        if _builds(p, case, len(p.nodes) - 1):
            return case
    assume(False)
    raise AssertionError("unreachable")  # pragma: no cover
