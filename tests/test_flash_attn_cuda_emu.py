"""The CUDA flash_attn kernel sequences executed on the CPU (``tests/cuda_emu.py``: the generated CUDA
source compiled with g++ against an emulation header, each block's threads as OS threads, warp
shuffles as barriers), against the float64 interpreter. No GPU needed; g++ (C++20) is.

This is how the CUDA decode kernel (``vec``: warps over KV blocks, GQA heads per block, reduce-scattered
q.k, split partials, the CUDA reduction) and the CUDA mask pre-pass are checked where there is no
device: index arithmetic, lane / warp hand-offs through shared memory, clamped tail rows, skipped
blocks, unwritten partials (the ``partials`` scratch starts as NaN: a read of a record a masked split
did not write shows up), strided (non-vector) K/V loads. ``tests/test_flash_attn_cuda.py`` runs the
same sequences on a GPU. Tolerances as ``tests/test_flash_attn.py`` (NMSE <= 5e-4, fully masked rows
exactly 0, skipping on vs off <= 1e-10). Shapes stay small: each block costs 128 OS threads.
"""

from __future__ import annotations

import numpy as np
import pytest

from fusec.codegen.families.flash_attn import attn_operands, choose_plan, emit_flash_attn_seq
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.rewrite import rewrite
from tests import cuda_emu
from tests.test_flash_attn import ATTN, FA_NMSE, attn_values, check_against_interp, fa_case, llama_attention, nmse
from tests.test_flash_attn_cuda import multi_seq_case

pytestmark = pytest.mark.skipif(not cuda_emu.available(), reason="needs g++ (C++20)")


def run(y, vals, **kw) -> np.ndarray:
    return cuda_emu.run_sequence(emit_flash_attn_seq(y, "cuda", **kw), vals)["dst"]


@pytest.mark.parametrize(("D", "Dv", "n_q", "n_head", "gqa", "n_kv", "kv", "mdt", "kind", "softcap", "max_bias"), [
    (128, 128, 1, 8, 4, 300, "f16", "f16", "random", 0.0, 0.0),      # the decode shape: G = 4, tail block
    (64, 64, 2, 4, 1, 517, "f32", "f16", "random", 0.0, 0.0),        # GQA 1, f32 K/V, 2 rows -> 2 row groups
    (256, 256, 1, 8, 8, 200, "f16", "f32", "swa", 0.0, 0.0),         # G = 8, LK = 32, f32 mask
    (80, 96, 1, 8, 2, 257, "f16", "f16", "random", 20.0, 8.0),       # D != Dv, LV = 16, softcap, ALiBi
    (96, 80, 3, 4, 4, 70, "f32", "f32", "causal", 0.0, 0.0),         # 3 rows, one KV block per split
    (128, 128, 1, 8, 8, 100, "f16", None, "zero", 0.0, 0.0),          # no mask, G = 8 (LK = 16)
])
def test_decode_matches_interpreter(D, Dv, n_q, n_head, gqa, n_kv, kv, mdt, kind, softcap, max_bias):
    y, g, vals = fa_case(17 + D + n_kv, D, Dv, n_q, n_head, gqa, n_kv, kv_dtype=kv, mask_dtype=mdt, mask_kind=kind,
                         softcap=softcap, max_bias=max_bias, kb=32)
    seq = emit_flash_attn_seq(y, "cuda")
    att = next(k for k in seq.kernels if k.meta["role"] == "attention")
    assert att.meta["variant"] == "vec" and att.workgroup_size == (128, 1, 1)
    assert att.meta["heads_per_block"] == min(gqa, 8)
    got = cuda_emu.run_sequence(seq, vals)["dst"]
    check_against_interp(y, g, vals, got)


def test_fully_masked_rows_and_split_variants():
    """Row 0 fully masked (result exactly 0, partials of its masked splits never read), skipping off, no
    split (direct write), more splits than KV blocks (clamped: one block per split), 2 and 4 rows per
    block: all equal (NMSE <= 1e-10) and == interpreter."""
    y, g, vals = fa_case(5, 128, 128, 4, 8, 4, 230, kv_dtype="f16", mask_kind="random", kb=32)
    vals["mask"][:, 0, :] = -np.inf
    vals["mask"][:, 2, 64:] = -np.inf
    base = run(y, vals)
    check_against_interp(y, g, vals, base)
    for kw in ({"skip": False}, {"n_split": 1}, {"n_split": 1000}, {"rows": 2}, {"rows": 4, "n_split": 3}):
        got = run(y, vals, **kw)
        assert nmse(got, base) <= 1e-10, kw
        check_against_interp(y, g, vals, got)


