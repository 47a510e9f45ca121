"""Semantic checks: turn a parsed :class:`~fusec.dsl.parser.RawPattern` into a checked
:class:`~fusec.dsl.ast.Pattern`, or raise :class:`fusec.errors.PatternError` (``file:line:col``).

Checked: op names (registry, with close-name suggestions), arity (registry ``arity``), op-parameter
names, variables assigned twice or used before assignment, assigned values unused by the root,
where-clause names (unbound variable, unknown dtype, unknown capture), predicate names and their
arguments, rewrite arguments (must be exactly the leaf variables), ``outputs(...)`` names (interior
variables other than the root, each once; not allowed with ``rewrite op``), duplicate pattern names.
"""

from __future__ import annotations

import difflib
import inspect
import re

from ..errors import PatternError
from ..ir.dtypes import DType
from ..ir.ops import REGISTRY
from .ast import (
    Absent,
    Binary,
    Call,
    Capture,
    CaptureRef,
    DTypeLit,
    Expr,
    LeafVar,
    ListExpr,
    Pattern,
    PNode,
    Pos,
    Str,
    Unary,
    VarRef,
    WhereClause,
    Wildcard,
)
from .parser import RawCall, RawPattern
from .predicates import BUILTINS, known_predicates, lookup_user

RESERVED_PARAMS = frozenset({"pattern", "kernel", "fused_op"})
_DTYPE_LIKE = re.compile(r"^(f|bf|i|u|q)\d+(_[0-9a-z]+)?$", re.IGNORECASE)
_DTYPES = ", ".join(d.value for d in DType)


def _err(msg: str, pos: Pos) -> PatternError:
    return PatternError(msg, pos.file, pos.line, pos.column)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


class _MatchBuilder:
    """Builds the PNode DAG of one pattern's ``match`` block."""

    def __init__(self, raw: RawPattern):
        self.raw = raw
        self.vars: dict[str, PNode | LeafVar] = {}
        self.assigned_at: dict[str, Pos] = {a.var.name: a.var.pos for a in reversed(raw.assigns)}
        self.leaf_order: list[str] = []
        self.captures: list[str] = []
        self.nodes: list[PNode] = []

    def build(self) -> PNode:
        root: PNode | None = None
        for a in self.raw.assigns:
            v = a.var
            if v.name in ("_", "none"):
                raise _err(f"cannot assign to '{v.name}': it is a source wildcard, not a variable", v.pos)
            if v.name in self.vars:
                prev = self.vars[v.name]
                what = "assigned twice" if isinstance(prev, PNode) else "assigned after its use as a leaf"
                raise _err(f"variable '{v.name}' is {what} (first at {prev.pos})", v.pos)
            root = self.call(a.call, v.name)
            self.vars[v.name] = root
        assert root is not None  # grammar: at least one assignment
        reached = {id(n) for n in self._postorder(root)}
        for name, node in self.vars.items():
            if isinstance(node, PNode) and id(node) not in reached:
                raise _err(f"variable '{name}' is assigned but not used by the root (the last assignment, "
                           f"'{self.raw.assigns[-1].var.name}')", self.assigned_at[name])
        self.nodes = self._postorder(root)
        for i, n in enumerate(self.nodes):
            n.index = i
        return root

    @staticmethod
    def _postorder(root: PNode) -> list[PNode]:
        out: list[PNode] = []
        seen: set[int] = set()

        def visit(n: PNode) -> None:
            if id(n) in seen:
                return
            seen.add(id(n))
            for a in n.args:
                if isinstance(a, PNode):
                    visit(a)
            out.append(n)

        visit(root)
        return out

    def call(self, c: RawCall, var: str | None) -> PNode:
        if c.op not in REGISTRY or c.op == "NONE":
            known = sorted(k for k in REGISTRY if k != "NONE")
            raise _err(f"unknown op '{c.op}'{_suggest(c.op, known)} (expected a registry op: "
                       f"{', '.join(known)})", c.pos)
        opdef = REGISTRY[c.op]
        lo, hi = opdef.arity
        if not lo <= len(c.args) <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise _err(f"{c.op} takes {want} source{'s' if hi != 1 else ''} (registry arity), got {len(c.args)}",
                       c.pos)
        args = []
        for i, a in enumerate(c.args):
            if isinstance(a, RawCall):
                args.append(self.call(a, None))
            elif a.name == "_":
                args.append(Wildcard(a.pos))
            elif a.name == "none":
                if i < lo:
                    raise _err(f"source {i} of {c.op} is required; 'none' (absent) only fits optional sources "
                               f"{lo}..{hi - 1}", a.pos)
                args.append(Absent(a.pos))
            elif a.name in self.vars:
                args.append(self.vars[a.name])
            elif a.name in self.assigned_at:
                raise _err(f"variable '{a.name}' is used before it is assigned (at {self.assigned_at[a.name]}); "
                           "assign sources before their users", a.pos)
            else:
                leaf = LeafVar(a.name, a.pos)
                self.vars[a.name] = leaf
                self.leaf_order.append(a.name)
                args.append(leaf)
        params: dict[str, object] = {}
        for key, value, pos in c.params:
            if key not in opdef.params:
                have = ", ".join(opdef.params) or "none"
                raise _err(f"{c.op} has no parameter '{key}'{_suggest(key, list(opdef.params))} "
                           f"(its parameters: {have})", pos)
            if key in params:
                raise _err(f"parameter '{key}' is given twice", pos)
            if isinstance(value, Capture):
                if value.name in RESERVED_PARAMS:
                    raise _err(f"capture name '${value.name}' is reserved (FUSED params "
                               f"{', '.join(sorted(RESERVED_PARAMS))})", pos)
                if value.name not in self.captures:
                    self.captures.append(value.name)
            params[key] = value
        return PNode(-1, c.op, args, params, var, c.pos)


