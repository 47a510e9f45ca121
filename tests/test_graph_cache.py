"""Graph cache (fusec.runtime.cache / key): cached == uncached over long decodes, misses exactly at
the padded-KV boundaries, structural keys vs random edits, refused replays, dynamic offsets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusec.backends import get_backend
from fusec.dsl import default_patterns
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.models import build_llama_decode, config_from_dict, random_weights
from fusec.runtime import DecodeSession
from fusec.runtime.cache import GraphCache
from fusec.runtime.key import CacheError, structural_key

TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "vocab_size": 61, "tie_word_embeddings": False, "max_position_embeddings": 512,
}


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict(TINY, name="tiny-cache")


@pytest.fixture(scope="module")
def weights(cfg):
    return random_weights(cfg, seed=3)


def _wgpu_ok() -> bool:
    try:
        return get_backend("wgpu") is not None
    except Exception:  # noqa: BLE001
        return False


def _decode(cfg, weights, backend, steps, kv_pad, kv_size, cache):
    s = DecodeSession(cfg, backend, weights, kv_size=kv_size, patterns=default_patterns(), kv_pad=kv_pad,
                      cache_graphs=cache)
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, cfg.vocab_size, size=steps).tolist()
    logits = [s.step([t]) for t in tokens]
    return s, logits


def _expected_misses(steps, kv_pad):
    # n_kv = round_up(pos + 1, kv_pad) changes when pos crosses a multiple of kv_pad
    return [i for i in range(steps) if i % kv_pad == 0]


@pytest.mark.parametrize("backend,steps,kv_pad", [
    ("numpy", 300, 128),
    pytest.param("wgpu", 300, 128, marks=pytest.mark.wgpu),
])
def test_cached_equals_uncached_and_misses_only_at_kv_boundaries(cfg, weights, backend, steps, kv_pad):
    if backend == "wgpu" and not _wgpu_ok():
        pytest.skip("no wgpu adapter")
    cached, out_c = _decode(cfg, weights, backend, steps, kv_pad, 384, True)
    plain, out_p = _decode(cfg, weights, backend, steps, kv_pad, 384, False)
    for i, (a, b) in enumerate(zip(out_c, out_p, strict=True)):
        assert np.array_equal(a, b), f"step {i}: cached logits differ from uncached"
    misses = [i for i, t in enumerate(cached.timings) if not t["cached"]]
    assert misses == _expected_misses(steps, kv_pad) == [0, 128, 256]
    assert all(t["reused"] for t in cached.timings if t["cached"])  # hits skip even the build
    st_ = cached.graph_cache.stats
    assert (st_.hits, st_.misses) == (steps - 3, 3)
    assert st_.saved_s > 0.0 and len(cached.graph_cache) == 3
    assert plain.graph_cache.stats.hits == 0 and all(not t["cached"] for t in plain.timings)
    assert all(t["build_s"] > 0 for t in plain.timings)


def test_env_var_disables_the_cache(cfg, weights, monkeypatch):
    monkeypatch.setenv("FUSEC_DISABLE_GRAPH_CACHE", "1")
    s, _ = _decode(cfg, weights, "numpy", 4, 32, 64, True)
    assert [t["cached"] for t in s.timings] == [False] * 4 and len(s.graph_cache) == 0


def test_hit_by_structure_when_params_differ(cfg, weights):
    """A graph built from new parameters with a known structure is a hit (built, not compiled)."""
    gc = GraphCache(get_backend("numpy"), default_patterns())
    g1 = build_llama_decode(cfg, 1, 32, 64)
    e1, hit1 = gc.get(g1, ("a",))
    e2, hit2 = gc.get(build_llama_decode(cfg, 1, 32, 64), ("b",))
    assert (hit1, hit2) == (False, True) and e1 is e2
    assert gc.can_reuse(("b",)) is e1 and gc.can_reuse(("c",)) is None


# -- replay validation -------------------------------------------------------------------------------


def _session_inputs(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=64, patterns=default_patterns(), kv_pad=32)
    s.step([1])
    return s, s.make_inputs([2])


@pytest.mark.parametrize("name,bad,needle", [
    ("kq_mask", lambda a: a.astype(np.float64), "float64"),
    ("kq_mask", lambda a: np.zeros((1, 1, 1, a.shape[-1] + 1), np.float32), "shape"),
    ("inp_tokens", lambda a: np.zeros(2, np.int32), "shape"),
    ("inp_pos", lambda a: a.astype(np.int64), "int64"),
    ("inp_tokens", lambda a: a.tolist(), "numpy.ndarray"),
])
def test_replay_with_wrong_input_raises_naming_it(cfg, weights, name, bad, needle):
    s, inputs = _session_inputs(cfg, weights)
    entry = s.graph_cache.can_reuse((1, 32))
    assert entry is not None
    inputs[name] = bad(inputs[name])
    with pytest.raises(CacheError) as e:
        s.graph_cache.run(entry, inputs)
    assert repr(name) in str(e.value) and needle in str(e.value)
    with pytest.raises(CacheError):
        s.graph_cache.step((1, 32), lambda: pytest.fail("a known step must not build"), inputs)


def test_replay_missing_or_unknown_input_raises(cfg, weights):
    s, inputs = _session_inputs(cfg, weights)
    entry = s.graph_cache.can_reuse((1, 32))
    with pytest.raises(CacheError, match="'v_idxs'"):
        s.graph_cache.run(entry, {k: v for k, v in inputs.items() if k != "v_idxs"})
    with pytest.raises(CacheError, match="'bogus'"):
        s.graph_cache.run(entry, {**inputs, "bogus": np.zeros(1, np.float32)})


def test_session_step_refuses_before_advancing(cfg, weights):
    s, _ = _session_inputs(cfg, weights)
    pos = s.pos
    good = DecodeSession.make_inputs
    s.make_inputs = lambda ids: {**good(s, ids), "inp_pos": good(s, ids)["inp_pos"].astype(np.float32)}
    with pytest.raises(CacheError, match="'inp_pos' is float32"):
        s.step([3])
    assert s.pos == pos


# -- structural keys ---------------------------------------------------------------------------------

OPS2 = ["ADD", "MUL", "SUB", "DIV"]


def _graph(spec, *, names=("h", "y"), offset=0, order=0, eps=1e-5, dyn=False):
    """x (f32 [n, rows]) and w ([n]) -> VIEW(x) rows -> RMS_NORM -> binop(., w) -> SCALE -> y."""
    n, rows, op, dt, wire, scale = spec
    b = GraphBuilder()
    if order:  # a different build order (other Tensor ids) must not change the key
        w = b.weight("w", dt, (n,))
        x = b.input("x", "f32", (n, rows + 4))
    else:
        x = b.input("x", "f32", (n, rows + 4))
        w = b.weight("w", dt, (n,))
    v = b.op("VIEW", [x], {"ne": [n, rows, 1, 1], "nb": [4, 4 * n, 4 * n * rows, 4 * n * rows],
                           "offset": offset, **({"dynamic_offset": True} if dyn else {})}, name="v")
    h = b.rms_norm(v, eps, name=names[0])
    m = b.op(op, [h, w] if wire == 0 else [h, h], name="m")
    y = b.scale(m, scale, name=names[1])
    return b.build([y])


specs = st.tuples(st.sampled_from([4, 8, 12]), st.integers(1, 3), st.sampled_from(OPS2), st.sampled_from(["f32"]),
                  st.sampled_from([0, 1]), st.sampled_from([0.5, 2.0]))
MUTATIONS = ["op", "shape", "rows", "wire", "param", "dtype_w", "eps", "offset"]


@settings(max_examples=60, deadline=None)
@given(spec=specs, which=st.sampled_from(MUTATIONS))
def test_semantic_edits_change_the_key_slot_edits_do_not(spec, which):
    n, rows, op, dt, wire, scale = spec
    base = structural_key(_graph(spec)).digest
    # only non-semantic changes: other names of interior nodes, rebuilt (other Tensor ids)
    assert structural_key(_graph(spec, names=("other", "y"))).digest == base
    # the key follows the graph's node order: another build order is a (safe) miss, never a wrong hit
    reordered = structural_key(_graph(spec, order=1))
    assert reordered.n_nodes == structural_key(_graph(spec)).n_nodes
    edited = {
        "op": lambda: _graph((n, rows, OPS2[(OPS2.index(op) + 1) % 4], dt, wire, scale)),
        "shape": lambda: _graph((n + 4, rows, op, dt, wire, scale)),
        "rows": lambda: _graph((n, rows + 1, op, dt, wire, scale)),
        "wire": lambda: _graph((n, rows, op, dt, 1 - wire, scale)),
        "param": lambda: _graph((n, rows, op, dt, wire, scale * 3)),
        "dtype_w": lambda: _graph((n, rows, op, "f16", wire, scale)),
        "eps": lambda: _graph(spec, eps=1e-6),
        "offset": lambda: _graph(spec, offset=4 * n),
    }[which]()
    if which == "dtype_w" and wire == 1:
        return  # w is not used then: same graph
    assert structural_key(edited).digest != base, which


@settings(max_examples=40, deadline=None)
@given(spec=specs, k=st.integers(0, 3), a=st.sampled_from([0, 4, 8, 12]))
def test_dynamic_offsets_are_slots_up_to_alignment(spec, k, a):
    g0 = structural_key(_graph(spec, dyn=True, offset=0))
    g1 = structural_key(_graph(spec, dyn=True, offset=16 * k))  # same 16-byte class
    assert g0.digest == g1.digest and g1.dynamic[0].offset == 16 * k
    if a:  # another alignment class changes the key (vector kernels depend on it)
        assert structural_key(_graph(spec, dyn=True, offset=a)).digest != g0.digest
    assert structural_key(_graph(spec, dyn=False, offset=0)).digest != g0.digest


def test_input_data_is_a_slot(cfg):
    g = build_llama_decode(cfg, 1, 32, 64)
    k = structural_key(g)
    assert [s.name for s in k.inputs] == ["inp_tokens", "inp_pos", "k_idxs", "v_idxs", "kq_mask"]
    assert k.digest == structural_key(build_llama_decode(cfg, 1, 32, 64)).digest
    assert k.digest != structural_key(build_llama_decode(cfg, 1, 64, 64)).digest  # padded n_kv: a shape


# -- dynamic offsets patched in place ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", pytest.param("wgpu", marks=pytest.mark.wgpu)])
def test_dynamic_view_offset_is_patched_on_a_hit(backend):
    if backend == "wgpu" and not _wgpu_ok():
        pytest.skip("no wgpu adapter")
    spec = (8, 2, "MUL", "f32", 0, 0.5)
    be = get_backend(backend)
    w = np.linspace(0.5, 2.0, 8, dtype=np.float32)
    be.set_weights({"w": w})
    gc = GraphCache(be, default_patterns())
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    for step, rows_off in enumerate([0, 2, 4, 2]):
        g = _graph(spec, dyn=True, offset=rows_off * 8 * 4)
        entry, hit = gc.get(g)
        assert hit == (step > 0)
        out = gc.run(entry, {"x": x})["y"]
        ref = interpret(g, {"x": x, "w": w})["y"]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert gc.stats.patched == 3
    with pytest.raises(CacheError, match="modulo"):
        gc.patch_dynamic(entry, {"v": 4})
    with pytest.raises(CacheError, match="outside"):
        gc.patch_dynamic(entry, {"v": 8 * 8 * 4})
    with pytest.raises(CacheError, match="no dynamic view"):
        gc.patch_dynamic(entry, {"nope": 0})


# -- matcher scaling (lenient: catches a quadratic matcher, not a 20 % drift) --------------------------


def _chain(blocks):
    b = GraphBuilder()
    # the chain starts from a residual sum, so that every block matches the same patterns (add_rms_norm*
    # included: each norm reads an ADD) and the match count is exactly proportional to the blocks
    x = b.add(b.input("x", "f32", (16, 1)), b.input("x1", "f32", (16, 1)), name="x0")
    w = b.weight("w", "f32", (16,))
    for i in range(blocks):
        x = b.add(b.mul(b.rms_norm(x, 1e-5, name=f"n{i}"), w, name=f"m{i}"), x, name=f"a{i}")
    return b.build([x])


def test_matcher_time_grows_about_linearly():
    import time

    from fusec.rewrite.match import GraphIndex, find_matches

    def best(g):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            found, _ = find_matches(g, default_patterns(), GraphIndex.of(g))
            ts.append(time.perf_counter() - t0)
        return min(ts), len(found)

    (t_small, n_small), (t_big, n_big) = best(_chain(200)), best(_chain(2000))
    assert n_big == 10 * n_small
    # linear: ~10x; a matcher doing per-candidate work over the whole graph would be ~100x
    assert t_big < 3 * 10 * t_small, (t_small, t_big)
