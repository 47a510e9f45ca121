"""The ops of llama.cpp's Mixture-of-Experts FFN: ARGSORT (and ggml_argsort_top_k = ARGSORT + VIEW),
MUL_MAT_ID, CLAMP, and GET_ROWS on the 3-D probabilities.

Interpreter tests check hand-worked values. Kernel tests run every generated kernel on random inputs
and compare it with the interpreter: WGSL on lavapipe, CUDA with the ``cuda`` marker; ARGSORT and
CLAMP must be bit-exact, MUL_MAT_ID within normalized MSE 1e-7 (f32 accumulation order differs).
Outputs are poisoned first (NaN, or -7 for i32), so an unwritten element fails. Every variant is
also compiled with nvcc (sm_90), the MSL shim and naga.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fusec.codegen import emit
from fusec.codegen.check import check_wgsl
from fusec.codegen.families import mul_mat_id as mm
from fusec.codegen.families.argsort import MAX_COLS, padded_cols
from fusec.errors import BackendError, CodegenError, GraphError
from fusec.interp import InterpError, interpret
from fusec.ir import GraphBuilder
from fusec.ir.graph import Graph
from fusec.ir.serialize import dumps, loads
from fusec.ir.tensor import Tensor
from tests.gpu import compile_check_tests, requires_cuda, requires_wgpu
from tests.test_elementwise_kernels import _runtime, layouts, nmse, operand

BACKENDS = [pytest.param("wgsl", marks=requires_wgpu.mark), pytest.param("cuda", marks=requires_cuda.mark)]


def f32(*v):
    return np.array(v, dtype=np.float32)


def run1(node: Tensor, values: dict[str, np.ndarray]) -> np.ndarray:
    """Interpret the one-output graph of ``node``; the value in numpy order ``ne[::-1]``."""
    return interpret(Graph([node], [node]), values)[node.name]


def kernel_vs_interp(node: Tensor, values: dict[str, np.ndarray], backend: str, exact: bool) -> str:
    """Run ``node``'s kernel on ``values`` (flat leaf arrays) and compare with the interpreter."""
    k = emit(node, backend)
    arrays = {}
    for bnd in k.bindings:
        root = bnd.tensor.root
        n = root.span_bytes // root.dtype.size
        if root.is_leaf:
            arrays[bnd.name] = values[root.name].copy()
        elif root.dtype.is_float:
            arrays[bnd.name] = np.full(n, np.nan, dtype=root.dtype.np)
        else:
            arrays[bnd.name] = np.full(n, -7, dtype=root.dtype.np)
    ref = run1(node, {n: v.copy() for n, v in values.items()}).reshape(-1)
    got = _runtime(backend).run_kernel(k, arrays)["dst"]
    if exact:
        np.testing.assert_array_equal(got, ref, err_msg=k.entry)
    else:
        assert not np.isnan(got).any(), f"{k.entry}: unwritten (NaN) elements"
        assert nmse(got, ref) <= 1e-7, (k.entry, nmse(got, ref))
    return k.entry


# ---------------------------------------------------------------------------------------------
# ARGSORT: interpreter


def test_argsort_orders_each_row_ascending_and_descending():
    b = GraphBuilder()
    x = b.input("x", "f32", (4, 2))
    asc, desc = b.argsort(x, "asc", name="asc"), b.argsort(x, "desc", name="desc")
    vals = {"x": f32(0.5, -1.0, 3.0, 2.0,
                     7.0, 7.5, -2.0, 0.0)}
    out = interpret(b.build([asc, desc]), vals)
    assert out["asc"].dtype == np.int32 and out["asc"].shape == (1, 1, 2, 4)
    np.testing.assert_array_equal(out["asc"][0, 0], [[1, 0, 3, 2], [2, 3, 0, 1]])
    np.testing.assert_array_equal(out["desc"][0, 0], [[2, 3, 0, 1], [1, 0, 3, 2]])


def test_argsort_orders_ties_by_ascending_column_in_both_directions():
    b = GraphBuilder()
    x = b.input("x", "f32", (5,))
    asc, desc = b.argsort(x, "asc", name="asc"), b.argsort(x, 1, name="desc")
    out = interpret(b.build([asc, desc]), {"x": f32(2.0, 1.0, 2.0, 1.0, 2.0)})
    np.testing.assert_array_equal(out["asc"].reshape(-1), [1, 3, 0, 2, 4])
    np.testing.assert_array_equal(out["desc"].reshape(-1), [0, 2, 4, 1, 3])