class _WhereResolver:
    """Resolves names in where-clauses and checks predicate calls."""

    def __init__(self, vars: dict[str, PNode | LeafVar], captures: list[str]):
        self.vars = vars
        self.captures = captures

    def clause(self, w: WhereClause) -> WhereClause:
        return WhereClause(self.expr(w.expr, dtype_ctx=False), w.text, w.pos)

    def expr(self, e: Expr, dtype_ctx: bool) -> Expr:
        if isinstance(e, VarRef):
            return self.name(e, dtype_ctx)
        if isinstance(e, CaptureRef):
            if e.name not in self.captures:
                have = ", ".join(f"${c}" for c in self.captures) or "none"
                raise _err(f"unknown capture '${e.name}' (captured in match: {have})", e.pos)
            return e
        if isinstance(e, Call):
            return self.call(e)
        if isinstance(e, ListExpr):
            return ListExpr(e.pos, [self.expr(i, dtype_ctx) for i in e.items])
        if isinstance(e, Unary):
            return Unary(e.pos, e.op, self.expr(e.operand, False))
        if isinstance(e, Binary):
            dt = e.op in ("==", "!=", "in", "not in") and (_is_dtype_call(e.left) or _is_dtype_call(e.right))
            return Binary(e.pos, e.op, self.expr(e.left, dt), self.expr(e.right, dt))
        return e

    def name(self, e: VarRef, dtype_ctx: bool) -> Expr:
        if e.name in self.vars:
            return e
        try:
            return DTypeLit(e.pos, DType.parse(e.name))
        except ValueError:
            pass
        if dtype_ctx or _DTYPE_LIKE.match(e.name):
            raise _err(f"unknown dtype '{e.name}' (expected one of {_DTYPES})", e.pos)
        bound = ", ".join(self.vars) or "none"
        raise _err(f"unbound variable '{e.name}'{_suggest(e.name, list(self.vars))} (variables of the match: "
                   f"{bound})", e.pos)

    def call(self, e: Call) -> Expr:
        if e.fn in BUILTINS:
            spec = BUILTINS[e.fn].args
            if len(e.args) != len(spec):
                raise _err(f"{e.fn} takes {len(spec)} argument{'s' if len(spec) != 1 else ''}, got {len(e.args)}",
                           e.pos)
            args: list[Expr] = []
            for i, (kind, a) in enumerate(zip(spec, e.args, strict=True)):
                if kind == "t":
                    if not isinstance(a, VarRef):
                        raise _err(f"argument {i + 1} of {e.fn} must be a match variable", a.pos)
                    args.append(self.name(a, False))
                elif kind == "n":
                    if isinstance(a, VarRef):
                        args.append(Str(a.pos, a.name))
                    elif isinstance(a, Str):
                        args.append(a)
                    else:
                        raise _err(f"argument {i + 1} of {e.fn} must be a parameter name", a.pos)
                else:
                    args.append(self.expr(a, False))
            return Call(e.pos, e.fn, args)
        fn = lookup_user(e.fn)
        if fn is None:
            known = known_predicates()
            raise _err(f"unknown predicate '{e.fn}'{_suggest(e.fn, known)} (known predicates: {', '.join(known)}; "
                       "register more with @fusec.dsl.predicate)", e.pos)
        try:
            inspect.signature(fn).bind(*e.args)
        except TypeError as exc:
            raise _err(f"predicate '{e.fn}' cannot take {len(e.args)} argument(s): {exc}", e.pos) from None
        except ValueError:  # builtins without a signature
            pass
        return Call(e.pos, e.fn, [self.expr(a, False) for a in e.args])


