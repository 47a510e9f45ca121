"""Tests of the numpy reference interpreter (``fusec.interp``).

Expected values are worked out by hand in each test (explicit arithmetic on small arrays, with
``math`` for transcendental functions), never by re-running the kernel's numpy expression.
Array layout reminder: a tensor with ggml ``ne = [n0, n1, n2, n3]`` has numpy shape
``(n3, n2, n1, n0)``; ``ne[0]`` is the row length.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fusec.errors import FusecError
from fusec.interp import InterpError, eval_node, evaluate, interpret
from fusec.interp.kernels import COMPUTE, WRITE
from fusec.ir import REGISTRY, VIEW_OPS, GraphBuilder
from fusec.rewrite.fuse import make_fused_node


def one(graph_outputs, values, name="y"):
    """Run the graph built from ``graph_outputs`` (builder, [outputs]) and return output ``name``."""
    b, outs = graph_outputs
    return interpret(b.build(outs), values)[name]


def f32(*v):
    return np.array(v, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# API, binding, memory


def test_every_registry_op_has_an_implementation():
    handled = set(COMPUTE) | set(WRITE) | set(VIEW_OPS) | {"NONE", "FUSED", "FUSED_OUTPUT"}  # the last two: engine
    assert set(REGISTRY) <= handled


def test_interpret_returns_4d_outputs_by_name_in_output_dtype():
    b = GraphBuilder()
    x = b.input("x", "f16", (3,))
    y = b.scale(x, 2.0, name="y")
    out = interpret(b.build([y]), {"x": [1.0, 2.0, 3.0]})
    assert set(out) == {"y"}
    assert out["y"].shape == (1, 1, 1, 3)
    assert out["y"].dtype == np.float16
    np.testing.assert_array_equal(out["y"].reshape(-1), [2.0, 4.0, 6.0])


def test_missing_leaf_raises_fusec_error_naming_it():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    w = b.weight("w_missing", "f32", (2,))
    y = b.add(x, w, name="y")
    with pytest.raises(FusecError, match="w_missing"):
        interpret(b.build([y]), {"x": f32(1, 2)})


def test_value_of_wrong_size_raises_interp_error():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 2))
    y = b.scale(x, 1.0, name="y")
    with pytest.raises(InterpError, match="3 elements"):
        interpret(b.build([y]), {"x": f32(1, 2, 3)})


def test_float_value_for_i32_leaf_is_refused():
    b = GraphBuilder()
    a = b.input("a", "f32", (2, 3))
    idx = b.input("idx", "i32", (1,))
    y = b.get_rows(a, idx, name="y")
    with pytest.raises(InterpError, match="i32"):
        interpret(b.build([y]), {"a": np.zeros(6, np.float32), "idx": np.array([0.5])})


def test_i32_value_outside_the_i32_range_is_refused():
    b = GraphBuilder()
    a = b.input("a", "f32", (2, 3))
    idx = b.input("idx", "i32", (1,))
    y = b.get_rows(a, idx, name="y")
    with pytest.raises(InterpError, match="i32 range"):
        interpret(b.build([y]), {"a": np.zeros(6, np.float32), "idx": np.array([2**32 + 1])})


def test_returned_output_does_not_alias_the_input_array():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    y = b.view(x, (2,), offset=4, name="y")
    xs = f32(1, 2, 3, 4)
    out = interpret(b.build([y]), {"x": xs})
    np.testing.assert_array_equal(out["y"].reshape(-1), [2, 3])
    out["y"][...] = 0
    np.testing.assert_array_equal(xs, [1, 2, 3, 4])


def test_evaluate_keys_every_node_by_tensor_object():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    h = b.scale(x, 3.0, name="h")
    y = b.add(h, x, name="y")
    vals = evaluate(b.build([y]), {"x": f32(1, 2)})
    assert set(vals) == {x, h, y}
    np.testing.assert_array_equal(vals[h].reshape(-1), [3, 6])
    np.testing.assert_array_equal(vals[y].reshape(-1), [4, 8])


def test_value_of_other_dtype_is_converted_to_leaf_dtype():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    y = b.scale(x, 0.5, name="y")
    out = one((b, [y]), {"x": np.array([3, 5], dtype=np.int64)})
    np.testing.assert_array_equal(out.reshape(-1), [1.5, 2.5])


# ---------------------------------------------------------------------------------------------
# binary ops and broadcasting (only src1 broadcasts, ggml_can_repeat)


def test_add_broadcasts_src1_over_rows():
    b = GraphBuilder()
    a = b.input("a", "f32", (3, 2))
    c = b.input("c", "f32", (3,))
    y = b.add(a, c, name="y")
    out = one((b, [y]), {"a": f32(1, 2, 3, 4, 5, 6), "c": f32(10, 20, 30)})
    np.testing.assert_array_equal(out[0, 0], [[11, 22, 33], [14, 25, 36]])


def test_mul_repeats_src1_tiles_within_a_row():
    # ggml_can_repeat: element i reads src1[i % ne10], not numpy size-1 broadcasting
    b = GraphBuilder()
    a = b.input("a", "f32", (4,))
    c = b.input("c", "f32", (2,))
    y = b.mul(a, c, name="y")
    out = one((b, [y]), {"a": f32(1, 2, 3, 4), "c": f32(10, 100)})
    np.testing.assert_array_equal(out.reshape(-1), [10, 200, 30, 400])


def test_sub_broadcasts_src1_over_dims_2_and_3():
    b = GraphBuilder()
    a = b.input("a", "f32", (2, 1, 2, 2))
    c = b.input("c", "f32", (2, 1, 1, 1))
    y = b.sub(a, c, name="y")
    # a[i3][i2] rows: (0,0)=[1,2] (0,1)=[3,4] (1,0)=[5,6] (1,1)=[7,8]; c=[1,10] subtracted from each
    out = one((b, [y]), {"a": f32(1, 2, 3, 4, 5, 6, 7, 8), "c": f32(1, 10)})
    np.testing.assert_array_equal(out.reshape(-1), [0, -8, 2, -6, 4, -4, 6, -2])


def test_div_with_src1_over_dim_2_only():
    b = GraphBuilder()
    a = b.input("a", "f32", (1, 1, 2, 2))
    c = b.input("c", "f32", (1, 1, 2, 1))
    y = b.div(a, c, name="y")
    # a (i3, i2) = (0,0)=8 (0,1)=9 (1,0)=10 (1,1)=12; c[i2] = [2, 3] repeated over i3
    out = one((b, [y]), {"a": f32(8, 9, 10, 12), "c": f32(2, 3)})
    np.testing.assert_array_equal(out.reshape(-1), [4, 3, 5, 4])


def test_f16_binary_result_is_rounded_to_f16_once():
    b = GraphBuilder()
    a = b.input("a", "f16", (1,))
    c = b.input("c", "f16", (1,))
    y = b.add(a, c, name="y")
    # 1 + 2^-12 = 1.000244...: below half the f16 spacing at 1 (2^-10 / 2 = 2^-11) -> 1.0
    out = one((b, [y]), {"a": np.float16([1.0]), "c": np.float16([2.0**-12])})
    assert out.dtype == np.float16
    assert out.reshape(-1)[0] == np.float16(1.0)


# ---------------------------------------------------------------------------------------------
# unary and GLU


def test_scale_multiplies_then_adds_bias():
    b = GraphBuilder()
    x = b.input("x", "f32", (3,))
    y = b.scale(x, 2.0, b=-1.0, name="y")
    out = one((b, [y]), {"x": f32(0, 1.5, -2)})
    np.testing.assert_array_equal(out.reshape(-1), [-1, 2, -5])


@pytest.mark.parametrize(("op", "expect"), [
    ("silu", lambda v: v / (1 + math.exp(-v))),
    ("sigmoid", lambda v: 1 / (1 + math.exp(-v))),
    ("tanh", math.tanh),
    ("gelu", lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * v * (1 + 0.044715 * v * v)))),
])
def test_unary_op_matches_its_scalar_formula(op, expect):
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    y = getattr(b, op)(x, name="y")
    xs = [-2.0, -0.5, 0.0, 1.0]
    out = one((b, [y]), {"x": f32(*xs)})
    np.testing.assert_allclose(out.reshape(-1), [expect(v) for v in xs], rtol=2e-6, atol=1e-7)


def test_silu_of_large_negative_is_zero_without_nan():
    b = GraphBuilder()
    x = b.input("x", "f32", (1,))
    y = b.silu(x, name="y")
    out = one((b, [y]), {"x": f32(-1000)})
    assert out.reshape(-1)[0] == 0.0


def test_swiglu_single_tensor_gates_with_first_half():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    y = b.swiglu(x, name="y")
    # gated half [1, -1], linear half [2, 3]
    out = one((b, [y]), {"x": f32(1, -1, 2, 3)})
    silu1 = 1 / (1 + math.exp(-1))
    silum1 = -1 / (1 + math.exp(1))
    np.testing.assert_allclose(out.reshape(-1), [silu1 * 2, silum1 * 3], rtol=1e-6)


def test_swiglu_split_form_multiplies_silu_of_a_by_b():
    b = GraphBuilder()
    g = b.input("g", "f32", (2,))
    u = b.input("u", "f32", (2,))
    y = b.swiglu(g, u, name="y")
    out = one((b, [y]), {"g": f32(0, 2), "u": f32(5, 4)})
    np.testing.assert_allclose(out.reshape(-1), [0.0, 2 / (1 + math.exp(-2)) * 4], rtol=1e-6)


def test_geglu_single_tensor_gates_with_first_half():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 2))
    y = b.geglu(x, name="y")
    out = one((b, [y]), {"x": f32(1, 7, 0, 9)})  # rows [1 | 7], [0 | 9]
    gelu1 = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))
    np.testing.assert_allclose(out.reshape(-1), [gelu1 * 7, 0.0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# row ops


def test_rms_norm_of_3_4_without_eps():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    y = b.rms_norm(x, 0.0, name="y")
    out = one((b, [y]), {"x": f32(3, 4)})
    rms = math.sqrt((9 + 16) / 2)
    np.testing.assert_allclose(out.reshape(-1), [3 / rms, 4 / rms], rtol=1e-6)


def test_rms_norm_eps_is_added_to_the_mean_square():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 2))
    y = b.rms_norm(x, 3.0, name="y")
    # row [1, 1]: 1/sqrt(1 + 3) = 0.5; row [2, 2]: 2/sqrt(4 + 3)
    out = one((b, [y]), {"x": f32(1, 1, 2, 2)})
    np.testing.assert_allclose(out.reshape(-1), [0.5, 0.5, 2 / math.sqrt(7), 2 / math.sqrt(7)], rtol=1e-6)


def test_norm_centres_and_divides_by_population_std():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    y = b.norm(x, 0.0, name="y")
    out = one((b, [y]), {"x": f32(1, 2, 3, 4)})
    # mean 2.5, var ((1.5^2 + 0.5^2) * 2) / 4 = 1.25
    s = math.sqrt(1.25)
    np.testing.assert_allclose(out.reshape(-1), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], rtol=1e-6)


def test_norm_eps():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    y = b.norm(x, 3.0, name="y")
    out = one((b, [y]), {"x": f32(-1, 1)})  # mean 0, var 1 -> x / sqrt(4)
    np.testing.assert_allclose(out.reshape(-1), [-0.5, 0.5], rtol=1e-6)


def test_soft_max_plain():
    b = GraphBuilder()
    x = b.input("x", "f32", (3,))
    y = b.soft_max(x, name="y")
    out = one((b, [y]), {"x": f32(0, math.log(2), math.log(3))})
    np.testing.assert_allclose(out.reshape(-1), [1 / 6, 2 / 6, 3 / 6], rtol=1e-6)


def test_soft_max_scale_multiplies_logits():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    y = b.soft_max_ext(x, scale=math.log(3), name="y")
    out = one((b, [y]), {"x": f32(0, 1)})  # logits [0, ln 3] -> [1/4, 3/4]
    np.testing.assert_allclose(out.reshape(-1), [0.25, 0.75], rtol=1e-6)


def test_soft_max_mask_uses_its_first_ne1_rows():
    b = GraphBuilder()
    x = b.input("x", "f32", (3, 2))
    m = b.input("m", "f32", (3, 4))  # 4 mask rows, only the first 2 apply
    y = b.soft_max_ext(x, m, name="y")
    inf = float("inf")
    mask = f32(0, -inf, 0, 0, 0, -inf, 9, 9, 9, 9, 9, 9)
    out = one((b, [y]), {"x": np.zeros(6, np.float32), "m": mask})
    np.testing.assert_allclose(out[0, 0], [[0.5, 0, 0.5], [0.5, 0.5, 0]], rtol=1e-6)


def test_soft_max_mask_broadcasts_over_dim_2():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 1, 2))
    m = b.input("m", "f16", (2, 1, 1))
    y = b.soft_max_ext(x, m, name="y")
    out = one((b, [y]), {"x": f32(0, 0, 0, math.log(3)), "m": np.float16([0, math.log(3)])})
    # head 0: logits [0, ln 3] -> [1/4, 3/4]; head 1: [0, 2 ln 3] -> [1/10, 9/10] (f16 ln 3 ~ 1.0986)
    l3 = float(np.float16(math.log(3)))
    p1 = math.exp(l3 + math.log(3)) / (1 + math.exp(l3 + math.log(3)))
    np.testing.assert_allclose(out.reshape(-1), [1 - math.exp(l3) / (1 + math.exp(l3)),
                                                 math.exp(l3) / (1 + math.exp(l3)), 1 - p1, p1], rtol=1e-5)


def test_soft_max_alibi_slopes_power_of_two_heads():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 1, 4))
    m = b.input("m", "f32", (2, 1))
    y = b.soft_max_ext(x, m, max_bias=8.0, name="y")
    out = one((b, [y]), {"x": np.zeros(8, np.float32), "m": f32(0, 1)})
    # n_head = 4 = n_head_log2, m0 = 2^(-8/4) = 1/4: slope_h = (1/4)^(h+1)
    for h in range(4):
        s = 0.25 ** (h + 1)
        np.testing.assert_allclose(out[0, h, 0], [1 / (1 + math.exp(s)), math.exp(s) / (1 + math.exp(s))],
                                   rtol=1e-6)


def test_soft_max_alibi_slopes_beyond_the_power_of_two_use_m1():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 1, 3))
    m = b.input("m", "f32", (2, 1))
    y = b.soft_max_ext(x, m, scale=0.5, max_bias=8.0, name="y")
    out = one((b, [y]), {"x": f32(2, 2, 2, 2, 2, 2), "m": f32(0, 1)})
    # n_head = 3 -> n_head_log2 = 2; m0 = 2^(-8/2) = 1/16, m1 = 2^(-4/2) = 1/4
    # slopes: h0 = 1/16, h1 = 1/256, h2 = m1^(2*(2-2)+1) = 1/4; logits [1, 1 + slope]
    for h, s in enumerate([1 / 16, 1 / 256, 1 / 4]):
        np.testing.assert_allclose(out[0, h, 0, 1], math.exp(s) / (1 + math.exp(s)), rtol=1e-6)


def test_soft_max_row_fully_masked_is_nan_as_ggml_cpu():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    m = b.input("m", "f32", (2,))
    y = b.soft_max_ext(x, m, name="y")
    out = one((b, [y]), {"x": f32(0, 0), "m": f32(-np.inf, -np.inf)})
    assert np.isnan(out).all()


# ---------------------------------------------------------------------------------------------
# ROPE


def _rope_graph(n_dims, mode, head=4, ff=False, **kw):
    b = GraphBuilder()
    x = b.input("x", "f32", (head, 1, 1))
    pos = b.input("pos", "i32", (1,))
    factors = b.input("ff", "f32", (n_dims // 2,)) if ff else None
    y = b.rope(x, pos, n_dims, mode, freq_factors=factors, name="y", **kw)
    return b, [y]


def test_rope_normal_rotates_adjacent_pairs():
    # position 1, n_dims 4, base 10000: theta_0 = 1, theta_1 = 10000^(-2/4) = 0.01
    out = one(_rope_graph(4, 0), {"x": f32(1, 2, 3, 4), "pos": [1]}).reshape(-1)
    c0, s0, c1, s1 = math.cos(1), math.sin(1), math.cos(0.01), math.sin(0.01)
    np.testing.assert_allclose(out, [1 * c0 - 2 * s0, 1 * s0 + 2 * c0, 3 * c1 - 4 * s1, 3 * s1 + 4 * c1], rtol=1e-6)


def test_rope_neox_rotates_halves():
    out = one(_rope_graph(4, 2), {"x": f32(1, 2, 3, 4), "pos": [1]}).reshape(-1)
    c0, s0, c1, s1 = math.cos(1), math.sin(1), math.cos(0.01), math.sin(0.01)
    # pairs (x0, x2) with theta_0 and (x1, x3) with theta_1
    np.testing.assert_allclose(out, [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 1 * s0 + 3 * c0, 2 * s1 + 4 * c1], rtol=1e-6)


def test_rope_dims_beyond_n_dims_pass_through():
    out = one(_rope_graph(2, 0), {"x": f32(1, 2, 3, 4), "pos": [1]}).reshape(-1)
    np.testing.assert_allclose(out, [math.cos(1) - 2 * math.sin(1), math.sin(1) + 2 * math.cos(1), 3, 4], rtol=1e-6)


def test_rope_position_zero_is_identity():
    out = one(_rope_graph(4, 0), {"x": f32(1, 2, 3, 4), "pos": [0]}).reshape(-1)
    np.testing.assert_array_equal(out, [1, 2, 3, 4])


def test_rope_freq_factors_divide_theta():
    # position 2: theta_0 = 2 / 1, theta_1 = 2 * 0.01 / 4 = 0.005
    out = one(_rope_graph(4, 0, ff=True), {"x": f32(0, 1, 0, 1), "pos": [2], "ff": f32(1, 4)}).reshape(-1)
    np.testing.assert_allclose(out, [-math.sin(2), math.cos(2), -math.sin(0.005), math.cos(0.005)], rtol=1e-6)


def test_rope_freq_scale_and_attn_factor_without_yarn():
    # ext_factor 0: theta = freq_scale * theta_extrap, magnitude * attn_factor
    out = one(_rope_graph(2, 0, freq_scale=0.5, attn_factor=2.0), {"x": f32(1, 0, 5, 6), "pos": [3]}).reshape(-1)
    np.testing.assert_allclose(out, [2 * math.cos(1.5), 2 * math.sin(1.5), 5, 6], rtol=1e-6)


def test_rope_yarn_ramp_mixes_interpolated_and_extrapolated_theta():
    n_dims, n_ctx, base, fs = 4, 4096, 10000.0, 0.25
    # ggml_rope_yarn_corr_dims by hand
    corr = [n_dims * math.log(n_ctx / (r * 2 * math.pi)) / (2 * math.log(base)) for r in (32.0, 1.0)]
    low, high = max(0.0, math.floor(corr[0])), min(n_dims - 1.0, math.ceil(corr[1]))
    assert (low, high) == (0.0, 2.0)
    # pair 0: ramp 1 -> theta = extrapolated = p; pair 1: ramp 1 - 1/2 = 0.5 -> mix 0.5
    p = 5.0
    th0 = p
    e1 = p * base ** (-2 / 4)
    th1 = fs * e1 * 0.5 + e1 * 0.5
    ms = 1.0 + 0.1 * math.log(1 / fs)
    out = one(_rope_graph(n_dims, 0, n_ctx_orig=n_ctx, freq_scale=fs, ext_factor=1.0),
              {"x": f32(1, 0, 1, 0), "pos": [5]}).reshape(-1)
    np.testing.assert_allclose(out, [ms * math.cos(th0), ms * math.sin(th0), ms * math.cos(th1), ms * math.sin(th1)],
                               rtol=1e-5)


def test_rope_uses_the_position_of_each_token():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 1, 2))  # two tokens of one head of 2 dims
    pos = b.input("pos", "i32", (2,))
    y = b.rope(x, pos, 2, 0, name="y")
    out = one((b, [y]), {"x": f32(1, 0, 1, 0), "pos": [0, 7]}).reshape(-1)
    np.testing.assert_allclose(out, [1, 0, math.cos(7), math.sin(7)], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# MUL_MAT


def test_mul_mat_is_b_times_a_transposed():
    b = GraphBuilder()
    a = b.weight("a", "f32", (2, 2))  # rows a0 = [1, 2], a1 = [3, 4]
    v = b.input("v", "f32", (2, 1))
    y = b.mul_mat(a, v, name="y")
    out = one((b, [y]), {"a": f32(1, 2, 3, 4), "v": f32(5, 6)})
    np.testing.assert_array_equal(out.reshape(-1), [1 * 5 + 2 * 6, 3 * 5 + 4 * 6])


def test_mul_mat_with_f16_weight_gives_f32():
    b = GraphBuilder()
    a = b.weight("a", "f16", (3, 1))
    v = b.input("v", "f32", (3, 2))
    y = b.mul_mat(a, v, name="y")
    out = one((b, [y]), {"a": np.float16([1, 0.5, -2]), "v": f32(1, 2, 3, 4, 5, 6)})
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.reshape(-1), [1 + 1 - 6, 4 + 2.5 - 12])


def test_transpose_feeding_mul_mat_reads_strided_memory():
    b = GraphBuilder()
    a = b.weight("a", "f32", (2, 2))  # memory rows [1, 2], [3, 4]
    at = b.transpose(a)  # rows [1, 3], [2, 4]
    v = b.input("v", "f32", (2, 1))
    y = b.mul_mat(at, v, name="y")
    out = one((b, [y]), {"a": f32(1, 2, 3, 4), "v": f32(5, 6)})
    np.testing.assert_array_equal(out.reshape(-1), [1 * 5 + 3 * 6, 2 * 5 + 4 * 6])


def test_mul_mat_gqa_broadcast_groups_consecutive_heads():
    b = GraphBuilder()
    k = b.input("k", "f32", (1, 1, 2))  # 2 kv heads: [10], [20]
    q = b.input("q", "f32", (1, 1, 4))  # 4 query heads: [1], [2], [3], [4]
    y = b.mul_mat(k, q, name="y")
    out = one((b, [y]), {"k": f32(10, 20), "q": f32(1, 2, 3, 4)})
    # heads 0,1 use kv head 0; heads 2,3 use kv head 1 (i02 = i12 / r2)
    np.testing.assert_array_equal(out.reshape(-1), [10, 20, 60, 80])


def test_mul_mat_broadcast_over_dim_3():
    b = GraphBuilder()
    a = b.input("a", "f32", (1, 1, 1, 1))
    v = b.input("v", "f32", (1, 1, 1, 3))
    y = b.mul_mat(a, v, name="y")
    out = one((b, [y]), {"a": f32(-2), "v": f32(1, 2, 3)})
    np.testing.assert_array_equal(out.reshape(-1), [-2, -4, -6])


# ---------------------------------------------------------------------------------------------
# GET_ROWS, SET_ROWS, CPY, CONT


def test_get_rows_gathers_and_widens_f16():
    b = GraphBuilder()
    a = b.weight("a", "f16", (2, 3))  # rows [1,2], [3,4], [5,6]
    idx = b.input("idx", "i32", (3,))
    y = b.get_rows(a, idx, name="y")
    out = one((b, [y]), {"a": np.float16([1, 2, 3, 4, 5, 6]), "idx": [2, 0, 2]})
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], [[5, 6], [1, 2], [5, 6]])


def test_get_rows_per_batch_indices():
    b = GraphBuilder()
    a = b.input("a", "f32", (1, 2, 2))  # batch 0 rows [1],[2]; batch 1 rows [3],[4]
    idx = b.input("idx", "i32", (1, 2))  # batch 0 -> row 1, batch 1 -> row 0
    y = b.get_rows(a, idx, name="y")
    out = one((b, [y]), {"a": f32(1, 2, 3, 4), "idx": [1, 0]})
    np.testing.assert_array_equal(out.reshape(-1), [2, 3])


def test_get_rows_out_of_range_index_raises():
    b = GraphBuilder()
    a = b.weight("a", "f32", (2, 3))
    idx = b.input("idx", "i32", (1,))
    y = b.get_rows(a, idx, name="y")
    with pytest.raises(InterpError, match="out of range"):
        interpret(b.build([y]), {"a": np.zeros(6, np.float32), "idx": [3]})


def _kv_graph():
    b = GraphBuilder()
    cache = b.input("cache", "f32", (2, 4))  # 4 cells of 2
    rows = b.input("rows", "f32", (2, 1))
    idx = b.input("idx", "i32", (1,))
    sr = b.set_rows(cache, rows, idx, name="sr")
    kv = b.view(sr, (2, 2), nb=(4, 8), offset=8, name="kv")  # cells 1 and 2
    return b.build([kv]), sr


def test_set_rows_writes_into_the_passed_cache_in_place():
    g, _ = _kv_graph()
    cache = np.zeros((4, 2), np.float32)
    out = interpret(g, {"cache": cache, "rows": f32(7, 8), "idx": [2]})
    np.testing.assert_array_equal(cache, [[0, 0], [0, 0], [7, 8], [0, 0]])
    np.testing.assert_array_equal(out["kv"][0, 0], [[0, 0], [7, 8]])


def test_set_rows_cache_persists_across_calls():
    g, _ = _kv_graph()
    cache = np.zeros((4, 2), np.float32)
    interpret(g, {"cache": cache, "rows": f32(7, 8), "idx": [2]})
    out = interpret(g, {"cache": cache, "rows": f32(5, 6), "idx": [1]})
    np.testing.assert_array_equal(out["kv"][0, 0], [[5, 6], [7, 8]])


def test_set_rows_into_f16_cache_rounds():
    b = GraphBuilder()
    cache = b.input("cache", "f16", (1, 2))
    rows = b.input("rows", "f32", (1, 1))
    idx = b.input("idx", "i32", (1,))
    sr = b.set_rows(cache, rows, idx, name="sr")
    mem = np.zeros((2, 1), np.float16)
    out = interpret(b.build([sr]), {"cache": mem, "rows": f32(0.1), "idx": [1]})
    assert mem[1, 0] == np.float16(0.1)
    assert out["sr"].dtype == np.float16
    np.testing.assert_array_equal(out["sr"].reshape(-1), np.float16([0, 0.1]))


def test_set_rows_indices_broadcast_over_dim_2():
    b = GraphBuilder()
    cache = b.input("cache", "f32", (1, 3, 2))  # 2 heads x 3 cells of 1
    rows = b.input("rows", "f32", (1, 1, 2))  # one row per head
    idx = b.input("idx", "i32", (1, 1))  # one index shared by both heads
    sr = b.set_rows(cache, rows, idx, name="sr")
    out = one((b, [sr]), {"cache": np.zeros(6, np.float32), "rows": f32(4, 9), "idx": [2]}, "sr")
    np.testing.assert_array_equal(out.reshape(-1), [0, 0, 4, 0, 0, 9])


def test_set_rows_through_a_view_of_the_cache():
    b = GraphBuilder()
    cache = b.input("cache", "f32", (2, 4))
    window = b.view(cache, (2, 2), nb=(4, 8), offset=16)  # cells 2 and 3
    rows = b.input("rows", "f32", (2, 1))
    idx = b.input("idx", "i32", (1,))
    sr = b.set_rows(window, rows, idx, name="sr")
    mem = np.zeros((4, 2), np.float32)
    out = interpret(b.build([sr]), {"cache": mem, "rows": f32(1, 2), "idx": [1]})
    np.testing.assert_array_equal(mem[3], [1, 2])
    np.testing.assert_array_equal(out["sr"][0, 0], [[0, 0], [1, 2]])


def test_evaluate_reports_cache_leaf_as_bound_before_the_write():
    g, sr = _kv_graph()
    cache_leaf = g.by_name("cache")
    cache = np.zeros((4, 2), np.float32)
    vals = evaluate(g, {"cache": cache, "rows": f32(7, 8), "idx": [0]})
    np.testing.assert_array_equal(vals[cache_leaf], np.zeros((1, 1, 4, 2)))
    np.testing.assert_array_equal(vals[sr][0, 0, 0], [7, 8])


def test_cpy_converts_into_destination_memory():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    dst = b.input("dst", "f16", (2,))
    y = b.cpy(x, dst, name="y")
    mem = np.zeros(2, np.float16)
    out = interpret(b.build([y]), {"x": f32(1.5, 1 / 3), "dst": mem})
    np.testing.assert_array_equal(mem, np.float16([1.5, 1 / 3]))
    assert out["y"].dtype == np.float16


def test_cpy_of_transposed_view_uses_flat_row_major_order():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 2))  # memory [1, 2, 3, 4]; transposed rows [1, 3], [2, 4]
    dst = b.input("dst", "f32", (4,))
    y = b.cpy(b.transpose(x), dst, name="y")
    out = one((b, [y]), {"x": f32(1, 2, 3, 4), "dst": np.zeros(4, np.float32)})
    np.testing.assert_array_equal(out.reshape(-1), [1, 3, 2, 4])


def test_permute_then_cont_materialises_the_permuted_order():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 3))  # rows [0, 1], [2, 3], [4, 5]
    y = b.cont(b.permute(x, 1, 0, 2, 3), name="y")  # ne = [3, 2]
    out = one((b, [y]), {"x": np.arange(6, dtype=np.float32)})
    np.testing.assert_array_equal(out[0, 0], [[0, 2, 4], [1, 3, 5]])


def test_permute_three_axes_moves_dim_i_to_axes_i():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 3, 4))
    p = b.permute(x, 2, 0, 1, 3)  # ne[2] = 2, ne[0] = 3, ne[1] = 4 -> ne = [3, 4, 2]
    y = b.cont(p, name="y")
    xs = np.arange(24, dtype=np.float32)  # x[i2][i1][i0] = 6*i2 + 2*i1 + i0
    out = one((b, [y]), {"x": xs})
    assert out.shape == (1, 2, 4, 3)
    # out[j2][j1][j0] = x[i0=j2, i1=j0, i2=j1] = 6*j1 + 2*j0 + j2
    assert out[0, 1, 3, 2] == 6 * 3 + 2 * 2 + 1
    assert out[0, 0, 2, 1] == 6 * 2 + 2 * 1 + 0


def test_cont_with_new_shape():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 2))
    y = b.cont(b.transpose(x), ne=(4,), name="y")
    out = one((b, [y]), {"x": f32(1, 2, 3, 4)})
    assert out.shape == (1, 1, 1, 4)
    np.testing.assert_array_equal(out.reshape(-1), [1, 3, 2, 4])


def test_view_with_offset_and_strides():
    b = GraphBuilder()
    x = b.input("x", "f32", (4, 3))  # x[i1][i0] = 4*i1 + i0
    v = b.view(x, (2, 2), nb=(8, 16), offset=4)  # element (i0, i1) at float (4 + 8*i0 + 16*i1)/4
    y = b.cont(v, name="y")
    out = one((b, [y]), {"x": np.arange(12, dtype=np.float32)})
    np.testing.assert_array_equal(out[0, 0], [[1, 3], [5, 7]])


def test_view_of_a_view_adds_offsets():
    b = GraphBuilder()
    x = b.input("x", "f32", (6,))
    v1 = b.view(x, (4,), offset=4)  # x[1:5]
    v2 = b.view(v1, (2,), offset=8)  # v1[2:4] = x[3:5]
    y = b.scale(v2, 1.0, name="y")
    out = one((b, [y]), {"x": np.arange(6, dtype=np.float32)})
    np.testing.assert_array_equal(out.reshape(-1), [3, 4])


def test_reshape_is_a_view_with_new_shape():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    y = b.reshape(x, (2, 2), name="y")
    out = one((b, [y]), {"x": f32(1, 2, 3, 4)})
    np.testing.assert_array_equal(out[0, 0], [[1, 2], [3, 4]])


# ---------------------------------------------------------------------------------------------
# FUSED


def _rms_mul_decomposition(n):
    sb = GraphBuilder()
    px = sb.leaf("px", "f32", (n, 2))
    pw = sb.leaf("pw", "f32", (n,))
    px.params["fused_input"] = 0
    pw.params["fused_input"] = 1
    return sb.build([sb.mul(sb.rms_norm(px, 0.0), pw)])


def test_fused_node_evaluates_its_decomposition():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 2))
    w = b.weight("w", "f32", (2,))
    y = make_fused_node(b, _rms_mul_decomposition(2), [x, w], {"pattern": "rms_norm_mul", "kernel": "row"}, "y")
    out = one((b, [y]), {"x": f32(3, 4, 1, 1), "w": f32(2, 10)})
    rms = math.sqrt(12.5)
    np.testing.assert_allclose(out[0, 0], [[2 * 3 / rms, 10 * 4 / rms], [2, 10]], rtol=1e-6)


def test_fused_node_equals_unfused_graph_exactly():
    xs, ws = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32), f32(*range(8))
    b = GraphBuilder()
    x, w = b.input("x", "f32", (8, 2)), b.weight("w", "f32", (8,))
    ref = one((b, [b.mul(b.rms_norm(x, 0.0), w, name="y")]), {"x": xs, "w": ws})
    b2 = GraphBuilder()
    x2, w2 = b2.input("x", "f32", (8, 2)), b2.weight("w", "f32", (8,))
    y2 = make_fused_node(b2, _rms_mul_decomposition(8), [x2, w2], {"pattern": "p", "kernel": "k"}, "y")
    np.testing.assert_array_equal(one((b2, [y2]), {"x": xs, "w": ws}), ref)


def test_nested_fused_node_and_non_contiguous_source():
    inner_b = GraphBuilder()
    p = inner_b.leaf("p", "f32", (2, 2))
    p.params["fused_input"] = 0
    inner = inner_b.build([inner_b.scale(p, 10.0)])
    outer_b = GraphBuilder()
    q = outer_b.leaf("q", "f32", (2, 2))
    q.params["fused_input"] = 0
    inner_node = make_fused_node(outer_b, inner, [q], {"pattern": "inner", "kernel": "k"}, "inner")
    outer = outer_b.build([outer_b.add(inner_node, q)])
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 2))
    y = make_fused_node(b, outer, [b.transpose(x)], {"pattern": "outer", "kernel": "k"}, "y")
    out = one((b, [y]), {"x": f32(1, 2, 3, 4)})  # transposed rows [1, 3], [2, 4]; 11 * each
    np.testing.assert_array_equal(out[0, 0], [[11, 33], [22, 44]])


# ---------------------------------------------------------------------------------------------
# eval_node


def test_eval_node_computes_one_op_from_source_values():
    b = GraphBuilder()
    a = b.weight("a", "f32", (2, 2))
    v = b.input("v", "f32", (2, 1))
    y = b.mul_mat(a, v)
    out = eval_node(y, [f32(1, 2, 3, 4), f32(5, 6)])
    assert out.shape == (1, 1, 1, 2)
    np.testing.assert_array_equal(out.reshape(-1), [17, 39])


def test_eval_node_lays_a_view_source_out_at_its_strides():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 2))
    t = b.transpose(x)
    y = b.cont(t)
    # the value of t is [[1, 3], [2, 4]] (rows); stored at t's strides it reads back the same
    out = eval_node(y, [np.array([[1, 3], [2, 4]], np.float32)])
    np.testing.assert_array_equal(out[0, 0], [[1, 3], [2, 4]])


def test_eval_node_view_with_offset():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    v = b.view(x, (2,), nb=(8,), offset=4)
    out = eval_node(v, [f32(10, 11, 12, 13)])
    np.testing.assert_array_equal(out.reshape(-1), [11, 13])


def test_eval_node_set_rows_returns_updated_destination():
    b = GraphBuilder()
    cache = b.input("cache", "f32", (1, 3))
    rows = b.input("rows", "f32", (1, 1))
    idx = b.input("idx", "i32", (1,))
    sr = b.set_rows(cache, rows, idx)
    dst = f32(1, 2, 3)
    out = eval_node(sr, [f32(9), np.array([0], np.int32), dst])
    np.testing.assert_array_equal(out.reshape(-1), [9, 2, 3])
    np.testing.assert_array_equal(dst, [1, 2, 3])  # source values are never written


def test_eval_node_wrong_number_of_sources_raises():
    b = GraphBuilder()
    x = b.input("x", "f32", (2,))
    y = b.add(x, x)
    with pytest.raises(InterpError, match="1 source values for 2 sources"):
        eval_node(y, [f32(1, 2)])


# ---------------------------------------------------------------------------------------------
# properties

_rows = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=16),
                   elements=st.floats(-100, 100, width=32))


@given(_rows)
def test_rms_norm_without_eps_has_unit_mean_square(xs):
    rows = xs[np.sum(np.abs(xs), axis=1) > 1e-3]  # rows that are not (nearly) zero
    if rows.shape[0] == 0:
        return
    n_rows, n = rows.shape
    b = GraphBuilder()
    x = b.input("x", "f32", (n, n_rows))
    y = b.rms_norm(x, 0.0, name="y")
    out = one((b, [y]), {"x": rows})[0, 0].astype(np.float64)
    np.testing.assert_allclose(np.mean(out * out, axis=1), 1.0, rtol=1e-5)


@given(st.permutations([0, 1, 2, 3]), st.tuples(*[st.integers(1, 3)] * 4))
def test_permute_cont_round_trips(axes, ne):
    inverse = [axes.index(i) for i in range(4)]
    b = GraphBuilder()
    x = b.input("x", "f32", ne)
    p = b.cont(b.permute(x, *axes))
    y = b.cont(b.permute(p, *inverse), name="y")
    xs = np.arange(math.prod(ne), dtype=np.float32)
    np.testing.assert_array_equal(one((b, [y]), {"x": xs}).reshape(-1), xs)


@given(st.data())
def test_add_repeats_src1_modulo_its_shape(data):
    ne1 = data.draw(st.tuples(*[st.integers(1, 2)] * 4))
    reps = data.draw(st.tuples(*[st.integers(1, 2)] * 4))
    ne0 = tuple(a * r for a, r in zip(ne1, reps, strict=True))
    xa = np.arange(math.prod(ne0), dtype=np.float32).reshape(ne0[::-1])
    xb = (1000 * np.arange(1, math.prod(ne1) + 1, dtype=np.float32)).reshape(ne1[::-1])
    b = GraphBuilder()
    a_t, b_t = b.input("a", "f32", ne0), b.input("b", "f32", ne1)
    out = one((b, [b.add(a_t, b_t, name="y")]), {"a": xa, "b": xb})
    for i3, i2, i1, i0 in np.ndindex(*ne0[::-1]):
        expect = xa[i3, i2, i1, i0] + xb[i3 % ne1[3], i2 % ne1[2], i1 % ne1[1], i0 % ne1[0]]
        assert out[i3, i2, i1, i0] == expect


@given(_rows)
def test_soft_max_rows_are_distributions(xs):
    n_rows, n = xs.shape
    b = GraphBuilder()
    x = b.input("x", "f32", (n, n_rows))
    out = one((b, [b.soft_max(x, name="y")]), {"x": xs})[0, 0]
    assert np.all(out >= 0)
    np.testing.assert_allclose(np.sum(out, axis=1, dtype=np.float64), 1.0, rtol=1e-5)


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.data())
def test_mul_mat_matches_explicit_dot_products(k, m, n, heads_kv, group, data):
    heads_q = heads_kv * group
    ints = st.integers(-8, 8)  # small integers: every dot product is exact in float32
    av = np.array(data.draw(st.lists(ints, min_size=k * m * heads_kv, max_size=k * m * heads_kv)), np.float32)
    bv = np.array(data.draw(st.lists(ints, min_size=k * n * heads_q, max_size=k * n * heads_q)), np.float32)
    b = GraphBuilder()
    a_t, b_t = b.input("a", "f32", (k, m, heads_kv)), b.input("b", "f32", (k, n, heads_q))
    out = one((b, [b.mul_mat(a_t, b_t, name="y")]), {"a": av, "b": bv})
    a3, b3 = av.reshape(heads_kv, m, k), bv.reshape(heads_q, n, k)
    for h, j, i in np.ndindex(heads_q, n, m):
        expect = sum(float(b3[h, j, t]) * float(a3[h // group, i, t]) for t in range(k))
        assert out[0, h, j, i] == expect
