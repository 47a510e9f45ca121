"""Rotary-embedding fusions (patterns/rope.fuse, kernel family rope): ROPE -> VIEW/RESHAPE -> SET_ROWS,
RMS_NORM -> MUL -> ROPE and RMS_NORM -> MUL -> ROPE -> VIEW/RESHAPE -> SET_ROWS.

The proptest generator cannot synthesize these graphs (tests/test_proptest.py pins that), so the
equivalence properties are explicit Hypothesis tests over builder-made graphs: shapes, rope mode,
partial rotary dims, freq factors, YaRN parameters, cache dtype, the view kind and the norm weight's
broadcast. Each rewritten graph runs on a backend (numpy = the interpreter on the FUSED graph; wgpu on
lavapipe; cuda where a device exists) and is compared with the interpreter on the ORIGINAL graph, for
the graph outputs and for the KV cache written in place. Near misses: the pattern must not fire.
Tolerance: normalized MSE <= 1e-7 for f32 results, <= 1e-5 with an f16 cache or f16 rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusec.codegen import emit
from fusec.codegen.check import check_cuda, check_msl
from fusec.dsl import default_patterns
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.rewrite import rewrite
from fusec.rewrite.fuse import fused_alias_input
from fusec.runtime.key import structural_key
from fusec.runtime.plan import plan_buffers
from tests.gpu import compile_check_tests, requires_cuda, requires_wgpu

ROPE = [p for p in default_patterns() if p.file == "patterns/rope.fuse"]
ALL = default_patterns()
F32_NMSE = 1e-7
F16_NMSE = 1e-5


def nmse(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((out - ref) ** 2) / max(np.sum(ref**2), 1e-300))


def case(*, head_dim=64, n_dims=64, n_head=2, n_tok=3, kv_size=8, mode=2, ff=False, yarn=False, norm=False,
         w_ne=None, x_dtype="f32", w_dtype="f32", write="view", cache_dtype="f32", strided=False, extra_user=False,
         view_offset=0, out_view=True, seed=0):
    """K as llama.cpp builds it: a projection ``kq`` [head_dim*n_head(+pad), n_tok] reshaped (or viewed,
    ``strided``) to [head_dim, n_head, n_tok], optionally RMS_NORM -> MUL(w) (Qwen3's k norm), ROPE, and
    with ``write`` = "view" | "reshape" the [head_dim*n_head, n_tok] view SET_ROWS'd into ``cache_k``
    [head_dim*n_head, kv_size] at rows ``k_idxs`` (distinct cells); ``write`` = None keeps the rope
    result as the output. ``out_view``: the attention's view of the cache is the output (as in llama).
    Returns (graph, values)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    width = head_dim * n_head
    if strided:  # K inside a fused QKV projection row: offset and wider row stride
        kq = b.input("kq", x_dtype, (width + 6, n_tok))
        es = kq.dtype.size
        x = b.view(kq, (head_dim, n_head, n_tok), (es, head_dim * es, kq.nb[1]), offset=2 * es, name="Kcur (view)")
    else:
        kq = b.input("kq", x_dtype, (width, n_tok))
        x = b.reshape(kq, (head_dim, n_head, n_tok), name="Kcur (reshaped)")
    values = {"kq": rng.standard_normal(kq.nelements).astype(kq.dtype.np) * 3}
    if norm:
        w_ne = w_ne or (head_dim,)
        w = b.weight("k_norm", w_dtype, w_ne)
        values["k_norm"] = rng.uniform(0.5, 1.5, w.nelements).astype(w.dtype.np)
        x = b.mul(b.rms_norm(x, 1e-6, name="norm"), w, name="Kcur_normed")
    pos = b.input("pos", "i32", (n_tok,))
    values["pos"] = rng.integers(0, 4096, n_tok).astype(np.int32)
    f = None
    if ff:
        f = b.weight("rope_freqs", "f32", (n_dims // 2,))
        values["rope_freqs"] = rng.uniform(1.0, 8.0, n_dims // 2).astype(np.float32)
    kw = dict(n_ctx_orig=4096, ext_factor=1.0, freq_scale=0.25, attn_factor=0.9) if yarn else {}
    r = b.rope(x, pos, n_dims, mode, freq_factors=f, freq_base=500000.0 if yarn else 10000.0, name="Kcur", **kw)
    outs = []
    if extra_user:
        outs.append(b.scale(r, 2.0, name="other_user"))
    if write is None:
        outs.append(r)
        return b.build(outs), values
    cache = b.weight("cache_k", cache_dtype, (width, kv_size))
    values["cache_k"] = rng.standard_normal(cache.nelements).astype(cache.dtype.np)
    idx = b.input("k_idxs", "i32", (n_tok,))
    values["k_idxs"] = rng.permutation(kv_size)[:n_tok].astype(np.int32)
    if write == "view":
        es = r.dtype.size
        n = (n_head - 1) if view_offset else n_head  # a near miss: a view of only part of the rope result
        rows = b.view(r, (head_dim * n, n_tok), nb=(es, r.nb[2]), offset=view_offset, name="Kcur (view)")
        if view_offset:  # the cache row then is narrower: write into a narrower cache view
            cache = b.view(cache, (head_dim * n, kv_size), nb=(cache.dtype.size, cache.nb[1]), name="cache_k (view)")
    else:
        rows = b.reshape(r, (width, n_tok), name="Kcur (reshaped 2)")
    k_stored = b.set_rows(cache, rows, idx, name="cache_k_l0 (view)")
    if out_view:
        cs = k_stored.dtype.size
        outs.append(b.view(k_stored, (head_dim, kv_size, n_head), nb=(cs, k_stored.nb[1], cs * head_dim), name="k-0"))
    else:
        outs.append(k_stored)
    return b.build(outs), values


def run_fused(graph, values, backend: str, patterns=ROPE):
    """Rewrite ``graph`` with ``patterns``, run it on ``backend`` and the original on the interpreter;
    returns (report, fused graph, outputs, reference outputs, cache after, reference cache after)."""
    g2, report = rewrite(graph, patterns)
    weights = {t.name: values[t.name] for t in g2.leaves if "weight" in t.flags}
    inputs = {t.name: values[t.name] for t in g2.leaves if "weight" not in t.flags}
    ref_vals = {k: np.array(v, copy=True) for k, v in values.items()}
    ref = interpret(graph, ref_vals)  # the reference cache is updated in place in ref_vals
    if backend == "numpy":
        from fusec.backends.numpy_backend import NumpyBackend as B
    elif backend == "wgpu":
        from fusec.backends.wgpu_backend import WgpuBackend as B
    else:
        from fusec.backends.cuda_backend import CudaBackend as B
    be = B()
    be.set_weights(weights)
    out = be.compile(g2).run(inputs)
    cache = be.read_weight("cache_k") if "cache_k" in weights else None
    return report, g2, out, ref, cache, ref_vals.get("cache_k")


def assert_close(out, ref, tol):
    for name, v in ref.items():
        assert out[name].shape == v.shape, name
        assert np.isfinite(out[name]).all(), name
        assert nmse(out[name], v) <= tol, (name, nmse(out[name], v))


def fused_patterns(report) -> list[str]:
    return sorted(name for name, st_ in report.patterns.items() for _ in st_.applied)


# ---------------------------------------------------------------------------------------------
# the rewrite: what fuses, aliasing of the FUSED node, the overlap winner


@pytest.mark.parametrize(("norm", "write", "want"), [
    (False, "view", "rope_set_rows"), (False, "reshape", "rope_reshape_set_rows"),
    (True, None, "rms_norm_mul_rope"), (True, "view", "rms_norm_mul_rope_set_rows"),
    (True, "reshape", "rms_norm_mul_rope_reshape_set_rows")])
def test_pattern_fires_and_fused_node_aliases_the_cache(norm, write, want):
    g, _ = case(norm=norm, write=write, ff=True)
    g2, report = rewrite(g, ALL)
    assert want in fused_patterns(report)
    fused = [t for t in g2.nodes if t.op == "FUSED" and t.params["pattern"] == want]
    assert len(fused) == 1
    node = fused[0]
    if write is None:
        assert not node.is_view and fused_alias_input(node.decomposition) is None
        return
    cache = g2.by_name("cache_k")
    assert node.view_src is cache and node.view_offs == 0 and node.nb == cache.nb
    assert node.src[fused_alias_input(node.decomposition)] is cache
    k = g2.by_name("k-0")
    assert k.src[0] is node and k.root is cache  # the attention still reads the cache through the node
    plan = plan_buffers(g2)
    plan.check()
    assert plan.slot(node).kind == "weight" and plan.slot(node).name == "cache_k"
    assert node not in plan.live  # no scratch buffer: the node writes the cache in place


def test_larger_match_wins_and_report_says_so():
    g, _ = case(norm=True, write="view")
    _, report = rewrite(g, ALL)
    assert fused_patterns(report) == ["rms_norm_mul_rope_set_rows"]
    lost = {n.pattern: n.reason for n in report.not_fused}
    assert "higher-benefit match rms_norm_mul_rope_set_rows" in lost["rms_norm_mul"]
    assert "higher-benefit match rms_norm_mul_rope_set_rows" in lost["rope_set_rows"]
    assert "higher-benefit match rms_norm_mul_rope_set_rows" in lost["rms_norm_mul_rope"]
    g, _ = case(norm=True, write=None)
    _, report = rewrite(g, ALL)
    assert fused_patterns(report) == ["rms_norm_mul_rope"]
    assert "higher-benefit match rms_norm_mul_rope" in {n.pattern: n.reason for n in report.not_fused}["rms_norm_mul"]


def test_structural_key_sees_the_aliasing():
    g, _ = case(write="view")
    g2, _ = rewrite(g, ROPE)
    g3, _ = rewrite(case(write="view", seed=1)[0], ROPE)
    assert structural_key(g2).digest == structural_key(g3).digest
    g4, _ = rewrite(case(write="view", cache_dtype="f16")[0], ROPE)
    assert structural_key(g4).digest != structural_key(g2).digest


# ---------------------------------------------------------------------------------------------
# near misses: the pattern must not fire


def test_near_miss_roped_k_used_elsewhere():
    g, _ = case(write="view", extra_user=True)
    g2, report = rewrite(g, ROPE)
    assert not fused_patterns(report)
    assert "escapes" in report.why_not("cache_k_l0 (view)")[0].reason


def test_near_miss_partial_view_offset():
    """A view starting past the first head (offset != 0): the VIEW { offset: 0 } literal does not match."""
    g, _ = case(write="view", view_offset=4 * 64, n_head=3)
    _, report = rewrite(g, ROPE)
    assert not fused_patterns(report) and report.total_matches == 0


def test_near_miss_partial_view_same_offset():
    """A view of the first token only (offset 0, contiguous, fewer elements): nelements(v) ==
    nelements(r) fails (the kernel would write every token)."""
    b = GraphBuilder()
    x = b.input("x", "f32", (64, 3, 2))
    pos = b.input("pos", "i32", (2,))
    r = b.rope(x, pos, 64, 2, name="r")
    v = b.view(r, (192, 1), nb=(4, r.nb[2]), name="v")
    cache = b.weight("cache_k", "f32", (192, 8))
    idx = b.input("idx", "i32", (1,))
    y = b.set_rows(cache, v, idx, name="y")
    _, report = rewrite(b.build([y]), ROPE)
    assert not fused_patterns(report)
    assert "nelements(v) == nelements(r) failed" in report.why_not("y")[0].reason


def test_near_miss_transposed_view():
    """A non-contiguous view (heads transposed) is not a reshape: contiguous(v) fails."""
    b = GraphBuilder()
    x = b.input("x", "f32", (4, 3, 2))
    pos = b.input("pos", "i32", (2,))
    r = b.rope(x, pos, 4, 0, name="r")
    v = b.view(r, (3, 8), nb=(r.nb[1], 4), name="v")  # element (h, e) -> column e of row h
    cache = b.weight("cache_k", "f32", (3, 8))
    idx = b.input("idx", "i32", (8,))
    y = b.set_rows(cache, v, idx, name="y")
    _, report = rewrite(b.build([y]), ROPE)
    assert not fused_patterns(report)
    assert "contiguous(v) failed" in report.why_not("y")[0].reason


def test_near_miss_norm_weight_does_not_broadcast():
    """MUL(w, norm) with w LARGER than the row: the MUL's result is w's shape, not a row kernel's."""
    b = GraphBuilder()
    x = b.input("x", "f32", (64, 1, 3))
    w = b.weight("w", "f32", (64, 2, 3))
    pos = b.input("pos", "i32", (3,))
    m = b.mul(w, b.rms_norm(x, 1e-6, name="n"), name="m")
    y = b.rope(m, pos, 64, 2, name="y")
    _, report = rewrite(b.build([y]), ROPE)
    assert not fused_patterns(report)
    assert "can_repeat(w, n) failed" in report.why_not("y")[0].reason


def test_near_miss_interior_set_rows_is_refused():
    """Only the root may write in place: a pattern with SET_ROWS inside is refused (escape)."""
    from fusec.dsl import parse_patterns

    (p,) = parse_patterns("""
pattern set_rows_then_scale {
  match {
    y = SET_ROWS(v, idx, dst)
    z = SCALE(y) { s: $s }
  }
  rewrite SR_SCALE(v, idx, dst) kernel rope
}
""", "t.fuse")
    b = GraphBuilder()
    v = b.input("v", "f32", (8, 2))
    idx = b.input("idx", "i32", (2,))
    cache = b.weight("cache", "f32", (8, 4))
    z = b.scale(b.set_rows(cache, v, idx, name="y"), 2.0, name="z")
    _, report = rewrite(b.build([z]), [p])
    assert not fused_patterns(report)
    assert "only the root may write in place" in report.why_not("z")[0].reason


# ---------------------------------------------------------------------------------------------
# equivalence: the rewritten graph on a backend == the interpreter on the original graph

shapes = st.sampled_from([(64, 64), (64, 32), (128, 128), (128, 64), (80, 80), (96, 32), (256, 128), (6, 4), (2, 2)])
params = dict(mode=st.sampled_from([0, 2]), shape=shapes, n_head=st.integers(1, 4), n_tok=st.integers(1, 5),
              ff=st.booleans(), yarn=st.booleans(), cache_dtype=st.sampled_from(["f32", "f16"]),
              write=st.sampled_from(["view", "reshape", None]), norm=st.booleans(), strided=st.booleans(),
              w_bcast=st.booleans(), w_dtype=st.sampled_from(["f32", "f16"]), seed=st.integers(0, 2**31))


def _equivalence(backend, mode, shape, n_head, n_tok, ff, yarn, cache_dtype, write, norm, strided, w_bcast, w_dtype,
                 seed, x_dtype="f32"):
    head_dim, n_dims = shape
    if write is None and not norm:
        norm = True  # a plain ROPE is no fusion: test the norm prologue instead
    w_ne = (head_dim, n_head) if w_bcast else (head_dim,)
    g, values = case(head_dim=head_dim, n_dims=n_dims, n_head=n_head, n_tok=n_tok, kv_size=n_tok + 3, mode=mode, ff=ff,
                     yarn=yarn, norm=norm, w_ne=w_ne, w_dtype=w_dtype, x_dtype=x_dtype, write=write,
                     cache_dtype=cache_dtype, strided=strided, out_view=seed % 2 == 0, seed=seed)
    report, g2, out, ref, cache, ref_cache = run_fused(g, values, backend)
    assert report.total_matches == 1 and sum(t.op == "FUSED" for t in g2.nodes) == 1
    tol = F16_NMSE if (cache_dtype == "f16" and write) or "f16" in (x_dtype, w_dtype) else F32_NMSE
    assert_close(out, ref, tol)
    if write:
        cache, ref_cache = cache.reshape(n_tok + 3, -1), ref_cache.reshape(n_tok + 3, -1)  # [kv_size, width]
        assert nmse(cache, ref_cache) <= tol
        untouched = np.ones(ref_cache.shape[0], bool)
        untouched[values["k_idxs"]] = False
        assert np.array_equal(cache[untouched], ref_cache[untouched])  # other cells are not written


@given(**params)
@settings(max_examples=30)
def test_fused_rope_matches_unfused_on_numpy(**kw):
    _equivalence("numpy", **kw)


@requires_wgpu
@given(**params)
@settings(max_examples=20)
def test_fused_rope_matches_unfused_on_wgpu(**kw):
    _equivalence("wgpu", **kw)


@requires_wgpu
@given(mode=st.sampled_from([0, 2]), shape=shapes, n_head=st.integers(1, 3), n_tok=st.integers(1, 4),
       ff=st.booleans(), w_dtype=st.sampled_from(["f32", "f16"]), seed=st.integers(0, 2**31))
@settings(max_examples=8)
def test_fused_norm_rope_f16_rows_on_wgpu(mode, shape, n_head, n_tok, ff, w_dtype, seed):
    """RMS_NORM -> MUL -> ROPE on f16 rows (the result is f16; the unfused graph rounds to f16 after
    each op, the kernel once)."""
    _equivalence("wgpu", mode, shape, n_head, n_tok, ff, False, "f32", None, True, False, False, w_dtype, seed,
                 x_dtype="f16")


@requires_cuda
@pytest.mark.parametrize("write", ["view", "reshape", None])
@pytest.mark.parametrize("cache_dtype", ["f32", "f16"])
@pytest.mark.parametrize("mode", [0, 2])
def test_fused_rope_matches_unfused_on_cuda(write, cache_dtype, mode):
    _equivalence("cuda", mode, (128, 64), 8, 7, True, True, cache_dtype, write, True, True, True, "f32", 5)
    _equivalence("cuda", mode, (64, 64), 2, 3, False, False, cache_dtype, write, write is None, False, False, "f16", 6)


# ---------------------------------------------------------------------------------------------
# every variant compiles on every backend


def all_variants():
    nodes = []
    for mode in (0, 2):
        for ff in (False, True):
            for write, norm in (("view", False), ("view", True), (None, True)):
                for cache_dtype in ("f32", "f16") if write else ("f32",):
                    g, _ = case(mode=mode, ff=ff, write=write, norm=norm, cache_dtype=cache_dtype, w_dtype="f16")
                    g2, _ = rewrite(g, ROPE)
                    nodes += [t for t in g2.nodes if t.op == "FUSED"]
    g, _ = case(norm=True, write=None, x_dtype="f16")
    nodes += [t for t in rewrite(g, ROPE)[0].nodes if t.op == "FUSED"]
    return nodes


def _variant_kernels(backend: str):
    return [emit(n, backend) for n in all_variants()]


def test_variants_have_distinct_cuda_entries():
    kernels = _variant_kernels("cuda")
    assert len({k.entry for k in kernels}) == len(kernels) == 21


(test_all_variants_compile_with_nvcc, test_all_variants_pass_msl_shim_check,
 test_all_variants_compile_with_naga) = compile_check_tests(_variant_kernels)


# ---------------------------------------------------------------------------------------------
# a kernel must not read the memory it writes in place


def _rope_of_cache_into_cache():
    """K read from the cache itself (a view of its first rows), roped and written back into it."""
    b = GraphBuilder()
    cache = b.weight("cache_k", "f32", (128, 8))
    x = b.view(cache, (64, 2, 3), nb=(4, 256, cache.nb[1]), name="x")
    pos = b.input("pos", "i32", (3,))
    r = b.rope(x, pos, 64, 2, name="r")
    v = b.reshape(r, (128, 3), name="v")
    y = b.set_rows(cache, v, b.input("idx", "i32", (3,)), name="y")
    return b.build([y])


def test_near_miss_rope_reads_the_cache_it_writes():
    _, report = rewrite(_rope_of_cache_into_cache(), ROPE)
    assert not fused_patterns(report)
    assert "which the match also reads through another source" in report.why_not("y")[0].reason


def test_plan_refuses_an_in_place_node_reading_its_destination_elsewhere():
    from fusec.errors import BackendError

    b = GraphBuilder()
    cache = b.weight("cache_k", "f32", (16, 8))
    rows = b.view(cache, (16, 2), nb=(4, cache.nb[1]), name="rows")  # rows 0..1 of the cache itself
    y = b.set_rows(cache, rows, b.input("idx", "i32", (2,)), name="y")
    with pytest.raises(BackendError, match="'y' \\(SET_ROWS\\) writes slot .* 'cache_k' that the node reads"):
        plan_buffers(b.build([y])).check()
    plan_buffers(_rope_of_cache_into_cache()).check()  # unfused: ROPE computes into scratch first


# ---------------------------------------------------------------------------------------------
# a Qwen3-style attention block: q/k norm + RoPE, K written into the cache, attention reading it


def qwen3_block(D=64, n_head=4, n_head_kv=2, n_tok=3, kv_size=16, kv_dtype="f16"):
    """Q and K as Qwen3 builds them (projection -> RESHAPE [D, n_head, n_tok] -> RMS_NORM -> MUL(q/k_norm)
    -> ROPE neox), K stored with VIEW -> SET_ROWS into ``cache_k`` (a weight: persistent), the attention
    reading the cache through a view of the SET_ROWS result, V from a transposed ``cache_v``."""
    b = GraphBuilder()
    pos = b.input("pos", "i32", (n_tok,))
    heads = {}
    for tag, nh in (("q", n_head), ("k", n_head_kv)):
        proj = b.input(f"{tag}_proj", "f32", (D * nh, n_tok))
        t = b.reshape(proj, (D, nh, n_tok), name=f"{tag.upper()}cur (reshaped)")
        t = b.mul(b.rms_norm(t, 1e-6, name=f"{tag}_norm_raw"), b.weight(f"{tag}_norm", "f32", (D,)),
                  name=f"{tag.upper()}cur_normed")
        heads[tag] = b.rope(t, pos, D, 2, freq_base=1e6, name=f"{tag.upper()}cur")
    ck = b.weight("cache_k", kv_dtype, (D * n_head_kv, kv_size))
    cv = b.weight("cache_v", kv_dtype, (kv_size * D * n_head_kv,))
    k2 = b.view(heads["k"], (D * n_head_kv, n_tok), nb=(4, heads["k"].nb[2]), name="Kcur (view)")
    stored = b.set_rows(ck, k2, b.input("k_idxs", "i32", (n_tok,)), name="cache_k_l0 (view)")
    es = ck.dtype.size
    k = b.view(stored, (D, kv_size, n_head_kv), nb=(es, es * D * n_head_kv, es * D), name="k")
    v = b.view(cv, (kv_size, D, n_head_kv), nb=(es, es * kv_size, es * kv_size * D), name="v")
    mask = b.input("kq_mask", "f32", (kv_size, n_tok))
    kq = b.mul_mat(k, b.permute(heads["q"], 0, 2, 1, 3, name="q"), name="kq")
    sm = b.soft_max_ext(kq, mask, scale=1.0 / np.sqrt(D), name="kq_soft_max")
    kqv = b.mul_mat(v, sm, name="kqv")
    out = b.cont(b.permute(kqv, 0, 2, 1, 3), (D * n_head, n_tok), name="kqv_out")
    return b.build([out])


def qwen3_values(g, step, n_tok=3, kv_size=16):
    rng = np.random.default_rng(step)
    vals = {t.name: rng.standard_normal(t.nelements).astype(t.dtype.np) for t in g.leaves}
    pos = np.arange(n_tok, dtype=np.int32) + step * n_tok
    vals.update(pos=pos, k_idxs=pos.copy(), q_norm=rng.uniform(0.5, 1.5, 64).astype(np.float32),
                k_norm=rng.uniform(0.5, 1.5, 64).astype(np.float32))
    vals["kq_mask"] = np.where(np.arange(kv_size)[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float32)
    return vals


@pytest.mark.parametrize("backend", ["numpy", pytest.param("wgpu", marks=requires_wgpu.mark),
                                     pytest.param("cuda", marks=requires_cuda.mark)])
def test_qwen3_block_fuses_norm_rope_and_cache_write_over_two_steps(backend):
    g = qwen3_block()
    g2, report = rewrite(g, ALL)
    assert fused_patterns(report) == ["attention_flash", "rms_norm_mul_rope", "rms_norm_mul_rope_set_rows"]
    lost = {(n.pattern, n.root): n.reason for n in report.not_fused}
    assert "overlaps higher-benefit match rms_norm_mul_rope" in lost[("rms_norm_mul", "Qcur_normed")]
    from fusec.backends import get_backend

    be = get_backend(backend)
    init = qwen3_values(g, 0)
    weights = {k: init[k] for k in ("q_norm", "k_norm", "cache_k", "cache_v")}
    be.set_weights(weights)
    exe = be.compile(g2)
    ref_w = {k: np.array(v, copy=True) for k, v in weights.items()}
    for step in range(2):  # the second step's attention reads the K rows the first step wrote
        vals = qwen3_values(g, step)
        inputs = {t.name: vals[t.name] for t in g2.leaves if "weight" not in t.flags}
        got = exe.run(inputs)["kqv_out"]
        want = interpret(g, {**ref_w, **inputs})["kqv_out"]
        assert nmse(got, want) <= F16_NMSE, step
    assert nmse(be.read_weight("cache_k"), ref_w["cache_k"]) <= F16_NMSE


# ---------------------------------------------------------------------------------------------
# the family's general prologue: NORM and a chain of several steps (no shipped pattern uses them yet)

NORM_CHAIN = """
pattern norm_mul_add_rope_test {
  match {
    n = NORM(x) { eps: $eps }
    m = MUL(n, w)
    a = ADD(m, b)
    y = ROPE(a, pos, _)
  }
  where {
    can_repeat(w, n)
    can_repeat(b, m)
  }
  rewrite NORM_MUL_ADD_ROPE(x, w, b, pos) kernel rope
}
"""


def norm_chain_case(mode, x_dtype, seed):
    from fusec.dsl import parse_patterns

    (p,) = parse_patterns(NORM_CHAIN, "t.fuse")
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    x = b.input("x", x_dtype, (96, 3, 4))
    w = b.weight("w", "f32", (96,))
    bias = b.weight("bias", x_dtype, (96, 3))
    pos = b.input("pos", "i32", (4,))
    y = b.rope(b.add(b.mul(b.norm(x, 1e-5, name="n"), w, name="m"), bias, name="a"), pos, 64, mode, name="y")
    g = b.build([y])
    vals = {t.name: rng.standard_normal(t.nelements).astype(t.dtype.np) * 2 + 0.5 for t in g.leaves}
    vals["pos"] = rng.integers(0, 500, 4).astype(np.int32)
    g2, report = rewrite(g, [p])
    assert report.total_matches == 1
    return g, g2, vals


@requires_wgpu
@pytest.mark.parametrize("mode", [0, 2])
@pytest.mark.parametrize("x_dtype", ["f32", "f16"])
def test_norm_chain_prologue_on_wgpu(mode, x_dtype):
    from fusec.backends.wgpu_backend import WgpuBackend

    g, g2, vals = norm_chain_case(mode, x_dtype, 3)
    be = WgpuBackend()
    be.set_weights({k: vals[k] for k in ("w", "bias")})
    out = be.compile(g2).run({k: vals[k] for k in ("x", "pos")})["y"]
    assert nmse(out, interpret(g, vals)["y"]) <= (F32_NMSE if x_dtype == "f32" else F16_NMSE)


def test_norm_chain_prologue_compiles_for_cuda_and_msl():
    nodes = [next(t for t in norm_chain_case(m, d, 0)[1].nodes if t.op == "FUSED")
             for m in (0, 2) for d in ("f32", "f16")]
    check_cuda([emit(n, "cuda") for n in nodes])
    check_msl([emit(n, "msl") for n in nodes])
    assert emit(nodes[0], "cuda").entry == "norm_mul_f32_add_f32_rope_norm_f32"
