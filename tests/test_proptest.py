"""Tests of ``fusec test`` (fusec.proptest): the shipped patterns pass, the generators produce what
they promise, and a wrong pattern is caught with a printed counterexample."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from hypothesis import find, given, settings
from rich.console import Console

from fusec.backends import Backend, Executable
from fusec.cli import main
from fusec.dsl import default_patterns, parse_patterns
from fusec.interp import evaluate
from fusec.ir.shape import can_repeat
from fusec.proptest import (
    MAX_ELEMENTS,
    NEAR_MISS_KINDS,
    analyze,
    compare,
    near_miss_cases,
    positive_cases,
    realize,
    run_pattern_tests,
)
from fusec.proptest.case import BROADCAST_SWAP, DTYPE, EXTRA_USER, INTERIOR_OUTPUT
from fusec.proptest.strategies import near_miss_kinds
from fusec.rewrite.match import MatchResult, NoMatch, match_at

RMS_MUL = next(p for p in default_patterns() if p.name == "rms_norm_mul")

WRONG = """
# BUG on purpose: no can_repeat(w, n), so MUL(w_full, rms_norm(x_row)) fuses although the row
# kernel writes x's shape and broadcasts w over it.
pattern rms_norm_mul_no_broadcast_check {
  match {
    n = RMS_NORM(x) { eps: $eps }
    y = MUL(n, w)
  }
  where {
    dtype(x) in [f32, f16]
    dtype(w) == dtype(x)
  }
  rewrite RMS_NORM_MUL(x, w) kernel norm_epilogue
}
"""


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=300, color_system=None), buf


# -- a kernel-like backend: what a real fused row kernel computes ---------------------------------


class RowKernelBackend(Backend):
    """Interprets everything except FUSED RMS_NORM_MUL nodes, which it computes as the fused row
    kernel does: one output row per row of ``x`` (output shape = x's), ``w`` read with
    ggml_can_repeat broadcasting (index modulo w's ne). Right whenever ``w`` broadcasts to ``x``."""

    name = "rowkernel"

    def __init__(self) -> None:
        self.store: dict[str, np.ndarray] = {}

    def set_weights(self, weights):
        self.store.update({k: np.array(v) for k, v in weights.items()})

    def read_weight(self, name):
        return self.store[name].copy()

    def compile(self, graph):
        backend = self

        class Exe(Executable):
            def run(self, inputs):
                vals = {**backend.store, **inputs}
                env = evaluate(graph, vals)
                out = {t.name: env[t] for t in graph.outputs}
                for t in graph.outputs:
                    if t.op == "FUSED" and t.params.get("fused_op") == "RMS_NORM_MUL":
                        x, w = (env[s].astype(np.float32) for s in t.src)
                        ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
                        y = x / np.sqrt(ms + t.params["eps"])
                        wb = w[np.ix_(*[np.arange(n) % m for n, m in zip(x.shape, w.shape, strict=True)])]
                        out[t.name] = (y * wb).astype(t.dtype.np)
                return out

        e = Exe()
        e.graph = graph
        return e


# -- the shipped patterns pass -----------------------------------------------------------------------


# The generator cannot build the attention patterns' inputs yet (PERMUTE/VIEW leaves, head sizes from
# `ne(v, i) in [...]`), the rope patterns' (ROPE's n_dims/positions, VIEW ne/nb params, SET_ROWS
# destinations) nor the MoE patterns' (the router's VIEW/RESHAPEs, in-range expert ids): they are covered
# by tests/test_flash_attn.py, tests/test_rope_fusion.py and tests/test_moe_router.py, and the limitation
# is pinned below.
UNGENERATABLE = ("patterns/attention.fuse", "patterns/rope.fuse", "patterns/moe.fuse")


def generatable_patterns():
    return [p for p in default_patterns() if p.file not in UNGENERATABLE]


@pytest.mark.parametrize("file", UNGENERATABLE)
def test_ungeneratable_patterns_are_reported_as_not_generatable(file):
    """Pins the documented limitation: `fusec test patterns/attention.fuse` (rope.fuse, moe.fuse) fails loudly
    ("no example could be generated") instead of passing vacuously."""
    con, buf = _console()
    att = [p for p in default_patterns() if p.file == file]
    assert att and run_pattern_tests(att, backend="numpy", examples=3, seed=0, console=con) is False
    assert "no example could be generated" in buf.getvalue()


def test_shipped_patterns_pass_on_numpy():
    con, buf = _console()
    pats = generatable_patterns()
    assert run_pattern_tests(pats, backend="numpy", examples=10, seed=0, console=con) is True
    lines = buf.getvalue().splitlines()
    assert len(lines) == len(pats)
    for p, line in zip(pats, lines, strict=True):
        assert line.startswith(f"ok {p.name} ")
        assert "10 positive example(s)" in line
        kinds = near_miss_kinds(p, analyze(p))  # the norm patterns have all 4; gemv.fuse's have 3
        for kind in kinds:
            assert f"{kind} {-(-10 // len(kinds))}" in line  # ceil(10 / number of kinds) per kind


def test_shipped_patterns_pass_on_row_kernel_backend():
    """Control for the wrong-pattern test: the correct pattern passes on the kernel-like backend."""
    con, buf = _console()
    assert run_pattern_tests([RMS_MUL], backend=RowKernelBackend(), examples=15, console=con), buf.getvalue()


@pytest.mark.wgpu
def test_shipped_patterns_pass_on_wgpu():
    from fusec.backends import wgpu_runtime

    if not wgpu_runtime.available():
        pytest.skip("no wgpu adapter")
    con, buf = _console()
    assert run_pattern_tests(generatable_patterns(), backend="wgpu", examples=8, console=con), buf.getvalue()


# -- the suite can fail ------------------------------------------------------------------------------


def test_wrong_pattern_fails_with_a_counterexample():
    wrong = parse_patterns(WRONG, "wrong.fuse")
    con, buf = _console()
    assert run_pattern_tests(wrong, backend=RowKernelBackend(), examples=50, seed=7, console=con) is False
    out = buf.getvalue()
    assert out.startswith("FAIL rms_norm_mul_no_broadcast_check (wrong.fuse:4)")
    assert "counterexample (positive example, shrunk)" in out
    assert "leaves: x f" in out and "ne=[" in out and "params of n = RMS_NORM: eps=" in out
    assert "operands 0/1 swapped at: y" in out
    assert "error: PropertyFailure: output 'y': shape" in out
    assert "reproduce: fusec test wrong.fuse --backend rowkernel --examples 50 --seed 7" in out


@pytest.mark.wgpu
def test_wrong_pattern_fails_on_wgpu():
    """The real kernel backend catches the missing can_repeat(w, n): positives include graphs where
    the weight is the LARGER operand (MUL(w_full, rms_norm(x_row))); the wrong pattern fuses them and
    the norm_epilogue kernel refuses (or would miscompute) them -- reported as a FAILURE with the
    shrunk counterexample, not raised."""
    from fusec.backends import wgpu_runtime

    if not wgpu_runtime.available():
        pytest.skip("no wgpu adapter")
    wrong = parse_patterns(WRONG, "wrong.fuse")
    con, buf = _console()
    assert run_pattern_tests(wrong, backend="wgpu", examples=8, seed=3, console=con) is False
    out = buf.getvalue()
    assert out.startswith("FAIL rms_norm_mul_no_broadcast_check (wrong.fuse:4) on wgpu: ")
    passed = int(re.search(r"on wgpu: (\d+) positive example", out).group(1))
    assert passed < 8  # examples before the failure, not the shrinker's reruns
    assert "counterexample (positive example, shrunk)" in out and "operands 0/1 swapped at: y" in out
    x, w = (tuple(int(v) for v in re.search(rf"{n} f(?:32|16) ne=\[([0-9, ]+)\]", out).group(1).split(", "))
            for n in ("x", "w"))
    assert can_repeat(x, w) and not can_repeat(w, x)  # x broadcasts into the larger w
    assert max(x[0] * x[1] * x[2] * x[3], w[0] * w[1] * w[2] * w[3]) <= 8  # shrunk
    assert "error: PropertyFailure: backend wgpu cannot run the rewritten graph" in out or \
        "error: PropertyFailure: output 'y'" in out
    assert "reproduce: fusec test wrong.fuse --backend wgpu --examples 8 --seed 3" in out


def test_wrong_values_fail():
    class Off(RowKernelBackend):
        name = "off-by-eps"

        def compile(self, graph):
            exe = super().compile(graph)
            run = exe.run
            exe.run = lambda inputs: {k: v * np.float32(1.001) for k, v in run(inputs).items()}
            return exe

    con, buf = _console()
    assert run_pattern_tests([RMS_MUL], backend=Off(), examples=5, console=con) is False
    assert "normalized MSE" in buf.getvalue()


def test_unrealizable_pattern_fails():
    pats = parse_patterns("pattern p { match { y = SILU(x) }\n where { ne(x, 0) == 12345\n nrows(x) == 777 }\n"
                          " rewrite S(x) kernel elementwise }")
    con, buf = _console()
    assert run_pattern_tests(pats, examples=5, console=con) is False
    assert "no example could be generated" in buf.getvalue()


# -- the generators --------------------------------------------------------------------------------


FACTS = {p.name: analyze(p) for p in default_patterns()}


@given(positive_cases(RMS_MUL, FACTS["rms_norm_mul"]))
def test_positive_cases_match(case):
    r = realize(RMS_MUL, case)
    assert isinstance(match_at(RMS_MUL, r.graph, r.root), MatchResult)
    x = case.leaves["x"]
    assert x.ne[0] * x.ne[1] * x.ne[2] * x.ne[3] <= MAX_ELEMENTS
    assert case.leaves["w"].dtype == x.dtype  # derived from dtype(w) == dtype(x)
    assert case.params[0]["eps"] in (1e-6, 0.0, 1e-5, 1e-4, 0.1, 1.0)


# `find` searches randomly; a fixed seed and a generous budget make the search reproducible
# (a rare case such as row_into_full otherwise fails on an unlucky seed).
SEARCH = settings(database=None, max_examples=2000, derandomize=True)


def test_positive_cases_explore_operand_order_and_the_larger_operand():
    """For a commutative op, positives put the matched value in src[1] too, and let the other operand
    be the larger one (the matched value broadcasting into it) whenever the pattern matches that."""
    wrong = parse_patterns(WRONG, "wrong.fuse")[0]

    def graph(p, case):
        r = realize(p, case)
        return r.tensors["y"], r.tensors["n"], r.tensors["w"]

    def larger(case):
        y, n, w = graph(wrong, case)
        return y.src[0] is w and w.nelements > n.nelements and can_repeat(n.ne, w.ne)

    case = find(positive_cases(wrong, analyze(wrong)), larger, settings=SEARCH)
    assert case.swaps == frozenset({1})  # the larger operand is src[0]

    def row_into_full(case):  # the x_row / w_full case: x ne=[n,1,1,1] against w ne=[n,k,1,1]
        y, n, w = graph(wrong, case)
        return y.src[0] is w and n.ne[1:] == (1, 1, 1) and w.ne[0] == n.ne[0] and w.ne[1] in (3, 4)

    find(positive_cases(wrong, analyze(wrong)), row_into_full, settings=SEARCH)

    def swapped_same(case):
        y, n, w = graph(RMS_MUL, case)
        return y.src[1] is n and w.ne == n.ne

    find(positive_cases(RMS_MUL, FACTS["rms_norm_mul"]), swapped_same, settings=SEARCH)


@given(positive_cases(RMS_MUL, FACTS["rms_norm_mul"]))
def test_positive_cases_of_a_correct_pattern_keep_the_weight_broadcastable(case):
    r = realize(RMS_MUL, case)
    assert can_repeat(r.tensors["w"].ne, r.tensors["n"].ne)
    assert r.root.ne == r.tensors["n"].ne


@pytest.mark.parametrize("kind", NEAR_MISS_KINDS)
def test_near_miss_cases_break_one_precondition(kind):
    p = next(p for p in default_patterns() if p.name == "rms_norm_mul_add")

    @given(near_miss_cases(p, FACTS[p.name], kind))
    def prop(case):
        assert case.variant == kind
        r = realize(p, case)
        res = match_at(p, r.graph, r.root)
        assert isinstance(res, NoMatch)
        if kind in (EXTRA_USER, INTERIOR_OUTPUT):
            assert res.kind == "escape" and case.target in res.reason
        elif kind == DTYPE:
            assert res.kind == "where" and "dtype" in res.reason
        else:
            assert kind == BROADCAST_SWAP and res.kind == "where" and "can_repeat" in res.reason
            leaf = case.target.split()[0]
            other = case.target.split()[3].rstrip(":")
            assert not can_repeat(r.tensors[leaf].ne, r.tensors[other].ne)

    prop()


def test_analyze_reads_the_where_clauses():
    f = FACTS["rms_norm_mul_add"]
    assert f.group_of("w") == {"x", "w", "b"}
    assert {(v.leaf, str(v.dtype)) for v in f.dtype_violations} >= {("x", "i32"), ("w", "f16"), ("b", "f32")}
    assert [(s.leaf, s.other, s.node) for s in f.swaps] == [("w", "n", 1), ("b", "m", 2)]


def test_compare():
    a = np.ones((2, 3), np.float32)
    assert compare(a, a, 1e-7) is None
    assert "shape" in compare(a, np.ones((3, 2), np.float32), 1e-7)
    assert "normalized MSE" in compare(a * 1.01, a, 1e-7)
    assert compare(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), 1e-7) is None
    assert "finiteness" in compare(np.array([0.0, 1.0]), np.array([np.nan, 1.0]), 1e-7)


def test_other_pattern_shapes_are_derived_generically():
    src = """
pattern silu_mul {
  match {
    a = SILU(g)
    y = MUL(a, u)
  }
  where { dtype(u) == dtype(g) }
  rewrite SILU_MUL(g, u) kernel elementwise
}
pattern softmax_only {
  match { y = SOFT_MAX(x, none) { scale: $scale } }
  rewrite SM(x) kernel softmax
}
"""
    con, buf = _console()
    assert run_pattern_tests(parse_patterns(src), examples=8, console=con), buf.getvalue()
    lines = buf.getvalue().splitlines()
    assert "dtype 3" in lines[0] and "broadcast_swap" not in lines[0]
    assert "0 near miss(es) (none derivable" in lines[1]


def test_cli_test_command(tmp_path):
    from fusec.resources import patterns_dir

    files = [str(f) for f in sorted(patterns_dir().glob("*.fuse")) if f"patterns/{f.name}" not in UNGENERATABLE]
    assert main(["test", *files, "--examples", "4", "--seed", "1"]) == 0
    bad = tmp_path / "unreal.fuse"
    bad.write_text("pattern p { match { y = SILU(x) }\n where { ne(x, 0) == 12345\n nrows(x) == 777 }\n"
                   " rewrite S(x) kernel elementwise }\n")
    assert main(["test", str(bad), "--examples", "3"]) == 1
