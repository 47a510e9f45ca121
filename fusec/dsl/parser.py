"""Parse pattern text (``grammar.lark``, LALR) into a surface AST; syntax errors become
:class:`fusec.errors.PatternError` with ``file:line:col``, the token found and the tokens expected,
in words. Semantic checks live in :mod:`fusec.dsl.checker`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from ..errors import PatternError
from .ast import Binary, Call, Capture, CaptureRef, Expr, ListExpr, Num, Pos, Str, Unary, VarRef, WhereClause

_GRAMMAR = Path(__file__).with_name("grammar.lark")


# ---------------------------------------------------------------------------------------------
# surface AST (before name resolution)


@dataclass(eq=False)
class RawName:
    name: str
    pos: Pos


@dataclass(eq=False)
class RawCall:
    op: str
    pos: Pos
    args: list[RawCall | RawName]
    params: list[tuple[str, object, Pos]]  # (param name, literal value or ast.Capture, position)


@dataclass(eq=False)
class RawAssign:
    var: RawName
    call: RawCall


@dataclass(eq=False)
class RawPattern:
    name: str
    pos: Pos
    assigns: list[RawAssign]
    where: list[WhereClause]
    rewrite_op: RawName
    rewrite_args: list[RawName]
    kernel: RawName
    benefit: int | float | None
    benefit_pos: Pos | None = None
    # ``rewrite op OP(args) { params }`` (a canonicalization to a plain registry op): the parameters
    # as (name, literal or ast.Capture, position); None for the FUSED form ``rewrite F(args) kernel k``
    op_params: list[tuple[str, object, Pos]] | None = None
    # ``rewrite F(args) kernel k outputs(v, ...)``: interior variables that are extra outputs (multi-output
    # fusion), in the order written; empty without an ``outputs`` clause
    outputs: list[RawName] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Lark


@functools.cache
def _lark() -> Lark:
    """The LALR parser. Its analysis is cached by Lark in the fusec cache folder (``$FUSEC_CACHE_DIR``;
    Lark keys the file on the grammar, the options and its own version), which saves ~150 ms per
    process; without a writable cache folder (or with ``FUSEC_DISABLE_DISK_CACHE``) it is rebuilt."""
    from ..codegen import diskcache  # noqa: PLC0415 (the cache-folder policy lives there)

    cache: str | bool = False
    if diskcache.disk_enabled():
        try:
            d = diskcache.cache_dir()
            d.mkdir(parents=True, exist_ok=True)
            cache = str(d / "dsl-grammar.lark-cache")
        except OSError:
            cache = False
    return Lark(_GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True,
                cache=cache)


_WORDS = {"NAME": "a name", "NUMBER": "a number", "CAPTURE": "a $capture", "STRING": "a string",
          "_NL": "a newline", "$END": "the end of the file"}


def _word(term: str) -> str:
    if term in _WORDS:
        return _WORDS[term]
    try:
        pat = _lark().get_terminal(term).pattern
    except KeyError:
        return term
    if isinstance(pat, PatternStr):
        return f"'{pat.value}'"
    return term.lower()


def _found(tok: Token) -> str:
    if tok.type == "$END":
        return "the end of the file"
    if tok.type == "_NL":
        return "a newline"
    word = _WORDS.get(tok.type)
    return f"{word} '{tok.value}'" if word else f"'{tok.value}'"


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> PatternError:
    line, col = getattr(e, "line", -1), getattr(e, "column", -1)
    if isinstance(e, UnexpectedToken):
        found = _found(e.token)
        expected = sorted({_word(t) for t in e.expected})
        if e.token.type == "_NL":  # the token starts at the newline: point just past the line's end
            line, col = e.token.line, e.token.column
    elif isinstance(e, UnexpectedCharacters):
        found = f"character {text[e.pos_in_stream]!r}"
        expected = sorted({_word(t) for t in e.allowed})
    else:  # pragma: no cover - LALR reports EOF as UnexpectedToken($END)
        found, expected = "unexpected input", sorted({_word(t) for t in getattr(e, "expected", ())})
    if line is None or line < 1:  # end of file
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
    exp = ", ".join(expected) if len(expected) <= 12 else ", ".join(expected[:12]) + ", ..."
    return PatternError(f"syntax error: found {found}, expected one of: {exp}", file, line, col)


def parse_raw(text: str, file: str = "<string>") -> list[RawPattern]:
    """Parse pattern text into :class:`RawPattern` records. Raises :class:`PatternError`."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    return [_pattern(t, text, file) for t in tree.children if isinstance(t, Tree)]


# ---------------------------------------------------------------------------------------------
# tree -> surface AST


def _pos(node: Tree | Token, file: str) -> Pos:
    if isinstance(node, Token):
        return Pos(file, node.line, node.column)
    return Pos(file, node.meta.line, node.meta.column)


def _number(tok: Token) -> int | float:
    s = str(tok)
    return int(s) if s.isdigit() else float(s)