def _is_dtype_call(e: Expr) -> bool:
    return isinstance(e, Call) and e.fn == "dtype"


def check_pattern(raw: RawPattern, file: str) -> Pattern:
    """Check one parsed pattern and resolve its names. Raises :class:`PatternError`."""
    mb = _MatchBuilder(raw)
    mb.build()
    resolver = _WhereResolver(mb.vars, mb.captures)
    where = [resolver.clause(w) for w in raw.where]
    leaves: list[str] = []
    for a in raw.rewrite_args:
        node = mb.vars.get(a.name)
        if isinstance(node, PNode):
            raise _err(f"rewrite argument '{a.name}' is an interior value (assigned in match); rewrite arguments "
                       f"must be leaf variables ({', '.join(mb.leaf_order) or 'none'})", a.pos)
        if node is None:
            raise _err(f"rewrite argument '{a.name}' is not a leaf variable of the match (leaf variables: "
                       f"{', '.join(mb.leaf_order) or 'none'})", a.pos)
        if a.name in leaves:
            raise _err(f"rewrite argument '{a.name}' is given twice", a.pos)
        leaves.append(a.name)
    missing = [v for v in mb.leaf_order if v not in leaves]
    if missing:
        raise _err(f"leaf variable{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
                   f"missing from the rewrite arguments (the fused op must receive every leaf: "
                   f"{', '.join(mb.leaf_order)})", raw.rewrite_op.pos)
    outputs = _check_outputs(raw, mb)
    # default benefit: the op nodes fused, less one per declared output (its value is still written)
    benefit = raw.benefit if raw.benefit is not None else len(mb.nodes) - len(outputs)
    if raw.op_params is not None:
        kernel, params = _check_op_rewrite(raw, leaves, mb.captures)
        return Pattern(
            name=raw.name, file=file, line=raw.pos.line, column=raw.pos.column, nodes=mb.nodes, vars=mb.vars,
            leaf_vars=mb.leaf_order, captures=mb.captures, where=where, fused_op=raw.rewrite_op.name,
            kernel=kernel, leaves=leaves, benefit=benefit, rewrite_pos=raw.rewrite_op.pos, rewrite_kind="op",
            rewrite_params=params)
    return Pattern(
        name=raw.name, file=file, line=raw.pos.line, column=raw.pos.column, nodes=mb.nodes, vars=mb.vars,
        leaf_vars=mb.leaf_order, captures=mb.captures, where=where, fused_op=raw.rewrite_op.name,
        kernel=raw.kernel.name, leaves=leaves, benefit=benefit, rewrite_pos=raw.rewrite_op.pos, outputs=outputs)


