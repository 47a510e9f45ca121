"""FLASH_ATTN_EXT kernel sequences on the CUDA backend (mask pre-pass, split-KV attention, reduction).

Every test needs CuPy and an NVIDIA GPU (``requires_cuda``; skipped elsewhere). Graphs run through
:class:`fusec.backends.cuda_backend.CudaBackend` (scratch buffers from the buffer plan, CUDA graph
capture on), the output poisoned with NaN before every run, against the float64 interpreter.

Tolerances: normalized MSE ``sum((out-ref)^2)/sum(ref^2)`` <= 5e-4 (ggml's test-backend-ops bound,
as ``tests/test_flash_attn.py``); fully masked rows exactly 0; skipping on vs off NMSE <= 1e-10 (the
same arithmetic on the blocks not skipped; skipped blocks add exact zeros); a CUDA graph replay
bit-identical to the eager launches it captured.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.rewrite import rewrite
from tests.cuda_emu import binding_key, sequence_buffers
from tests.gpu import requires_cuda
from tests.test_flash_attn import ATTN, FA_NMSE, attn_values, check_against_interp, fa_case, llama_attention, nmse

pytestmark = requires_cuda.mark
KB = 32  # CUDA KV block (flash_attn.KV_BLOCK["cuda"]): the block pattern of the random masks


def _backend(**kw):
    from fusec.backends.cuda_backend import CudaBackend

    return CudaBackend(**kw)


def run_cuda(exe, y, vals, state=None) -> np.ndarray:
    """One run of ``exe`` with ``y``'s memory poisoned with NaN first; the flat output of ``y``."""
    be = exe.backend
    with be.on_stream():
        exe._bind()
        exe.device_array(y).fill(np.nan)
    return np.asarray(exe.run(vals, state)[y.name]).reshape(-1)


def roles(exe) -> list[str]:
    return [k.meta.get("role") for k in exe.kernels]