def _pattern(t: Tree, text: str, file: str) -> RawPattern:
    name_tok = t.children[0]
    blocks = {c.data: c for c in t.children[1:] if isinstance(c, Tree)}
    assigns = [_assign(a, file) for a in blocks["match_block"].children if isinstance(a, Tree)]
    where: list[WhereClause] = []
    if "where_block" in blocks:
        for c in blocks["where_block"].children:
            if isinstance(c, Tree) and c.data == "clause":
                src = text[c.meta.start_pos:c.meta.end_pos]
                where.append(WhereClause(_expr(c.children[0], file), " ".join(src.split()), _pos(c, file)))
    benefit, benefit_pos = None, None
    if "benefit_stmt" in blocks:
        tok = blocks["benefit_stmt"].children[0]
        benefit, benefit_pos = _number(tok), _pos(tok, file)
    if "rewrite_op_stmt" in blocks:  # rewrite op OP(args) { params }
        rw = blocks["rewrite_op_stmt"].children
        op_params: list[tuple[str, object, Pos]] = []
        rest = list(rw[1:])
        if rest and isinstance(rest[-1], Tree) and rest[-1].data == "op_params":
            op_params = [_op_param(p, file) for p in rest.pop().children if p is not None]
        elif rest and rest[-1] is None:  # absent optional op_params
            rest.pop()
        rw_args = [RawName(str(a), _pos(a, file)) for a in rest if a is not None]
        return RawPattern(str(name_tok), _pos(name_tok, file), assigns, where, RawName(str(rw[0]), _pos(rw[0], file)),
                          rw_args, None, benefit, benefit_pos, op_params)  # type: ignore[arg-type]
    rw = list(blocks["rewrite_stmt"].children)
    outputs: list[RawName] = []
    if rw and isinstance(rw[-1], Tree) and rw[-1].data == "outputs_clause":
        outputs = [RawName(str(a), _pos(a, file)) for a in rw.pop().children if a is not None]
    rw_args = [RawName(str(a), _pos(a, file)) for a in rw[1:-1] if a is not None]
    return RawPattern(str(name_tok), _pos(name_tok, file), assigns, where, RawName(str(rw[0]), _pos(rw[0], file)),
                      rw_args, RawName(str(rw[-1]), _pos(rw[-1], file)), benefit, benefit_pos, outputs=outputs)


def _assign(t: Tree, file: str) -> RawAssign:
    var, call = t.children
    return RawAssign(RawName(str(var), _pos(var, file)), _call(call, file))


def _call(t: Tree, file: str) -> RawCall:
    op = t.children[0]
    args: list[RawCall | RawName] = []
    params: list[tuple[str, object, Pos]] = []
    for c in t.children[1:]:
        if c is None:
            continue
        if isinstance(c, Tree) and c.data == "call":
            args.append(_call(c, file))
        elif isinstance(c, Tree) and c.data == "arg_name":
            tok = c.children[0]
            args.append(RawName(str(tok), _pos(tok, file)))
        elif isinstance(c, Tree) and c.data == "op_params":
            for p in c.children:
                if p is not None:
                    params.append(_op_param(p, file))
    return RawCall(str(op), _pos(op, file), args, params)


def _op_param(t: Tree, file: str) -> tuple[str, object, Pos]:
    key, val = t.children
    tok = val.children[0]
    value: object
    if val.data == "capture":
        value = Capture(str(tok)[1:])
    elif val.data == "number":
        value = _number(tok)
    elif val.data == "neg_number":
        value = -_number(tok)
    elif val.data == "string":
        value = str(tok)[1:-1]
    else:  # bare name: true/false or a symbolic value
        value = {"true": True, "false": False}.get(str(tok), str(tok))
    return str(key), value, _pos(key, file)


_BINARY = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "in_": "in",
           "not_in": "not in", "add": "+", "sub": "-", "mul": "*", "div": "/", "mod": "%"}


def _expr(t: Tree | Token, file: str) -> Expr:
    pos = _pos(t, file)
    d = t.data
    ch = t.children
    if d in ("or_test", "and_test"):
        op = "or" if d == "or_test" else "and"
        out = _expr(ch[0], file)
        for c in ch[1:]:
            out = Binary(pos, op, out, _expr(c, file))
        return out
    if d in _BINARY:
        return Binary(pos, _BINARY[d], _expr(ch[0], file), _expr(ch[1], file))
    if d == "not_":
        return Unary(pos, "not", _expr(ch[0], file))
    if d == "neg":
        return Unary(pos, "-", _expr(ch[0], file))
    if d == "number":
        return Num(pos, _number(ch[0]))
    if d == "capture":
        return CaptureRef(pos, str(ch[0])[1:])
    if d == "string":
        return Str(pos, str(ch[0])[1:-1])
    if d == "name":
        return VarRef(pos, str(ch[0]))
    if d == "call_expr":
        return Call(pos, str(ch[0]), [_expr(c, file) for c in ch[1:] if c is not None])
    if d == "list_expr":
        return ListExpr(pos, [_expr(c, file) for c in ch if c is not None])
    raise AssertionError(f"unhandled expression node {d}")  # pragma: no cover
