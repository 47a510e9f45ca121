"""CUDA graph capture per graph-cache entry (fusec.backends.cuda_backend, issue 5 part 4).

Every test needs CuPy and an NVIDIA GPU (``requires_cuda``; skipped elsewhere). Replay must be
bit-identical to eager launches of the same kernels, a new cache entry (padded KV boundary) must
capture anew, a patched dynamic offset must drop the captured graph, wrong inputs must still raise on
replay, and ``FUSEC_DISABLE_CUDA_GRAPHS=1`` must turn capture off.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fusec.dsl import default_patterns
from fusec.errors import BackendError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.models import config_from_dict, random_weights
from fusec.runtime import DecodeSession
from fusec.runtime.cache import GraphCache
from fusec.runtime.key import CacheError
from tests.gpu import requires_cuda

pytestmark = requires_cuda.mark

TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "vocab_size": 61, "tie_word_embeddings": False, "max_position_embeddings": 512,
}
KV_PAD = 32
STEPS = 56  # crosses the padded-KV boundary at position 32: a second entry, captured at step 32


def _backend(**kw):
    from fusec.backends.cuda_backend import CudaBackend

    return CudaBackend(**kw)


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict(TINY, name="tiny-cuda-graphs")


def _session(cfg, backend, weight_dtype="f32", kv_size=96):
    w = random_weights(cfg, seed=5, weight_dtype=weight_dtype)
    return DecodeSession(cfg, backend, w, kv_size=kv_size, patterns=default_patterns(), kv_pad=KV_PAD)


def _entry_of(sess):
    return sess.graph_cache.can_reuse((1, sess.timings[-1]["n_kv"]))


def _decode(sess, steps, seed=11):
    """Logits per step and, per step, the executable's run mode (``eager`` / ``replay``) and whether
    it captured."""
    tokens = np.random.default_rng(seed).integers(0, sess.cfg.vocab_size, size=steps).tolist()
    logits, modes = [], []
    for t in tokens:
        logits.append(sess.step([t]))
        lt = _entry_of(sess).executable.last_timing
        modes.append((lt["mode"], lt["capture_s"] > 0))
    return logits, modes


@pytest.mark.parametrize("weight_dtype", ["f32", "f16"])
def test_replay_is_bit_identical_to_eager_across_a_kv_boundary(cfg, weight_dtype):
    graphs = _session(cfg, _backend(use_graphs=True), weight_dtype)
    eager = _session(cfg, _backend(use_graphs=False, matmul="kernel"), weight_dtype)  # same kernels, no graphs
    assert graphs.backend.matmul == "kernel" and graphs.backend.stream is not None
    out_g, modes = _decode(graphs, STEPS)
    out_e, modes_e = _decode(eager, STEPS)
    for i, (a, b) in enumerate(zip(out_g, out_e, strict=True)):
        assert np.array_equal(a, b), f"step {i} ({modes[i][0]}): replayed logits differ from eager launches"
    # eager + capture exactly at the cache misses (new padded n_kv), replay everywhere else
    misses = [i for i, t in enumerate(graphs.timings) if not t["cached"]]
    assert misses == [0, KV_PAD]
    assert [i for i, (_, cap) in enumerate(modes) if cap] == misses
    assert [i for i, (m, _) in enumerate(modes) if m == "eager"] == misses
    assert all(m == "eager" and not cap for m, cap in modes_e)
    entries = graphs.graph_cache.entries()
    assert len(entries) == 2 and all("graph" in e.backend_state and "fallback" not in e.backend_state
                                     for e in entries)
    assert all(e.executable.captures == 1 for e in entries)
    assert all(not e.backend_state for e in eager.graph_cache.entries())
    for name in ("cache_k_l0", "cache_v_l1"):  # the KV caches written by replays match too
        assert np.array_equal(graphs.backend.read_weight(name), eager.backend.read_weight(name))


def test_graph_kernels_match_cublas_within_tolerance(cfg):
    """The generated mul_mat kernels the graph path uses agree with the cuBLAS path (not bitwise)."""
    graphs = _session(cfg, _backend(use_graphs=True))
    cublas = _session(cfg, _backend(use_graphs=False))
    assert cublas.backend.matmul == "cublas"
    out_g, _ = _decode(graphs, 8)
    out_c, _ = _decode(cublas, 8)
    for a, b in zip(out_g, out_c, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


def test_wrong_inputs_still_raise_on_replay(cfg):
    sess = _session(cfg, _backend(use_graphs=True))
    _decode(sess, 3)
    entry = _entry_of(sess)
    assert "graph" in entry.backend_state
    good = sess.make_inputs([4])
    bad = {**good, "kq_mask": np.zeros((1, 1, 1, good["kq_mask"].shape[-1] + 1), np.float32)}
    with pytest.raises(CacheError, match="'kq_mask'"):
        sess.graph_cache.run(entry, bad)
    with pytest.raises(BackendError, match="'kq_mask'"):  # the executable checks too, before any copy or launch
        entry.executable.run(bad, backend_state=entry.backend_state)
    with pytest.raises(BackendError, match="'inp_pos' is float32"):
        entry.executable.run({**good, "inp_pos": good["inp_pos"].astype(np.float32)},
                             backend_state=entry.backend_state)
    assert "graph" in entry.backend_state  # a refused replay keeps the captured graph
    out = sess.graph_cache.run(entry, good)["result_output"]
    assert entry.executable.last_timing["mode"] == "replay"
    ref = entry.executable.run(good)["result_output"]  # no state: eager launches of the same kernels
    assert entry.executable.last_timing["mode"] == "eager"
    assert np.array_equal(out, ref)


def test_env_var_disables_graphs(cfg, monkeypatch):
    monkeypatch.setenv("FUSEC_DISABLE_CUDA_GRAPHS", "1")
    be = _backend()
    assert (be.use_graphs, be.stream, be.matmul) == (False, None, "cublas")
    sess = _session(cfg, be)
    _, modes = _decode(sess, 4)
    assert all(m == "eager" and not cap for m, cap in modes)
    assert all(not e.backend_state and e.executable.captures == 0 for e in sess.graph_cache.entries())
    assert _backend(use_graphs=True).use_graphs  # an explicit flag wins over the variable
    monkeypatch.setenv("FUSEC_DISABLE_CUDA_GRAPHS", "0")
    assert _backend().use_graphs


def test_disabled_graph_cache_never_captures(cfg, monkeypatch):
    monkeypatch.setenv("FUSEC_DISABLE_GRAPH_CACHE", "1")
    be = _backend(use_graphs=True)
    compiled = []
    compile_ = be.compile
    be.compile = lambda g: compiled.append(compile_(g)) or compiled[-1]
    sess = _session(cfg, be)
    for t in (3, 5, 7):
        sess.step([t])
        assert compiled[-1].last_timing == {**compiled[-1].last_timing, "mode": "eager", "capture_s": 0.0}
    assert len(compiled) == 3 and all(ex.captures == 0 for ex in compiled)
    assert len(sess.graph_cache) == 0 and sess.graph_cache.stats.hits == 0


def test_bad_matmul_mode_is_a_backend_error():
    with pytest.raises(BackendError, match="matmul"):
        _backend(matmul="tensor-cores")


def test_cublas_capture_falls_back_loudly_or_replays_exactly(cfg):
    """cuBLAS through CuPy on a capturing stream: CuPy 14 refuses it, so the entry must fall back to
    eager launches with a CudaGraphWarning (once), and still compute the eager cuBLAS results."""
    from fusec.backends.cuda_backend import CudaGraphWarning

    sess = _session(cfg, _backend(use_graphs=True, matmul="cublas"))
    ref = _session(cfg, _backend(use_graphs=False, matmul="cublas"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, modes = _decode(sess, 4)
    out_r, _ = _decode(ref, 4)
    for a, b in zip(out, out_r, strict=True):
        assert np.array_equal(a, b)
    state = _entry_of(sess).backend_state
    ours = [w for w in caught if issubclass(w.category, CudaGraphWarning)]
    assert ("graph" in state) != ("fallback" in state)
    if "fallback" in state:
        assert len(ours) == 1 and state["fallback"] in str(ours[0].message)
        # one capture attempt (step 0, timed in capture_s), never retried for this entry
        assert [m for m, _ in modes] == ["eager"] * 4 and [c for _, c in modes] == [True, False, False, False]
    else:  # a CuPy that captures cuBLAS: then it must replay
        assert not ours and [m for m, _ in modes] == ["eager", "replay", "replay", "replay"]


# -- dynamic offsets: a patched entry drops its graph -------------------------------------------------------


def _offset_graph(offset):
    """x (f32 [8, 10]) -> dynamic VIEW of 2 rows at ``offset`` bytes -> RMS_NORM -> MUL w -> SCALE -> y."""
    n, rows = 8, 2
    b = GraphBuilder()
    x = b.input("x", "f32", (n, rows + 8))
    w = b.weight("w", "f32", (n,))
    v = b.op("VIEW", [x], {"ne": [n, rows, 1, 1], "nb": [4, 4 * n, 4 * n * rows, 4 * n * rows],
                           "offset": offset, "dynamic_offset": True}, name="v")
    y = b.scale(b.mul(b.rms_norm(v, 1e-5, name="h"), w, name="m"), 0.5, name="y")
    return b.build([y])


def test_patched_dynamic_offset_drops_and_recaptures_the_graph():
    be = _backend(use_graphs=True)
    w = np.linspace(0.5, 2.0, 8, dtype=np.float32)
    be.set_weights({"w": w})
    gc = GraphCache(be, default_patterns())
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    seen = []
    for step, rows_off in enumerate([0, 2, 2, 4, 4]):
        g = _offset_graph(rows_off * 8 * 4)
        entry, hit = gc.get(g)
        assert hit == (step > 0)
        out = gc.run(entry, {"x": x})["y"]
        np.testing.assert_allclose(out, interpret(g, {"x": x, "w": w})["y"], rtol=1e-5, atol=1e-6)
        lt = entry.executable.last_timing
        seen.append((lt["mode"], lt["capture_s"] > 0))
    # offset changes (steps 1, 3) patch the entry: its graph is dropped, the step runs eagerly and re-captures
    assert seen == [("eager", True), ("eager", True), ("replay", False), ("eager", True), ("replay", False)]
    assert gc.stats.patched == 2 and entry.executable.captures == 3


def test_new_weight_memory_invalidates_the_captured_graph():
    """``set_weights`` with another size gives the leaf new device memory: the next run re-captures
    (a stale graph would read freed memory); same-size updates keep the graph and are seen by it."""
    be = _backend(use_graphs=True)
    gc = GraphCache(be, default_patterns())
    x = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)
    g = _offset_graph(0)
    be.set_weights({"w": np.ones(8, np.float32)})
    entry, _ = gc.get(g)
    gc.run(entry, {"x": x})
    gc.run(entry, {"x": x})
    assert entry.executable.last_timing["mode"] == "replay"
    w2 = np.linspace(1.0, 3.0, 8, dtype=np.float32)
    be.set_weights({"w": w2})  # same size: in place, the graph stays and reads the new values
    out = gc.run(entry, {"x": x})["y"]
    assert entry.executable.last_timing["mode"] == "replay"
    np.testing.assert_allclose(out, interpret(g, {"x": x, "w": w2})["y"], rtol=1e-5, atol=1e-6)
    be.set_weights({"other": np.zeros(3, np.float32)})  # new memory somewhere: generation bump
    gc.run(entry, {"x": x})
    assert entry.executable.last_timing["mode"] == "eager" and entry.executable.captures == 2
