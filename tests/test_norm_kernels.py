"""norm_epilogue kernels (RMS_NORM / NORM + MUL/ADD chains) against the numpy interpreter.

The fused node comes from the shipped patterns (``fusec.rewrite.rewrite`` with
``fusec.dsl.default_patterns()``); the reference is the interpreter on the *unfused* graph.
Tolerance: normalized MSE ``sum((out-ref)^2)/sum(ref^2)`` <= 1e-7 for f32 (ggml test-backend-ops),
<= 1e-5 for f16 storage (f16 rounding of inputs/outputs; the fused kernel keeps f32 intermediates).
Outputs are filled with NaN first, so an element the kernel does not write fails the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fusec.backends import cuda_runtime, wgpu_runtime
from fusec.codegen import emit
from fusec.codegen.families.norm_epilogue import EpilogueStep, plan, tune
from fusec.dsl import default_patterns
from fusec.errors import CodegenError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.rewrite import rewrite
from fusec.rewrite.fuse import make_fused_node
from tests.gpu import kernel_arrays, requires_cuda, requires_wgpu

CHAINS = ("rms_norm", "norm", "rms_norm_mul", "rms_norm_mul_add", "norm_mul_add")
ROW_LENGTHS = (1, 2, 3, 511, 1024, 1025, 4096, 8192, 16896)
MAX_ELEMENTS = 2_000_000
BACKENDS = [pytest.param("wgsl", marks=requires_wgpu.mark), pytest.param("cuda", marks=requires_cuda.mark)]
RUN = {"wgsl": wgpu_runtime.run_kernel, "cuda": cuda_runtime.run_kernel}


def nmse(out: np.ndarray, ref: np.ndarray) -> float:
    """Normalized MSE over the finite reference entries; where the reference is NaN (e.g. NORM of a
    one-element row with eps = 0: 0/0 as in ggml) the kernel must give NaN too, else the error is inf."""
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    bad = ~np.isfinite(ref)
    if not np.array_equal(np.isnan(out[bad]), np.isnan(ref[bad])) or not np.all(np.isfinite(out[~bad])):
        return float("inf")
    out, ref = out[~bad], ref[~bad]
    den = np.sum(ref**2)
    return float(np.sum((out - ref) ** 2) / den) if den > 0 else float(np.sum((out - ref) ** 2))


def build(chain: str, dtype: str, ne, w_ne, eps: float, row_pad: int, offs: int):
    """Graph ``chain(x)`` with x a view (row stride ``ne0 + row_pad`` elements, ``offs`` elements in)
    of a padded input when ``row_pad`` > 0; returns (graph, output name)."""
    b = GraphBuilder()
    es = 2 if dtype == "f16" else 4
    if row_pad:
        root = b.input("x_mem", dtype, (ne[0] + row_pad, *ne[1:]))
        x = b.view(root, ne, nb=[es, (ne[0] + row_pad) * es], offset=offs * es, name="x")
    else:
        x = b.input("x", dtype, ne)
    y = b.rms_norm(x, eps, name="n") if chain.startswith("rms_norm") else b.norm(x, eps, name="n")
    if "mul" in chain:
        y = b.mul(y, b.weight("w", dtype, w_ne), name="m")
    if chain.endswith("add"):
        y = b.add(y, b.weight("b", dtype, w_ne), name="y")
    return b.build([y]), y.name


def run_node(node, graph, values, backend):
    """Run ``node``'s kernel with every binding's root memory taken from ``values`` (by leaf name)."""
    k = emit(node, backend)
    return k, RUN[backend](k, kernel_arrays(k, values))["dst"].reshape(node.ne[::-1])


@st.composite
def cases(draw):
    chain = draw(st.sampled_from(CHAINS))
    dtype = draw(st.sampled_from(("f32", "f16")))
    ne0 = draw(st.one_of(st.sampled_from(ROW_LENGTHS), st.integers(1, 17000)))
    ndim = draw(st.integers(1, 4))
    budget = max(1, MAX_ELEMENTS // (ne0 + 8))
    ne = [ne0]
    for _ in range(1, ndim):
        ne.append(draw(st.integers(1, max(1, min(300, budget)))))
        budget = max(1, budget // ne[-1])
    ne += [1] * (4 - len(ne))
    assume(ne[1] * ne[2] * ne[3] * (ne0 + 8) <= MAX_ELEMENTS)
    # weights: full row, with some of dims 1..3 kept and the rest broadcast (ggml_can_repeat)
    keep = [draw(st.booleans()) for _ in range(3)]
    w_ne = (ne0, *(n if k else 1 for n, k in zip(ne[1:], keep, strict=True)))
    eps = draw(st.sampled_from((0.0, 1e-6, 1e-4, 0.1, 1.0)))
    row_pad = draw(st.sampled_from((0, 0, 4, 3)))
    offs = draw(st.integers(0, row_pad))
    seed = draw(st.integers(0, 2**32 - 1))
    return chain, dtype, tuple(ne), w_ne, eps, row_pad, offs, seed


def check_case(case, backend):
    chain, dtype, ne, w_ne, eps, row_pad, offs, seed = case
    g, out = build(chain, dtype, ne, w_ne, eps, row_pad, offs)
    rng = np.random.default_rng(seed)
    # values bounded away from 0 in magnitude: no all-zero row (eps may be 0)
    values = {t.name: (rng.uniform(0.5, 2.0, t.ne[::-1]) * rng.choice([-1.0, 1.0], t.ne[::-1])).astype(t.dtype.np)
              for t in g.leaves}
    ref = interpret(g, values)[out]
    fused, _ = rewrite(g, default_patterns())
    node = fused.outputs[0]
    assert node.op == ("FUSED" if "mul" in chain else chain.upper())
    k, got = run_node(node, fused, values, backend)
    bound = 1e-7 if dtype == "f32" else 1e-5
    err = nmse(got, ref)
    assert err <= bound, f"{k.entry}: nmse {err:.3g} > {bound} for {case}"


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
def test_norm_epilogue_matches_interpreter(backend, case):
    check_case(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ne0", (1, 511, 1025, 16896, 17000))
@pytest.mark.parametrize("chain", ("rms_norm_mul_add", "norm_mul_add"))
def test_row_lengths_from_one_to_seventeen_thousand(backend, chain, ne0):
    check_case((chain, "f32", (ne0, 3, 2, 1), (ne0, 1, 2, 1), 1e-6, 0, 0, ne0), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_fold_into_a_two_dimensional_grid(backend):
    case = ("rms_norm_mul", "f32", (4, 140000, 1, 1), (4, 1, 1, 1), 1e-6, 0, 0, 7)
    g, _ = build(*case[:-1])
    k = emit(rewrite(g, default_patterns())[0].outputs[0], "wgsl")
    assert k.grid[1] > 1
    check_case(case, backend)


# -- planning -----------------------------------------------------------------------------------------------


def fused(ops_fn, srcs_ne, dtype="f32", name="fz"):
    """A FUSED norm_epilogue node whose decomposition is ``ops_fn(builder, placeholders)``."""
    b, sb = GraphBuilder(), GraphBuilder()
    phs = []
    for i, ne in enumerate(srcs_ne):
        ph = sb.leaf(f"in{i}", dtype, ne)
        ph.params["fused_input"] = i
        phs.append(ph)
    srcs = [b.input(f"s{i}", dtype, ne) for i, ne in enumerate(srcs_ne)]
    sub = sb.build([ops_fn(sb, phs)])
    return make_fused_node(b, sub, srcs, {"pattern": "test", "kernel": "norm_epilogue"}, name)


def test_plan_of_shipped_patterns_has_no_per_pattern_code():
    g, _ = build("norm_mul_add", "f32", (64, 2, 1, 1), (64, 1, 1, 1), 1e-3, 0, 0)
    p = plan(rewrite(g, default_patterns())[0].outputs[0])
    assert (p.norm, p.x, p.eps, p.steps) == ("NORM", 0, 1e-3, (EpilogueStep("MUL", 1), EpilogueStep("ADD", 2)))


def test_plan_accepts_running_value_as_src1_of_commutative_ops():
    node = fused(lambda b, ph: b.op("MUL", [ph[1], b.op("RMS_NORM", [ph[0]], {"eps": 0.5})]), [(8, 2), (8, 2)])
    assert plan(node).steps == (EpilogueStep("MUL", 1),)


@pytest.mark.parametrize("what,ops_fn,srcs_ne", [
    ("SUB with the norm as src1", lambda b, ph: b.op("SUB", [ph[1], b.op("NORM", [ph[0]])]), [(8, 2), (8, 2)]),
    ("a unary op", lambda b, ph: b.op("SILU", [b.op("RMS_NORM", [ph[0]])]), [(8, 2)]),
    ("no leading norm", lambda b, ph: b.op("MUL", [ph[0], ph[1]]), [(8, 2), (8, 2)]),
    ("operand that is not a fused input",
     lambda b, ph: b.op("MUL", [b.op("RMS_NORM", [ph[0]]), b.op("SILU", [ph[1]])]), [(8, 2), (8, 2)]),
    ("squaring the running value", lambda b, ph: b.op("MUL", [n := b.op("RMS_NORM", [ph[0]]), n]), [(8, 2)]),
    ("a result wider than the row", lambda b, ph: b.op("ADD", [ph[1], b.op("RMS_NORM", [ph[0]])]),
     [(8, 1), (8, 4)]),
])
def test_plan_rejects_what_the_template_cannot_render(what, ops_fn, srcs_ne):
    node = fused(ops_fn, srcs_ne)
    with pytest.raises(CodegenError, match="'fz'"):
        plan(node)


def test_vector_width_follows_row_alignment():
    aligned, _ = build("rms_norm_mul", "f32", (64, 2, 1, 1), (64, 1, 1, 1), 1e-6, 4, 4)
    shifted, _ = build("rms_norm_mul", "f32", (64, 2, 1, 1), (64, 1, 1, 1), 1e-6, 4, 1)
    nodes = [rewrite(g, default_patterns())[0].outputs[0] for g in (aligned, shifted)]
    assert [tune(n, plan(n), "cuda").vec for n in nodes] == [4, 1]


def test_source_does_not_depend_on_the_shape():
    ks = [emit(rewrite(build("rms_norm_mul_add", "f16", (4096, r, 1, 1), (4096, 1, 1, 1), 1e-6, 0, 0)[0],
                       default_patterns())[0].outputs[0], "cuda") for r in (1, 7)]
    # the tuning depends on the row count only through its class (few rows: more threads per row,
    # many rows: persistent; fusec.codegen.families.norm_epilogue.tune): rows 1 and 7 share one source
    assert ks[0].source == ks[1].source and ks[0].entry == "rms_norm_mul_add_f16_v8_t512_k1"
    assert ks[0].param("src0_ne1") == 1 and ks[1].param("src0_ne1") == 7
