"""WgpuBackend and CudaBackend against the reference interpreter.

Every graph runs on the device backend and through :func:`fusec.interp.interpret` with the same
values; cases whose kernel family has not landed are skipped (not deleted). CUDA cases carry
``pytest.mark.cuda`` and skip without a GPU and CuPy.
"""

from __future__ import annotations

import numpy as np
import pytest

from fusec import codegen
from fusec.backends import wgpu_runtime
from fusec.errors import BackendError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.ir.graph import Graph
from fusec.rewrite.fuse import make_fused_node

codegen._load_families()


def _cuda_available() -> bool:
    try:
        from fusec.backends.cuda_backend import CudaBackend
    except ImportError:
        return False
    return CudaBackend.available()


BACKENDS = [
    pytest.param("wgpu", marks=[pytest.mark.wgpu, pytest.mark.skipif(not wgpu_runtime.available(),
                                                                     reason="no WebGPU adapter")]),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not _cuda_available(),
                                                                     reason="no CUDA GPU with CuPy")]),
]


def make_backend(kind: str):
    if kind == "wgpu":
        from fusec.backends.wgpu_backend import WgpuBackend

        return WgpuBackend()
    from fusec.backends.cuda_backend import CudaBackend

    return CudaBackend()


def need(*families: str) -> None:
    missing = [f for f in families if f not in codegen.FAMILIES]
    if missing:
        pytest.skip(f"kernel families not landed: {', '.join(missing)}")


def rand(rng, ne, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(tuple(ne)[::-1]) * scale).astype(dtype)


def check(kind: str, g: Graph, inputs: dict, weights: dict, rtol=1e-5, atol=1e-5, runs: int = 1):
    """Run ``g`` ``runs`` times on backend ``kind`` and on the interpreter (with persistent weights
    updated in place on both sides); compare every output and, at the end, every weight."""
    be = make_backend(kind)
    be.set_weights(weights)
    exe = be.compile(g)
    ref_w = {k: np.array(v, copy=True) for k, v in weights.items()}
    for _ in range(runs):
        got = exe.run(inputs)
        want = interpret(g, {**ref_w, **inputs})
        assert set(got) == set(want)
        for name, v in want.items():
            assert got[name].shape == v.shape and got[name].dtype == v.dtype, name
            np.testing.assert_allclose(got[name].astype(np.float64), v.astype(np.float64), rtol=rtol, atol=atol,
                                       err_msg=name)
    for name, v in ref_w.items():
        np.testing.assert_allclose(be.read_weight(name).astype(np.float64), v.astype(np.float64), rtol=rtol,
                                   atol=atol, err_msg=f"weight {name}")
    return exe


def fused_rms_mul(b: GraphBuilder, x, w, name: str):
    sb = GraphBuilder()
    px, pw = sb.leaf("px", x.dtype, x.ne), sb.leaf("pw", w.dtype, w.ne)
    px.params["fused_input"], pw.params["fused_input"] = 0, 1
    out = sb.mul(sb.rms_norm(px, 1e-6), pw)
    return make_fused_node(b, sb.build([out]), [x, w], {"pattern": "rms_norm_mul", "kernel": "norm_epilogue"}, name)


