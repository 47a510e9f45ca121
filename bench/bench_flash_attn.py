"""Decode flash attention on the GPU machine: fusec's CUDA kernel sequence (mask pre-pass, split-KV
vec attention, reduction) with and without masked-block skipping, next to PyTorch SDPA and the copy
ceiling, and (``--wgsl``) fusec's WGSL kernel sequence through wgpu on the same GPU.

Cases (f16 K/V, 32 query heads, 8 KV heads, head size 128, one query token per sequence):

* ``4seq``: 4 sequences x 8192 cells in a unified 32768-cell KV cache, block-diagonal mask (each query
  sees exactly its own sequence's 8192 cells). fusec layouts of the same computation: ``seq`` -- q
  ``ne = [128, 1, 32, 4]``, mask ``[32768, 1, 1, 4]`` (one mask batch per sequence) -- and ``ggml`` --
  llama.cpp's ubatch, q ``[128, 4, 32, 1]``, mask ``[32768, 4, 1, 1]`` (one query row per row group on
  CUDA, so each row skips the other sequences' blocks as well).
* ``1seq4096``: one sequence, 4096 cells, all visible (an all-zero f16 mask, as llama.cpp passes one).
* with ``--all`` also ``swa`` (window 4096 at the end of 32768 cells) and ``single`` (8192 cells, no mask).

Correctness first: each fusec variant's output is poisoned with NaN, the captured CUDA graph replayed
and the result compared with a float64 reference computed with CuPy (normalized MSE bound 5e-4, no
NaN); a wrong variant is reported and not timed. Then timing with ``triton.testing.do_bench`` (median,
L2 flushed between repetitions) of the CUDA graph replay (fusec), of each fusec kernel alone (the
``kernels`` column: pre-pass / attention / reduce), and of the peers (f16 q, k, v, as PyTorch runs them):

* ``sdpa_masked``: ``F.scaled_dot_product_attention`` over the whole cache with the boolean mask;
* ``sdpa_own``: SDPA over only each sequence's own cells (one batched call on a strided view of the
  cache, no mask): the ideal;
* ``flex`` (only with ``--flex``: torch.compile takes a minute): ``flex_attention`` with a block mask;
* ``copy_ideal``: the visible K/V bytes at the device-to-device copy ceiling (1 GiB copy, bytes read
  + written over time).

fusec variants: ``fusec_skip`` (the default plan), ``fusec_noskip`` (no pre-pass: every block loaded,
the mask read), tuning probes that override ``flash_attn``'s constants for one plan: ``_st3`` (3
cp.async K/V stages instead of what fits ``CUDA_RING_BYTES``), ``_bps16`` (at most 16 KV blocks per split
instead of ``CUDA_MAX_BPS``), ``_minbps8`` (at least 8 instead of ``CUDA_MIN_BPS``), ``_bpsm4`` (split for 4
blocks per SM instead of ``CUDA_BLOCKS_PER_SM``), ``_w8`` / ``_w16`` (8 / 16 warps per block instead of
``CUDA_VEC_WARPS``), and ``fusec_ggml_layout`` (4seq only). GB/s = visible K/V bytes (the cells some query
may see, K and V, every KV head) over time; ``% copy`` = that over the (CUDA) copy ceiling. The JSON
(``--out``) is rewritten after every case. About a minute on an H200 without ``--flex``.

WGSL rows (``--wgsl``, issue #4: WGSL within 2x of the CUDA kernel): the same graph (``seq`` layout),
``emit_flash_attn_seq(node, "wgsl")`` -- the sequence :class:`fusec.backends.wgpu_backend.WgpuExecutable`
dispatches (pre-pass + attention + reduce, as the plan has them) -- on wgpu storage buffers (q, k, v,
mask uploaded, scratch bound as the sequence names it), checked first against the float64 reference
(output NaN-poisoned, the same nmse bound), then timed with ``fusec.bench.measure_wgpu.WgpuTimer``
(timestamp queries around one compute pass holding the whole sequence, a 256 MiB ``clear_buffer``
before each repetition as L2 flush, median of 30; the GPU spun up first with 2 s of WGSL copy passes):

* ``wgsl_skip``: the default WGSL plan (mask pre-pass, masked blocks skipped);
* ``wgsl_noskip``: ``skip=False`` (no pre-pass, every block loaded, the mask read).

Their ``kernels`` column times each WGSL kernel alone (one dispatch per pass, flushed). The case entry
gets ``wgsl_vs_cuda`` = t(``wgsl_skip``) / t(``fusec_skip``); the JSON's ``wgsl`` object records the
adapter (``wgpu_runtime`` asks for ``power_preference="high-performance"``: the discrete GPU), the
timing method and the WGSL copy ceiling. Without wgpu-py or a WebGPU adapter, on a CPU adapter, or
without ``shader-f16`` the rows are skipped with a note (``wgsl.skip`` in the JSON). The Vulkan
driver is the caller's (``VK_DRIVER_FILES``). Adds a few seconds to a run on the H200.

Usage: python bench/bench_flash_attn.py --out results.json [--all] [--flex] [--wgsl] [--dry]
``--dry`` (no GPU needed) builds every case at a tiny size and checks the reference against fusec's
interpreter and that the fusec graphs emit their CUDA (and WGSL) kernel sequences, printing the
full-size plans; ``--dry --wgsl`` also runs the WGSL sequences (skip and no skip) at the tiny size on
the local wgpu adapter (lavapipe on a CPU) against the reference: correctness only, no timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusec.ir import GraphBuilder  # noqa: E402

NMSE_BOUND = 5e-4
D, N_HEAD, N_HEAD_KV = 128, 32, 8


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``n_seq`` query streams (one token each) over ``n_kv`` cache cells.

    ``kind``: ``multi`` (sequence s owns cells ``[s*n_kv/n_seq, (s+1)*n_kv/n_seq)``), ``swa`` (the
    last ``window`` cells visible), ``full`` (everything visible, an all-zero mask), ``none``
    (everything visible, no mask).
    """

    name: str
    n_seq: int
    n_kv: int
    kind: str
    window: int = 0

    def visible(self) -> np.ndarray | None:
        """Bool [n_seq, n_kv]: cell j visible to sequence s; None without a mask."""
        j = np.arange(self.n_kv)
        if self.kind == "multi":
            return (j[None, :] * self.n_seq // self.n_kv) == np.arange(self.n_seq)[:, None]
        if self.kind == "swa":
            return np.broadcast_to(j[None, :] >= self.n_kv - self.window, (self.n_seq, self.n_kv)).copy()
        if self.kind == "full":
            return np.ones((self.n_seq, self.n_kv), bool)
        return None

    def visible_cells(self) -> int:
        """Cells visible to at least one query (each read once by an ideal kernel)."""
        vis = self.visible()
        return self.n_kv if vis is None else int(vis.any(axis=0).sum())


def cases(scale: int = 1, all_cases: bool = False) -> list[Case]:
    """The benchmark cases; ``scale`` divides every length (``--dry``)."""
    out = [Case("4seq", 4, 32768 // scale, "multi"), Case("1seq4096", 1, 4096 // scale, "full")]
    if all_cases:
        out += [Case("swa", 1, 32768 // scale, "swa", 4096 // scale), Case("single", 1, 8192 // scale, "none")]
    return out


def kv_bytes(c: Case) -> int:
    return c.visible_cells() * N_HEAD_KV * D * 2 * 2  # K and V, f16


def build(c: Case, layout: str):
    """fusec graph: FLASH_ATTN_EXT with q an input, k/v/mask weights (stored once on the device).
    ``layout``: ``seq`` (q ``[D, 1, H, S]``, mask ``[n_kv, 1, 1, S]``) or ``ggml`` (q ``[D, S, H, 1]``,
    mask ``[n_kv, S, 1, 1]``). Returns (graph, node)."""
    b = GraphBuilder()
    S = c.n_seq
    if layout == "seq":
        q = b.input("q", "f32", (D, 1, N_HEAD, S))
        mask = b.weight("mask", "f16", (c.n_kv, 1, 1, S)) if c.kind != "none" else None
    else:
        q = b.input("q", "f32", (D, S, N_HEAD, 1))
        mask = b.weight("mask", "f16", (c.n_kv, S, 1, 1)) if c.kind != "none" else None
    k = b.weight("k", "f16", (D, c.n_kv, N_HEAD_KV, 1))
    v = b.weight("v", "f16", (D, c.n_kv, N_HEAD_KV, 1))
    y = b.flash_attn_ext(q, k, v, mask, scale=1.0 / math.sqrt(D), name="y")
    return b.build([y]), y


def data(c: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """q f32 [S, H, D]; k, v f16 [H_kv, n_kv, D] (ggml ne [D, n_kv, H_kv]); mask f16 [S, n_kv] (0 / -inf)."""
    rng = np.random.default_rng(seed)
    out = {"q": rng.standard_normal((c.n_seq, N_HEAD, D)).astype(np.float32),
           "k": rng.standard_normal((N_HEAD_KV, c.n_kv, D)).astype(np.float16),
           "v": rng.standard_normal((N_HEAD_KV, c.n_kv, D)).astype(np.float16)}
    vis = c.visible()
    if vis is not None:
        out["mask"] = np.where(vis, 0.0, -np.inf).astype(np.float16)
    return out


def fusec_inputs(vals: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    q = vals["q"] if layout == "seq" else np.ascontiguousarray(vals["q"].transpose(1, 0, 2))
    return {"q": q}


def reference(xp, vals: dict[str, np.ndarray]):
    """float64 attention with ``xp`` (numpy or cupy): [S, H, D]; rows with nothing visible are 0."""
    q = xp.asarray(vals["q"], dtype=xp.float64)
    k = xp.asarray(vals["k"], dtype=xp.float64)
    v = xp.asarray(vals["v"], dtype=xp.float64)
    S, H, _ = q.shape
    hk = k.shape[0]
    qg = q.reshape(S, hk, H // hk, D)
    s = xp.einsum("sgrd,gjd->sgrj", qg, k) / math.sqrt(D)
    if "mask" in vals:
        vis = xp.asarray(vals["mask"] == 0)[:, None, None, :]
        s = xp.where(vis, s, -xp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    p = xp.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    o = xp.einsum("sgrj,gjd->sgrd", p, v) / xp.where(den == 0, 1.0, den)
    return o.reshape(S, H, D)


def nmse(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((out - ref) ** 2) / max(np.sum(ref**2), 1e-300))


# fusec variants: (name, layout, skip, tuning overrides of fusec.codegen.families.flash_attn or None)
_STAGE = 32 * (128 + 8) * 2 * 2  # one K + V tile of the CUDA vec kernel (f16, D = Dv = 128, padded rows)
FUSEC_VARIANTS = [("fusec_skip", "seq", True, None), ("fusec_noskip", "seq", False, None),
                  ("fusec_skip_st3", "seq", True, {"CUDA_RING_BYTES": 3 * _STAGE}),
                  ("fusec_skip_bps16", "seq", True, {"CUDA_MAX_BPS": 16}),
                  ("fusec_skip_minbps8", "seq", True, {"CUDA_MIN_BPS": 8}),
                  ("fusec_skip_bpsm4", "seq", True, {"CUDA_BLOCKS_PER_SM": 4}),
                  ("fusec_skip_w8", "seq", True, {"CUDA_VEC_WARPS": 8}),
                  ("fusec_skip_w8_minbps8", "seq", True, {"CUDA_VEC_WARPS": 8, "CUDA_MIN_BPS": 8}),
                  ("fusec_skip_w16", "seq", True, {"CUDA_VEC_WARPS": 16}),
                  ("fusec_ggml_layout", "ggml", True, None)]


def variants_for(c: Case) -> list[tuple[str, str, bool, dict | None]]:
    """fusec variants (name, layout, skip, tuning overrides or None for the default plan); the ggml
    layout only with several sequences."""
    return FUSEC_VARIANTS if c.n_seq > 1 else FUSEC_VARIANTS[:-1]


@contextlib.contextmanager
def split_bounds(over: dict | None):
    """Temporarily replace tuning constants of ``fusec.codegen.families.flash_attn`` (``CUDA_MAX_BPS``,
    ``CUDA_BLOCKS_PER_SM``, ``CUDA_RING_BYTES``, ...): a tuning probe."""
    from fusec.codegen.families import flash_attn as fa

    over = over or {}
    old = {k: getattr(fa, k) for k in over}
    for k, v in over.items():
        setattr(fa, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(fa, k, v)


# ---------------------------------------------------------------------------------------------------
# WGSL (wgpu-py over Vulkan: the NVIDIA driver on the GPU machine, lavapipe on a CPU)
WGSL_VARIANTS = [("wgsl_skip", True), ("wgsl_noskip", False)]
WGSL_SPIN_UP_S = 2.0  # seconds of copy passes before the first WGSL timing (the GPU leaves its idle clocks)


def wgsl_setup(timing: bool) -> tuple[dict, object | None]:
    """The wgpu device (``wgpu_runtime``'s: ``power_preference="high-performance"``, so the discrete
    GPU) and, with ``timing``, a :class:`fusec.bench.measure_wgpu.WgpuTimer` after a spin-up with the
    WGSL copy kernel, whose ceiling is recorded. Returns (meta for the JSON, timer or None); meta has
    ``"skip"`` (a note) when wgpu-py or a WebGPU adapter is missing, when the device lacks
    ``shader-f16``, or (with ``timing``) when the adapter is a CPU (lavapipe: no GPU numbers)."""
    try:
        import wgpu  # noqa: PLC0415

        from fusec.backends import wgpu_runtime as rt  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        return {"skip": f"wgpu-py not importable ({type(e).__name__}: {e})"}, None
    if not rt.available():
        return {"skip": "no WebGPU adapter (wgpu found no Vulkan/Metal/DX12 device; check VK_DRIVER_FILES)"}, None
    info = rt.adapter_info()
    dev = rt.device()
    meta = {"wgpu": wgpu.__version__, "adapter": info.get("device"), "adapter_info": info,
            "power_preference": "high-performance", "features": sorted(str(f) for f in dev.features),
            "max_storage_buffer_binding_size": dev.limits.get("max-storage-buffer-binding-size")}
    if not rt.has_feature("shader-f16"):
        meta["skip"] = f"adapter {info.get('device')!r} has no shader-f16 (f16 K/V)"
        return meta, None
    if not timing:
        return meta, None
    if info.get("adapter_type") == "CPU":
        meta["skip"] = f"CPU adapter {info.get('device')!r} (not the GPU; no WGSL timing at full size)"
        return meta, None
    from fusec.bench.measure_wgpu import FLUSH_BYTES, WgpuTimer, copy_kernel, timestamp_period  # noqa: PLC0415

    notes: list[str] = []
    timer = WgpuTimer(notes, FLUSH_BYTES)
    nbytes = min(256 << 20, meta["max_storage_buffer_binding_size"] or (128 << 20)) // 16 * 16
    k = copy_kernel(nbytes)
    src, dst = rt.storage_buffer(k.param("n4") * 16), rt.storage_buffer(k.param("n4") * 16)
    disp = [(rt.pipeline(k), rt.bind_group(k, [src, dst], rt.uniform_buffer(rt.pack_params(k))), k.grid)]
    timer.spin_up(disp, WGSL_SPIN_UP_S)
    t_us = timer(disp)
    src.destroy()
    dst.destroy()
    meta.update(timing=timer.method, timestamp_period_ns=timestamp_period(), notes=notes,
                spin_up=f"{WGSL_SPIN_UP_S:g} s of WGSL copy passes before the first case",
                copy_ceiling_gbs=2 * nbytes / (t_us * 1e-6) / 1e9,
                copy_ceiling=f"fusec.bench.measure_wgpu's WGSL vec4 copy, {nbytes >> 20} MiB read + written")
    return meta, timer


class WgslSeq:
    """One FLASH_ATTN_EXT node's WGSL kernel sequence (``emit_flash_attn_seq(node, "wgsl", skip=skip)``,
    what :class:`fusec.backends.wgpu_backend.WgpuExecutable` dispatches for the node, ``skip=False``
    dropping the pre-pass) on storage buffers: q / k / v / mask uploaded, the output NaN-filled,
    scratch (flags, partials) zeroed; :attr:`dispatches` as ``measure_wgpu.encode_pass`` takes them."""

    def __init__(self, c: Case, vals: dict[str, np.ndarray], layout: str, skip: bool):
        from fusec.backends import wgpu_runtime as rt  # noqa: PLC0415
        from fusec.codegen import _load_families  # noqa: PLC0415
        from fusec.codegen.families.flash_attn import emit_flash_attn_seq  # noqa: PLC0415

        _load_families()
        g, self.y = build(c, layout)
        self.seq = emit_flash_attn_seq(self.y, "wgsl", skip=skip)
        feed = dict(fusec_inputs(vals, layout), k=vals["k"], v=vals["v"])
        if "mask" in vals:
            feed["mask"] = vals["mask"]
        self.bufs: dict[str, object] = {}
        for t in g.leaves:
            data = np.ascontiguousarray(feed[t.name], t.dtype.np).tobytes()
            self.bufs[t.name] = rt.storage_buffer(t.span_bytes, data)
        r = self.y.root
        self.out_buf = rt.storage_buffer(r.span_bytes)
        self.scratch = {sc.name: rt.storage_buffer(sc.nbytes, bytes(-(-sc.nbytes // 4) * 4)) for sc in self.seq.scratch}
        self.dispatches = []
        for k in self.seq.kernels:
            bufs = [self.scratch[b.scratch] if b.scratch is not None
                    else self.out_buf if b.tensor.root is r else self.bufs[b.tensor.root.name] for b in k.bindings]
            group = rt.bind_group(k, bufs, rt.uniform_buffer(rt.pack_params(k)))
            self.dispatches.append((rt.pipeline(k), group, k.grid))

    def run(self) -> np.ndarray:
        """NaN-poison the output, run the sequence in one compute pass, read the output back."""
        from fusec.backends import wgpu_runtime as rt  # noqa: PLC0415
        from fusec.bench.measure_wgpu import encode_pass  # noqa: PLC0415

        r = self.y.root
        dev = rt.device()
        dev.queue.write_buffer(self.out_buf, 0, np.full(r.span_bytes // 4, np.nan, np.float32).tobytes())
        enc = dev.create_command_encoder()
        encode_pass(enc, self.dispatches)
        dev.queue.submit([enc.finish()])
        return np.frombuffer(rt.read_buffer(self.out_buf, r.span_bytes), np.float32)

    def destroy(self) -> None:
        for b in [*self.bufs.values(), self.out_buf, *self.scratch.values()]:
            b.destroy()
        self.bufs, self.scratch, self.dispatches = {}, {}, []


def run_wgsl(timer, c: Case, vals, ref, name: str, skip: bool, layout: str = "seq") -> dict:
    """Check one WGSL variant against ``ref`` (NaN-poisoned output, nmse <= :data:`NMSE_BOUND`) and,
    with a ``timer`` (``WgpuTimer``), time the whole sequence in one compute pass and each kernel alone
    (``t_s`` in seconds, kernels' ``us``)."""
    ws = WgslSeq(c, vals, layout, skip)
    try:
        got = ws.run().reshape(c.n_seq, N_HEAD, D)  # ne [Dv, H, 1, S] (seq) or [Dv, H, S, 1] (ggml)
        err = nmse(got, ref)
        res = {"name": name, "layout": layout, "skip": skip, "nmse": err, "nan": bool(np.isnan(got).any()),
               "kernels": [{"entry": k.entry, "role": k.meta.get("role"), "grid": list(k.grid),
                            "block": list(k.workgroup_size)} for k in ws.seq.kernels]}
        if res["nan"] or err > NMSE_BOUND:
            res["error"] = f"wrong result: nmse {err:.3e}, nan {res['nan']}"
            return res
        if timer is None:
            return res
        res["t_s"] = timer(ws.dispatches) * 1e-6
        for d, kd in zip(ws.dispatches, res["kernels"], strict=True):
            kd["us"] = timer([d])
        return res
    finally:
        ws.destroy()


# ---------------------------------------------------------------------------------------------------
def dry(wgsl: bool = False) -> int:
    """Tiny cases: reference (numpy) vs the interpreter, and the CUDA sequences emit. With ``wgsl``
    also the WGSL sequences (skip and no skip) run on the wgpu adapter (lavapipe on a CPU) against
    the reference: correctness only (a note, not a failure, when wgpu / an adapter is missing)."""
    from fusec.backends.cuda_backend import _sequence
    from fusec.interp import interpret

    ok = True
    if wgsl:
        meta, _ = wgsl_setup(timing=False)
        if "skip" in meta:
            print(f"wgsl: skipped: {meta['skip']}")
            wgsl = False
        else:
            print(f"wgsl: adapter {meta['adapter']!r} ({meta['adapter_info'].get('adapter_type')}, "
                  f"{meta['adapter_info'].get('backend_type')})")
    for c in cases(scale=64, all_cases=True):
        vals = data(c, 1)
        ref = reference(np, vals)
        for name, layout, skip, bps in variants_for(c):
            g, y = build(c, layout)
            feed = dict(fusec_inputs(vals, layout), k=vals["k"], v=vals["v"])
            if "mask" in vals:
                feed["mask"] = vals["mask"]
            got = interpret(g, feed)["y"].reshape(c.n_seq, N_HEAD, D)
            e = nmse(got, ref)
            with split_bounds(bps):
                seq = _sequence(y, skip)
            roles = [k.meta.get("role") for k in seq.kernels]
            print(f"{c.name:8s} {name:18s} nmse(interp, ref)={e:.2e} kernels={roles} "
                  f"grids={[k.grid for k in seq.kernels]}")
            ok &= e <= 1e-10
        if wgsl:
            for name, skip in WGSL_VARIANTS:
                r = run_wgsl(None, c, vals, ref, name, skip)
                print(f"{c.name:8s} {name:18s} nmse(wgsl, ref)={r['nmse']:.2e} nan={r['nan']} "
                      f"kernels={[k['role'] for k in r['kernels']]} grids={[k['grid'] for k in r['kernels']]}"
                      + (f"  ERROR {r['error']}" if "error" in r else ""))
                ok &= "error" not in r
    for c in cases(all_cases=True):  # the full-size plans (codegen only)
        for name, layout, skip, bps in variants_for(c):
            with split_bounds(bps):
                seq = _sequence(build(c, layout)[1], skip)
            print(f"full size {c.name:8s} {name:18s} grids={[k.grid for k in seq.kernels]}")
        for name, skip in WGSL_VARIANTS:
            from fusec.codegen.families.flash_attn import emit_flash_attn_seq

            seq = emit_flash_attn_seq(build(c, "seq")[1], "wgsl", skip=skip)
            print(f"full size {c.name:8s} {name:18s} grids={[k.grid for k in seq.kernels]} "
                  f"scratch={[(sc.name, sc.nbytes) for sc in seq.scratch]}")
    print("dry:", "ok" if ok else "FAILED")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------------
def run_fusec(cp, timeit, c: Case, vals, ref, name: str, layout: str, skip: bool, bps) -> dict:
    from fusec.backends.cuda_backend import CudaBackend

    be = CudaBackend(use_graphs=True, flash_attn_skip=skip)
    g, y = build(c, layout)
    w = {"k": vals["k"], "v": vals["v"]}
    if "mask" in vals:
        w["mask"] = vals["mask"]
    be.set_weights(w)
    with split_bounds(bps):
        exe = be.compile(g)
    inp = fusec_inputs(vals, layout)
    state: dict = {}
    exe.run(inp, state)  # eager, then capture
    if "graph" not in state:
        return {"name": name, "error": f"no CUDA graph: {state.get('fallback')}"}
    with be.on_stream():
        exe.device_array(y).fill(np.nan)
    out = exe.run(inp, state)["y"]  # replay
    got = np.asarray(out).reshape(c.n_seq, N_HEAD, D)  # ne [Dv, H, 1, S] (seq) or [Dv, H, S, 1] (ggml)
    err = nmse(got, ref)
    res = {"name": name, "layout": layout, "skip": skip, "bps": bps, "nmse": err, "nan": bool(np.isnan(got).any()),
           "mode": exe.last_timing.get("mode"),
           "kernels": [{"entry": k.entry, "role": k.meta.get("role"), "grid": list(k.grid),
                        "block": list(k.workgroup_size)} for k in exe.kernels]}
    if res["nan"] or err > NMSE_BOUND:
        res["error"] = f"wrong result: nmse {err:.3e}, nan {res['nan']}"
        return res
    graph = state["graph"]
    null = cp.cuda.Stream.null
    cp.cuda.runtime.deviceSynchronize()
    res["t_s"] = timeit(lambda: graph.launch(null))
    # each kernel alone (bound launches of the executable, on the null stream). The attention kernel alone
    # does not combine the splits: its ticket counters are zeroed by the pre-pass, which does not run here
    pv = exe._param_values
    for call, kd in zip([cl for cl in exe._calls if cl[0] == "kernel"], res["kernels"], strict=True):
        _, k, fn, bufs, ki, _pdl = call
        kd["us"] = timeit(lambda k=k, fn=fn, bufs=bufs, ki=ki: fn(k.grid, k.workgroup_size, bufs + (pv[ki],),
                                                                 shared_mem=k.dynamic_shared)) * 1e6
    return res


def run_torch(torch, timeit, c: Case, vals, ref, with_flex: bool = True) -> list[dict]:
    import torch.nn.functional as F

    dev = "cuda"
    S = c.n_seq
    q = torch.from_numpy(vals["q"]).to(dev).half().reshape(S, N_HEAD, 1, D)
    k = torch.from_numpy(vals["k"]).to(dev).reshape(1, N_HEAD_KV, c.n_kv, D)
    v = torch.from_numpy(vals["v"]).to(dev).reshape(1, N_HEAD_KV, c.n_kv, D)
    vis = torch.from_numpy(c.visible()).to(dev) if c.kind != "none" else None
    out: list[dict] = []

    def check_time(name, fn, note=""):
        r = {"name": name, "note": note}
        try:
            o = fn()
            torch.cuda.synchronize()
            got = o.float().reshape(S, N_HEAD, D).cpu().numpy()
            r["nmse"] = nmse(got, ref)
            if not np.isfinite(got).all() or r["nmse"] > NMSE_BOUND:
                r["error"] = f"wrong result: nmse {r['nmse']:.3e}"
            else:
                r["t_s"] = timeit(fn)
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        out.append(r)

    ke, ve = k.expand(S, -1, -1, -1), v.expand(S, -1, -1, -1)
    if vis is not None:
        m = vis.reshape(S, 1, 1, c.n_kv)
        check_time("sdpa_masked", lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=m, enable_gqa=True),
                   "whole cache, bool mask, enable_gqa")
    else:
        check_time("sdpa_masked", lambda: F.scaled_dot_product_attention(q, ke, ve, enable_gqa=True),
                   "no mask needed (everything visible)")
    if c.kind == "multi":
        C = c.n_kv // S
        ko = k.reshape(N_HEAD_KV, S, C, D).permute(1, 0, 2, 3)  # [S, H_kv, C, D], strided
        vo = v.reshape(N_HEAD_KV, S, C, D).permute(1, 0, 2, 3)
    elif c.kind == "swa":
        ko, vo = k[:, :, c.n_kv - c.window:], v[:, :, c.n_kv - c.window:]
    else:
        ko, vo = k, v
    check_time("sdpa_own", lambda: F.scaled_dot_product_attention(q, ko, vo, enable_gqa=True),
               "only the visible cells, no mask (strided views)")
    if not with_flex:
        return out
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        if c.kind == "multi":
            C = c.n_kv // S

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx // C == b
            bm = create_block_mask(mask_mod, S, None, 1, c.n_kv, device=dev)
        elif c.kind == "swa":
            lo = c.n_kv - c.window

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx >= lo
            bm = create_block_mask(mask_mod, None, None, 1, c.n_kv, device=dev)
        else:
            bm = None
        kc, vc = ke.contiguous() if S > 1 else k, ve.contiguous() if S > 1 else v
        t0 = time.perf_counter()
        check_time("flex", lambda: flex(q, kc, vc, block_mask=bm, enable_gqa=True),
                   "torch.compile(flex_attention), create_block_mask")
        out[-1]["compile_and_bench_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        out.append({"name": "flex", "error": f"{type(e).__name__}: {str(e)[:400]}"})
    return out


def copy_ceiling(cp, timeit) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    n = 1 << 30
    src, dst = cp.ones(n, cp.uint8), cp.empty(n, cp.uint8)
    t = timeit(lambda: cp.copyto(dst, src))
    return 2 * n / t / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required="--dry" not in sys.argv, help="JSON results path")
    ap.add_argument("--dry", action="store_true", help="tiny CPU-only checks (no GPU)")
    ap.add_argument("--all", action="store_true", help="also the swa and single (no mask) cases")
    ap.add_argument("--flex", action="store_true", help="also torch.compile(flex_attention) (slow to compile)")
    ap.add_argument("--wgsl", action="store_true",
                    help="also fusec's WGSL sequence through wgpu (Vulkan); with --dry: on lavapipe, correctness only")
    args = ap.parse_args()
    if args.dry:
        return dry(wgsl=args.wgsl)
    import cupy as cp
    import torch
    from triton.testing import do_bench

    def timeit(fn) -> float:
        return float(do_bench(fn, warmup=10, rep=60, return_mode="median")) * 1e-3

    t_start = time.perf_counter()
    ceiling = copy_ceiling(cp, timeit)
    doc = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "host": platform.node(), "torch": torch.__version__, "cupy": cp.__version__,
           "copy_ceiling_gbs": ceiling, "timing": "triton.testing.do_bench median, L2 flushed",
           "shape": {"D": D, "n_head": N_HEAD, "n_head_kv": N_HEAD_KV, "kv": "f16", "q_fusec": "f32",
                     "q_torch": "f16"}, "cases": []}
    print(f"copy ceiling {ceiling:.0f} GB/s", flush=True)
    wtimer = None
    if args.wgsl:
        try:
            wmeta, wtimer = wgsl_setup(timing=True)
        except Exception as e:  # noqa: BLE001
            wmeta = {"skip": f"wgpu setup failed: {type(e).__name__}: {e}", "tb": traceback.format_exc()[-1500:]}
        doc["wgsl"] = wmeta
        if wtimer is None:
            print(f"wgsl: skipped: {wmeta.get('skip')}", flush=True)
        else:
            print(f"wgsl: adapter {wmeta['adapter']!r}, WGSL copy ceiling {wmeta['copy_ceiling_gbs']:.0f} GB/s",
                  flush=True)
    for c in cases(all_cases=args.all):
        vals = data(c)
        ref = cp.asnumpy(reference(cp, vals))
        vb = kv_bytes(c)
        entry = {"case": c.name, "n_seq": c.n_seq, "n_kv": c.n_kv, "kind": c.kind, "window": c.window,
                 "visible_kv_bytes": vb, "results": []}
        rows = []
        for name, layout, skip, bps in variants_for(c):
            try:
                rows.append(run_fusec(cp, timeit, c, vals, ref, name, layout, skip, bps))
            except Exception as e:  # noqa: BLE001
                rows.append({"name": name, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-1500:]})
        if wtimer is not None:
            for name, skip in WGSL_VARIANTS:
                try:
                    rows.append(run_wgsl(wtimer, c, vals, ref, name, skip))
                except Exception as e:  # noqa: BLE001
                    rows.append({"name": name, "error": f"{type(e).__name__}: {e}",
                                 "tb": traceback.format_exc()[-1500:]})
        rows += run_torch(torch, timeit, c, vals, ref, with_flex=args.flex)
        rows.append({"name": "copy_ideal", "t_s": vb / (ceiling * 1e9)})
        own = next((r["t_s"] for r in rows if r["name"] == "sdpa_own" and "t_s" in r), None)
        for r in rows:
            if "t_s" in r:
                r["us"] = r["t_s"] * 1e6
                r["gbs"] = vb / r["t_s"] / 1e9
                r["pct_copy"] = 100 * r["gbs"] / ceiling
                if own:
                    r["vs_sdpa_own"] = own / r["t_s"]
        t_of = {r["name"]: r["t_s"] for r in rows if "t_s" in r}
        if "wgsl_skip" in t_of and "fusec_skip" in t_of:
            entry["wgsl_vs_cuda"] = t_of["wgsl_skip"] / t_of["fusec_skip"]
        entry["results"] = rows
        doc["cases"].append(entry)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"\n{c.name}: n_seq={c.n_seq} n_kv={c.n_kv} visible K/V {vb / 2**20:.0f} MiB")
        print(f"  {'variant':18s} {'us':>9s} {'GB/s':>7s} {'%copy':>6s} {'x own':>6s} {'nmse':>8s}  kernels (us)")
        for r in rows:
            if "us" in r:
                ks = " ".join(f"{k['role']}={k['us']:.1f}" for k in r.get("kernels", []) if "us" in k)
                print(f"  {r['name']:18s} {r['us']:9.1f} {r['gbs']:7.0f} {r['pct_copy']:6.1f} "
                      f"{r.get('vs_sdpa_own', float('nan')):6.2f} {r.get('nmse', float('nan')):8.1e}  {ks}")
            else:
                print(f"  {r['name']:18s} ERROR {r.get('error')}")
        if "wgsl_vs_cuda" in entry:
            print(f"  wgsl_skip / fusec_skip = {entry['wgsl_vs_cuda']:.2f}x (issue #4 goal: <= 2)")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
