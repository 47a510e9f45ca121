"""FLASH_ATTN_EXT kernels (ggml_flash_attn_ext) with masked-block skipping, and the ``flash_attn``
FUSED nodes of ``patterns/attention.fuse`` (the unfused MUL_MAT -> SOFT_MAX -> MUL_MAT attention).

A node is computed by a :class:`~fusec.codegen.kernel.KernelSequence` (:func:`emit_flash_attn_seq`):

1. ``flash_attn_mask_flags`` (pre-pass, only with a mask): one flag per (mask batch, query-row group
   of ``QR`` rows, KV block of ``KB`` columns), computed from the mask rows ``0..n_q-1``: **0** every
   entry ``-inf`` (the attention kernel skips the block without loading K, V or the mask), **2** every
   entry zero (K and V are loaded, the mask is not), **1** mixed. Scratch ``flags`` (i32).
2. ``flash_attn_{vec,tile}`` (one workgroup of ``KB`` threads per (KV split, row group, head x seq)):
   the ``QR`` query rows of a group sit in workgroup memory; per KV block each thread computes one
   column of scores (``q.k * scale``, softcap, ``+ slope*mask``), the group's running max / sum are
   updated (online softmax, f32) and each thread accumulates ``ceil(Dv/KB)`` output dims per row in
   registers. ``vec`` (decode, ``n_q <= 8``: ``QR`` = n_q rounded up to 1/2/4/8) splits the KV blocks
   over ``n_split`` workgroups (flash-decoding) and writes partials ``[M, S, acc[Dv]]`` per (row,
   split) to scratch ``partials``; ``tile`` (prefill: ``QR`` = 16, 8 for D = 256) runs all blocks in
   one workgroup and writes the result.
3. ``flash_attn_reduce`` (only with ``n_split > 1``): per (row, head, seq), ``M = max M_i``,
   ``out = sum_i e^(M_i - M) acc_i / sum_i e^(M_i - M) S_i`` (0 when the sum is 0).

On CUDA the decode (``vec``) path is its own design (``templates/cuda/flash_attn.cu.j2``, see
:func:`cuda_vec_layout` and docs/flash-attention.md): one query row per row group; the pre-pass
computes the flags and lists, per (GQA head group, row group, sequence), the KV blocks not skipped
(``flash_attn_block_list``, role ``prepass``); the attention kernel streams its share of the listed
32-position tiles through shared memory with cp.async (the q of all the group's heads in shared
memory), and the last split of each list to finish combines the partials (no reduction kernel).

:func:`emit_flash_attn` (the registered single-kernel form, what :func:`fusec.codegen.emit` returns)
is the attention kernel without pre-pass or split, writing the result directly: correct on its own
for backends that run one kernel per node.

Block sizes per backend (:data:`KV_BLOCK`): 32 on CUDA (a warp) and MSL (a simdgroup), 64 on WGSL
(no subgroup size is guaranteed; 64 invocations is the portable workgroup). Head sizes
:data:`HEAD_SIZES` (D and Dv compile-time). Semantics and the fully masked row (result 0, as
ggml-cpu): :func:`fusec.interp.kernels.flash_attn_ext`; design notes: ``docs/flash-attention.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import CodegenError
from ...ir.dtypes import F16, F32, I32
from ...ir.tensor import Tensor
from .. import family, sequence_family
from ..env import CUDA_SMS, TYPE_NAMES, render
from ..kernel import Binding, Kernel, KernelSequence, Scratch
from ..layout import ceil_div, elem_offset, elem_strides
from .soft_max import alibi_params, row_grid

HEAD_SIZES = (64, 80, 96, 128, 256)
KV_BLOCK = {"wgsl": 64, "cuda": 32, "msl": 32}
VEC_MAX_ROWS = 8
REDUCE_THREADS = 64
TARGET_WORKGROUPS = 2048  # flash-decoding (WGSL/MSL vec): split the KV range until about this many workgroups run
# (a GPU of 100+ compute units with masked splits exiting early: 4 sequences in a unified cache leave 3/4 idle)
# CUDA: CUDA_WARPS warps per block of the mask pre-pass of the tile variant (a warp per KV block); the vec (decode)
# kernel runs CUDA_VEC_WARPS warps over KV tiles of 32 positions streamed through shared memory, and a block holds
# the q rows of up to CUDA_GQ_MAX (head, row) columns of one GQA group.
CUDA_WARPS = 4
CUDA_VEC_WARPS = 4
CUDA_GQ_MAX = 8
CUDA_BLOCKS_PER_SM = 2  # the split heuristic aims at CUDA_SMS (env) x this many blocks
CUDA_MIN_BPS, CUDA_MAX_BPS = 4, 32  # KV tiles per split
# H200 probes (bench/results/2026-11-21-h200-flash-attn-v3.json): 2 blocks per SM as good as 4 on 4seq / 1seq4096 /
# single and 1.3x faster on swa; 8 or 16 warps per block and 3-4 stages slower than 4 warps, 2 stages.
CUDA_REDUCE_THREADS = 128
CUDA_RING_BYTES = 48 * 1024  # K/V stages of the CUDA vec kernel: as many (<= CUDA_MAX_STAGES) as fit this
CUDA_MAX_STAGES = 4
CUDA_MAX_RING_BYTES = 200 * 1024  # dynamic shared memory of one block (H100/H200: 227 KiB with opt-in)
TEMPLATES = {"wgsl": "wgsl/flash_attn.wgsl.j2", "cuda": "cuda/flash_attn.cu.j2", "msl": "msl/flash_attn.metal.j2"}
Q_SHARED_BYTES = 8192  # q rows of a group kept in workgroup memory: QR * D * 4 <= this (tile variant)


@dataclass(frozen=True)
class Attn:
    """The operands of one attention node, in FLASH_ATTN_EXT terms.

    Attributes:
        q: f32 ``ne = [D, n_q, n_head, n_seq]`` (any strides).
        k: ``ne = [D, n_kv, n_head_kv, k3]``.
        v: FLASH_ATTN_EXT's v ``ne = [Dv, n_kv, ...]``, or for a FUSED node the transposed view of
            ``MUL_MAT(v, kq)`` ``ne = [n_kv, Dv, ...]`` (``v_transposed``).
        mask: ``ne = [n_kv, >= n_q, m2, m3]`` or None.
        qk_scale: factor of ``q.k`` before the softcap (``scale / softcap`` when softcap != 0).
        softcap: ``c`` of ``c * tanh(.)``; 0 = none.
        max_bias: ALiBi.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    v_transposed: bool
    qk_scale: float
    softcap: float
    max_bias: float

    @property
    def D(self) -> int:
        return int(self.q.ne[0])

    @property
    def Dv(self) -> int:
        return int(self.v.ne[1] if self.v_transposed else self.v.ne[0])

    @property
    def n_q(self) -> int:
        return int(self.q.ne[1])

    @property
    def n_head(self) -> int:
        return int(self.q.ne[2])

    @property
    def n_seq(self) -> int:
        return int(self.q.ne[3])

    @property
    def n_kv(self) -> int:
        return int(self.k.ne[1])