@pytest.mark.parametrize("layout", ["seq", "ggml"])
def test_multi_sequence_flags_and_result(layout):
    """4 sequences x 96 cells, GQA 4: == interpreter, skipping on == off; the pre-pass flags (one query
    row per group) mark each sequence's own blocks 2 and the others 0 in both layouts, and each block
    list holds exactly the sequence's own blocks."""
    y, g, vals = multi_seq_case(3, 128, 8, 4, 4, 96, layout)
    seq = emit_flash_attn_seq(y, "cuda")
    out = cuda_emu.run_sequence(seq, vals)
    ref = interpret(g, vals)["y"].reshape(-1)
    assert not np.isnan(out["dst"]).any() and nmse(out["dst"], ref) <= FA_NMSE
    off = run(y, vals, skip=False)
    assert nmse(out["dst"], off) <= 1e-10
    n_blocks = 4 * 96 // 32
    # block lists L = z * 2 + hg (2 head groups of G = 4; z = the sequence in both layouts): count, ticket
    # (one per split after the run), then (block, flags of the 4 heads, 2 bits each) pairs: the own 3
    # blocks, every head's flag 2 (all zero); the other sequences' blocks (flag 0) are not listed
    att = next(k for k in seq.kernels if k.meta["role"] == "attention")
    bl = out["blist"].reshape(8, 2 * (n_blocks + 1))
    for L in range(8):
        s = L // 2
        assert bl[L, 0] == 3 and list(bl[L, 2:8]) == [3 * s, 170, 3 * s + 1, 170, 3 * s + 2, 170], bl[L]
        assert bl[L, 1] == (att.meta["n_split"] if att.meta["fused_reduce"] else 0)