def test_argsort_reads_a_strided_view():
    b = GraphBuilder()
    x = b.input("x", "f32", (3, 2))
    xt = b.transpose(x)  # ne = [2, 3]: row r = column r of x
    y = b.argsort(xt, "desc", name="y")
    out = run1(y, {"x": f32(1.0, 2.0, 3.0,
                            6.0, 5.0, 4.0)})
    np.testing.assert_array_equal(out[0, 0], [[1, 0], [1, 0], [1, 0]])


def test_argsort_top_k_is_a_descending_argsort_and_a_view_of_its_first_k_columns():
    b = GraphBuilder()
    x = b.input("x", "f32", (5, 2))
    top = b.argsort_top_k(x, 2, name="top", argsort_name="sorted")
    assert top.op == "VIEW" and top.src[0].op == "ARGSORT" and top.src[0].name == "sorted"
    assert top.src[0].params["order"] == 1
    assert top.ne == (2, 2, 1, 1) and top.nb == (4, 20, 40, 40) and top.dtype.value == "i32"
    out = run1(top, {"x": f32(0.1, 0.4, 0.2, 0.9, 0.0,
                              5.0, 1.0, 2.0, 3.0, 4.0)})
    np.testing.assert_array_equal(out[0, 0], [[3, 1], [0, 4]])


def test_argsort_refuses_non_f32_bad_order_and_k_out_of_range():
    b = GraphBuilder()
    with pytest.raises(GraphError, match="f32"):
        b.argsort(b.input("h", "f16", (4,)), name="bad")
    with pytest.raises(GraphError, match="order"):
        b.op("ARGSORT", [b.input("x", "f32", (4,))], {"order": 2}, name="bad_order")
    with pytest.raises(GraphError, match="k=5"):
        b.argsort_top_k(b.input("y", "f32", (4,)), 5, name="topk")


# ---------------------------------------------------------------------------------------------
# CLAMP: interpreter


def test_clamp_follows_ggml_min_then_max_with_infinite_bound():
    b = GraphBuilder()
    x = b.input("x", "f32", (6,))
    y = b.clamp(x, 6.103515625e-5, math.inf, name="y")
    z = b.clamp(x, -1.0, 1.0, name="z")
    vals = {"x": f32(0.0, -3.0, 2.5, 1e-6, math.inf, math.nan)}
    out = interpret(b.build([y, z]), vals)
    np.testing.assert_array_equal(out["y"].reshape(-1), f32(6.103515625e-5, 6.103515625e-5, 2.5, 6.103515625e-5,
                                                            math.inf, math.inf))
    # MAX(MIN(nan, 1), -1) = MAX(1, -1) = 1 with ggml's ternary macros
    np.testing.assert_array_equal(out["z"].reshape(-1), f32(0.0, -1.0, 1.0, 1e-6, 1.0, 1.0))


def test_clamp_keeps_f16():
    b = GraphBuilder()
    y = b.clamp(b.input("x", "f16", (3,)), 0.0, 2.0, name="y")
    out = run1(y, {"x": np.array([-1.0, 1.5, 9.0], np.float16)})
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out.reshape(-1), [0.0, 1.5, 2.0])


# ---------------------------------------------------------------------------------------------
# MUL_MAT_ID: interpreter


def _mmid_graph(k_, m, n_as, b1, n_used, n_tok, dt="f32"):
    b = GraphBuilder()
    a = b.weight("as", dt, (k_, m, n_as))
    x = b.input("b", "f32", (k_, b1, n_tok))
    ids = b.input("ids", "i32", (n_used, n_tok))
    return b, b.mul_mat_id(a, x, ids, name="y")


def test_mul_mat_id_picks_each_slots_expert_matrix():
    # 3 experts of 2x2 (ne = [K=2, M=2]): expert e = [[e+1, 0], [0, -(e+1)]] row by row
    as_ = np.zeros((3, 2, 2), np.float32)
    for e in range(3):
        as_[e] = [[e + 1, 0], [0, -(e + 1)]]
    _, y = _mmid_graph(2, 2, 3, 1, 2, 2)
    assert y.ne == (2, 2, 2, 1) and y.dtype.value == "f32"
    vals = {"as": as_, "b": f32(1.0, 2.0,   # token 0
                                  3.0, 4.0),  # token 1
            "ids": np.array([2, 0,    # token 0 uses experts 2, 0
                             1, 1], np.int32)}  # token 1 uses expert 1 twice
    out = run1(y, vals)[0]  # [T, E, M]
    np.testing.assert_array_equal(out[0], [[3.0, -6.0], [1.0, -2.0]])
    np.testing.assert_array_equal(out[1], [[6.0, -8.0], [6.0, -8.0]])