def attn_operands(node: Tensor) -> Attn:
    """The :class:`Attn` of a FLASH_ATTN_EXT node or of a FUSED ``flash_attn`` node (read from its
    decomposition: ``MUL_MAT(k, q)`` [-> ``SCALE{s1} -> TANH -> SCALE{s2}``] -> ``SOFT_MAX(., mask)
    {scale}`` -> ``MUL_MAT(v, .)`` -> ``PERMUTE(0,2,1,3)`` -> ``CONT``; the softcap chain maps to
    ``softcap = s2*scale``, ``qk_scale = s1``, i.e. ggml's ``logit_softcap = s2*scale`` and ``scale =
    s1*s2*scale``). Raises :class:`CodegenError` for any other structure."""
    if node.op == "FLASH_ATTN_EXT":
        q, k, v = node.src[0], node.src[1], node.src[2]
        mask = node.src[3] if len(node.src) > 3 else None
        scale = float(node.params.get("scale", 1.0))
        softcap = float(node.params.get("logit_softcap", 0.0))
        return Attn(q, k, v, mask, False, scale / softcap if softcap != 0.0 else scale, softcap,
                    float(node.params.get("max_bias", 0.0)))
    if node.op != "FUSED" or node.decomposition is None:
        raise CodegenError(f"node {node.name!r}: flash_attn renders FLASH_ATTN_EXT or a FUSED attention, not {node.op}")
    sub = node.decomposition

    def outer(t: Tensor | None) -> Tensor:
        if t is None or not t.is_leaf or "fused_input" not in t.params:
            raise CodegenError(f"node {node.name!r}: flash_attn needs q, k, v and the mask to be fused inputs")
        src = node.src[int(t.params["fused_input"])]
        assert src is not None
        return src

    def want(t: Tensor | None, op: str) -> Tensor:
        if t is None or t.op != op:
            got = "nothing" if t is None else t.op
            raise CodegenError(f"node {node.name!r}: flash_attn expects {op} in the attention chain, found {got}")
        return t

    root = want(sub.outputs[0], "CONT")
    perm = want(root.src[0], "PERMUTE")
    if list(perm.params.get("axes") or []) != [0, 2, 1, 3]:
        raise CodegenError(f"node {node.name!r}: flash_attn expects PERMUTE(0, 2, 1, 3) of the result")
    kqv = want(perm.src[0], "MUL_MAT")
    sm = want(kqv.src[1], "SOFT_MAX")
    x = sm.src[0]
    sc = float(sm.params.get("scale", 1.0))
    qk_scale, softcap = sc, 0.0
    if x is not None and x.op == "SCALE":
        s2 = x
        th = want(s2.src[0], "TANH")
        s1 = want(th.src[0], "SCALE")
        if float(s1.params.get("b", 0.0)) != 0.0 or float(s2.params.get("b", 0.0)) != 0.0:
            raise CodegenError(f"node {node.name!r}: a softcap SCALE with a bias is not ggml's logit_softcap")
        qk_scale, softcap = float(s1.params.get("s", 1.0)), float(s2.params.get("s", 1.0)) * sc
        if softcap == 0.0:
            raise CodegenError(f"node {node.name!r}: softcap factor 0")
        x = s1.src[0]
    kq = want(x, "MUL_MAT")
    k, q, v = outer(kq.src[0]), outer(kq.src[1]), outer(kqv.src[0])
    mask = outer(sm.src[1]) if len(sm.src) > 1 and sm.src[1] is not None else None
    return Attn(q, k, v, mask, True, qk_scale, softcap, float(sm.params.get("max_bias", 0.0)))