def test_prepass_flags_equal_numpy_for_tile_blocks():
    """The CUDA pre-pass (a warp per block) with 16 query rows per group (tile) and KV block 64."""
    y, g, vals = fa_case(9, 64, 64, 20, 2, 1, 300, mask_kind="random", kb=64, mask_heads=2)
    seq = emit_flash_attn_seq(y, "cuda", kv_block=64)
    out = cuda_emu.run_sequence(seq, vals)
    check_against_interp(y, g, vals, out["dst"])
    m = np.asarray(vals["mask"], np.float32)
    qr, kb, n_q, n_kv = 16, 64, 20, 300
    nb, ng = -(-n_kv // kb), -(-n_q // qr)
    want = np.empty((2, ng, nb), np.int32)
    for h in range(2):
        for gi in range(ng):
            for bi in range(nb):
                blk = m[h, gi * qr:min((gi + 1) * qr, n_q), bi * kb:(bi + 1) * kb]
                want[h, gi, bi] = 0 if np.all(blk == -np.inf) else (2 if np.all(blk == 0) else 1)
    np.testing.assert_array_equal(out["flags"][:want.size].reshape(want.shape), want)


@pytest.mark.parametrize(("n_q", "softcap", "mask_dtype"), [(1, 0.0, "f32"), (3, 30.0, "f16")])
def test_rewritten_graph_strided_v(n_q, softcap, mask_dtype):
    """The FUSED node reads V through the transposed cache view (scalar strided loads, no vectors)."""
    b = GraphBuilder()
    g, _ = llama_attention(b, D=64, n_q=n_q, n_kv=70, kv_size=80, mask_dtype=mask_dtype, softcap=softcap)
    fused, rep = rewrite(g, ATTN)
    assert rep.total_matches == 1
    node = next(t for t in fused.nodes if t.op == "FUSED")
    seq = emit_flash_attn_seq(node, "cuda")
    att = next(k for k in seq.kernels if k.meta["role"] == "attention")
    assert att.entry.endswith(("_skip_split", "_split", "_skip")) and "_vv" not in att.entry
    vals = attn_values(g, n_q)
    got = cuda_emu.run_sequence(seq, vals)["dst"]
    ref = interpret(g, vals)["out"].reshape(-1)
    assert nmse(got, ref) <= FA_NMSE


def test_split_heuristic_for_the_benchmark_shapes():
    """4 sequences x 8192 cells of a 32768-cell cache (32 heads, 8 KV heads): G = 4, 32 blocks per split
    (32 splits, 1024 blocks); one sequence of 4096 cells: 4 blocks per split (256 blocks)."""
    for (n_kv, n_seq), (want_split, want_blocks) in {(32768, 4): (32, 1024), (4096, 1): (32, 256)}.items():
        bld = GraphBuilder()
        q = bld.input("q", "f32", (128, 1, 32, n_seq))
        k = bld.input("k", "f16", (128, n_kv, 8, 1))
        v = bld.input("v", "f16", (128, n_kv, 8, 1))
        m = bld.input("m", "f16", (n_kv, 1, 1, n_seq))
        y = bld.flash_attn_ext(q, k, v, m, scale=0.1)
        pl = choose_plan(attn_operands(y), "cuda")
        assert (pl.g, pl.qr, pl.kb, pl.n_split) == (4, 1, 32, want_split)
        att = next(k for k in emit_flash_attn_seq(y, "cuda").kernels if k.meta["role"] == "attention")
        assert att.grid == (want_split, 8, n_seq) and np.prod(att.grid) == want_blocks


def test_strided_k_and_v():
    """K and V as PERMUTE views of [n_kv, D, heads] caches (rows not contiguous: scalar strided loads),
    3 query rows with 2 rows per block, D = 96 (NC = 3 chunks, lanes 0..3 of a row group hold 3)."""
    b = GraphBuilder()
    q = b.input("q", "f32", (96, 3, 4))
    kc = b.input("kc", "f16", (70, 96, 2))
    vc = b.input("vc", "f16", (70, 96, 2))
    k, v = b.permute(kc, 1, 0, 2, 3), b.permute(vc, 1, 0, 2, 3)
    m = b.input("m", "f16", (70, 4))
    y = b.flash_attn_ext(q, k, v, m, scale=0.1, name="y")
    g = b.build([y])
    rng = np.random.default_rng(0)
    vals = {"q": rng.standard_normal(q.nelements).astype(np.float32),
            "kc": rng.standard_normal(kc.nelements).astype(np.float16),
            "vc": rng.standard_normal(vc.nelements).astype(np.float16),
            "m": np.where(rng.random((4, 70)) < 0.3, -np.inf, 0.0).astype(np.float16)}
    ref = interpret(g, vals)["y"].reshape(-1)
    for kw in ({}, {"rows": 2}):
        seq = emit_flash_attn_seq(y, "cuda", **kw)
        att = next(k for k in seq.kernels if k.meta["role"] == "attention")
        assert "_kv" not in att.entry and "_vv" not in att.entry
        got = cuda_emu.run_sequence(seq, vals)["dst"]
        assert not np.isnan(got).any() and nmse(got, ref) <= FA_NMSE, kw


def test_block_list_over_several_chunks(monkeypatch):
    """The listing pre-pass's loop over chunks of its threads (here 128 threads, 141 KV blocks: 2
    chunks; on the device only past 32768 cells), a sliding window keeping a few blocks per list; the
    packed flags equal numpy's (0 all -inf, 2 all zero, 1 mixed, over the cells < n_kv)."""
    from fusec.codegen.families import flash_attn as fa

    monkeypatch.setattr(fa, "BLOCK_LIST_MAX_THREADS", 128)
    y, g, vals = fa_case(31, 64, 64, 2, 4, 4, 4500, kv_dtype="f16", mask_kind="random", kb=32)
    m = vals["mask"]
    m[:, :, :4000] = -np.inf  # only the last ~16 blocks visible, and random -inf blocks among them
    seq = emit_flash_attn_seq(y, "cuda")
    bk = next(k for k in seq.kernels if k.meta["role"] == "prepass")
    assert bk.meta["lists"] and bk.workgroup_size == (128, 1, 1)
    out = cuda_emu.run_sequence(seq, vals)
    check_against_interp(y, g, vals, out["dst"])
    n_blocks = -(-4500 // 32)
    mf = np.asarray(m, np.float32)[0, :2]  # [row group = query row][cell]
    flags = np.array([[0 if np.all(blk == -np.inf) else (2 if np.all(blk == 0) else 1)
                       for blk in (mf[r, b * 32:(b + 1) * 32] for b in range(n_blocks))] for r in range(2)])
    bl = out["blist"].reshape(2, 2 * (n_blocks + 1))  # lists L = z (= row group) * 1 head group
    for r in range(2):
        want = np.flatnonzero(flags[r] != 0)  # G = 4 heads, one mask batch: the same flag 4 times
        pairs = bl[r, 2:2 + 2 * len(want)].reshape(-1, 2)
        assert bl[r, 0] == len(want) and list(pairs[:, 0]) == list(want)
        assert list(pairs[:, 1]) == [f * 0b01010101 for f in flags[r][want]]


@pytest.mark.parametrize("n_seq", [1, 2])
def test_per_head_masks(n_seq):
    """Masks per head (m2 = 2): the G = 4 heads of a block have different pre-pass flags (packed per head
    in the block list); with 2 sequences also a KV batch per sequence."""
    y, g, vals = fa_case(41 + n_seq, 64, 64, 2, 8, 4, 200, n_seq=n_seq, mask_kind="random", kb=32, mask_heads=2)
    out = cuda_emu.run_sequence(emit_flash_attn_seq(y, "cuda"), vals)["dst"]
    check_against_interp(y, g, vals, out)
    assert nmse(run(y, vals, skip=False), out) <= 1e-10
