"""Candidate CUDA and WGSL kernels of a fused RMS_NORM->MUL(->ADD) node, for the harness's variant
sweep (``fusec bench --variants``) and the tests that compile and run every candidate.

:func:`cuda_variants` lists, for one node, the kernels worth timing side by side: ``tuned`` (what
:func:`fusec.codegen.families.norm_epilogue.tune` picks, i.e. what ships), ``base`` (the kernel
shipped before the row-count-aware tuning: one block per row, index division for every row offset,
no persistent grid: the 2026-11-21 tuned numbers), ``cs`` (``tuned`` with cache-streaming loads and
stores), ``t<N>`` (one block per row with N threads per row), ``r<N>`` (the same with the row
streamed from memory in each pass instead of held in registers) and, when there are rows enough for a
persistent grid (as :func:`~fusec.codegen.families.norm_epilogue.tune` requires), ``p<B>n``
(persistent, B blocks per SM, next row loaded before the reduction), ``p<B>`` (the default B
without the next-row prefetch) and ``pn_x32`` / ``pn_x128`` (persistent with next-row prefetch at the
default threads per SM, 32 / 128 bytes of x per thread per row instead of 64). Names are stable across
cases so the sweep table has columns.
"""

from __future__ import annotations

from collections.abc import Callable

from ..codegen.families import norm_epilogue as ne
from ..codegen.kernel import Kernel
from ..ir.tensor import Tensor

BASE_OPTS = {"persist": False, "small_fill_threads": 0, "streaming": False}
"""``tune`` options that give the tuning shipped before row-count-aware tuning (with ``dense=False``)."""

TPRS = (128, 256, 512, 1024)
PERSIST_PER_SM = (1, 2, 4)


def _replace(tu: ne.Tuning, **kw) -> ne.Tuning:
    return ne.Tuning(**{**tu.__dict__, **kw})


def cuda_variants(node: Tensor) -> dict[str, Callable[[], Kernel]]:
    """Name -> builder of each candidate CUDA kernel for ``node`` (a norm_epilogue node); the
    builders are lazy (rendering is cheap, compiling is not: the caller compiles what it times).
    Duplicates (the same source and grid as an earlier entry) are left out, except ``tuned``."""
    p = ne.plan(node)
    tuned = ne.tune(node, p, "cuda")
    base = ne.tune(node, p, "cuda", opts=BASE_OPTS)
    out: dict[str, Callable[[], Kernel]] = {
        "tuned": lambda: ne.build(node, "cuda"),
        "base": lambda: ne.build(node, "cuda", base, dense=False),
        "cs": lambda: ne.build(node, "cuda", _replace(tuned, cs=True)),
    }
    seen = {tuned, _replace(tuned, cs=True)}
    x = node.src[p.x]
    nvec = -(-x.ne[0] // tuned.vec)
    esize = x.dtype.size
    for tpr in TPRS:
        slots = ne._pow2ceil(-(-nvec // tpr))
        if slots * tuned.vec * esize > ne.MAX_CACHED_BYTES or tpr > ne._pow2ceil(nvec) or base.rows != 1:
            continue
        tu = ne.Tuning(tuned.vec, tpr, 1, slots)
        if tu in seen:
            continue
        seen.add(tu)
        out[f"t{tpr}"] = lambda tu=tu: ne.build(node, "cuda", tu)
    # the row streamed from memory in each pass (slots 0: x read twice, the second time from L2; few
    # registers, so more threads per SM), the shape of torch.compile's looped-reduction Triton kernel
    for tpr in (256, 512, 1024):
        if tpr > ne._pow2ceil(nvec) or base.rows != 1:
            continue
        tu = ne.Tuning(tuned.vec, tpr, 1, 0)
        if tu not in seen:
            seen.add(tu)
            out[f"r{tpr}"] = lambda tu=tu: ne.build(node, "cuda", tu)
    nrows = x.ne[1] * x.ne[2] * x.ne[3]
    if p.prologue is None and base.rows == 1 and base.slots:
        ps = max(1, ne.CUDA_OPTS["persist_bytes"] // (tuned.vec * esize))
        ptpr = min(max(ne._pow2ceil(-(-nvec // ps)), ne.SIMD), ne.MAX_TPR["cuda"])
        pslots = ne._pow2ceil(-(-nvec // ptpr))
        default = max(1, ne.CUDA_OPTS["persist_threads_per_sm"] // ptpr)
        for per_sm in PERSIST_PER_SM:
            if per_sm * ptpr > 1024 or nrows < ne.CUDA_OPTS["persist_rows_per_block"] * per_sm * ne.CUDA_OPTS["sms"]:
                continue
            for pn, name in ((True, f"p{per_sm}n"), (False, f"p{per_sm}")):
                if not pn and per_sm != default:
                    continue
                tu = ne.Tuning(tuned.vec, ptpr, 1, pslots, per_sm, pn, False)
                if tu in seen:
                    continue
                seen.add(tu)
                out[name] = lambda tu=tu: ne.build(node, "cuda", tu)
        # the default threads per SM with half / twice the bytes of x per thread per row
        threads = ne.CUDA_OPTS["persist_threads_per_sm"]
        for xbytes in (32, 128):
            ks = max(1, xbytes // (tuned.vec * esize))
            tpr = min(max(ne._pow2ceil(-(-nvec // ks)), ne.SIMD), ne.MAX_TPR["cuda"])
            slots = ne._pow2ceil(-(-nvec // tpr))
            per_sm = max(1, threads // tpr)
            if (slots * tuned.vec * esize > ne.MAX_CACHED_BYTES or per_sm * tpr > 1024
                    or nrows < ne.CUDA_OPTS["persist_rows_per_block"] * per_sm * ne.CUDA_OPTS["sms"]):
                continue
            tu = ne.Tuning(tuned.vec, tpr, 1, slots, per_sm, True)
            if tu not in seen:
                seen.add(tu)
                out[f"pn_x{xbytes}"] = lambda tu=tu: ne.build(node, "cuda", tu)
    return out


WGSL_SEQ = ((4, True), (8, True), (16, True), (8, False))
"""(rows per workgroup one after another, next-row prefetch) of the WGSL candidates."""


def wgsl_variants(node: Tensor) -> dict[str, Callable[[], Kernel]]:
    """Name -> builder of each candidate WGSL kernel for ``node``: ``tuned`` (what ships) and, for
    a resident row without prologue, ``s<S>[n]``: one-row workgroups computing S consecutive rows
    one after another (``n``: the next row's x loaded before this row's reduction), the WGSL
    counterpart of the CUDA persistent grid (fewer workgroup starts, loads in flight during the
    reduction's barriers)."""
    p = ne.plan(node)
    tu = ne.tune(node, p, "wgsl")
    out: dict[str, Callable[[], Kernel]] = {"tuned": lambda: ne.build(node, "wgsl")}
    if p.prologue is None and tu.rows == 1 and tu.slots:
        for seq, pn in WGSL_SEQ:
            t = ne.Tuning(tu.vec, tu.tpr, 1, tu.slots, pn=pn, seq=seq)
            out[f"s{seq}{'n' if pn else ''}"] = lambda t=t: ne.build(node, "wgsl", t)
    return out


__all__ = ["BASE_OPTS", "WGSL_SEQ", "cuda_variants", "wgsl_variants"]