@dataclass(frozen=True)
class Plan:
    """Tuning choices of one node (all but ``n_split`` are compile-time in the kernel source)."""

    variant: str  # "vec" | "tile"
    qr: int  # query rows per workgroup
    kb: int  # KV block = threads per workgroup
    n_split: int  # KV splits (workgroups along x); > 1 only for vec
    skip: bool  # pre-pass flags + masked-block skipping (needs a mask)
    g: int = 1  # query heads per workgroup (one GQA group shares the K/V loads; CUDA vec only)
    backend: str = ""
    stages: int = 0  # CUDA vec: K/V pipeline stages (0: cuda_vec_layout's choice)

    @property
    def cuda_vec(self) -> bool:
        """The CUDA decode kernel (warps over KV blocks, GQA heads in registers); else the shared skeleton."""
        return self.backend == "cuda" and self.variant == "vec"

    @property
    def threads(self) -> int:
        return 32 * CUDA_VEC_WARPS if self.cuda_vec else self.kb

    @property
    def block_list(self) -> bool:
        """CUDA vec with skipping: the pre-pass lists, per (head group, sequence, row group), the KV
        blocks not skipped; the splits divide that list evenly (no idle splits)."""
        return self.cuda_vec and self.skip

    @property
    def fused_reduce(self) -> bool:
        """CUDA vec with a block list and a split: the last block of each list to finish combines the
        splits' partials (a ticket counter in the list header), so no reduction kernel runs."""
        return self.block_list and self.split

    def n_lists(self, a: Attn) -> int:
        return (a.n_head // self.g) * a.n_seq * ceil_div(a.n_q, self.qr)

    @property
    def split(self) -> bool:
        return self.n_split > 1


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def cuda_heads_per_block(a: Attn, qr: int) -> int:
    """Query heads per CUDA vec block: the largest power of two ``G <= CUDA_GQ_MAX / qr`` dividing both
    ``n_head / n_head_kv`` of K and of V, so that the ``G`` heads ``hg*G .. hg*G+G-1`` read one K head
    and one V head."""
    r = math.gcd(a.n_head // int(a.k.ne[2]), a.n_head // int(a.v.ne[2]))
    g = 1
    while g * 2 * qr <= CUDA_GQ_MAX and r % (g * 2) == 0:
        g *= 2
    return g


def cuda_split(n_blocks: int, other_blocks: int) -> int:
    """KV splits of the CUDA vec kernel: ``other_blocks`` (head groups x row groups x sequences) blocks
    per split; about ``CUDA_SMS * CUDA_BLOCKS_PER_SM`` blocks in all, each walking between
    ``CUDA_MIN_BPS`` and ``CUDA_MAX_BPS`` KV blocks (the upper bound keeps several blocks per SM busy
    when masked blocks are skipped: 4 sequences in a unified cache leave 3/4 of the splits idle)."""
    target = CUDA_SMS * CUDA_BLOCKS_PER_SM
    bps = max(CUDA_MIN_BPS, min(CUDA_MAX_BPS, (n_blocks * other_blocks) // target))
    return max(1, ceil_div(n_blocks, bps))


def choose_plan(a: Attn, backend: str, *, kv_block: int | None = None, n_split: int | None = None,
                skip: bool = True, variant: str | None = None, rows: int | None = None,
                stages: int | None = None) -> Plan:
    """Variant, rows per workgroup, KV block and split count for ``a`` on ``backend``.

    ``vec`` when ``n_q <= 8`` (``QR`` = n_q rounded up to a power of two), else ``tile`` (``QR`` =
    16, or 8 for head size 256, so that q rows use <= 8 KiB of workgroup memory). ``n_split`` (vec
    only, default): enough splits for about :data:`TARGET_WORKGROUPS` workgroups, at least 2 KV
    blocks each. The keyword arguments override the choices (tests); ``skip`` is off without a mask.

    CUDA ``vec``: KV block 32 (a warp's positions), ``QR`` = 1 query row per block (``rows`` overrides:
    1/2/4/8; row groups are what the pre-pass flags are per, so 1 lets each query row, e.g. one token
    of each of several sequences, skip the other rows' cells), ``g`` = :func:`cuda_heads_per_block`,
    ``n_split`` = :func:`cuda_split`.

    Raises :class:`CodegenError` for a KV block that is not a power of two in 16..256 or smaller
    than the row group (CUDA vec: other than 32), or bad ``rows``.
    """
    if variant is None:
        variant = "vec" if a.n_q <= VEC_MAX_ROWS else "tile"
    cuda_vec = backend == "cuda" and variant == "vec"
    kb = int(kv_block or KV_BLOCK[backend])
    g = 1
    if cuda_vec:
        if kb != 32:
            raise CodegenError(f"flash_attn: the CUDA vec kernel walks KV blocks of 32 positions, not {kb}")
        qr = int(rows or 1)
        if qr not in (1, 2, 4, 8):
            raise CodegenError(f"flash_attn: CUDA vec rows per block must be 1, 2, 4 or 8, not {qr}")
        g = cuda_heads_per_block(a, qr)
    elif variant == "vec":
        qr = _pow2_at_least(min(a.n_q, VEC_MAX_ROWS))
    else:
        qr = 16 if a.D * 16 * 4 <= Q_SHARED_BYTES else 8
    if kb not in (16, 32, 64, 128, 256) or kb < qr:
        raise CodegenError(f"flash_attn: KV block {kb} must be a power of two in 16..256 and >= {qr} rows")
    n_blocks = ceil_div(a.n_kv, kb)
    groups = ceil_div(a.n_q, qr) * a.n_head * a.n_seq
    if n_split is None:
        n_split = 1
        if cuda_vec:
            n_split = cuda_split(n_blocks, ceil_div(a.n_q, qr) * (a.n_head // g) * a.n_seq)
        elif variant == "vec":
            n_split = max(1, min(ceil_div(TARGET_WORKGROUPS, groups), n_blocks // 2))
    n_split = max(1, min(int(n_split), n_blocks))
    bps = ceil_div(n_blocks, n_split)
    n_split = ceil_div(n_blocks, bps)  # no empty split
    return Plan(variant, qr, kb, n_split, bool(skip and a.mask is not None), g, backend, int(stages or 0))


def _check(node: Tensor, a: Attn) -> None:
    def bad(msg: str) -> CodegenError:
        return CodegenError(f"node {node.name!r}: flash_attn: {msg}")

    if a.D not in HEAD_SIZES or a.Dv not in HEAD_SIZES:
        raise bad(f"head sizes D={a.D}, Dv={a.Dv} not supported (supported: {', '.join(map(str, HEAD_SIZES))})")
    if a.q.dtype != F32:
        raise bad(f"q must be f32, got {a.q.dtype}")
    for t, nm in ((a.k, "k"), (a.v, "v")):
        if t.dtype not in (F32, F16):
            raise bad(f"{nm} must be f32 or f16, got {t.dtype}")
    if a.mask is not None:
        if a.mask.dtype not in (F32, F16):
            raise bad(f"mask must be f32 or f16, got {a.mask.dtype}")
        if a.mask.ne[0] != 1 and a.mask.nb[0] != a.mask.dtype.size:
            raise bad("mask rows must be contiguous")
    if a.max_bias > 0.0 and a.mask is None:
        raise bad("max_bias (ALiBi) needs a mask")


def _vdims(a: Attn) -> tuple[int, int, int, int]:
    """v strides (elements): along the head dim, along kv, heads, sequences; and v's ne[2], ne[3]."""
    nb = elem_strides(a.v)
    if a.v_transposed:
        return nb[1], nb[0], nb[2], nb[3]
    return nb[0], nb[1], nb[2], nb[3]


def _common_params(a: Attn, pl: Plan) -> list[tuple[str, str, int | float]]:
    n_blocks = ceil_div(a.n_kv, pl.kb)
    n_groups = ceil_div(a.n_q, pl.qr)
    mne2, mne3 = (int(a.mask.ne[2]), int(a.mask.ne[3])) if a.mask is not None else (1, 1)
    return [("n_q", "u32", a.n_q), ("n_kv", "u32", a.n_kv), ("n_head", "u32", a.n_head),
            ("n_seq", "u32", a.n_seq), ("n_blocks", "u32", n_blocks), ("n_groups", "u32", n_groups),
            ("n_split", "u32", pl.n_split), ("blocks_per_split", "u32", ceil_div(n_blocks, pl.n_split)),
            ("mask_ne2", "u32", mne2), ("mask_ne3", "u32", mne3)]


def _mask_params(a: Attn) -> list[tuple[str, str, int | float]]:
    if a.mask is None:
        return []
    nb = elem_strides(a.mask)
    return [("mask_offs", "u32", elem_offset(a.mask)), ("mask_nb1", "u32", nb[1]), ("mask_nb2", "u32", nb[2]),
            ("mask_nb3", "u32", nb[3])]


def _render(backend: str, **ctx) -> str:
    return render(TEMPLATES[backend], backend=backend, **ctx)


def _types(backend: str, bindings: list[Binding]) -> list[str]:
    return [TYPE_NAMES[backend][b.dtype] for b in bindings]


def _tag(a: Attn, pl: Plan) -> str:
    m = "" if a.mask is None else f"_m{a.mask.dtype}"
    return f"d{a.D}_dv{a.Dv}_k{a.k.dtype}_v{a.v.dtype}{m}_q{pl.qr}_b{pl.kb}"


def prepass_kernel(node: Tensor, a: Attn, pl: Plan, backend: str) -> Kernel:
    """The mask pre-pass: grid (n_blocks, n_groups, m2*m3), ``KB`` threads; writes scratch ``flags``."""
    assert a.mask is not None
    bindings = [Binding("mask", a.mask, a.mask.dtype), Binding("flags", None, I32, write=True, scratch="flags")]
    params = _common_params(a, pl) + _mask_params(a)
    entry = f"flash_attn_mask_flags_m{a.mask.dtype}_q{pl.qr}_b{pl.kb}"
    # CUDA: one warp per KV block (__all_sync), CUDA_WARPS blocks per workgroup; else KB threads per block
    threads = 32 * CUDA_WARPS if backend == "cuda" else pl.kb
    per_wg = CUDA_WARPS if backend == "cuda" else 1
    src = _render(backend, kind="prepass", entry=entry, node_name=node.name, bindings=bindings,
                  elem_types=_types(backend, bindings), params=params, threads=threads, qr=pl.qr, kb=pl.kb,
                  mask_f16=a.mask.dtype == F16, nw=CUDA_WARPS)
    n_mb = int(a.mask.ne[2] * a.mask.ne[3])
    grid = (ceil_div(ceil_div(a.n_kv, pl.kb), per_wg), ceil_div(a.n_q, pl.qr), n_mb)
    return Kernel(backend, "flash_attn", entry, src, bindings, params, (threads, 1, 1), grid, node,
                  {"role": "prepass"})


def main_kernel(node: Tensor, a: Attn, pl: Plan, backend: str) -> Kernel:
    """The attention kernel: grid (n_split, n_groups, n_head*n_seq), ``KB`` threads; writes the node
    (no split) or scratch ``partials`` (split)."""
    bindings = [Binding("q", a.q, a.q.dtype), Binding("k", a.k, a.k.dtype), Binding("v", a.v, a.v.dtype)]
    if a.mask is not None:
        bindings.append(Binding("mask", a.mask, a.mask.dtype))
    if pl.block_list:  # the list carries the flags of the listed blocks (and, with a split, the ticket counter)
        bindings.append(Binding("blist", None, I32, write=pl.split, scratch="blist"))
    elif pl.skip:
        bindings.append(Binding("flags", None, I32, scratch="flags"))
    if pl.split:
        bindings.append(Binding("partials", None, F32, write=True, scratch="partials"))
    if not pl.split or pl.fused_reduce:
        bindings.append(Binding("dst", node, F32, write=True))
    qnb, knb = elem_strides(a.q), elem_strides(a.k)
    v_sd, v_sj, v_s2, v_s3 = _vdims(a)
    v_ne2, v_ne3 = (a.v.ne[2], a.v.ne[3])
    params = _common_params(a, pl) + _mask_params(a)
    params += [("q_offs", "u32", elem_offset(a.q))] + [(f"q_nb{i}", "u32", qnb[i]) for i in range(4)]
    params += [("k_offs", "u32", elem_offset(a.k))] + [(f"k_nb{i}", "u32", knb[i]) for i in range(4)]
    params += [("v_offs", "u32", elem_offset(a.v)), ("v_sd", "u32", v_sd), ("v_sj", "u32", v_sj),
               ("v_s2", "u32", v_s2), ("v_s3", "u32", v_s3),
               ("k_r2", "u32", a.n_head // a.k.ne[2]), ("k_r3", "u32", a.n_seq // a.k.ne[3]),
               ("v_r2", "u32", a.n_head // v_ne2), ("v_r3", "u32", a.n_seq // v_ne3),
               ("dst_offs", "u32", 0 if pl.split else elem_offset(node)),
               ("qk_scale", "f32", a.qk_scale), ("softcap", "f32", a.softcap)]
    params += alibi_params(a.n_head, a.max_bias)
    nd = ceil_div(a.Dv, pl.kb)
    cv = cuda_vec_layout(a, pl, pl.stages or None) if pl.cuda_vec else {}
    vec_tag = f"_g{cv['g']}_s{cv['stages']}_c{cv['kcp']}x{cv['vcp']}" if pl.cuda_vec else ""
    entry = (f"flash_attn_{pl.variant}_{_tag(a, pl)}{vec_tag}{'_skip' if pl.skip else ''}"
             f"{'_split' if pl.split else ''}")
    src = _render(backend, kind="main", entry=entry, node_name=node.name, bindings=bindings,
                  elem_types=_types(backend, bindings), params=params, threads=pl.threads, qr=pl.qr, kb=pl.kb,
                  d=a.D, dv=a.Dv, nd=nd, has_mask=a.mask is not None, use_flags=pl.skip, split=pl.split,
                  variant=pl.variant, **cv)
    if pl.cuda_vec:
        grid = (pl.n_split, a.n_head // pl.g, ceil_div(a.n_q, pl.qr) * a.n_seq)
    else:
        grid = (pl.n_split, ceil_div(a.n_q, pl.qr), a.n_head * a.n_seq)
    return Kernel(backend, "flash_attn", entry, src, bindings, params, (pl.threads, 1, 1), grid, node,
                  {"role": "attention", "variant": pl.variant, "n_split": pl.n_split, "skip": pl.skip,
                   "heads_per_block": pl.g, "rows_per_block": pl.qr, "stages": cv.get("stages", 0),
                   "fused_reduce": pl.fused_reduce}, dynamic_shared=int(cv.get("ring", 0)))


def _copy_bytes(esize: int, contiguous: bool, offsets: tuple[int, ...]) -> int:
    """Widest cp.async size (16, 8 or 4 bytes) that every row start of a tensor is aligned to (element
    offsets and strides in ``offsets``, buffers 16-byte aligned), 0 for element copies (strided rows)."""
    if not contiguous:
        return 0
    for w in (16, 8, 4):
        if w >= esize and all((x * esize) % w == 0 for x in offsets):
            return w
    return 0


def cuda_vec_layout(a: Attn, pl: Plan, stages: int | None = None) -> dict:
    """Compile-time layout of the CUDA vec kernel (see templates/cuda/flash_attn.cu.j2).

    KV tiles of ``T = 32`` positions stream into ``stages`` shared-memory stages (K ``[T][D + EK]``, V
    ``[T][Dv + EV]``, rows padded by one 16-byte chunk: ``EK``/``EV`` = elements per 16 bytes) by
    cp.async of ``kcp``/``vcp`` bytes (:func:`_copy_bytes`; 0 = element copies for strided rows, with
    ``v_jfast`` when V's positions are the contiguous axis, e.g. a transposed V cache). ``stages``: as
    many as fit :data:`CUDA_RING_BYTES` (2..4; 1 when one tile is larger). ``ring``: dynamic shared
    memory bytes of the launch (the stages, or the end-of-kernel sum of the p.v position groups if
    larger)."""
    gq = pl.g * pl.qr
    ks, vs = a.k.dtype.size, a.v.dtype.size
    ek, ev = 16 // ks, 16 // vs
    knb = elem_strides(a.k)
    v_sd, v_sj, v_s2, v_s3 = _vdims(a)
    kcp = _copy_bytes(ks, knb[0] == 1, (elem_offset(a.k), knb[1], knb[2], knb[3]))
    vcp = _copy_bytes(vs, v_sd == 1, (elem_offset(a.v), v_sj, v_s2, v_s3))
    stage = 32 * ((a.D + ek) * ks + (a.Dv + ev) * vs)
    if stages is None:
        stages = max(1, min(CUDA_MAX_STAGES, CUDA_RING_BYTES // stage))
        if stages == 1 and 2 * stage <= CUDA_MAX_RING_BYTES:
            stages = 2
    npg = 32 * CUDA_VEC_WARPS // (a.Dv // ev)
    ring = max(stages * stage, npg * gq * a.Dv * 4)
    if ring > CUDA_MAX_RING_BYTES:
        raise CodegenError(f"flash_attn: {stages} KV stages of {stage} bytes exceed the shared memory of a block")
    return {"g": pl.g, "gq": gq, "stages": stages, "ring": ring, "kcp": kcp, "vcp": vcp,
            "v_jfast": v_sj == 1 and v_sd != 1, "nw": CUDA_VEC_WARPS,
            "k_f16": a.k.dtype == F16, "v_f16": a.v.dtype == F16}


BLOCK_LIST_MAX_THREADS = 1024


def block_list_kernel(node: Tensor, a: Attn, pl: Plan, backend: str) -> Kernel:
    """The CUDA vec kernel's mask pre-pass: one workgroup per list ``L = (s * n_groups + grp) * (n_head /
    G) + hg`` computes the flag of every KV block for the G heads ``hg*G ..`` and the ``QR`` rows of row
    group ``grp`` of sequence ``s`` from the mask (0 all ``-inf``, 2 all zero, 1 mixed; heads of one mask
    batch share it) and writes, at ``blist[L * 2 * (n_blocks + 1)]``, ``count, 0`` (the attention
    kernel's ticket counter) and then, in ascending block order, the pairs ``(b, sum_i flag_i << 2i)`` of
    the KV blocks that some column does not skip. Threads: n_blocks rounded up to a power of two in
    128..1024 (blocks are checked and compacted in chunks of that many)."""
    assert a.mask is not None
    bindings = [Binding("mask", a.mask, a.mask.dtype), Binding("blist", None, I32, write=True, scratch="blist")]
    params = _common_params(a, pl) + _mask_params(a)
    threads = min(BLOCK_LIST_MAX_THREADS, max(128, _pow2_at_least(ceil_div(a.n_kv, pl.kb))))
    mnb = elem_strides(a.mask)  # mask rows 16-byte aligned: each block's entries as 16-byte loads
    mvec = _copy_bytes(a.mask.dtype.size, True, (elem_offset(a.mask), mnb[1], mnb[2], mnb[3])) == 16
    entry = f"flash_attn_block_list_m{a.mask.dtype}_g{pl.g}_q{pl.qr}_t{threads}{'_mv' if mvec else ''}"
    src = _render(backend, kind="blocklist", entry=entry, node_name=node.name, bindings=bindings,
                  elem_types=_types(backend, bindings), params=params, threads=threads, g=pl.g, qr=pl.qr, kb=pl.kb,
                  mask_f16=a.mask.dtype == F16, mvec=mvec)
    return Kernel(backend, "flash_attn", entry, src, bindings, params, (threads, 1, 1),
                  (pl.n_lists(a), 1, 1), node, {"role": "prepass", "lists": True})


def reduce_kernel(node: Tensor, a: Attn, pl: Plan, backend: str) -> Kernel:
    """Combine the split partials: one workgroup of :data:`REDUCE_THREADS` per (row, head, seq)."""
    bindings = [Binding("partials", None, F32, scratch="partials"), Binding("dst", node, F32, write=True)]
    params = _common_params(a, pl) + [("dst_offs", "u32", elem_offset(node))]
    entry = f"flash_attn_reduce_dv{a.Dv}{'_cv' if pl.cuda_vec else ''}"
    threads = CUDA_REDUCE_THREADS if pl.cuda_vec else REDUCE_THREADS
    src = _render(backend, kind="reduce", entry=entry, node_name=node.name, bindings=bindings,
                  elem_types=_types(backend, bindings), params=params, threads=threads, dv=a.Dv,
                  variant=pl.variant, nw=threads // 32)
    return Kernel(backend, "flash_attn", entry, src, bindings, params, (threads, 1, 1),
                  row_grid(a.n_q * a.n_head * a.n_seq), node, {"role": "reduce"})


def emit_flash_attn_seq(node: Tensor, backend: str, *, kv_block: int | None = None, n_split: int | None = None,
                        skip: bool = True, variant: str | None = None, rows: int | None = None,
                        stages: int | None = None) -> KernelSequence:
    """The kernel sequence of ``node`` (see the module docstring); keyword arguments as
    :func:`choose_plan`. Scratch: ``flags`` (i32, n_blocks * n_groups * m2 * m3) with skipping,
    ``blist`` (i32, lists * 2 * (n_blocks + 1)) with skipping on the CUDA vec kernel, ``partials`` (f32,
    n_q * n_head * n_seq * n_split * (Dv + 2)) with a split.

    Raises :class:`CodegenError` for an unsupported head size or dtype, a non-attention node, or a
    FUSED node whose decomposition is not the attention chain."""
    a = attn_operands(node)
    _check(node, a)
    pl = choose_plan(a, backend, kv_block=kv_block, n_split=n_split, skip=skip, variant=variant, rows=rows,
                     stages=stages)
    kernels: list[Kernel] = []
    scratch: list[Scratch] = []
    if pl.block_list:  # CUDA vec: the pre-pass lists the blocks not skipped
        scratch.append(Scratch("blist", 4 * pl.n_lists(a) * 2 * (ceil_div(a.n_kv, pl.kb) + 1)))
        kernels.append(block_list_kernel(node, a, pl, backend))
    elif pl.skip:
        assert a.mask is not None
        n = ceil_div(a.n_kv, pl.kb) * ceil_div(a.n_q, pl.qr) * int(a.mask.ne[2] * a.mask.ne[3])
        scratch.append(Scratch("flags", 4 * n))
        kernels.append(prepass_kernel(node, a, pl, backend))
    kernels.append(main_kernel(node, a, pl, backend))
    if pl.split:
        scratch.append(Scratch("partials", 4 * a.n_q * a.n_head * a.n_seq * pl.n_split * (a.Dv + 2)))
        if not pl.fused_reduce:
            kernels.append(reduce_kernel(node, a, pl, backend))
    return KernelSequence(node, kernels, scratch)


@family("flash_attn", ops=("FLASH_ATTN_EXT",))
def emit_flash_attn(node: Tensor, backend: str) -> Kernel:
    """Single-kernel form: the attention kernel of :func:`choose_plan`'s variant without the mask
    pre-pass and without a KV split (it writes the result directly). Shapes: see :class:`Attn`;
    result f32 ``ne = [Dv, n_head, n_q, n_seq]`` (a FUSED node's own ``ne`` has the same memory
    order). Raises :class:`CodegenError` as :func:`emit_flash_attn_seq`."""
    seq = emit_flash_attn_seq(node, backend, n_split=1, skip=False)
    (k,) = seq.kernels
    return k


@sequence_family("flash_attn")
def _emit_flash_attn_all(node: Tensor, backend: str) -> KernelSequence:
    return emit_flash_attn_seq(node, backend)


__all__ = ["HEAD_SIZES", "KV_BLOCK", "Attn", "Plan", "attn_operands", "choose_plan", "emit_flash_attn",
           "emit_flash_attn_seq"]
