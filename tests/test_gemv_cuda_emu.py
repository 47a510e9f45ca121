"""The CUDA gemv_epilogue kernels executed on the CPU (``tests/cuda_emu.py``: the generated source
compiled with g++ against an emulation header, each block's threads as OS threads, warp shuffles as
barriers), against the float32 interpreter of the unfused graph. No GPU needed; g++ (C++20) is.

Covers the streaming body (``Tuning(stream=True)``): persistent grids sized for a tiny SM count
(``sms=1``) so that every row slot walks several rows and the next row's loads are issued before the
current row's reduction; chunk tails (K not a multiple of ``unroll * tpr`` vectors); one warp per
row (4 rows per block, rows past M in the last block) and K split over 64-256 threads (shared-memory
reduce, double-buffered by row); the three load hints; f16/f32 weights and vector widths 8/4/1;
weight views with a row stride; broadcast epilogue operands. The classic body is checked too.
Tolerance as ``tests/test_gemv_kernels.py`` (NMSE <= 1e-7, f16 results 1e-5); outputs start as NaN.
"""

from __future__ import annotations

import pytest

from fusec.codegen.families import gemv_epilogue as ge
from fusec.codegen.kernel import KernelSequence
from fusec.dsl import default_patterns
from fusec.interp import interpret
from fusec.ir.dtypes import DType
from fusec.rewrite import rewrite
from tests import cuda_emu
from tests.test_gemv_kernels import BOUND, F16_OUT_BOUND, build, nmse, values_for

pytestmark = pytest.mark.skipif(not cuda_emu.available(), reason="needs g++ (C++20)")


def run_emu(kind, K, M, wdt, tuning=None, sms=1, seed=0, **kw):
    g = build(kind, K, M, wdt, **kw)
    node = rewrite(g, default_patterns())[0].by_name("y")
    assert node.op == "FUSED" and node.params["kernel"] == "gemv_epilogue"
    p = ge.plan(node)
    tu = tuning(ge.tune(node, p, "cuda")) if callable(tuning) else tuning
    k = ge.build(node, "cuda", tu, sms=sms)
    values = values_for(g, seed)
    ref = interpret(g, values)["y"].reshape(-1)
    out = cuda_emu.run_sequence(KernelSequence(node, [k]), values)["dst"]
    if node.dtype == DType.F16:
        out = out.view("<f2")
    err = nmse(out[: node.nelements], ref)
    bound = BOUND if node.dtype == DType.F32 else F16_OUT_BOUND
    assert err <= bound, f"{k.entry} grid {k.grid}: nmse {err:.3g} > {bound} ({kind} K={K} M={M} {wdt} {kw})"
    return k


def streamed(**fields):
    """A tuning built from tune()'s vector width with ``fields`` replaced."""
    def f(base):
        d = {**vars(base), "stream": True, "xrows": 0, "xvecs": 0, **fields}
        return ge.Tuning(**d)
    return f


@pytest.mark.parametrize("kind,K,M,wdt,tuning,kw", [
    # tune()'s choice for f32 weights; the same shape of grid (4 warps per block, 4 blocks -> 16 row
    # slots, rows walked by each) forced for f16 weights (tune() keeps the classic body there)
    ("swiglu", 256, 37, "f16", streamed(tpr=32, rows=4, unroll=4, persist=4, ld="na"), {}),
    ("add", 1024, 40, "f16", streamed(tpr=32, rows=4, unroll=8, persist=4, ld="na"), {"bdt": "f16", "b_ne": (4,)}),
    ("geglu", 260, 19, "f32", None, {}),                                    # vec 4, f32
    ("add", 7, 9, "f16", streamed(tpr=32, rows=4, unroll=4, persist=4, ld="na"), {}),   # vec 1
    ("add", 136, 11, "f16", streamed(tpr=32, rows=4, unroll=4, persist=4, ld="na"), {"w_pad": 8}),  # row stride K + 8
    # chunk tails, several chunks per row, rows past M inside a block
    ("swiglu", 328, 23, "f16", streamed(tpr=32, rows=4, unroll=2, persist=1, ld="cs"), {}),
    ("add", 200, 13, "f32", streamed(tpr=32, rows=2, unroll=4, persist=2, ld=""), {}),
    # split K: shared-memory reduce over 2-8 warps, double-buffered by row
    ("swiglu", 1024, 9, "f16", streamed(tpr=64, rows=1, unroll=2, persist=2), {}),
    ("add", 2056, 7, "f16", streamed(tpr=128, rows=1, unroll=4, persist=1), {"swap": True}),
    ("geglu", 520, 5, "f16", streamed(tpr=256, rows=1, unroll=1, persist=0), {}),  # not persistent
    ("add", 72, 6, "f32", streamed(tpr=256, rows=1, unroll=8, persist=3, ld="cs"), {}),  # most threads idle
])
def test_streaming_body_matches_interpreter(kind, K, M, wdt, tuning, kw):
    k = run_emu(kind, K, M, wdt, tuning, **kw)
    assert k.meta["tuning"].stream


@pytest.mark.parametrize("kind,K,M,wdt", [("swiglu", 264, 9, "f16"), ("add", 7, 5, "f32")])
def test_classic_body_matches_interpreter(kind, K, M, wdt):
    k = run_emu(kind, K, M, wdt, lambda b: ge.Tuning(b.vec, 32, 4, 2))
    assert not k.meta["tuning"].stream


def xreg(tpr, xrows, xvecs, unroll, ld="", spread=False):
    """The x-in-registers body with tune()'s vector width."""
    def f(base):
        return ge.Tuning(base.vec, tpr, 1, unroll, xrows=xrows, xvecs=xvecs, ld=ld, xspread=spread)
    return f


@pytest.mark.parametrize("kind,K,M,wdt,tuning,kw", [
    # one segment (x fits the registers), rows past M in the last block, several warps reduced
    ("add", 1024, 36, "f16", xreg(64, 8, 2, 2, "na"), {"bdt": "f16", "b_ne": (4,)}),
    ("swiglu", 512, 19, "f16", xreg(32, 4, 2, 4), {}),
    # several K segments (accumulators carried across them), K tail inside a segment
    ("add", 2056, 11, "f16", xreg(64, 4, 2, 1, "cs"), {"swap": True}),
    ("geglu", 260, 9, "f32", xreg(32, 2, 1, 2), {}),                       # vec 4
    ("add", 7, 5, "f16", xreg(32, 4, 1, 3), {}),                            # vec 1, unroll not dividing xrows
    ("add", 136, 13, "f16", xreg(128, 16, 1, 2, "na"), {"w_pad": 8}),       # row stride K + 8, idle threads
    # rows spread over the grid (block b: rows b, b + nb, ...): M not a multiple of xrows, the
    # epilogue operand broadcast (row % 4), several segments, two weights
    ("add", 1024, 36, "f16", xreg(64, 8, 2, 2, "na", True), {"bdt": "f16", "b_ne": (4,)}),
    ("swiglu", 2056, 11, "f16", xreg(64, 4, 2, 1, "", True), {}),
    ("add", 7, 3, "f32", xreg(32, 4, 1, 3, "", True), {}),                  # fewer rows than xrows
])
def test_x_in_registers_body_matches_interpreter(kind, K, M, wdt, tuning, kw):
    k = run_emu(kind, K, M, wdt, tuning, **kw)
    assert k.meta["tuning"].xrows and "_x" in k.entry