# -- graphs equal to the interpreter --------------------------------------------------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_rms_norm_mul(kind):
    need("norm_epilogue", "binary")
    rng = np.random.default_rng(0)
    b = GraphBuilder()
    x = b.input("x", "f32", (96, 5))
    w = b.weight("w", "f32", (96,))
    y = b.mul(b.rms_norm(x, 1e-6, name="n"), w, name="y")
    check(kind, b.build([y]), {"x": rand(rng, x.ne)}, {"w": rand(rng, w.ne)}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", BACKENDS)
def test_fused_rms_norm_mul_chain(kind):
    need("norm_epilogue", "binary")
    rng = np.random.default_rng(1)
    b = GraphBuilder()
    x = b.input("x", "f32", (64, 3))
    w = b.weight("w", "f32", (64,))
    h = b.add(x, x, name="h")
    f = fused_rms_mul(b, h, w, "f")  # h is last read by the fused node
    y = b.scale(f, 2.0, name="y")
    exe = check(kind, b.build([y]), {"x": rand(rng, x.ne)}, {"w": rand(rng, w.ne)}, rtol=1e-4, atol=1e-5)
    assert exe.plan.slot(f).index != exe.plan.slot(h).index


@pytest.mark.parametrize("kind", BACKENDS)
def test_add_chain_with_broadcast_reuses_buffers(kind):
    need("binary", "unary")
    rng = np.random.default_rng(2)
    b = GraphBuilder()
    x = b.input("x", "f32", (32, 4, 3))
    bias = b.weight("bias", "f32", (32, 1, 3))
    h = x
    for i in range(6):
        h = b.add(b.silu(h, name=f"s{i}"), bias, name=f"a{i}")
        h = b.add(h, x, name=f"r{i}")
    exe = check(kind, b.build([h]), {"x": rand(rng, x.ne)}, {"bias": rand(rng, bias.ne)}, rtol=1e-5, atol=1e-5)
    st = exe.plan.stats()
    assert st.scratch_bytes < st.scratch_bytes_no_reuse


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("wdt", ["f32", "f16"])
def test_get_rows(kind, wdt):
    need("get_rows")
    rng = np.random.default_rng(3)
    b = GraphBuilder()
    emb = b.weight("emb", wdt, (16, 10))
    ids = b.input("ids", "i32", (5,))
    y = b.get_rows(emb, ids, name="y")
    check(kind, b.build([y]), {"ids": np.array([3, 0, 9, 3, 7], np.int32)},
          {"emb": rand(rng, emb.ne, emb.dtype.np)})


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("wdt", ["f32", "f16"])
def test_mul_mat(kind, wdt):
    need("mul_mat")
    rng = np.random.default_rng(4)
    b = GraphBuilder()
    w = b.weight("w", wdt, (48, 20))
    x = b.input("x", "f32", (48, 7))
    y = b.mul_mat(w, x, name="y")
    check(kind, b.build([y]), {"x": rand(rng, x.ne)}, {"w": rand(rng, w.ne, w.dtype.np)}, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", BACKENDS)
def test_mul_mat_broadcast_over_heads_with_permuted_operands(kind):
    need("mul_mat", "copy")
    rng = np.random.default_rng(5)
    b = GraphBuilder()
    k = b.input("k", "f32", (16, 6, 2))  # 2 kv heads
    q = b.input("q", "f32", (16, 4, 3))  # [head_dim, n_head, n_tokens]
    qp = b.permute(q, 0, 2, 1, 3, name="qp")  # -> [head_dim, n_tokens, n_head]
    kq = b.mul_mat(k, qp, name="kq")  # 4 heads over 2 kv heads
    check(kind, b.build([kq]), {"k": rand(rng, k.ne), "q": rand(rng, q.ne)}, {}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", BACKENDS)
def test_soft_max_with_mask(kind):
    need("soft_max")
    rng = np.random.default_rng(6)
    b = GraphBuilder()
    a = b.input("a", "f32", (12, 3, 4))
    m = b.input("mask", "f32", (12, 3))
    y = b.soft_max_ext(a, m, scale=0.25, name="y")
    mask = np.where(rng.random((3, 12)) < 0.3, -np.inf, 0.0).astype(np.float32)
    mask[:, 0] = 0.0
    check(kind, b.build([y]), {"a": rand(rng, a.ne), "mask": mask}, {}, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("mode", [0, 2])
def test_rope(kind, mode):
    need("rope")
    rng = np.random.default_rng(7)
    b = GraphBuilder()
    x = b.input("x", "f32", (16, 4, 3))
    pos = b.input("pos", "i32", (3,))
    y = b.rope(x, pos, n_dims=16, mode=mode, freq_base=10000.0, name="y")
    check(kind, b.build([y]), {"x": rand(rng, x.ne), "pos": np.array([0, 5, 17], np.int32)}, {},
          rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", BACKENDS)
def test_views_and_cont(kind):
    need("copy", "unary")
    rng = np.random.default_rng(8)
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 6, 2))
    s = b.silu(x, name="s")
    t = b.cont(b.transpose(s, name="sT"), name="t")
    p = b.cont(b.permute(s, 2, 0, 1, 3, name="sp"), name="p")
    v = b.cont(b.view(s, (4, 3), nb=(4, 64), offset=8, name="sv"), name="v")
    r = b.scale(b.reshape(t, (48, 2), name="tr"), 3.0, name="r")
    check(kind, b.build([t, p, v, r]), {"x": rand(rng, x.ne)}, {})


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("cache_dt", ["f32", "f16"])
def test_set_rows_updates_a_persistent_cache_across_runs(kind, cache_dt):
    need("set_rows", "copy", "unary")
    rng = np.random.default_rng(9)
    b = GraphBuilder()
    cache = b.weight("cache", cache_dt, (8, 6))
    rows = b.input("rows", "f32", (8, 2))
    idx = b.input("idx", "i32", (2,))
    kv = b.set_rows(cache, b.scale(rows, 2.0, name="rs"), idx, name="kv")
    out = b.cont(b.view(kv, (8, 4), name="kv_view"), name="out")  # reads the updated cache
    g = b.build([out])
    be = make_backend(kind)
    be.set_weights({"cache": np.zeros((6, 8), cache.dtype.np)})
    exe = be.compile(g)
    ref_cache = np.zeros((6, 8), cache.dtype.np)
    for step, cells in enumerate(([0, 1], [2, 3])):
        inputs = {"rows": rand(rng, rows.ne), "idx": np.array(cells, np.int32)}
        got = exe.run(inputs)
        want = interpret(g, {"cache": ref_cache, **inputs})  # updates ref_cache in place
        np.testing.assert_allclose(got["out"], want["out"], rtol=1e-3, atol=1e-3, err_msg=f"step {step}")
        np.testing.assert_allclose(be.read_weight("cache").astype(np.float32), ref_cache.astype(np.float32),
                                   rtol=1e-3, atol=1e-3)
    assert np.count_nonzero(be.read_weight("cache")[:4]) > 0  # both steps' rows are there
    # a reset through set_weights is seen by the compiled executable
    be.set_weights({"cache": np.zeros((6, 8), cache.dtype.np)})
    assert not be.read_weight("cache").any()


@pytest.mark.parametrize("kind", BACKENDS)
def test_tiny_llama_decode_matches_numpy(kind):
    need("norm_epilogue", "binary", "unary", "glu", "copy", "get_rows", "set_rows", "soft_max", "rope", "mul_mat")
    from fusec.models import config_from_dict, random_weights
    from fusec.runtime import DecodeSession

    tiny = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 97, "tie_word_embeddings": False,
            "max_position_embeddings": 128}
    cfg = config_from_dict(tiny, name="tiny")
    w = random_weights(cfg, seed=3)
    dsl = pytest.importorskip("fusec.dsl")
    dev = DecodeSession(cfg, make_backend(kind), w, kv_size=16, kv_pad=4)
    fused = DecodeSession(cfg, make_backend(kind), w, kv_size=16, kv_pad=4, patterns=dsl.default_patterns())
    ref = DecodeSession(cfg, "numpy", w, kv_size=16, kv_pad=4)
    for chunk in ([5, 17, 3], [96], [0]):
        want = ref.step(chunk)
        np.testing.assert_allclose(dev.step(chunk), want, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(fused.step(chunk), want, rtol=1e-3, atol=1e-3)
    assert "FUSED" in fused.last_graph.by_op()
    for name in ("cache_k_l0", "cache_v_l1"):
        np.testing.assert_allclose(dev.backend.read_weight(name), ref.backend.read_weight(name), rtol=1e-4,
                                   atol=1e-5)


# -- errors ---------------------------------------------------------------------------------------------
def small_graph() -> Graph:
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 2))
    ids = b.input("ids", "i32", (2,))
    w = b.weight("w", "f32", (8, 4))
    return b.build([b.add(b.get_rows(w, ids, name="g"), x, name="y")])


@pytest.fixture
def small_exe():
    need("binary", "get_rows")
    if not wgpu_runtime.available():
        pytest.skip("no WebGPU adapter")
    be = make_backend("wgpu")
    be.set_weights({"w": np.ones((4, 8), np.float32)})
    return be.compile(small_graph())


GOOD = {"x": np.zeros((2, 8), np.float32), "ids": np.array([0, 3], np.int32)}


@pytest.mark.wgpu
def test_good_inputs_run(small_exe):
    out = small_exe.run(GOOD)["y"]
    assert out.shape == (1, 1, 2, 8) and out.dtype == np.float32 and (out == 1.0).all()


@pytest.mark.wgpu
@pytest.mark.parametrize("bad, msg", [
    ({**GOOD, "x": np.zeros((3, 8), np.float32)}, r"input 'x' has 24 elements .* needs 16"),
    ({**GOOD, "x": np.zeros((2, 8), np.float64)}, r"input 'x' is float64, the graph needs f32"),
    ({**GOOD, "ids": np.array([0, 3], np.int64)}, r"input 'ids' is int64, the graph needs i32"),
    ({**GOOD, "z": np.zeros(1, np.float32)}, r"unknown input\(s\) 'z'"),
    ({"x": GOOD["x"]}, r"no value for input\(s\) 'ids'"),
])
def test_bad_inputs_are_refused(small_exe, bad, msg):
    with pytest.raises(BackendError, match=msg):
        small_exe.run(bad)


@pytest.mark.wgpu
def test_missing_and_mismatched_weights_are_named():
    need("binary", "get_rows")
    if not wgpu_runtime.available():
        pytest.skip("no WebGPU adapter")
    be = make_backend("wgpu")
    exe = be.compile(small_graph())  # compiling before set_weights is allowed
    with pytest.raises(BackendError, match="weight 'w' .* never set"):
        exe.run(GOOD)
    be.set_weights({"w": np.ones((4, 8), np.float16)})
    with pytest.raises(BackendError, match="stored weight 'w' is float16"):
        exe.run(GOOD)
    be.set_weights({"w": np.full((4, 8), 2.0, np.float32)})
    assert (exe.run(GOOD)["y"] == 2.0).all()
    with pytest.raises(BackendError, match="unsupported dtype float64"):
        be.set_weights({"w": np.ones((4, 8))})
    with pytest.raises(BackendError, match="no weight named 'nope'"):
        be.read_weight("nope")


@pytest.mark.wgpu
def test_op_without_kernel_family_is_a_compile_error(monkeypatch):
    if not wgpu_runtime.available():
        pytest.skip("no WebGPU adapter")
    monkeypatch.delitem(codegen.OP_FAMILY, "SILU", raising=False)
    b = GraphBuilder()
    x = b.input("x", "f32", (8,))
    g = b.build([b.silu(x, name="act")])
    with pytest.raises(BackendError, match=r"no wgsl kernel for op SILU \(node 'act'\)"):
        make_backend("wgpu").compile(g)


@pytest.mark.wgpu
def test_fused_node_with_unknown_family_is_a_compile_error():
    if not wgpu_runtime.available():
        pytest.skip("no WebGPU adapter")
    b = GraphBuilder()
    x = b.input("x", "f32", (8,))
    sb = GraphBuilder()
    p = sb.leaf("p", "f32", (8,))
    p.params["fused_input"] = 0
    f = make_fused_node(b, sb.build([sb.silu(p)]), [x], {"pattern": "p", "kernel": "no_such_family"}, "f")
    with pytest.raises(BackendError, match=r"no wgsl kernel for op FUSED \(node 'f'\).*no_such_family"):
        make_backend("wgpu").compile(b.build([f]))


def test_backend_classes_report_availability():
    from fusec.backends.cuda_backend import CudaBackend
    from fusec.backends.wgpu_backend import WgpuBackend

    assert WgpuBackend.available() == wgpu_runtime.available()
    assert isinstance(CudaBackend.available(), bool)


@pytest.mark.skipif(_cuda_available(), reason="checks the error path without a GPU")
def test_cuda_backend_without_gpu_is_a_backend_error():
    from fusec.backends.cuda_backend import CudaBackend

    with pytest.raises(BackendError):
        CudaBackend()


# -- CudaBackend's cuBLAS path, checked on the host -------------------------------------------------------
class _Ptr:
    """Stand-in for ``cupy.cuda.MemoryPointer``: host bytes plus a byte offset."""

    def __init__(self, host: np.ndarray, off: int = 0):
        self.host, self.off = host, off

    def __add__(self, n: int) -> _Ptr:
        return _Ptr(self.host, self.off + n)


class _Mem:
    """Stand-in for a uint8 ``cupy.ndarray`` (only ``.data`` is used)."""

    def __init__(self, host: np.ndarray):
        self.host = host.reshape(-1).view(np.uint8)

    @property
    def data(self) -> _Ptr:
        return _Ptr(self.host)


class _HostCupy:
    """The three CuPy entry points :func:`fusec.backends.cuda_backend.mul_mat` uses, on numpy."""

    float32 = np.float32
    matmul = staticmethod(np.matmul)

    @staticmethod
    def ndarray(shape, dtype, memptr, strides):
        return np.ndarray(shape, dtype=dtype, buffer=memptr.host, offset=memptr.off, strides=strides)


@pytest.mark.parametrize("wdt", ["f32", "f16"])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("a23, r23", [((1, 1), (1, 1)), ((2, 1), (3, 1)), ((2, 3), (2, 2)), ((1, 2), (4, 1))])
def test_cuda_mul_mat_strided_broadcast_matches_ggml(wdt, permuted, a23, r23):
    from fusec.backends.cuda_backend import mul_mat
    from fusec.interp import eval_node

    rng = np.random.default_rng(11)
    K, M, N = 8, 5, 3
    A2, A3 = a23
    B2, B3 = A2 * r23[0], A3 * r23[1]
    b_ = GraphBuilder()
    a = b_.input("a", wdt, (K, M, A2, A3))
    if permuted:  # b stored as [K, B2, N, B3] and permuted to [K, N, B2, B3]: strided, as in attention
        q = b_.input("q", "f32", (K, B2, N, B3))
        bb = b_.permute(q, 0, 2, 1, 3)
    else:
        q = bb = b_.input("q", "f32", (K, N, B2, B3))
    d = b_.mul_mat(a, bb, name="d")
    av, qv = rand(rng, a.ne, a.dtype.np), rand(rng, q.ne)
    out = np.zeros(d.ne[::-1], np.float32)
    mul_mat(_HostCupy, a, bb, d, _Mem(av), _Mem(qv), _Mem(out))
    want = eval_node(d, [av, np.ndarray(bb.ne[::-1], np.float32, qv, bb.view_offs, bb.nb[::-1])])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
