"""gemv_epilogue kernels (MUL_MAT -> ADD, gate/up MUL_MAT pair -> SWIGLU/GEGLU) against the interpreter.

The fused node comes from the shipped patterns (``patterns/gemv.fuse``) through ``rewrite``; the
reference is ``fusec.interp.interpret`` of the *unfused* graph (float32, ggml semantics).
Tolerance: normalized MSE ``sum((out-ref)^2)/sum(ref^2)`` <= 1e-7 for f32 weights and also for f16
weights: the kernel widens each f16 weight exactly to f32 as the interpreter does, accumulates in
f32 and writes an f32 result, so only the summation order differs (measured <= 1e-12 on lavapipe).
An ``ADD(b, m)`` with an f16 ``b`` first has an f16 result (ggml takes src[0]'s type): bound 1e-5
there (one f16 rounding of the output, as for the norm kernels' f16 storage).
Outputs are poisoned with NaN first: an element the kernel does not write fails the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.backends import cuda_runtime, wgpu_runtime
from fusec.codegen import emit
from fusec.codegen.check import check_cuda, check_msl, check_wgsl
from fusec.codegen.families import gemv_epilogue as ge
from fusec.dsl import default_patterns
from fusec.errors import CodegenError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.ir.dtypes import DType
from fusec.rewrite import rewrite
from tests.gpu import kernel_arrays, requires_cuda, requires_wgpu

KINDS = ("add", "swiglu", "geglu")
BACKENDS = [pytest.param("wgsl", marks=requires_wgpu.mark), pytest.param("cuda", marks=requires_cuda.mark)]
RUN = {"wgsl": wgpu_runtime.run_kernel, "cuda": cuda_runtime.run_kernel}
BOUND = 1e-7
F16_OUT_BOUND = 1e-5  # ADD(b_f16, m) has an f16 result (ggml: src[0]'s type): one f16 rounding


def nmse(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    den = np.sum(ref**2)
    return float(np.sum((out - ref) ** 2) / den) if den > 0 else float(np.sum((out - ref) ** 2))


def build(kind: str, K: int, M: int, wdt: str, *, b_ne=None, bdt="f32", x_rows=1, swap=False,
          extra_user=False, w_pad=0):
    """The unfused graph: ``y = ADD(MUL_MAT(w, x), b)`` (``swap``: ``ADD(b, m)``) or ``y = GLU(MUL_MAT(wg,
    x), MUL_MAT(wu, x))``. ``w_pad`` > 0 makes the weights views with row stride ``K + w_pad``;
    ``extra_user`` adds a second output reading the first MUL_MAT (an escaping intermediate)."""
    b = GraphBuilder()
    x = b.input("x", "f32", (K, x_rows))

    def weight(name):
        if not w_pad:
            return b.weight(name, wdt, (K, M))
        es = 2 if wdt == "f16" else 4
        root = b.weight(name + "_mem", wdt, (K + w_pad, M))
        return b.view(root, (K, M), nb=[es, (K + w_pad) * es], offset=0, name=name)

    outs = []
    if kind == "add":
        m = b.mul_mat(weight("w"), x, name="m")
        bias = b.weight("b", bdt, b_ne or (M,))
        y = b.add(bias, m, name="y") if swap else b.add(m, bias, name="y")
    else:
        m = b.mul_mat(weight("wg"), x, name="g")
        u = b.mul_mat(weight("wu"), x, name="u")
        y = (b.swiglu if kind == "swiglu" else b.geglu)(m, u, name="y")
    outs.append(y)
    if extra_user:
        outs.append(b.scale(m, 2.0, name="other"))
    return b.build(outs)


def values_for(g, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: (rng.standard_normal(t.ne[::-1]) * (0.5 if t.name.startswith("w") else 1.0)).astype(t.dtype.np)
            for t in g.leaves}


def run_node(node, values, backend):
    k = emit(node, backend)
    return k, RUN[backend](k, kernel_arrays(k, values))["dst"][: node.nelements]


def check(kind, K, M, wdt, backend, seed=0, **kw):
    g = build(kind, K, M, wdt, **kw)
    fused, _ = rewrite(g, default_patterns())
    node = fused.by_name("y")
    assert node.op == "FUSED" and node.params["kernel"] == "gemv_epilogue", node.op
    values = values_for(g, seed)
    ref = interpret(g, values)["y"].reshape(-1)
    k, got = run_node(node, values, backend)
    err = nmse(got, ref)
    bound = BOUND if node.dtype == DType.F32 else F16_OUT_BOUND
    assert err <= bound, f"{k.entry}: nmse {err:.3g} > {bound} for {kind} K={K} M={M} {wdt} {kw}"
    return k


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(KINDS))
    wdt = draw(st.sampled_from(("f32", "f16")))
    K = draw(st.one_of(st.sampled_from((1, 2, 3, 7, 8, 64, 511, 2048, 4099)), st.integers(1, 5000)))
    M = draw(st.one_of(st.sampled_from((1, 2, 3, 33, 128, 257)), st.integers(1, 400)))
    kw = {}
    if kind == "add":
        swap = draw(st.booleans())  # ADD(b, m): only src[1] broadcasts, so b then has m's shape
        d = M if swap else draw(st.sampled_from([M, 1] + [v for v in (2, 3, 4) if M % v == 0]))
        kw = {"b_ne": (d,), "bdt": draw(st.sampled_from(("f32", "f16"))), "swap": swap}
    kw["w_pad"] = draw(st.sampled_from((0, 0, 1, 8)))
    return kind, K, M, wdt, draw(st.integers(0, 2**32 - 1)), kw


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
def test_gemv_epilogue_matches_interpreter(backend, case):
    kind, K, M, wdt, seed, kw = case
    check(kind, K, M, wdt, backend, seed, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wdt", ("f32", "f16"))
@pytest.mark.parametrize("K,M", [(1, 1), (7, 5), (2048, 64), (2056, 3)])
def test_fixed_sizes(backend, kind, wdt, K, M):
    check(kind, K, M, wdt, backend)


# -- fusion decisions -------------------------------------------------------------------------------------

def fused_ops(g):
    fused, report = rewrite(g, default_patterns())
    return [t.params.get("fused_op") for t in fused.nodes if t.op == "FUSED"], report


@pytest.mark.parametrize("kind,op", [("add", "MUL_MAT_ADD"), ("swiglu", "FFN_UP_GATE_SWIGLU"),
                                     ("geglu", "FFN_UP_GATE_GEGLU")])
def test_decode_shapes_fuse(kind, op):
    assert fused_ops(build(kind, 64, 16, "f16"))[0] == [op]


@pytest.mark.parametrize("kind", KINDS)
def test_more_than_one_token_does_not_fuse(kind):
    ops, report = fused_ops(build(kind, 64, 16, "f16", x_rows=2, b_ne=(16, 2) if kind == "add" else None))
    assert ops == []
    assert any("ne(x, 1) == 1" in f.message for f in report.not_fused)


@pytest.mark.parametrize("kind", KINDS)
def test_intermediate_used_elsewhere_does_not_fuse(kind):
    ops, report = fused_ops(build(kind, 64, 16, "f32", extra_user=True))
    assert ops == []
    assert any(f.kind == "escape" for f in report.not_fused)


@pytest.mark.parametrize("kind", ("swiglu", "geglu"))
def test_gate_and_up_weights_of_different_dtypes_do_not_fuse(kind):
    b = GraphBuilder()
    x = b.input("x", "f32", (64, 1))
    g = b.mul_mat(b.weight("wg", "f16", (64, 16)), x, name="g")
    u = b.mul_mat(b.weight("wu", "f32", (64, 16)), x, name="u")
    y = (b.swiglu if kind == "swiglu" else b.geglu)(g, u, name="y")
    ops, report = fused_ops(b.build([y]))
    assert ops == []
    assert any("dtype(wu) == dtype(wg)" in f.message for f in report.not_fused)


def test_bias_larger_than_the_product_does_not_fuse():
    b = GraphBuilder()
    m = b.mul_mat(b.weight("w", "f32", (64, 16)), b.input("x", "f32", (64, 1)), name="m")
    y = b.add(m, b.weight("b", "f32", (16,)), name="y")
    g = b.build([y])
    assert fused_ops(g)[0] == ["MUL_MAT_ADD"]
    b2 = GraphBuilder()
    m2 = b2.mul_mat(b2.weight("w", "f16", (64, 16)), b2.input("x", "f32", (64, 1)), name="m")
    y2 = b2.add(b2.input("b", "f32", (16, 2)), m2, name="y")  # larger than m: m broadcasts into it
    ops, report = fused_ops(b2.build([y2]))
    assert ops == []
    assert any("can_repeat(b, m)" in f.message for f in report.not_fused)


def test_llama_decode_graph_fuses_gate_up_and_residual_adds():
    from fusec.models.config import load_config
    from fusec.models.llama import build_llama_decode

    g = build_llama_decode(load_config("llama-3.2-1b"), 1, 8, 16, weight_dtype="f16")
    _, report = rewrite(g, default_patterns())
    st_ = report.patterns
    assert st_["ffn_up_gate_swiglu"].matches == 16
    assert st_["mul_mat_add"].matches == 32  # attn_out + inp_sa, ffn_out + ffn_inp in each layer
    roots = sorted(a.root for a in st_["mul_mat_add"].applied)
    assert roots == sorted([f"ffn_inp-{i}" for i in range(16)] + [f"l_out-{i}" for i in range(16)])


# -- planning ----------------------------------------------------------------------------------------------

def test_plan_orders_gate_before_up():
    node = rewrite(build("swiglu", 64, 8, "f32"), default_patterns())[0].by_name("y")
    p = ge.plan(node)
    assert [node.src[i].name for i in p.weights] == ["wg", "wu"] and p.glu == "SWIGLU"


def test_plan_refuses_a_node_it_cannot_render():
    node = rewrite(build("swiglu", 64, 8, "f32"), default_patterns())[0].by_name("y")
    node.params = {**node.params}
    sub = node.decomposition
    glu = sub.ops[-1]
    glu.src = [glu.src[1], glu.src[1]]  # SWIGLU(u, u): no longer gate/up of two products
    with pytest.raises(CodegenError, match="node 'y'.*gemv_epilogue cannot render it"):
        ge.plan(node)


def test_plan_refuses_non_fused_nodes():
    g = build("add", 8, 4, "f32")
    with pytest.raises(CodegenError, match="node 'm'"):
        ge.plan(g.by_name("m"))


def test_vector_width_follows_alignment():
    def vec(K, wdt, backend, **kw):
        node = rewrite(build("swiglu", K, 8, wdt, **kw), default_patterns())[0].by_name("y")
        return emit(node, backend).meta["tuning"].vec

    assert vec(2048, "f16", "cuda") == 8
    assert vec(2048, "f16", "wgsl") == 4
    assert vec(2048, "f32", "cuda") == 4
    assert vec(2052, "f16", "cuda") == 4
    assert vec(2048, "f16", "cuda", w_pad=1) == 1
    assert vec(7, "f32", "cuda") == 1


def llama_node(kind, K, M, wdt="f16"):
    return rewrite(build(kind, K, M, wdt), default_patterns())[0].by_name("y")


def test_cuda_tuning_for_the_llama_decode_shapes():
    """tune() on CUDA: 16-byte weight vectors and rows of K >= 2048 take the x-in-registers body
    (launched with PDL) with a tuning derived from K (tune_xreg_for); shorter rows keep the classic body
    (f16) or the streaming body on a persistent grid (f32); WGSL / MSL the classic body."""
    def tuned(kind, K, M, wdt="f16"):
        node = llama_node(kind, K, M, wdt)
        k = ge.build(node, "cuda")
        return k.meta["tuning"], k.grid, k.workgroup_size, k.meta["pdl"]

    x = ge.Tuning
    # FFN gate/up and the attention projections (K = 2048): 128 threads, 2 x vectors each, 4 rows per block
    for shape, grid in ((("swiglu", 2048, 8192), 2048), (("add", 2048, 2048), 512), (("add", 2048, 512), 128)):
        assert tuned(*shape) == (x(8, 128, 1, 2, xrows=4, xvecs=2, ld="na"), (grid, 1, 1), (128, 1, 1), True)
    # FFN down (K = 8192): 256 threads, 4 x vectors each, 2 rows per block
    assert tuned("add", 8192, 2048) == (x(8, 256, 1, 1, xrows=2, xvecs=4, ld="na"), (1024, 1, 1), (256, 1, 1), True)
    # f32 weights, K = 2048: 4-vectors of 16 bytes: x in registers too
    assert tuned("swiglu", 2048, 8192, "f32") == (x(4, 256, 1, 2, xrows=4, xvecs=2, ld="na"), (2048, 1, 1),
                                                  (256, 1, 1), True)
    # short rows: classic (f16) / streaming (f32), launched without PDL
    t16 = tuned("add", 1024, 512)
    assert not t16[0].xrows and not t16[0].stream and not t16[3]
    t32 = tuned("swiglu", 1024, 8192, "f32")
    assert t32[0].stream and t32[0].persist and not t32[3]
    assert not ge.tune(llama_node("swiglu", 2048, 8192), ge.plan(llama_node("swiglu", 2048, 8192)), "msl").xrows


def test_persistent_grid_splits_rows_evenly():
    node = llama_node("swiglu", 2048, 8192)
    tu = ge.Tuning(8, 32, 4, 4, True, 3, "na")
    assert ge.build(node, "cuda", tu).grid == (342, 1, 1)  # 2048 row groups over <= 396 blocks: 6 each
    assert ge.build(node, "cuda", tu, sms=1000).grid == (2048, 1, 1)  # more slots than row groups
    assert ge.build(node, "cuda", tu, sms=1).grid == (3, 1, 1)


@pytest.mark.parametrize("tu,backend,msg", [
    (ge.Tuning(8, 32, 4, 4, True, 4, "na"), "msl", "CUDA only"),
    (ge.Tuning(8, 256, 1, 2, xrows=8, xvecs=4), "wgsl", "CUDA only"),
    (ge.Tuning(8, 32, 2, 2, xrows=8, xvecs=4), "cuda", "needs stream=False, rows=1"),
    (ge.Tuning(8, 256, 1, 9, xrows=8, xvecs=4), "cuda", "unroll <= xrows"),
    (ge.Tuning(8, 256, 1, 2, xvecs=4), "cuda", "xvecs, xspread and xpf need xrows"),
    (ge.Tuning(8, 256, 1, 2, xspread=True), "cuda", "xvecs, xspread and xpf need xrows"),
    (ge.Tuning(8, 256, 1, 2, xpf=True), "cuda", "xvecs, xspread and xpf need xrows"),
    (ge.Tuning(4, 256, 1, 1, xrows=4, xvecs=2, xpf=True), "cuda", "needs 16-byte weight vectors"),
    (ge.Tuning(4, 32, 4, 4, False, 4, ""), "cuda", "need the streaming body"),
    (ge.Tuning(8, 32, 4, 4, True, 4, "xx"), "cuda", "ld must be one of"),
    (ge.Tuning(8, 16, 8, 4, True, 4, ""), "cuda", "streaming body needs 32 <= tpr"),
    (ge.Tuning(8, 48, 1, 4), "cuda", "power of two"),
    (ge.Tuning(8, 64, 2, 4), "cuda", "several rows per workgroup"),
])
def test_build_refuses_tunings_the_backend_cannot_render(tu, backend, msg):
    with pytest.raises(CodegenError, match=msg):
        ge.build(llama_node("swiglu", 64, 8), backend, tu)


def test_source_does_not_depend_on_the_shape():
    def src(K, M):
        node = rewrite(build("add", K, M, "f16"), default_patterns())[0].by_name("y")
        return emit(node, "cuda").source

    assert src(1024, 8192) == src(1536, 16384)  # the classic body: shapes are runtime parameters
    assert src(2048, 8192) == src(2048, 512)  # x in registers: the tuning follows K (tune_xreg_for), not M
    assert src(8192, 2048) == src(8192, 4096)


def all_variants(backend):
    """One kernel per distinct source over kinds, dtypes, vector widths and tunings."""
    out = {}
    for kind in KINDS:
        for wdt in ("f32", "f16"):
            for K, M in ((7, 5), (2052, 64), (2048, 16), (8192, 16)):
                for bdt in ("f32", "f16"):
                    if kind != "add" and bdt == "f16":
                        continue
                    node = rewrite(build(kind, K, M, wdt, bdt=bdt), default_patterns())[0].by_name("y")
                    p = ge.plan(node)
                    base = ge.tune(node, p, backend)
                    tunings = [base, ge.tune_classic(node, p, backend), ge.Tuning(base.vec, 32, 4, 2),
                               ge.Tuning(base.vec, 128, 1, 8)]
                    if backend == "cuda":
                        tunings += stream_tunings(base.vec, 2 if wdt == "f16" else 4)
                    for tu in tunings:
                        k = ge.build(node, backend, tu)
                        out[k.source] = k
    return list(out.values())


def stream_tunings(vec, wsize=2):
    """Streaming-body tunings (CUDA) besides tune()'s (persistent, ``na``, tpr 32 or split K): not
    persistent with ``cs``, split over 256 threads with plain loads; and x-in-registers tunings."""
    return [ge.Tuning(vec, 32, 4, 8, True, 0, "cs"), ge.Tuning(vec, 256, 1, 8, True, 2, ""),
            ge.Tuning(vec, 256, 1, 2, xrows=8, xvecs=4, ld="na"), ge.Tuning(vec, 128, 1, 4, xrows=16, xvecs=2),
            ge.Tuning(vec, 256, 1, 1, xrows=8, xvecs=4, ld="na", xspread=True)] + (
        [ge.Tuning(vec, 256, 1, 1, xrows=4, xvecs=4, ld="na", xpf=True)] if vec * wsize == 16 else [])


def test_every_variant_compiles_with_nvcc():
    pytest.importorskip("shutil").which("nvcc") or pytest.skip("nvcc not installed")
    check_cuda(all_variants("cuda"))


def test_every_variant_passes_the_msl_shim():
    pytest.importorskip("shutil").which("g++") or pytest.skip("g++ not installed")
    check_msl(all_variants("msl"))


@requires_wgpu
def test_every_variant_compiles_in_naga():
    check_wgsl(all_variants("wgsl"))


# -- programmatic dependent launch (CUDA) --------------------------------------------------------------------

def _gemv_chain(n: int, K: int):
    """``n`` GEMV + residual ADD nodes in a row, each reading the previous one's result as x (f16
    weights, K >= 4096: the x-in-registers body, launched with PDL on sm_90+)."""
    b = GraphBuilder()
    h = b.input("x", "f32", (K, 1))
    for i in range(n):
        h = b.add(b.mul_mat(b.weight(f"w{i}", "f16", (K, K)), h, name=f"m{i}"), b.weight(f"r{i}", "f32", (K,)),
                  name=f"y{i}")
    return b.build([h])


@requires_cuda
def test_pdl_chain_of_gemvs_reads_each_previous_result():
    """Each GEMV waits (griddepcontrol.wait) for the kernel before it, whose output is its x: a kernel
    reading x early would use the previous step's (NaN-poisoned or stale) values. Eager launches and the
    captured CUDA graph's replays (programmatic edges) both equal the interpreter."""
    from fusec.backends import cuda_runtime as rt
    from fusec.backends.cuda_backend import CudaBackend

    K, n = 4096, 6
    g = _gemv_chain(n, K)
    rng = np.random.default_rng(3)
    vals = {t.name: (rng.standard_normal(t.ne[::-1]) * (1.0 / np.sqrt(K) if t.name.startswith("w") else 0.1))
            .astype(t.dtype.np) for t in g.leaves}
    fused, _ = rewrite(g, default_patterns())
    be = CudaBackend(use_graphs=True)
    be.set_weights({k: v for k, v in vals.items() if k != "x"})
    exe = be.compile(fused)
    gemvs = [k for k in exe.kernels if k.family == "gemv_epilogue"]
    assert len(gemvs) == n and all(k.meta["pdl"] and k.meta["tuning"].xrows for k in gemvs)
    ref = interpret(g, vals)[g.outputs[0].name].reshape(-1)
    state: dict = {}
    for step in range(4):  # eager + capture, then replays
        x = (vals["x"] * (1.0 + step)).astype(np.float32)
        ref = interpret(g, {**vals, "x": x})[g.outputs[0].name].reshape(-1)
        out = exe.run({"x": x}, backend_state=state)[g.outputs[0].name].reshape(-1)
        assert nmse(out, ref) <= BOUND, (step, exe.last_timing["mode"], rt.pdl_supported())
    assert exe.last_timing["mode"] == "replay"