def test_mul_mat_id_slot_e_reads_b_row_e_mod_b1():
    as_ = np.stack([np.eye(2, dtype=np.float32), 2 * np.eye(2, dtype=np.float32)])  # [n_as=2, M=2, K=2]
    _, y = _mmid_graph(2, 2, 2, 2, 2, 1)
    vals = {"as": as_, "b": f32(1.0, 2.0, 10.0, 20.0), "ids": np.array([1, 0], np.int32)}
    out = run1(y, vals)[0, 0]  # [E, M]
    np.testing.assert_array_equal(out, [[2.0, 4.0], [10.0, 20.0]])


def test_mul_mat_id_widens_f16_experts():
    _, y = _mmid_graph(3, 1, 2, 1, 1, 1, dt="f16")
    vals = {"as": np.array([1, 1, 1, 0.5, 0.25, 0.125], np.float16), "b": f32(8, 8, 8),
            "ids": np.array([1], np.int32)}
    assert run1(y, vals).reshape(-1).tolist() == [7.0]


def test_mul_mat_id_out_of_range_expert_is_an_interp_error():
    _, y = _mmid_graph(2, 2, 3, 1, 1, 1)
    vals = {"as": np.zeros(12, np.float32), "b": f32(1, 1), "ids": np.array([3], np.int32)}
    with pytest.raises(InterpError, match="3 out of range"):
        run1(y, vals)


@pytest.mark.parametrize("shapes, msg", [
    (((4, 2, 3, 2), (4, 1, 2), (2, 2)), "as\\) must be 3-D"),
    (((4, 2, 3), (5, 1, 2), (2, 2)), "ne\\[0\\]=4 != src\\[1\\]"),
    (((4, 2, 3), (4, 1, 2), (2, 3)), "tokens"),
    (((4, 2, 3), (4, 3, 2), (2, 2)), "multiple"),
])
def test_mul_mat_id_shape_errors_name_the_node(shapes, msg):
    b = GraphBuilder()
    a = b.weight("as", "f32", shapes[0])
    x = b.input("b", "f32", shapes[1])
    ids = b.input("ids", "i32", shapes[2])
    with pytest.raises(GraphError, match=msg) as e:
        b.mul_mat_id(a, x, ids, name="experts_up")
    assert "experts_up" in str(e.value)


def test_mul_mat_id_refuses_float_ids():
    b = GraphBuilder()
    with pytest.raises(GraphError, match="i32"):
        b.mul_mat_id(b.weight("as", "f32", (4, 2, 3)), b.input("b", "f32", (4, 1, 2)),
                     b.input("ids", "f32", (2, 2)), name="y")


# ---------------------------------------------------------------------------------------------
# GET_ROWS on the 3-D probabilities (the router weights), and the whole router chain


def test_get_rows_gathers_router_weights_from_3d_probs():
    b = GraphBuilder()
    probs = b.input("probs", "f32", (4, 2))  # [n_expert, n_tokens]
    ids = b.input("ids", "i32", (2, 2))      # [n_used, n_tokens]
    w = b.get_rows(b.reshape(probs, (1, 4, 2)), ids, name="w")
    assert w.ne == (1, 2, 2, 1)
    out = run1(w, {"probs": f32(0.1, 0.2, 0.3, 0.4,
                                0.5, 0.6, 0.7, 0.8),
                   "ids": np.array([3, 0,
                                    1, 2], np.int32)})
    np.testing.assert_array_equal(out.reshape(2, 2), f32(0.4, 0.1, 0.6, 0.7).reshape(2, 2))


def test_router_chain_by_hand():
    """SOFT_MAX -> top-2 -> GET_ROWS -> SUM_ROWS -> CLAMP -> DIV on one token of 3 experts."""
    b = GraphBuilder()
    logits = b.input("logits", "f32", (3, 1))
    probs = b.soft_max(logits)
    top = b.argsort_top_k(probs, 2, name="top")
    w = b.get_rows(b.reshape(probs, (1, 3, 1)), top)
    w2 = b.reshape(w, (2, 1))
    s = b.clamp(b.sum_rows(w2), 6.103515625e-5, math.inf)
    norm = b.div(w2, s, name="norm")
    out = interpret(b.build([top, norm]), {"logits": f32(0.0, math.log(3.0), math.log(2.0))})
    np.testing.assert_array_equal(out["top"].reshape(-1), [1, 2])  # probs 1/6, 3/6, 2/6
    np.testing.assert_allclose(out["norm"].reshape(-1), [0.6, 0.4], rtol=1e-6)