def _check_outputs(raw: RawPattern, mb: _MatchBuilder) -> list[str]:
    """Check ``outputs(v, ...)``: each name an interior variable of the match (assigned, not the
    root, which is output 0 already), each once. Returns the names in order."""
    root_var = raw.assigns[-1].var.name
    interior = [n for n, v in mb.vars.items() if isinstance(v, PNode) and n != root_var]
    out: list[str] = []
    for a in raw.outputs:
        node = mb.vars.get(a.name)
        if a.name == root_var:
            raise _err(f"output '{a.name}' is the root (the last assignment), already output 0; outputs(...) "
                       f"names interior variables ({', '.join(interior) or 'none'})", a.pos)
        if isinstance(node, LeafVar):
            raise _err(f"output '{a.name}' is a leaf variable (an input of the fused node); outputs(...) names "
                       f"interior variables ({', '.join(interior) or 'none'})", a.pos)
        if node is None:
            raise _err(f"output '{a.name}' is not a variable of the match{_suggest(a.name, interior)} (interior "
                       f"variables: {', '.join(interior) or 'none'})", a.pos)
        if a.name in out:
            raise _err(f"output '{a.name}' is given twice", a.pos)
        out.append(a.name)
    return out


def _check_op_rewrite(raw: RawPattern, leaves: list[str], captures: list[str]) -> tuple[str, dict[str, object]]:
    """Check ``rewrite op OP(args) { params }``: OP is a registry op (not NONE/FUSED), the number of
    arguments fits its arity, parameter names are its parameters (each once), captures are bound
    in match. Returns (OP's default kernel family or "", params)."""
    op = raw.rewrite_op
    known = sorted(k for k in REGISTRY if k not in ("NONE", "FUSED"))
    if op.name not in known:
        raise _err(f"unknown op '{op.name}' in 'rewrite op'{_suggest(op.name, known)} (expected a registry op: "
                   f"{', '.join(known)})", op.pos)
    opdef = REGISTRY[op.name]
    lo, hi = opdef.arity
    if not lo <= len(leaves) <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise _err(f"{op.name} takes {want} source{'s' if hi != 1 else ''} (registry arity), got {len(leaves)}",
                   op.pos)
    params: dict[str, object] = {}
    for key, value, pos in raw.op_params or []:
        if key not in opdef.params:
            have = ", ".join(opdef.params) or "none"
            raise _err(f"{op.name} has no parameter '{key}'{_suggest(key, list(opdef.params))} "
                       f"(its parameters: {have})", pos)
        if key in params:
            raise _err(f"parameter '{key}' is given twice", pos)
        if isinstance(value, Capture) and value.name not in captures:
            have = ", ".join(f"${c}" for c in captures) or "none"
            raise _err(f"unknown capture '${value.name}' (captured in match: {have})", pos)
        params[key] = value
    from ..codegen import OP_FAMILY, _load_families  # display only: the op's own kernel family

    _load_families()
    return OP_FAMILY.get(op.name, ""), params


def check_unique(patterns: list[Pattern]) -> None:
    """Raise :class:`PatternError` at the second definition of a duplicated pattern name."""
    seen: dict[str, Pattern] = {}
    for p in patterns:
        if p.name in seen:
            first = seen[p.name]
            raise PatternError(f"duplicate pattern name '{p.name}' (first defined at {first.file}:{first.line}:"
                               f"{first.column})", p.file, p.line, p.column)
        seen[p.name] = p

