"""Benchmark cases: the unfused RMS_NORM -> MUL (-> ADD) graphs, their inputs, byte counts, checks.

A :class:`Case` is one (pattern, dtype, rows, n) point. Shapes are ggml ``ne`` (innermost first):
``x`` and the residual ``b`` are ``(n, rows)``, the weight ``w`` is ``(n,)``; numpy arrays have
the reversed shape (``(rows, n)``). :func:`prepare` builds the unfused graph with
:class:`fusec.ir.GraphBuilder`, rewrites it with the shipped patterns and computes the reference
output with :func:`fusec.interp.interpret` of the *unfused* graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..interp import interpret
from ..ir import GraphBuilder
from ..ir.graph import Graph
from ..rewrite import rewrite

EPS = 1e-6
"""RMS_NORM epsilon of every case (llama.cpp's default ``f_norm_rms_eps``)."""

PATTERNS = ("rms_norm_mul", "rms_norm_mul_add")
DTYPES = ("f32", "f16")
ROWS = {"full": (1, 32, 512, 8192, 65536), "quick": (32, 8192), "dry": (1, 5)}
NS = {"full": (4096, 8192), "quick": (4096,), "dry": (256, 4096)}
MODES = tuple(ROWS)

SMALL_ROWS_MAX = 512
"""Cases with ``rows <= SMALL_ROWS_MAX`` are "small": launch and host overhead dominate, so they are
also timed back to back (many launches between two events) and judged against an empty launch."""

LARGE_ROWS_MIN = 8192
"""Cases with ``rows >= LARGE_ROWS_MIN`` are "large": judged against the copy ceiling."""

TOL = {"f32": 1e-7, "f16": 1e-5}
"""Largest normalized MSE (``sum((out-ref)^2) / sum(ref^2)``) a correct output may have, per dtype."""

OUTPUT = "y"
"""Name of the output tensor of every case graph (unfused and fused)."""


@dataclass(frozen=True)
class Case:
    """One benchmark point.

    Attributes:
        pattern: ``"rms_norm_mul"`` (y = rms_norm(x) * w) or ``"rms_norm_mul_add"`` (y = rms_norm(x) * w + b).
        dtype: ``"f32"`` or ``"f16"`` (every tensor of the case).
        rows: number of rows (``ne[1]`` of ``x``).
        n: row length in elements (``ne[0]``).
    """

    pattern: str
    dtype: str
    rows: int
    n: int

    @property
    def with_add(self) -> bool:
        return self.pattern == "rms_norm_mul_add"

    @property
    def esize(self) -> int:
        """Bytes per element (4 for f32, 2 for f16)."""
        return {"f32": 4, "f16": 2}[self.dtype]

    @property
    def np_dtype(self):
        return {"f32": np.float32, "f16": np.float16}[self.dtype]

    @property
    def small(self) -> bool:
        return self.rows <= SMALL_ROWS_MAX

    @property
    def large(self) -> bool:
        return self.rows >= LARGE_ROWS_MIN

    @property
    def bytes(self) -> int:
        return min_bytes(self)

    @property
    def key(self) -> str:
        return f"{self.pattern} {self.dtype} rows={self.rows} n={self.n}"

    def row(self) -> dict:
        """The identifying fields of a result row."""
        return {"pattern": self.pattern, "dtype": self.dtype, "rows": self.rows, "n": self.n, "bytes": self.bytes}


def min_bytes(case: Case) -> int:
    """Minimum DRAM traffic of the fused op in bytes: read ``x`` (rows*n), read ``w`` (n), read ``b``
    (rows*n, the ADD pattern only), write ``y`` (rows*n); each element ``case.esize`` bytes."""
    full = 3 if case.with_add else 2
    return (full * case.rows * case.n + case.n) * case.esize


def graph_bytes(graph: Graph) -> int:
    """Bytes of every leaf plus every output of ``graph`` (the same count as :func:`min_bytes`
    for a case graph, computed from the IR)."""
    return sum(t.nbytes for t in graph.leaves) + sum(t.nbytes for t in graph.outputs)


def case_list(mode: str = "full", patterns=PATTERNS, dtypes=DTYPES) -> list[Case]:
    """Cases of ``mode``: ``"full"`` (rows 1..65536 x n 4096, 8192), ``"quick"`` (rows 32, 8192 x
    n 4096) or ``"dry"`` (tiny: rows 1, 5 x n 256, 4096), for both patterns and both dtypes."""
    if mode not in ROWS:
        raise ValueError(f"unknown case mode {mode!r} (expected one of {', '.join(MODES)})")
    return [Case(p, d, r, n) for p in patterns for d in dtypes for n in NS[mode] for r in ROWS[mode]]


def build_graph(case: Case) -> Graph:
    """The unfused graph: ``y = RMS_NORM(x) * w`` (``+ b``), leaves ``x``, ``w`` (weight), ``b``."""
    bld = GraphBuilder()
    x = bld.input("x", case.dtype, (case.n, case.rows))
    w = bld.weight("w", case.dtype, (case.n,))
    m = bld.mul(bld.rms_norm(x, EPS, name="norm"), w, name="m" if case.with_add else OUTPUT)
    if case.with_add:
        b = bld.input("b", case.dtype, (case.n, case.rows))
        m = bld.add(m, b, name=OUTPUT)
    return bld.build([m])


def make_inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal leaf values by name, numpy shapes ``(rows, n)`` / ``(n,)``, ``case`` dtype."""
    rng = np.random.default_rng(seed)
    shapes = {"x": (case.rows, case.n), "w": (case.n,)}
    if case.with_add:
        shapes["b"] = (case.rows, case.n)
    return {k: rng.standard_normal(s, dtype=np.float32).astype(case.np_dtype, copy=False) for k, s in shapes.items()}


def nmse(out, ref, chunk: int = 1 << 24, xp=np) -> float:
    """Normalized MSE ``sum((out-ref)^2) / sum(ref^2)`` in float64, in chunks of ``chunk`` elements
    (no full-size float64 temporaries). NaN anywhere in ``out`` gives NaN; ``ref == 0`` divides by 1.
    ``xp``: the array module of ``out`` and ``ref`` (numpy, or cupy to compare on the device)."""
    a = xp.asarray(out).reshape(-1)
    b = xp.asarray(ref).reshape(-1)
    if a.size != b.size:
        raise ValueError(f"nmse: {a.size} elements vs {b.size} in the reference")
    num = den = 0.0
    for i in range(0, a.size, chunk):
        ai = a[i:i + chunk].astype(xp.float64)
        bi = b[i:i + chunk].astype(xp.float64)
        num += float(xp.sum((ai - bi) ** 2))
        den += float(xp.sum(bi * bi))
    return num / (den or 1.0)


def within_tol(err: float, dtype: str) -> bool:
    """True when ``err`` is a number not above the tolerance of ``dtype`` (NaN is never within)."""
    return bool(err <= TOL[dtype])


@dataclass
class Prepared:
    """A case ready to run on any backend.

    Attributes:
        case: the case.
        graph: the unfused graph.
        fused: ``graph`` rewritten with the patterns.
        n_fused: number of FUSED nodes in ``fused`` (1 when the pattern fired).
        values: leaf values by name (numpy shapes ``(rows, n)`` / ``(n,)``).
        ref: the interpreter's output of ``graph``, shape ``(rows, n)``, the case dtype.
    """

    case: Case
    graph: Graph
    fused: Graph
    n_fused: int
    values: dict[str, np.ndarray]
    ref: np.ndarray

    @property
    def fused_ok(self) -> bool:
        return self.n_fused == 1


def prepare(case: Case, patterns, seed: int = 0) -> Prepared:
    """Build, rewrite and interpret ``case`` (the reference every backend is checked against)."""
    g = build_graph(case)
    fused, _report = rewrite(g, patterns)
    values = make_inputs(case, seed)
    ref = interpret(g, values)[OUTPUT].reshape(case.rows, case.n)
    n_fused = sum(1 for t in fused.nodes if t.op == "FUSED")
    return Prepared(case, g, fused, n_fused, values, ref)


__all__ = ["Case", "DTYPES", "EPS", "LARGE_ROWS_MIN", "MODES", "OUTPUT", "PATTERNS", "Prepared", "SMALL_ROWS_MAX",
           "TOL", "build_graph", "case_list", "graph_bytes", "make_inputs", "min_bytes", "nmse", "prepare",
           "within_tol"]
