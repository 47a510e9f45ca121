"""FLASH_ATTN_EXT (op, interpreter, flash_attn kernels) and the attention rewrite (patterns/attention.fuse).

WGSL kernel sequences (mask pre-pass, attention, split reduction) run on the wgpu adapter (lavapipe
here) against the numpy interpreter; every emitted variant compiles with nvcc (sm_90) and passes
the MSL shim check. Outputs are poisoned with NaN before each run so unwritten elements fail.

Tolerances: kernels vs interpreter, normalized MSE ``sum((out-ref)^2)/sum(ref^2)`` <= 5e-4 (ggml's
test-backend-ops bound for FLASH_ATTN_EXT); fully masked rows must be exactly 0. Skipping on vs off:
equal within NMSE 1e-10 (the same arithmetic on the blocks not skipped; skipped blocks contribute
exact zeros). Interpreter FLASH_ATTN_EXT vs the unfused MUL_MAT -> SOFT_MAX -> MUL_MAT graph:
NMSE <= 1e-10 (float64 vs float32 reference arithmetic), on rows with at least one visible entry.
Lavapipe is slow: n_kv stays <= 160 and example counts small (ci profile).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusec.codegen import emit, emit_all
from fusec.codegen.check import check_cuda, check_msl
from fusec.codegen.families.flash_attn import HEAD_SIZES, KV_BLOCK, emit_flash_attn_seq
from fusec.dsl import default_patterns
from fusec.errors import CodegenError, GraphError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.rewrite import rewrite
from fusec.runtime.plan import plan_buffers
from tests.gpu import requires_wgpu

FA_NMSE = 5e-4
VIEWS = ("VIEW", "PERMUTE", "RESHAPE", "TRANSPOSE")
ATTN = [p for p in default_patterns() if p.name.startswith("attention_flash")]


def nmse(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((out - ref) ** 2) / max(np.sum(ref**2), 1e-300))


# ---------------------------------------------------------------------------------------------
# cases


def make_mask(rng, kind: str, n_kv: int, n_q: int, rows: int, kb: int, n_seq_tokens: int = 1) -> np.ndarray:
    """A mask f32 [rows, n_kv] (numpy order) of ``kind``: ``random`` (random values, random -inf
    entries, whole -inf and zero KV blocks as test-backend-ops injects them), ``causal`` (the last
    n_q positions of n_kv), ``swa`` (causal within a window of 5), ``blockdiag`` (``n_seq_tokens``
    sequences each attending its own contiguous KV range), ``zero``. Row 0 of ``random`` may be
    fully masked."""
    m = np.zeros((rows, n_kv), np.float32)
    pos = np.arange(n_kv)
    qpos = n_kv - n_q + np.arange(rows)
    if kind == "random":
        m[:] = rng.standard_normal(m.shape).astype(np.float32)
        m[rng.random(m.shape) < 0.2] = -np.inf
        for b in range(0, n_kv, kb):
            r = rng.random()
            if r < 0.3:
                m[:, b:b + kb] = -np.inf
            elif r < 0.55:
                m[:, b:b + kb] = 0.0
        if rng.random() < 0.3:
            m[0, :] = -np.inf  # fully masked row
    elif kind == "causal":
        m[pos[None, :] > qpos[:, None]] = -np.inf
    elif kind == "swa":
        m[(pos[None, :] > qpos[:, None]) | (pos[None, :] <= qpos[:, None] - 5)] = -np.inf
    elif kind == "blockdiag":
        seq_of_kv = pos * n_seq_tokens // n_kv
        seq_of_q = np.arange(rows) * n_seq_tokens // max(n_q, 1)
        m[seq_of_kv[None, :] != seq_of_q[:, None]] = -np.inf
    return m


def fa_case(seed: int, D: int, Dv: int, n_q: int, n_head: int, gqa: int, n_kv: int, n_seq: int = 1,
            kv_dtype: str = "f16", mask_dtype: str | None = "f16", mask_kind: str = "random", softcap: float = 0.0,
            max_bias: float = 0.0, mask_heads: int = 1, kb: int = 64):
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    q = b.input("q", "f32", (D, n_q, n_head, n_seq))
    k = b.input("k", kv_dtype, (D, n_kv, n_head // gqa, n_seq))
    v = b.input("v", kv_dtype, (Dv, n_kv, n_head // gqa, n_seq))
    rows = n_q + (n_q % 2)  # a padded mask (more rows than queries)
    mask = b.input("mask", mask_dtype, (n_kv, rows, mask_heads)) if mask_dtype else None
    y = b.flash_attn_ext(q, k, v, mask, scale=1.0 / math.sqrt(D), max_bias=max_bias, logit_softcap=softcap, name="y")
    g = b.build([y])
    vals = {"q": rng.standard_normal(q.nelements).astype(np.float32),
            "k": rng.standard_normal(k.nelements).astype(k.dtype.np),
            "v": rng.standard_normal(v.nelements).astype(v.dtype.np)}
    if mask is not None:
        ms = np.stack([make_mask(rng, mask_kind, n_kv, n_q, rows, kb, n_seq_tokens=2) for _ in range(mask_heads)])
        vals["mask"] = ms.astype(mask.dtype.np)
    return y, g, vals


def run_seq(seq, values: dict[str, np.ndarray], graph) -> dict[str, np.ndarray]:
    """Run a WGSL kernel sequence: tensor bindings from ``values`` (by root leaf name; the node's
    output poisoned with NaN), scratch buffers fresh; returns the output and every scratch buffer."""
    from fusec.backends import wgpu_runtime as rt

    dev = rt.device()
    bufs: dict[tuple[str, str], object] = {}
    for sc in seq.scratch:
        bufs[("s", sc.name)] = rt.storage_buffer(sc.nbytes, np.full(sc.nbytes // 4, -7, np.int32).tobytes())
    for k in seq.kernels:
        for b in k.bindings:
            if b.scratch is None and ("t", b.name) not in bufs:
                if b.write:
                    a = np.full(b.tensor.root.span_bytes // 4, np.nan, np.float32)
                else:
                    a = np.ascontiguousarray(values[b.tensor.root.name], dtype=b.dtype.np)
                bufs[("t", b.name)] = rt.storage_buffer(a.nbytes, a.tobytes())
    enc = dev.create_command_encoder()
    for k in seq.kernels:
        group = rt.bind_group(k, [bufs[("s", b.scratch)] if b.scratch else bufs[("t", b.name)] for b in k.bindings],
                              rt.uniform_buffer(rt.pack_params(k)))
        rt.encode(enc, k, group)
    dev.queue.submit([enc.finish()])
    out = {"dst": np.frombuffer(rt.read_buffer(bufs[("t", "dst")], seq.node.nbytes), np.float32).copy()}
    for sc in seq.scratch:
        out[sc.name] = np.frombuffer(rt.read_buffer(bufs[("s", sc.name)], sc.nbytes), np.int32).copy()
    return out


def fully_masked_rows(vals, y) -> np.ndarray:
    """Boolean [n_seq, n_q, n_head] of the rows whose every mask entry is -inf."""
    D, n_head, n_q, n_seq = y.ne
    if "mask" not in vals:
        return np.zeros((n_seq, n_q, n_head), bool)
    m = np.asarray(vals["mask"], np.float32)  # [mask_heads, rows, n_kv]
    full = np.all(m[:, :n_q, :] == -np.inf, axis=-1)  # [mask_heads, n_q]
    heads = np.arange(n_head) % m.shape[0]
    return np.broadcast_to(full[heads].T[None], (n_seq, n_q, n_head))


def check_against_interp(y, g, vals, out):
    ref = interpret(g, vals)["y"]  # [n_seq, n_q, n_head, Dv]
    got = out.reshape(ref.shape)
    assert not np.isnan(got).any()
    dead = fully_masked_rows(vals, y)
    assert np.all(ref[dead] == 0.0) and np.all(got[dead] == 0.0)
    assert nmse(got, ref) <= FA_NMSE, nmse(got, ref)


# ---------------------------------------------------------------------------------------------
# op and interpreter


def test_flash_attn_ext_shape_and_errors():
    b = GraphBuilder()
    q = b.input("q", "f32", (64, 3, 8, 2))
    k = b.input("k", "f16", (64, 10, 2, 2))
    v = b.input("v", "f16", (80, 10, 2, 2))
    m = b.input("m", "f16", (10, 4))
    y = b.flash_attn_ext(q, k, v, m, scale=0.125)
    assert y.ne == (80, 8, 3, 2) and str(y.dtype) == "f32"
    with pytest.raises(GraphError, match="head size"):
        b.flash_attn_ext(q, b.input("k2", "f16", (32, 10, 2, 2)), v)
    with pytest.raises(GraphError, match="GQA"):
        b.flash_attn_ext(q, b.input("k3", "f16", (64, 10, 3, 2)), b.input("v3", "f16", (64, 10, 3, 2)))
    with pytest.raises(GraphError, match="mask ne\\[1\\]"):
        b.flash_attn_ext(q, k, v, b.input("m2", "f16", (10, 2)))
    with pytest.raises(GraphError, match="q must be f32"):
        b.flash_attn_ext(b.input("q2", "f16", (64, 3, 8, 2)), k, v)


def test_interpreter_hand_checked_values():
    """Two keys, one query: softmax weights by hand; softcap and ALiBi slope by hand; fully masked -> 0."""
    b = GraphBuilder()
    q = b.input("q", "f32", (2, 2, 1))
    k = b.input("k", "f32", (2, 2, 1))
    v = b.input("v", "f32", (1, 2, 1))
    m = b.input("m", "f32", (2, 2))
    y0 = b.flash_attn_ext(q, k, v, m, scale=0.5, name="y0")
    y1 = b.flash_attn_ext(q, k, v, m, scale=0.5, logit_softcap=2.0, name="y1")
    g = b.build([y0, y1])
    vals = {"q": np.array([[1, 2], [1, 1]], np.float32), "k": np.array([[1, 0], [0, 1]], np.float32),
            "v": np.array([10, 20], np.float32), "m": np.array([[0, -1], [-np.inf, -np.inf]], np.float32)}
    r = interpret(g, vals)
    s = np.array([0.5 * 1 + 0.0, 0.5 * 2 - 1.0])  # scores of query 0 (row 0 of the mask)
    w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    assert r["y0"].reshape(-1)[0] == pytest.approx(w @ [10, 20], rel=1e-6)
    sc = np.array([2 * np.tanh(0.5 / 2), 2 * np.tanh(1.0 / 2) - 1.0])
    wc = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
    assert r["y1"].reshape(-1)[0] == pytest.approx(wc @ [10, 20], rel=1e-6)
    assert r["y0"].reshape(-1)[1] == 0.0 and r["y1"].reshape(-1)[1] == 0.0  # fully masked row (ggml-cpu: 0)


@given(seed=st.integers(0, 2**31), n_q=st.integers(1, 6), gqa=st.sampled_from([1, 2]), n_kv=st.integers(1, 40),
       softcap=st.sampled_from([0.0, 0.0, 30.0]), kv_dtype=st.sampled_from(["f32", "f16"]),
       mask_kind=st.sampled_from(["random", "causal", "swa"]))
@settings(max_examples=15)
def test_interpreter_equals_unfused_attention(seed, n_q, gqa, n_kv, softcap, kv_dtype, mask_kind):
    """FLASH_ATTN_EXT == MUL_MAT(k, q) -> [SCALE/TANH/SCALE] -> SOFT_MAX -> MUL_MAT(v^T, .) -> PERMUTE
    -> CONT (the unfused llama.cpp graph), on rows with a visible entry; NaN (unfused) vs 0 (FA) on
    fully masked rows."""
    y, g, vals = fa_case(seed, 64, 64, n_q, 4, gqa, n_kv, kv_dtype=kv_dtype, mask_dtype="f32", mask_kind=mask_kind,
                         softcap=softcap)
    ref = interpret(g, vals)["y"]
    b = GraphBuilder()
    q = b.input("q", "f32", y.src[0].ne)
    k = b.input("k", kv_dtype, y.src[1].ne)
    v = b.input("v", kv_dtype, y.src[2].ne)
    m = b.input("mask", "f32", y.src[3].ne)
    kq = b.mul_mat(k, q)
    scale = 1.0 / 8.0
    if softcap:
        kq = b.scale(b.tanh(b.scale(kq, scale / softcap)), softcap)
        scale = 1.0
    sm = b.soft_max_ext(kq, m, scale=scale)
    vt = b.cont(b.transpose(v))
    out = b.cont(b.permute(b.mul_mat(vt, sm), 0, 2, 1, 3), name="o")
    un = interpret(b.build([out]), vals)["o"]
    dead = fully_masked_rows(vals, y)
    assert np.all(np.isnan(un[dead])) and np.all(ref[dead] == 0)
    live = ~dead
    assert nmse(ref[live], un[live]) <= 1e-10


# ---------------------------------------------------------------------------------------------
# kernels on wgpu


@requires_wgpu
@given(seed=st.integers(0, 2**31), D=st.sampled_from(HEAD_SIZES), n_q=st.integers(1, 8),
       gqa=st.sampled_from([1, 2, 4]), n_kv=st.integers(1, 160), kv_dtype=st.sampled_from(["f16", "f32"]),
       mask_dtype=st.sampled_from(["f16", "f32", None]),
       mask_kind=st.sampled_from(["random", "causal", "swa", "blockdiag", "zero"]), kb=st.sampled_from([16, 32, 64]),
       softcap=st.sampled_from([0.0, 0.0, 20.0]), max_bias=st.sampled_from([0.0, 0.0, 8.0]))
@settings(max_examples=12, suppress_health_check=list(HealthCheck))
def test_decode_kernels_match_interpreter(seed, D, n_q, gqa, n_kv, kv_dtype, mask_dtype, mask_kind, kb, softcap,
                                          max_bias):
    """vec variant (flash-decoding split + reduction) with masked-block skipping."""
    if mask_dtype is None:
        max_bias = 0.0
    y, g, vals = fa_case(seed, D, D, n_q, 4, gqa, n_kv, kv_dtype=kv_dtype, mask_dtype=mask_dtype, mask_kind=mask_kind,
                         softcap=softcap, max_bias=max_bias, kb=kb)
    seq = emit_flash_attn_seq(y, "wgsl", kv_block=kb)
    assert seq.kernels[-2 if seq.kernels[-1].meta["role"] == "reduce" else -1].meta["variant"] == "vec"
    check_against_interp(y, g, vals, run_seq(seq, vals, g)["dst"])


@requires_wgpu
@given(seed=st.integers(0, 2**31), D=st.sampled_from(HEAD_SIZES), Dv=st.sampled_from(HEAD_SIZES),
       n_q=st.integers(9, 40), gqa=st.sampled_from([1, 2]), n_kv=st.integers(1, 96), n_seq=st.integers(1, 2),
       mask_kind=st.sampled_from(["random", "causal", "swa", "blockdiag"]), mask_heads=st.sampled_from([1, 2]))
@settings(max_examples=6, suppress_health_check=list(HealthCheck))
def test_prefill_kernels_match_interpreter(seed, D, Dv, n_q, gqa, n_kv, n_seq, mask_kind, mask_heads):
    """tile variant (Q tiles of 16 / 8 rows), multi-sequence, per-head masks, D != Dv."""
    y, g, vals = fa_case(seed, D, Dv, n_q, 2, gqa if gqa <= 2 else 1, n_kv, n_seq=n_seq, mask_kind=mask_kind,
                         mask_heads=mask_heads, kb=32)
    seq = emit_flash_attn_seq(y, "wgsl", kv_block=32)
    assert seq.kernels[-1].meta["variant"] == "tile"
    check_against_interp(y, g, vals, run_seq(seq, vals, g)["dst"])


@requires_wgpu
@pytest.mark.parametrize("n_q", [1, 5, 17])
def test_skipping_on_and_off_agree(n_q):
    y, g, vals = fa_case(11 + n_q, 128, 128, n_q, 4, 2, 150, mask_kind="random", kb=16)
    on = run_seq(emit_flash_attn_seq(y, "wgsl", kv_block=16), vals, g)["dst"]
    off = run_seq(emit_flash_attn_seq(y, "wgsl", kv_block=16, skip=False, n_split=1), vals, g)["dst"]
    single = run_seq(emit_all_single(y), vals, g)["dst"]
    assert nmse(on, off) <= 1e-10 and nmse(single, off) <= 1e-10
    check_against_interp(y, g, vals, on)


def emit_all_single(y):
    from fusec.codegen.kernel import KernelSequence

    return KernelSequence(y, [emit(y, "wgsl")], [])


@requires_wgpu
@given(seed=st.integers(0, 2**31), n_q=st.integers(1, 20), n_kv=st.integers(1, 200), kb=st.sampled_from([16, 32, 64]),
       mask_heads=st.sampled_from([1, 2]), mask_dtype=st.sampled_from(["f16", "f32"]))
@settings(max_examples=10, suppress_health_check=list(HealthCheck))
def test_prepass_flags_equal_numpy(seed, n_q, n_kv, kb, mask_heads, mask_dtype):
    y, g, vals = fa_case(seed, 64, 64, n_q, 2, 1, n_kv, mask_dtype=mask_dtype, mask_kind="random", kb=kb,
                         mask_heads=mask_heads)
    seq = emit_flash_attn_seq(y, "wgsl", kv_block=kb)
    pre = seq.kernels[0]
    assert pre.meta["role"] == "prepass"
    qr = seq.kernels[1].workgroup_size[0] and int(seq.kernels[1].entry.split("_q")[1].split("_")[0])
    got = run_seq(seq, vals, g)["flags"]
    m = np.asarray(vals["mask"], np.float32)  # [mask_heads, rows, n_kv]
    n_blocks, n_groups = -(-n_kv // kb), -(-n_q // qr)
    want = np.empty((mask_heads, n_groups, n_blocks), np.int32)
    for h in range(mask_heads):
        for gi in range(n_groups):
            for bi in range(n_blocks):
                blk = m[h, gi * qr:min((gi + 1) * qr, n_q), bi * kb:(bi + 1) * kb]
                want[h, gi, bi] = 0 if np.all(blk == -np.inf) else (2 if np.all(blk == 0) else 1)
    np.testing.assert_array_equal(got.reshape(want.shape), want)


# ---------------------------------------------------------------------------------------------
# compile checks: every emitted variant


def _variants():
    """A covering set: every head-size pair in decode (f16, f16 mask: pre-pass, vec split, reduce) and
    prefill (f32, f32 mask: tile), plus row groups 4 and 8 and the no-mask form at head size 128."""
    cases = [(D, Dv, 1, "f16", "f16") for D, Dv in ((64, 64), (80, 96), (96, 80), (128, 128), (256, 256))]
    cases += [(D, Dv, 24, "f32", "f32") for D, Dv in ((64, 64), (80, 96), (96, 80), (128, 128), (256, 256))]
    cases += [(128, 128, 3, "f16", None), (128, 128, 8, "f32", "f16"), (64, 64, 40, "f16", None)]
    out = []
    for D, Dv, n_q, kv, md in cases:
        b = GraphBuilder()
        q = b.input("q", "f32", (D, n_q, 8))
        k = b.input("k", kv, (D, 512, 2))
        v = b.input("v", kv, (Dv, 512, 2))
        m = b.input("m", md, (512, n_q)) if md else None
        out.append(b.flash_attn_ext(q, k, v, m, name="y"))
    return out


def _cuda_vec_variants():
    """CUDA vec: G = 1/2/8 heads per block (GQA 1/2/8), f32 mask and no mask, 2/4/8 rows per block,
    a permuted (strided, non-vector) K and V."""
    out = []
    for D, gqa, kv, md in ((64, 8, "f16", "f32"), (128, 1, "f32", None), (256, 2, "f16", "f16"), (80, 8, "f32", "f16")):
        b = GraphBuilder()
        q = b.input("q", "f32", (D, 2, 8))
        k = b.input("k", kv, (D, 300, 8 // gqa))
        v = b.input("v", kv, (D, 300, 8 // gqa))
        m = b.input("m", md, (300, 2)) if md else None
        out.append((b.flash_attn_ext(q, k, v, m, name="y"), {}))
    y = out[0][0]
    out += [(y, {"rows": 2}), (y, {"rows": 4, "skip": False}), (y, {"rows": 8, "n_split": 1})]
    b = GraphBuilder()
    q = b.input("q", "f32", (96, 1, 4))
    kc = b.input("kc", "f16", (300, 96, 2))  # ne [n_kv, D, heads]: K rows strided
    k = b.permute(kc, 1, 0, 2, 3)
    v = b.permute(b.input("vc", "f16", (300, 96, 2)), 1, 0, 2, 3)
    out.append((b.flash_attn_ext(q, k, v, b.input("m", "f16", (300, 1)), name="y"), {}))
    return out


def one_cuda_unit(sources: dict[str, str]) -> str:
    """Every distinct CUDA source in one translation unit (one nvcc run instead of one per source:
    nvcc's start-up dominates): each in its own namespace, its entry renamed, its macros undefined."""
    parts = ["#include <cuda_fp16.h>\n"]
    for i, (src, entry) in enumerate(sources.items()):
        parts.append(f"#define {entry} {entry}_v{i}\nnamespace fa_v{i} {{\n{src}\n}}\n#undef {entry}\n")
        parts.append("".join(f"#undef FA_{m}\n" for m in ("KB", "QR", "D", "DV", "ND", "MASKED")))
    return "".join(parts)


@pytest.mark.parametrize("backend", ["cuda", "msl"])
def test_every_variant_compiles(backend):
    """nvcc -arch=sm_90 / the MSL shim on every distinct source of the covering set: pre-pass, vec
    (split and not), tile, reduce, the single-kernel form (no skip, no split)."""
    import shutil

    if shutil.which("nvcc" if backend == "cuda" else "g++") is None:
        pytest.skip(f"no compiler for {backend}")
    srcs: dict[str, str] = {}
    for y in _variants():
        for k in [*emit_flash_attn_seq(y, backend).kernels, emit(y, backend)]:
            srcs.setdefault(k.source, k.entry)
    if backend == "cuda":  # the CUDA vec kernel's own axes: heads per block, rows per block, strided K/V
        for y, kw in _cuda_vec_variants():
            for k in emit_flash_attn_seq(y, backend, **kw).kernels:
                srcs.setdefault(k.source, k.entry)
    roles = {e.split("_")[2] for e in srcs.values()}
    assert {"mask", "vec", "tile", "reduce"} <= roles and len(srcs) >= 30
    if backend == "cuda":
        check_cuda([("flash_attn_variants", one_cuda_unit(srcs))])
    else:
        check_msl([(e, s) for s, e in srcs.items()])


def test_block_sizes_per_backend_and_scratch_sizes():
    """KV block per backend; the CUDA vec kernel runs 4 warps over KV tiles of 32 positions and, with a
    block list, combines the splits itself (no reduction kernel)."""
    y = _variants()[0]  # D 64, n_q 1, f16, f16 mask
    for be in ("wgsl", "cuda", "msl"):
        seq = emit_all(y, be)
        cuda = be == "cuda"  # + the list of the blocks not skipped per (head group, row group, sequence)
        assert [k.meta["role"] for k in seq.kernels] == (["prepass", "attention"] if cuda else
                                                         ["prepass", "attention", "reduce"])
        att = next(k for k in seq.kernels if k.meta["role"] == "attention")
        assert att.workgroup_size[0] == (128 if cuda else KV_BLOCK[be])
        assert att.meta.get("fused_reduce", False) == cuda and (att.dynamic_shared > 0) == cuda
        n_split = att.meta["n_split"]
        assert seq.scratch_bytes("partials") == 4 * 8 * n_split * (64 + 2)
        if not cuda:  # CUDA's pre-pass writes the block lists instead of a flag array
            assert seq.scratch_bytes("flags") == 4 * (512 // KV_BLOCK[be])
        if cuda:  # G = 4 heads per block: 2 head groups x 1 row group, (count, pad) + (block, flags) pairs
            assert seq.scratch_bytes("blist") == 4 * 2 * 2 * (512 // 32 + 1)
    assert KV_BLOCK["cuda"] == KV_BLOCK["msl"] == 32


def test_unsupported_head_size_is_refused():
    b = GraphBuilder()
    q, k, v = b.input("q", "f32", (48, 1, 2)), b.input("k", "f16", (48, 8, 2)), b.input("v", "f16", (48, 8, 2))
    y = b.flash_attn_ext(q, k, v)
    with pytest.raises(CodegenError, match="head sizes"):
        emit(y, "wgsl")


# ---------------------------------------------------------------------------------------------
# buffer plan with node scratch


def test_plan_gives_scratch_its_own_slots():
    y, g, _ = fa_case(0, 64, 64, 1, 4, 2, 100)
    seq = emit_all(y, "wgsl")
    plan = plan_buffers(g, {y: [(s.name, s.nbytes) for s in seq.scratch]})
    plan.check()
    used = {plan.slot(t).index for t in g.nodes}
    sc = [plan.scratch_slot(y, s.name).index for s in seq.scratch]
    assert len(set(sc)) == len(sc) and not set(sc) & used
    plan.node_scratch[y]["flags"] = (plan.slot(y).index, 4)  # aliasing the output must be refused
    with pytest.raises(Exception, match="live at that node"):
        plan.check()


# ---------------------------------------------------------------------------------------------
# the attention rewrite


def llama_attention(b: GraphBuilder, *, D=64, n_q=1, n_head=4, n_head_kv=2, n_kv=40, kv_size=48, kv_dtype="f16",
                    mask_dtype="f32", softcap=0.0, use_twice=False, scale=None, name="out"):
    """The unfused attention as fusec.models.llama builds it: k a view of the K cache, v the
    transposed view of the V cache, q a PERMUTE of the roped Q."""
    qc = b.input("qc", "f32", (D, n_head, n_q))
    ck = b.input("cache_k", kv_dtype, (D * n_head_kv, kv_size))
    cv = b.input("cache_v", kv_dtype, (kv_size * D * n_head_kv,))
    m = b.input("kq_mask", mask_dtype, (n_kv, n_q)) if mask_dtype else None
    es = 2 if kv_dtype == "f16" else 4
    k = b.view(ck, (D, n_kv, n_head_kv), nb=(es, es * D * n_head_kv, es * D), name="k")
    v = b.view(cv, (n_kv, D, n_head_kv), nb=(es, es * kv_size, es * kv_size * D), name="v")
    q = b.permute(qc, 0, 2, 1, 3, name="q")
    kq = b.mul_mat(k, q, name="kq")
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    if softcap:
        kq = b.scale(b.tanh(b.scale(kq, 1.0 / softcap)), softcap)
    sm = b.soft_max_ext(kq, m, scale=sc, name="kq_soft_max")
    kqv = b.mul_mat(v, sm, name="kqv")
    out = b.cont(b.permute(kqv, 0, 2, 1, 3), (D * n_head, n_q), name=name)
    outs = [out]
    if use_twice:
        outs.append(b.scale(sm, 2.0, name="other_user"))
    return b.build(outs), out


def attn_values(g, seed):
    rng = np.random.default_rng(seed)
    vals = {}
    for t in g.leaves:
        if t.name == "kq_mask":
            n_kv, n_q = t.ne[0], t.ne[1]
            m = np.where(np.arange(n_kv)[None, :] > n_kv - n_q + np.arange(n_q)[:, None], -np.inf, 0.0)
            m[:, : rng.integers(0, n_kv - n_q + 1)] = -np.inf  # a window: leading blocks fully masked
            vals[t.name] = m.astype(t.dtype.np)
        else:
            vals[t.name] = rng.standard_normal(t.nelements).astype(t.dtype.np)
    return vals


@given(seed=st.integers(0, 2**31), D=st.sampled_from(HEAD_SIZES), n_q=st.integers(1, 5),
       gqa=st.sampled_from([1, 2, 4]), n_kv=st.integers(8, 40), kv_dtype=st.sampled_from(["f16", "f32"]),
       mask_dtype=st.sampled_from(["f32", "f16", None]),
       softcap=st.sampled_from([0.0, 0.0, 30.0]))
@settings(max_examples=15)
def test_rewrite_fuses_and_equals_unfused(seed, D, n_q, gqa, n_kv, kv_dtype, mask_dtype, softcap):
    b = GraphBuilder()
    g, _ = llama_attention(b, D=D, n_q=n_q, n_head=4, n_head_kv=4 // gqa, n_kv=n_kv, kv_size=n_kv + 3,
                           kv_dtype=kv_dtype, mask_dtype=mask_dtype, softcap=softcap)
    fused, rep = rewrite(g, ATTN)
    assert rep.total_matches == 1 and [t.op for t in fused.ops if t.op not in VIEWS] == ["FUSED"]
    node = fused.outputs[0]
    assert node.params["kernel"] == "flash_attn" and node.params["fused_op"] == "FLASH_ATTN_EXT"
    vals = attn_values(g, seed)
    a, ref = interpret(fused, vals)["out"], interpret(g, vals)["out"]
    assert nmse(a, ref) <= 1e-12  # the FUSED node's value is its decomposition


@requires_wgpu
@pytest.mark.parametrize(("n_q", "softcap", "mask_dtype"), [(1, 0.0, "f32"), (3, 30.0, "f16"), (12, 0.0, None)])
def test_rewritten_graph_runs_on_wgpu_backend(n_q, softcap, mask_dtype):
    """The wgpu backend runs the FUSED node's kernel sequence (scratch from the plan) == the unfused
    graph on the interpreter."""
    from fusec.backends.wgpu_backend import WgpuBackend

    b = GraphBuilder()
    g, _ = llama_attention(b, D=64, n_q=n_q, n_kv=70, kv_size=80, mask_dtype=mask_dtype, softcap=softcap)
    fused, rep = rewrite(g, ATTN)
    assert rep.total_matches == 1
    exe = WgpuBackend().compile(fused)
    roles = [k.meta.get("role") for k in exe.kernels]
    assert "attention" in roles and (("prepass" in roles) == (mask_dtype is not None))
    vals = attn_values(g, n_q)
    out = exe.run(vals)["out"]
    assert nmse(out, interpret(g, vals)["out"]) <= FA_NMSE


def test_llama_decode_graph_fuses_attention_in_every_layer():
    from fusec.models import build_llama_decode, load_config

    cfg = load_config("llama-3.2-1b").with_layers(3)
    g = build_llama_decode(cfg, 1, 64, 64, kv_dtype="f16")
    fused, rep = rewrite(g, default_patterns())
    assert rep.patterns["attention_flash"].matches == 3
    for n in fused.ops:
        if n.op == "FUSED" and n.params["kernel"] == "flash_attn":
            assert [k.meta["role"] for k in emit_all(n, "wgsl").kernels][1] == "attention"


@pytest.mark.parametrize(("kw", "why"), [
    ({"D": 48}, "ne(k, 0) in"),
    ({"D": 32}, "ne(k, 0) in"),
    ({"use_twice": True}, "escapes"),
])
def test_near_misses_do_not_fuse(kw, why):
    b = GraphBuilder()
    g, _ = llama_attention(b, **kw)
    fused, rep = rewrite(g, ATTN)
    assert rep.total_matches == 0 and not any(t.op == "FUSED" for t in fused.nodes)
    assert any(why in nf.message for nf in rep.not_fused), [nf.message for nf in rep.not_fused]


def test_near_miss_k_and_v_dtypes_differ():
    b = GraphBuilder()
    qc = b.input("qc", "f32", (64, 4, 1))
    k = b.input("k", "f16", (64, 10, 2))
    v = b.input("v", "f32", (10, 64, 2))
    kq = b.mul_mat(k, b.permute(qc, 0, 2, 1, 3))
    out = b.cont(b.permute(b.mul_mat(v, b.soft_max_ext(kq, None, scale=0.1)), 0, 2, 1, 3), name="out")
    fused, rep = rewrite(b.build([out]), ATTN)
    assert rep.total_matches == 0
    assert any("dtype(v) == dtype(k)" in nf.message for nf in rep.not_fused)


def test_near_miss_wrong_permutation_and_softcap_bias():
    b = GraphBuilder()
    qc = b.input("qc", "f32", (64, 4, 1))
    k = b.input("k", "f16", (64, 10, 2))
    v = b.input("v", "f16", (10, 64, 2))
    kq = b.mul_mat(k, b.permute(qc, 0, 2, 1, 3))
    o1 = b.cont(b.permute(b.mul_mat(v, b.soft_max_ext(kq, None, scale=0.1)), 0, 1, 3, 2), name="o1")
    kq2 = b.mul_mat(k, b.permute(qc, 0, 2, 1, 3))
    sc = b.scale(b.tanh(b.scale(kq2, 0.1, b=0.5)), 10.0)
    o2 = b.cont(b.permute(b.mul_mat(v, b.soft_max_ext(sc, None, scale=0.1)), 0, 2, 1, 3), name="o2")
    fused, rep = rewrite(b.build([o1, o2]), ATTN)
    assert rep.total_matches == 0


def test_attention_patterns_load():
    """The four shipped attention patterns (tests/test_dsl.py pins the other shipped files)."""
    pats = {p.name: p for p in default_patterns() if p.file == "patterns/attention.fuse"}
    assert set(pats) == {"attention_flash", "attention_flash_nomask", "attention_flash_softcap",
                         "attention_flash_softcap_nomask"}
    assert {(p.kernel, p.fused_op) for p in pats.values()} == {("flash_attn", "FLASH_ATTN_EXT")}
    assert pats["attention_flash"].ops == ["MUL_MAT", "SOFT_MAX", "MUL_MAT", "PERMUTE", "CONT"]
    assert set(pats["attention_flash_softcap"].leaves) == {"q", "k", "v", "mask"}
    assert set(pats["attention_flash_nomask"].leaves) == {"q", "k", "v"}