def multi_seq_case(seed: int, D: int, n_head: int, gqa: int, n_seq: int, cells: int, layout: str,
                   kv_dtype: str = "f16"):
    """Decode of ``n_seq`` sequences (one token each) in a unified KV cache of ``n_seq * cells`` cells,
    sequence ``s`` owning cells ``[s*cells, (s+1)*cells)``. ``layout="seq"``: q ``[D, 1, n_head, n_seq]``,
    mask ``[n_kv, 1, 1, n_seq]`` (one mask batch per sequence: whole blocks -inf); ``"ggml"``: llama.cpp's
    ubatch, q ``[D, n_seq, n_head, 1]``, mask ``[n_kv, n_seq, 1, 1]`` block-diagonal."""
    rng = np.random.default_rng(seed)
    n_kv = n_seq * cells
    b = GraphBuilder()
    if layout == "seq":
        q = b.input("q", "f32", (D, 1, n_head, n_seq))
        mask = b.input("mask", "f16", (n_kv, 1, 1, n_seq))
    else:
        q = b.input("q", "f32", (D, n_seq, n_head, 1))
        mask = b.input("mask", "f16", (n_kv, n_seq, 1, 1))
    k = b.input("k", kv_dtype, (D, n_kv, n_head // gqa, 1))
    v = b.input("v", kv_dtype, (D, n_kv, n_head // gqa, 1))
    y = b.flash_attn_ext(q, k, v, mask, scale=1.0 / math.sqrt(D), name="y")
    g = b.build([y])
    own = (np.arange(n_kv)[None, :] // cells) == np.arange(n_seq)[:, None]  # [n_seq, n_kv]
    vals = {"q": rng.standard_normal(q.nelements).astype(np.float32),
            "k": rng.standard_normal(k.nelements).astype(k.dtype.np),
            "v": rng.standard_normal(v.nelements).astype(v.dtype.np),
            "mask": np.where(own, 0.0, -np.inf).astype(np.float16)}
    return y, g, vals


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize(("n_q", "gqa", "n_kv", "kv_dtype", "mask_kind"), [
    (1, 4, 300, "f16", "random"), (4, 1, 517, "f32", "random"), (3, 2, 200, "f16", "blockdiag"),
    (1, 4, 257, "f16", "swa"), (12, 2, 130, "f16", "random")])
def test_sequence_matches_interpreter(D, n_q, gqa, n_kv, kv_dtype, mask_kind):
    """vec (n_q <= 8: pre-pass + split + reduce) and tile (n_q = 12) on CUDA == interpreter; replay of
    the captured CUDA graph == the eager run, bit for bit."""
    y, g, vals = fa_case(1000 + D + n_q, D, D, n_q, 8, gqa, n_kv, kv_dtype=kv_dtype, mask_kind=mask_kind, kb=KB)
    exe = _backend(use_graphs=True).compile(g)
    want = ["prepass", "attention"]  # vec: the listing pre-pass; the last split combines the partials
    assert roles(exe) == want
    state: dict = {}
    eager = run_cuda(exe, y, vals, state)
    assert exe.last_timing["mode"] == "eager" and "graph" in state, state.get("fallback")
    replay = run_cuda(exe, y, vals, state)
    assert exe.last_timing["mode"] == "replay"
    check_against_interp(y, g, vals, eager)
    np.testing.assert_array_equal(replay, eager)


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("layout", ["seq", "ggml"])
def test_multi_sequence_block_diagonal(D, layout):
    """4 sequences in one unified cache, GQA 4: == interpreter; the pre-pass (one query row per group on
    CUDA) lists only each sequence's own blocks in both layouts; skipping on == off."""
    from fusec.backends.wgpu_backend import _ScratchRef

    y, g, vals = multi_seq_case(7 + D, D, 8, 4, 4, 96, layout)
    on = _backend(use_graphs=True).compile(g)
    off = _backend(use_graphs=True, flash_attn_skip=False).compile(g)
    assert roles(on) == ["prepass", "attention"] and roles(off) == ["attention", "reduce"]
    got_on, got_off = run_cuda(on, y, vals, {}), run_cuda(off, y, vals, {})
    ref = interpret(g, vals)["y"].reshape(-1)  # no row is fully masked
    assert not np.isnan(got_on).any() and nmse(got_on, ref) <= FA_NMSE, nmse(got_on, ref)
    assert nmse(got_on, got_off) <= 1e-10
    with on.backend.on_stream():
        bl = on._memory(_ScratchRef(y, "blist")).view(np.int32).get()
    n_blocks = 4 * 96 // KB
    # lists L = z * 2 + hg (z = the sequence in both layouts, 2 head groups of G = 4): count, ticket, then
    # (block, 4 heads' flags) pairs: only the own 3 blocks, all zero (flag 2 = 0b10 per head); the other
    # sequences' blocks (flag 0) are not listed
    bl = bl[:8 * 2 * (n_blocks + 1)].reshape(8, 2 * (n_blocks + 1))
    for L in range(8):
        s = L // 2
        assert bl[L, 0] == 3 and list(bl[L, 2:8]) == [3 * s, 170, 3 * s + 1, 170, 3 * s + 2, 170], bl[L]


@pytest.mark.parametrize("n_q", [1, 5, 17])
def test_skipping_on_and_off_agree(n_q):
    y, g, vals = fa_case(11 + n_q, 128, 128, n_q, 4, 2, 450, mask_kind="random", kb=KB)
    on = run_cuda(_backend(use_graphs=False).compile(g), y, vals)
    off = run_cuda(_backend(use_graphs=False, flash_attn_skip=False).compile(g), y, vals)
    assert nmse(on, off) <= 1e-10
    check_against_interp(y, g, vals, on)


@pytest.mark.parametrize(("n_q", "softcap", "mask_dtype"), [(1, 0.0, "f32"), (3, 30.0, "f16"), (12, 0.0, None)])
def test_rewritten_graph_runs_on_cuda_backend(n_q, softcap, mask_dtype):
    """The FUSED flash_attn node (transposed V view of the cache) on CUDA == the unfused graph."""
    b = GraphBuilder()
    g, _ = llama_attention(b, D=64, n_q=n_q, n_kv=70, kv_size=80, mask_dtype=mask_dtype, softcap=softcap)
    fused, rep = rewrite(g, ATTN)
    assert rep.total_matches == 1
    exe = _backend(use_graphs=True).compile(fused)
    r = roles(exe)
    assert "attention" in r and (("prepass" in r) == (mask_dtype is not None))
    vals = attn_values(g, n_q)
    out = exe.run(vals, {})["out"]
    assert nmse(out, interpret(g, vals)["out"]) <= FA_NMSE


@pytest.mark.parametrize(("D", "Dv", "n_q", "gqa", "n_kv", "kv", "mdt", "kind", "softcap", "max_bias", "kw"), [
    (128, 128, 1, 4, 8200, "f16", "f16", "random", 0.0, 0.0, {}),                 # decode shape, many splits
    (128, 128, 1, 8, 1000, "f16", "f16", "swa", 0.0, 0.0, {}),                    # G = 8 (LK = 16)
    (128, 128, 2, 1, 777, "f32", "f32", "random", 0.0, 0.0, {}),                  # GQA 1, f32 K/V and mask
    (64, 64, 1, 4, 97, "f16", "f16", "causal", 0.0, 0.0, {"n_split": 1000}),      # one block per split (> blocks)
    (80, 96, 3, 2, 300, "f16", "f16", "random", 20.0, 8.0, {}),                   # D != Dv, softcap, ALiBi
    (256, 256, 1, 8, 450, "f16", None, "zero", 0.0, 0.0, {}),                     # no mask, G = 8, LK = 32
    (256, 256, 4, 4, 333, "f32", "f16", "blockdiag", 0.0, 0.0, {"rows": 2}),      # 2 rows per block
    (96, 80, 5, 4, 129, "f16", "f16", "random", 0.0, 0.0, {"rows": 4, "n_split": 1}),  # no split: direct write
])
def test_vec_kernel_shapes(D, Dv, n_q, gqa, n_kv, kv, mdt, kind, softcap, max_bias, kw):
    """The CUDA vec kernel (4 warps over KV blocks, G heads x QR rows per block): == interpreter with
    fully masked rows exactly 0 (the partials of masked splits are never written or read), skipping on
    == off, CUDA graph replay == eager."""
    from fusec.backends import cuda_runtime as rt
    from fusec.codegen.families.flash_attn import emit_flash_attn_seq

    y, g, vals = fa_case(500 + D + n_kv, D, Dv, n_q, 8, gqa, n_kv, kv_dtype=kv, mask_dtype=mdt, mask_kind=kind,
                         softcap=softcap, max_bias=max_bias, kb=KB)
    if mdt is not None and n_q > 1:
        vals["mask"][:, 1, :] = -np.inf  # a fully masked row next to live ones
    skips = (True, False) if mdt is not None else (True,)
    outs = [_run_seq_cuda(rt, emit_flash_attn_seq(y, "cuda", skip=sk, **kw), vals) for sk in skips]
    check_against_interp(y, g, vals, outs[0])
    assert all(nmse(o, outs[0]) <= 1e-10 for o in outs[1:])
    exe = _backend(use_graphs=True).compile(g)
    state: dict = {}
    eager = run_cuda(exe, y, vals, state)
    replay = run_cuda(exe, y, vals, state)
    check_against_interp(y, g, vals, eager)
    np.testing.assert_array_equal(replay, eager)


def _run_seq_cuda(rt, seq, vals) -> np.ndarray:
    """Launch a KernelSequence directly: inputs by root name, output poisoned with NaN, f32 scratch NaN
    and i32 scratch -7 (a read of an unwritten partial or flag shows)."""
    import cupy as cp

    bufs, written = sequence_buffers(seq, vals, xp=cp)
    for k in seq.kernels:
        rt.launch(k, [bufs[binding_key(b)] for b in k.bindings])
    cp.cuda.get_current_stream().synchronize()
    return cp.asnumpy(bufs[written[-1]])