def test_moe_ops_round_trip_through_json():
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 2))
    top = b.argsort_top_k(x, 3, name="top")
    c = b.clamp(b.sum_rows(x), 1e-3, math.inf, name="c")
    y = b.mul_mat_id(b.weight("as", "f16", (4, 5, 8)), b.input("v", "f32", (4, 1, 2)), top, name="y")
    g = loads(dumps(b.build([top, c, y])))
    ops = {t.name: t for t in g.nodes}
    assert ops["c"].params == {"min": 1e-3, "max": math.inf}
    assert ops["y"].op == "MUL_MAT_ID" and ops["y"].ne == (5, 3, 2, 1)
    assert ops["top"].src[0].op == "ARGSORT" and ops["top"].src[0].params == {"order": 1}
    json.loads(dumps(g))  # Python's json writes +inf as Infinity and reads it back


# ---------------------------------------------------------------------------------------------
# kernels: ARGSORT


ROW_LENS = st.one_of(st.integers(1, 40), st.sampled_from([64, 100, 128, 129, 255, 256, 512, 1000, 1024]))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), n=ROW_LENS, rows=st.integers(1, 5), order=st.sampled_from(["asc", "desc"]),
       ties=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_argsort_kernel_matches_interpreter(backend, data, n, rows, order, ties, seed):
    b = GraphBuilder()
    lay = data.draw(layouts())
    x = operand(b, "x", "f32", (n, rows, 1, 1), lay)
    y = b.argsort(x, order, name="y")
    rng = np.random.default_rng(seed)
    root = x.root
    v = rng.standard_normal(root.nelements).astype(np.float32)
    if ties:  # few distinct values: the tie order (ascending column) must match exactly
        v = rng.integers(-3, 4, size=root.nelements).astype(np.float32)
    kernel_vs_interp(y, {"x": v}, backend, exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argsort_kernel_handles_infinities_and_many_rows(backend):
    b = GraphBuilder()
    y = b.argsort(b.input("x", "f32", (128, 70000)), "desc", name="y")  # rows folded into a 2-D grid
    rng = np.random.default_rng(1)
    v = rng.standard_normal(128 * 70000).astype(np.float32)
    v[::97] = np.inf
    v[5::101] = -np.inf
    assert emit(y, "wgsl").grid[1] > 1
    kernel_vs_interp(y, {"x": v}, backend, exact=True)


def test_argsort_pads_to_a_power_of_two_and_refuses_long_rows():
    assert [padded_cols(n) for n in (1, 2, 3, 128, 129, 1024)] == [1, 2, 4, 128, 256, 1024]
    b = GraphBuilder()
    k = emit(b.argsort(b.input("x", "f32", (100, 3)), "desc", name="y"), "wgsl")
    assert k.entry == "argsort_f32_desc_n128" and k.meta["npad"] == 128 and k.grid == (3, 1, 1)
    big = b.argsort(b.input("z", "f32", (MAX_COLS + 1,)), name="router_sort")
    with pytest.raises(CodegenError, match="router_sort.*1025 columns"):
        emit(big, "cuda")


# ---------------------------------------------------------------------------------------------
# kernels: MUL_MAT_ID


@pytest.mark.parametrize("backend", BACKENDS)
@given(k_=st.sampled_from([1, 3, 4, 8, 63, 64, 260]), m=st.integers(1, 40), n_as=st.integers(1, 20),
       n_tok=st.integers(1, 4), dt=st.sampled_from(["f32", "f16"]), b_per_slot=st.booleans(),
       ids_view=st.booleans(), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_mul_mat_id_kernel_matches_interpreter(backend, k_, m, n_as, n_tok, dt, b_per_slot, ids_view, seed, data):
    n_used = data.draw(st.integers(1, n_as))
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    a = b.weight("as", dt, (k_, m, n_as))
    x = b.input("b", "f32", (k_, n_used if b_per_slot else 1, n_tok))
    ids_rows = [rng.permutation(n_as)[:n_used] for _ in range(n_tok)]
    if ids_view:  # the ids as llama.cpp has them: the first columns of a wider i32 tensor
        full = b.input("ids", "i32", (n_as, n_tok))
        ids = b.view(full, (n_used, n_tok), full.nb)
        flat = np.stack([np.concatenate([r, rng.permutation(n_as)[: n_as - n_used]]) for r in ids_rows])
    else:
        ids = b.input("ids", "i32", (n_used, n_tok))
        flat = np.stack(ids_rows)
    y = b.mul_mat_id(a, x, ids, name="y")
    vals = {"as": rng.standard_normal(k_ * m * n_as).astype(dt.replace("f", "float")),
            "b": rng.standard_normal(x.nelements).astype(np.float32), "ids": flat.astype(np.int32).reshape(-1)}
    kernel_vs_interp(y, vals, backend, exact=False)


def test_mul_mat_id_uses_4_vectors_when_aligned_and_refuses_too_many_pairs():
    b = GraphBuilder()
    a = b.weight("as", "f16", (64, 8, 16))
    y = b.mul_mat_id(a, b.input("x", "f32", (64, 1, 3)), b.input("i", "i32", (4, 3)), name="y")
    k = emit(y, "wgsl")
    assert k.entry == "mul_mat_id_vec_f16_f32_v4" and k.grid == (2, 1, 12)
    y2 = b.mul_mat_id(a, b.input("x2", "f32", (64, 1, 3)), b.input("i2", "i32", (4, 3)), name="y2")
    assert emit(y2, "cuda").entry.endswith("_v4")
    y3 = b.mul_mat_id(b.weight("as3", "f32", (63, 8, 16)), b.input("x3", "f32", (63, 1, 3)),
                      b.input("i3", "i32", (4, 3)), name="y3")
    assert not emit(y3, "msl").entry.endswith("_v4")
    huge = b.mul_mat_id(a, b.input("xh", "f32", (64, 1, 20000)), b.input("ih", "i32", (4, 20000)), name="ffn_up")
    with pytest.raises(CodegenError, match="ffn_up.*80000"):
        emit(huge, "wgsl")


@pytest.mark.parametrize("backend", [pytest.param("wgsl", marks=requires_wgpu.mark)])
@given(k_=st.sampled_from([4, 63, 64]), m=st.integers(1, 40), n_as=st.integers(2, 40), n_tok=st.integers(1, 3),
       dt=st.sampled_from(["f32", "f16"]), first=st.integers(0, 3), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_mul_mat_id_binds_large_expert_tensors_as_windows(backend, k_, m, n_as, n_tok, dt, first, seed, data):
    """With a 16 KiB binding limit (standing in for WebGPU's 128 MiB), the experts are bound as windows
    of whole experts; the experts may be a view starting at any expert of a larger tensor."""
    n_used = data.draw(st.integers(1, n_as))
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    full = b.weight("as", dt, (k_, m, n_as + first))
    a = b.view(full, (k_, m, n_as), full.nb, offset=first * full.nb[2]) if first else full
    x = b.input("b", "f32", (k_, 1, n_tok))
    ids = b.input("ids", "i32", (n_used, n_tok))
    y = b.mul_mat_id(a, x, ids, name="y")
    vals = {"as": rng.standard_normal(full.nelements).astype(dt.replace("f", "float")),
            "b": rng.standard_normal(x.nelements).astype(np.float32),
            "ids": np.stack([rng.permutation(n_as)[:n_used] for _ in range(n_tok)]).astype(np.int32).reshape(-1)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "WGSL_MAX_BINDING", 1 << 14)
        try:
            windows = mm.expert_windows(a, mm.WGSL_MAX_BINDING)
        except CodegenError:  # one expert over the limit or too many windows (refusal tested below)
            assume(False)
        entry = kernel_vs_interp(y, vals, backend, exact=False)
    assert (windows is None) == (full.nbytes <= 1 << 14) and ("_w" in entry) == (windows is not None)


def test_expert_windows_cover_every_expert_within_the_limit():
    b = GraphBuilder()
    a = b.weight("as", "f16", (2048, 768, 128))  # Qwen3-30B-A3B ffn_up_exps: 402 MB in f16
    windows = mm.expert_windows(a, mm.WGSL_MAX_BINDING)
    assert len(windows) == 4 and [w[0] for w in windows] == [0, 42, 84, 126]
    for i, (e0, off, size) in enumerate(windows):
        last = (windows[i + 1][0] if i + 1 < len(windows) else 128) - 1
        assert off % 256 == 0 and size <= mm.WGSL_MAX_BINDING
        assert off <= e0 * a.nb[2] and (last + 1) * a.nb[2] <= off + size
    assert mm.expert_windows(b.weight("small", "f16", (64, 64, 8)), mm.WGSL_MAX_BINDING) is None
    k = emit(b.mul_mat_id(a, b.input("x", "f32", (2048, 1, 1)), b.input("i", "i32", (8, 1)), name="ffn_up"), "wgsl")
    assert [bd.name for bd in k.bindings] == ["src0_0", "src0_1", "src0_2", "src0_3", "src1", "ids", "dst"]
    assert k.param("src0_per_window") == 42 and k.entry.endswith("_w4")
    check_wgsl(k)
    huge = b.weight("huge", "f32", (8192, 8192, 2))  # one expert of 256 MiB
    with pytest.raises(CodegenError, match="'huge'.*one expert matrix spans 268435456 bytes"):
        mm.expert_windows(huge, mm.WGSL_MAX_BINDING)
    many = b.weight("many", "f32", (1024, 1024, 600))  # 2.4 GB: 20 windows
    with pytest.raises(CodegenError, match="'many'.*at most 16"):
        mm.expert_windows(many, mm.WGSL_MAX_BINDING)
    # CUDA and MSL bind the whole tensor
    assert [bd.name for bd in emit(b.mul_mat_id(a, b.input("x2", "f32", (2048, 1, 1)),
                                                 b.input("i2", "i32", (8, 1))), "cuda").bindings][0] == "src0"


@requires_wgpu
def test_over_limit_binding_is_an_error_naming_kernel_node_and_tensor(monkeypatch):
    from fusec.backends import wgpu_runtime  # noqa: PLC0415

    monkeypatch.setattr(mm, "WGSL_MAX_BINDING", 1 << 40)  # no windows
    limit = wgpu_runtime.device().limits["max-storage-buffer-binding-size"]
    b = GraphBuilder()
    n_as = limit // (2 * 64 * 64) + 1  # f16 experts of 64x64: just over the device limit
    a = b.weight("experts_big", "f16", (64, 64, n_as))
    y = b.mul_mat_id(a, b.input("x", "f32", (64, 1, 1)), b.input("i", "i32", (1, 1)), name="moe_up")
    k = emit(y, "wgsl")
    arrays = {"src0": np.zeros(a.nelements, np.float16), "src1": np.ones(64, np.float32),
              "ids": np.zeros(1, np.int32), "dst": np.zeros(64, np.float32)}
    with pytest.raises(BackendError, match="moe_up.*'src0'.*experts_big.*binding limit"):
        wgpu_runtime.run_kernel(k, arrays)


# ---------------------------------------------------------------------------------------------
# kernels: CLAMP


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dt=st.sampled_from(["f32", "f16"]), n=st.integers(1, 300),
       lo=st.floats(-3, 1, width=32), hi=st.one_of(st.just(math.inf), st.floats(1, 3, width=32)),
       seed=st.integers(0, 2**32 - 1))
def test_clamp_kernel_matches_interpreter(backend, data, dt, n, lo, hi, seed):
    b = GraphBuilder()
    x = operand(b, "x", dt, (n, 3, 1, 1), data.draw(layouts()))
    y = b.clamp(x, lo, hi, name="y")
    rng = np.random.default_rng(seed)
    v = (4 * rng.standard_normal(x.root.nelements)).astype(x.dtype.np)
    v[::7] = np.nan
    kernel_vs_interp(y, {"x": v}, backend, exact=True)


# ---------------------------------------------------------------------------------------------
# every variant compiles


def _variants(backend: str):
    out, b = {}, GraphBuilder()
    for n in (1, 7, 128, 1000):
        for order in ("asc", "desc"):
            k = emit(b.argsort(b.input(f"x{n}{order}", "f32", (n, 2)), order), backend)
            out[k.source] = k
    for dt in ("f32", "f16"):
        for k_ in (64, 63):
            y = b.mul_mat_id(b.weight(f"a{dt}{k_}", dt, (k_, 8, 4)), b.input(f"b{dt}{k_}", "f32", (k_, 2, 3)),
                             b.input(f"i{dt}{k_}", "i32", (2, 3)))
            k = emit(y, backend)
            out[k.source] = k
        for n in (8, 7):
            k = emit(b.clamp(b.input(f"c{dt}{n}", dt, (n,)), 0.0, math.inf), backend)
            out[k.source] = k
    return list(out.values())


(test_every_cuda_variant_compiles_with_nvcc, test_every_msl_variant_passes_the_shim,
 test_every_wgsl_variant_compiles_with_naga) = compile_check_tests(_variants)
