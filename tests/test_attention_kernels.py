"""SOFT_MAX, ROPE and MUL_MAT kernels (families soft_max, rope, mul_mat) against the numpy interpreter.

WGSL kernels run on the wgpu adapter (lavapipe here); CUDA kernels are compiled with nvcc and run
only where CuPy finds a device; MSL kernels pass the shim syntax check. Outputs are poisoned with NaN
before each run so unwritten elements fail. Tolerance: normalized MSE ``sum((out-ref)^2)/sum(ref^2)``
<= 1e-7 for f32 results (ggml's test-backend-ops bound), <= 1e-6 for f16 results (one f16 rounding of
the output is ~8e-8 NMSE; the kernel and the interpreter may round the other way).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusec.codegen import emit
from fusec.codegen.families.mul_mat import emit_mul_mat
from fusec.codegen.families.rope import emit_rope
from fusec.codegen.families.soft_max import emit_soft_max
from fusec.errors import CodegenError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from tests.gpu import compile_check_tests, requires_cuda, requires_wgpu

F32_NMSE = 1e-7
F16_NMSE = 1e-6


def nmse(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    return float(np.sum((out - ref) ** 2) / max(np.sum(ref**2), 1e-300))


def run(node, graph, values: dict[str, np.ndarray], backend: str = "wgsl") -> tuple[np.ndarray, np.ndarray]:
    """Emit ``node`` for ``backend``, run it on the roots of ``values`` (output poisoned with NaN) and
    return (kernel output, interpreter reference), both flat in the node's memory order."""
    k = emit(node, backend)
    by_root = {t.name: t for t in graph.leaves}
    arrays = {}
    for b in k.bindings:
        if b.write:
            arrays[b.name] = np.full(b.tensor.root.span_bytes // b.dtype.size, np.nan, dtype=b.dtype.np)
        else:
            root = b.tensor.root
            arrays[b.name] = np.asarray(values[by_root[root.name].name], dtype=b.dtype.np).reshape(-1)
    if backend == "wgsl":
        from fusec.backends import wgpu_runtime as rt
    else:
        from fusec.backends import cuda_runtime as rt
    out = rt.run_kernel(k, arrays)["dst"]
    ref = interpret(graph, values)[node.name].reshape(-1)
    return out, ref


# ---------------------------------------------------------------------------------------------
# SOFT_MAX


def soft_max_case(ne, mask_dtype, mask_rows, mask_b, scale, max_bias, seed, neg_inf_frac, masked_rows):
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    x = b.input("x", "f32", ne)
    values = {"x": rng.standard_normal(x.nelements).astype(np.float32) * 3}
    mask = None
    if mask_dtype is not None:
        mask = b.input("mask", mask_dtype, (ne[0], ne[1] + mask_rows, *mask_b))
        m = rng.standard_normal(mask.nelements).astype(np.float32)
        m[rng.random(m.size) < neg_inf_frac] = -np.inf
        m = m.reshape(mask.ne[::-1])
        m[..., :masked_rows, :] = -np.inf  # fully masked rows: NaN, as ggml-cpu gives
        values["mask"] = m.astype(mask.dtype.np).reshape(-1)
    y = b.soft_max_ext(x, mask, scale=scale, max_bias=max_bias, name="y")
    return y, b.build([y]), values


@requires_wgpu
@given(ne0=st.integers(1, 1500), ne1=st.integers(1, 4), ne2=st.sampled_from([1, 2, 3, 4, 6]), ne3=st.integers(1, 2),
       mask_dtype=st.sampled_from([None, "f32", "f16"]), mask_rows=st.integers(0, 2),
       scale=st.floats(0.05, 2.0), max_bias=st.sampled_from([0.0, 0.0, 8.0]), seed=st.integers(0, 2**31),
       neg_inf_frac=st.sampled_from([0.0, 0.3]), masked_rows=st.integers(0, 1))
def test_soft_max_wgsl_matches_interpreter(ne0, ne1, ne2, ne3, mask_dtype, mask_rows, scale, max_bias, seed,
                                           neg_inf_frac, masked_rows):
    mask_b = (1 if ne2 == 1 else ne2 // 2 if ne2 % 2 == 0 else 1, 1)
    y, g, values = soft_max_case((ne0, ne1, ne2, ne3), mask_dtype, mask_rows, mask_b, scale, max_bias, seed,
                                 neg_inf_frac, masked_rows)
    out, ref = run(y, g, values)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan), "NaN (fully masked) rows differ from the interpreter's"
    assert nmse(out[~nan], ref[~nan]) <= F32_NMSE


@requires_wgpu
def test_soft_max_wgsl_long_row():
    y, g, values = soft_max_case((17003, 2, 1, 1), "f16", 0, (1, 1), 0.125, 0.0, 7, 0.1, 0)
    out, ref = run(y, g, values)
    assert nmse(out, ref) <= F32_NMSE


@requires_wgpu
def test_soft_max_wgsl_fully_masked_row_is_nan():
    y, g, values = soft_max_case((40, 3, 2, 1), "f32", 0, (2, 1), 1.0, 0.0, 3, 0.0, 1)
    out, _ = run(y, g, values)
    rows = out.reshape(2, 3, 40)
    assert np.isnan(rows[:, 0]).all() and np.isfinite(rows[:, 1:]).all()


@requires_wgpu
def test_soft_max_wgsl_strided_input():
    rng = np.random.default_rng(1)
    b = GraphBuilder()
    x = b.input("x", "f32", (6, 50, 4))
    xt = b.permute(x, 1, 0, 2, 3)  # ne = [50, 6, 4], rows strided by 4 bytes
    y = b.soft_max_ext(xt, None, scale=0.7, name="y")
    g = b.build([y])
    out, ref = run(y, g, {"x": rng.standard_normal(x.nelements).astype(np.float32)})
    assert nmse(out, ref) <= F32_NMSE


# ---------------------------------------------------------------------------------------------
# ROPE


def rope_case(mode, dtype, head_dim, n_dims, n_head, n_tok, ff, strided, max_pos, yarn, seed):
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    if strided:  # rope on a view of a fused QKV row: head_dim of a wider row, offset by 2 elements
        qkv = b.input("x", dtype, (head_dim * n_head + 6, n_tok))
        es = qkv.dtype.size
        x = b.view(qkv, (head_dim, n_head, n_tok), (es, head_dim * es, qkv.nb[1]), offset=2 * es)
        root = qkv
    else:
        x = root = b.input("x", dtype, (head_dim, n_head, n_tok))
    pos = b.input("pos", "i32", (n_tok,))
    f = b.input("ff", "f32", (n_dims // 2,)) if ff else None
    kw = dict(n_ctx_orig=4096, ext_factor=1.0, freq_scale=0.25, attn_factor=0.9) if yarn else {}
    y = b.rope(x, pos, n_dims, mode, freq_factors=f, freq_base=500000.0 if yarn else 10000.0, name="y", **kw)
    values = {"x": rng.standard_normal(root.nelements).astype(root.dtype.np),
              "pos": rng.integers(0, max_pos, n_tok).astype(np.int32)}
    if ff:
        values["ff"] = rng.uniform(1.0, 8.0, n_dims // 2).astype(np.float32)
    return y, b.build([y]), values


rope_shapes = st.tuples(st.sampled_from([2, 6, 32, 64, 80, 128]), st.integers(1, 4)).flatmap(
    lambda hd: st.tuples(st.just(hd[0]), st.integers(1, hd[0] // 2).map(lambda h: 2 * h), st.just(hd[1])))


@requires_wgpu
@given(mode=st.sampled_from([0, 2]), dtype=st.sampled_from(["f32", "f16"]), shape=rope_shapes,
       n_tok=st.integers(1, 5), ff=st.booleans(), strided=st.booleans(), yarn=st.booleans(),
       seed=st.integers(0, 2**31))
def test_rope_wgsl_matches_interpreter(mode, dtype, shape, n_tok, ff, strided, yarn, seed):
    head_dim, n_dims, n_head = shape
    y, g, values = rope_case(mode, dtype, head_dim, n_dims, n_head, n_tok, ff, strided, 4096, yarn, seed)
    out, ref = run(y, g, values)
    assert nmse(out, ref) <= (F32_NMSE if dtype == "f32" else F16_NMSE)


@requires_wgpu
@given(mode=st.sampled_from([0, 2]), seed=st.integers(0, 2**31))
@settings(max_examples=5)
def test_rope_wgsl_large_positions(mode, seed):
    # Angles reach 1e5 rad: f32 holds them to one ulp (2^-23 relative, ~0.01 rad at 1e5), so the
    # kernel's f32 angle differs from the interpreter's float64 one by about that much. Bound: the NMSE
    # of a one-ulp error on the largest angle, (max_pos * 2^-23)^2 (~1.4e-4; measured ~1e-7).
    max_pos = 100_000
    y, g, values = rope_case(mode, "f32", 128, 128, 4, 6, False, True, max_pos, False, seed)
    out, ref = run(y, g, values)
    assert nmse(out, ref) <= max(F32_NMSE, (max_pos * 2.0**-23) ** 2)


# ---------------------------------------------------------------------------------------------
# MUL_MAT


def mul_mat_case(K, M, N, a2, r2, b3, a_dtype, a_transposed, b_permuted, seed):
    """a ne=[K, M, a2, 1] (optionally a transposed view, as V of the KV cache), b ne=[K, N, a2*r2, b3]
    (optionally a permuted view, as Q in attention)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    if a_transposed:
        a_root = b.input("a", a_dtype, (M, K, a2))
        a = b.transpose(a_root)
    else:
        a = a_root = b.input("a", a_dtype, (K, M, a2))
    if b_permuted:
        b_root = b.input("b", "f32", (K, a2 * r2, N, b3))
        bb = b.permute(b_root, 0, 2, 1, 3)
    else:
        bb = b_root = b.input("b", "f32", (K, N, a2 * r2, b3))
    y = b.mul_mat(a, bb, name="y")
    values = {"a": rng.standard_normal(a_root.nelements).astype(a_root.dtype.np),
              "b": rng.standard_normal(b_root.nelements).astype(np.float32)}
    return y, b.build([y]), values


@requires_wgpu
@given(K=st.one_of(st.integers(1, 80), st.integers(1000, 4096)), M=st.integers(1, 90),
       N=st.one_of(st.just(1), st.integers(1, 70)), a2=st.integers(1, 2), r2=st.integers(1, 3), b3=st.integers(1, 2),
       a_dtype=st.sampled_from(["f32", "f16"]), a_transposed=st.booleans(), b_permuted=st.booleans(),
       seed=st.integers(0, 2**31))
def test_mul_mat_wgsl_matches_interpreter(K, M, N, a2, r2, b3, a_dtype, a_transposed, b_permuted, seed):
    if K > 1000:  # keep lavapipe time bounded: long K only with small M x N
        M, N = min(M, 40), min(N, 8)
    y, g, values = mul_mat_case(K, M, N, a2, r2, b3, a_dtype, a_transposed, b_permuted, seed)
    out, ref = run(y, g, values)
    # f32 accumulation over K: ~K * 2^-48 NMSE (~1e-11 at K = 4096), well inside the f32 bound
    assert nmse(out, ref) <= F32_NMSE


@requires_wgpu
def test_mul_mat_vec4_variant_matches_interpreter():
    y, g, values = mul_mat_case(4096, 37, 1, 2, 4, 1, "f16", False, True, 5)
    assert emit(y, "wgsl").entry == "mul_mat_vec_f16_f32_v4"
    out, ref = run(y, g, values)
    assert nmse(out, ref) <= F32_NMSE


def test_mul_mat_variant_follows_n():
    gemv, *_ = mul_mat_case(64, 8, 1, 1, 1, 1, "f32", True, False, 0)
    tiled, *_ = mul_mat_case(64, 8, 2, 1, 1, 1, "f32", True, False, 0)
    assert emit(gemv, "wgsl").meta["variant"] == "vec"
    assert emit(tiled, "wgsl").meta["variant"] == "tile"


# ---------------------------------------------------------------------------------------------
# every variant compiles on every backend


def all_variants() -> list:
    nodes = []
    for mask in (None, "f32", "f16"):
        nodes.append(soft_max_case((300, 2, 2, 1), mask, 0, (1, 1), 1.0, 8.0, 0, 0.0, 0)[0])
        nodes.append(soft_max_case((3000, 2, 2, 1), mask, 0, (1, 1), 1.0, 0.0, 0, 0.0, 0)[0])
    for mode in (0, 2):
        for dtype in ("f32", "f16"):
            for ff in (False, True):
                nodes.append(rope_case(mode, dtype, 64, 32, 2, 2, ff, True, 100, True, 0)[0])
    for a_dtype in ("f32", "f16"):
        nodes.append(mul_mat_case(64, 8, 5, 1, 2, 1, a_dtype, False, False, 0)[0])  # tiled
        nodes.append(mul_mat_case(64, 8, 1, 1, 2, 1, a_dtype, False, False, 0)[0])  # vec, v4
        nodes.append(mul_mat_case(63, 8, 1, 1, 2, 1, a_dtype, True, False, 0)[0])  # vec, scalar
    return nodes


def _variant_kernels(backend: str):
    return [emit(n, backend) for n in all_variants()]


def test_variants_have_distinct_cuda_entries():
    kernels = _variant_kernels("cuda")
    assert len({k.entry for k in kernels}) == 20


(test_all_variants_compile_with_nvcc, test_all_variants_pass_msl_shim_check,
 test_all_variants_compile_with_naga) = compile_check_tests(_variant_kernels)


@pytest.mark.parametrize("fn", [emit_soft_max, emit_rope, emit_mul_mat])
def test_family_rejects_other_ops(fn):
    b = GraphBuilder()
    x = b.input("x", "f32", (4, 4))
    with pytest.raises(CodegenError, match="renders"):
        fn(b.silu(x, name="s"), "wgsl")


# ---------------------------------------------------------------------------------------------
# CUDA execution (skipped without CuPy and a device)


@requires_cuda
@pytest.mark.parametrize("mask", [None, "f16"])
def test_soft_max_cuda_matches_interpreter(mask):
    y, g, values = soft_max_case((2000, 3, 4, 1), mask, 1, (2, 1), 0.5, 8.0, 11, 0.2, 1)
    out, ref = run(y, g, values, "cuda")
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    assert nmse(out[~nan], ref[~nan]) <= F32_NMSE


@requires_cuda
@pytest.mark.parametrize("mode", [0, 2])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_rope_cuda_matches_interpreter(mode, dtype):
    y, g, values = rope_case(mode, dtype, 128, 96, 8, 7, True, True, 4096, True, 3)
    out, ref = run(y, g, values, "cuda")
    assert nmse(out, ref) <= (F32_NMSE if dtype == "f32" else F16_NMSE)


@requires_cuda
@pytest.mark.parametrize("N", [1, 77])
@pytest.mark.parametrize("a_dtype", ["f32", "f16"])
@pytest.mark.parametrize("a_transposed", [False, True])
def test_mul_mat_cuda_matches_interpreter(N, a_dtype, a_transposed):
    y, g, values = mul_mat_case(1024, 130, N, 2, 4, 1, a_dtype, a_transposed, True, 9)
    out, ref = run(y, g, values, "cuda")
    assert nmse(out, ref) <= F32_NMSE
