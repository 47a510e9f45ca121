"""Side-by-side benchmark of fusec's fused GEMV kernels (``gemv_epilogue``) on the GPU machine.

Cases: Llama-3.2-1B decode shapes with f16 weights (gate/up 2048 -> 8192 with SWIGLU, down
8192 -> 2048 with the residual ADD, attention projections 2048 -> 2048 and 2048 -> 512 with an ADD),
plus the gate/up case with f32 weights. For each case the unfused graph is built with fusec's
builder and rewritten with the shipped patterns; the fused node's CUDA kernel (and its tuning
variants, ``gemv_epilogue.build``) is checked first against a float64 reference computed on the GPU
(relative error ``||out - ref|| / ||ref||``, output poisoned with NaN before each checked run, fresh
random inputs per variant; bound 1e-5), then timed next to:

* the copy ceiling: a device-to-device copy of 1 GiB (bytes read + bytes written over time);
* back-to-back (``b2b``): every variant launched over R weight copies (>= 256 MB in all) in one
  captured CUDA graph, time per launch (no launch gaps, no L2 reuse: a decode step's steady state),
  the cuBLAS + epilogue sequence likewise; and an empty kernel of the same grid (single-launch floor);
* cuBLAS through CuPy: ``cupy.matmul`` of the weight (its storage dtype) with x in the same dtype,
  one per MUL_MAT, plus fusec's own unfused epilogue kernel (SWIGLU / GEGLU ``glu`` or ``binary``
  ADD) on the products (f16 products for f16 weights: the weights are read once, at 2 bytes each).

Variants (:func:`variants`): ``default`` (``gemv_epilogue.tune``), ``classic`` (the classic body's
tuning, ``tune_classic``: the default before the streaming body), classic with all loads before the
FMAs, streaming-body tunings (``s_t<tpr>_u<unroll>_p<blocks per SM>_<load hint>``) over threads
per row, loads per chunk, persistent grid size and load hint, and x-in-registers tunings
(``x_t<threads>_r<rows per block>_u<rows loaded together>_<load hint>``) -- the full sweep for the
two FFN cases, a short list for the others (``--xreg-sweep``: the FFN cases sweep the x-in-registers
body only, each tuning also launched without programmatic dependent launch, ``..._nopdl``, and
one with the L2 bulk prefetch, ``..._pf``). x-in-registers kernels are launched as the CUDA
backend launches them: with PDL (``cuda_runtime.uses_pdl``), so in the b2b / steady graphs each
launch may start while the previous one drains. Each variant is checked (first launch, and every
copy's output after the timed replays), then timed single-launch and b2b.
Per case the result reports the default and, separately, the best variant in each mode
(``best_b2b_variant`` / ``best_b2b_tuning``: what ``tune()`` should pick), so tune() can be updated
from one run.

Timing: ``triton.testing.do_bench`` (L2 flushed between repetitions, median; variants with a
shorter warmup/rep than the default and the baselines). GB/s is on the weight bytes only (the
bytes a GEMV cannot avoid); ``% copy`` = GB/s over the copy ceiling. Persistent grids are sized for
the device's SM count. About 100-150 s on an H200 (``--quick``: default, classic and two
alternatives per case, about 30 s).

Usage: python bench/bench_gemv.py [--out results.json] [--quick | --xreg-sweep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusec.backends import cuda_runtime as cr  # noqa: E402
from fusec.codegen import emit  # noqa: E402
from fusec.codegen.families import gemv_epilogue as ge  # noqa: E402
from fusec.dsl import default_patterns  # noqa: E402
from fusec.ir import GraphBuilder  # noqa: E402
from fusec.rewrite import rewrite  # noqa: E402

CASES = [  # (name, kind, K, M, weight dtype)
    ("ffn gate/up SWIGLU", "swiglu", 2048, 8192, "f16"),
    ("ffn down + residual ADD", "add", 8192, 2048, "f16"),
    ("attn q/o proj + ADD", "add", 2048, 2048, "f16"),
    ("attn k/v proj + ADD", "add", 2048, 512, "f16"),
    ("ffn gate/up GEGLU", "geglu", 2048, 8192, "f16"),
    ("ffn gate/up SWIGLU f32", "swiglu", 2048, 8192, "f32"),
]
REL_BOUND = 1e-5


def build_graph(kind: str, K: int, M: int, wdt: str):
    b = GraphBuilder()
    x = b.input("x", "f32", (K, 1))
    if kind == "add":
        w = b.weight("w", wdt, (K, M))
        r = b.input("r", "f32", (M, 1))
        y = b.add(b.mul_mat(w, x, name="m"), r, name="y")
    else:
        wg, wu = b.weight("wg", wdt, (K, M)), b.weight("wu", wdt, (K, M))
        g, u = b.mul_mat(wg, x, name="g"), b.mul_mat(wu, x, name="u")
        y = (b.swiglu if kind == "swiglu" else b.geglu)(g, u, name="y")
    return b.build([y])


def epilogue_kernel(kind: str, M: int, dt_: str):
    """fusec's unfused epilogue kernel on the cuBLAS products (dtype ``dt_``)."""
    b = GraphBuilder()
    g = b.input("g", dt_, (M, 1))
    u = b.input("u", dt_, (M, 1))
    y = {"add": b.add, "swiglu": b.swiglu, "geglu": b.geglu}[kind](g, u, name="y")
    return emit(b.build([y]).outputs[0], "cuda")


def leaf_values(cp, rng, g, K: int) -> dict:
    """Random device values of ``g``'s leaves by name: weights ~ N(0, 1/K) as in a trained layer
    (products of order 1), other leaves ~ N(0, 1); never zeros."""
    return {t.name: (rng.standard_normal(int(np.prod(t.ne)), dtype=cp.float32) *
                     (1.0 / np.sqrt(K) if t.name.startswith("w") else 1.0)).astype(t.dtype.np)
            for t in g.leaves}


def reference(cp, kind, vals, K, M):
    """float64 result from the flat leaf arrays ``vals`` (w/wg/wu ``[M][K]``, x ``[K]``, r ``[M]``)."""
    f = {k: v.astype(cp.float64) for k, v in vals.items()}
    x = f["x"].reshape(K)
    if kind == "add":
        return f["w"].reshape(M, K) @ x + f["r"].reshape(M)
    g = f["wg"].reshape(M, K) @ x
    u = f["wu"].reshape(M, K) @ x
    if kind == "swiglu":
        return g / (1.0 + cp.exp(-g)) * u
    return 0.5 * g * (1.0 + cp.tanh(np.sqrt(2.0 / np.pi) * g * (1.0 + 0.044715 * g * g))) * u


FULL_SWEEP = {("swiglu", 2048, "f16"), ("add", 8192, "f16")}  # the f16 FFN cases: every variant; others: a short list


def variants(node, p, kind, K, wdt, quick=False, xreg_only=False):
    """``{name: Tuning}``, ``default`` first; names unique, tunings deduplicated (a variant equal to the
    default is not timed twice). ``xreg_only``: the FFN cases sweep only the x-in-registers body
    (consecutive and spread rows: ``..._s``; L2 prefetch of the block's rows before the PDL wait:
    ``..._pf``), each also launched without programmatic dependent launch (``..._nopdl``). A value is
    a Tuning or ``(Tuning, False)``: launched without PDL."""
    base = ge.tune(node, p, "cuda")
    vec = base.vec
    nvec = node.src[p.weights[0]].ne[0] // vec
    out = {"default": base, "classic": ge.tune_classic(node, p, "cuda")}

    def stream(tpr, unroll, persist, ld="na"):
        rows = 4 if tpr == 32 else 1
        if unroll * tpr > nvec:  # a chunk longer than the row: fewer loads per thread
            unroll = max(1, 1 << max(0, (nvec // tpr).bit_length() - 1))
        tu = ge.Tuning(vec, tpr, rows, unroll, True, persist, ld)
        name = f"s_t{tpr}_u{unroll}_p{persist}_{ld or 'plain'}"
        out.setdefault(name, tu)

    def xr(tpr, xrows, unroll, ld="na", spread=False, pf=False, nopdl=False):
        tu = ge.tune_xreg(vec, nvec, tpr, xrows, unroll, ld, spread, pf)
        if unroll > xrows or tu.xvecs * unroll * len(p.weights) > 16:  # loads in flight past ~64 registers
            return
        name = f"x_t{tpr}_r{xrows}_u{unroll}_{ld or 'plain'}" + ("_s" if spread else "") + ("_pf" if pf else "")
        out.setdefault(name, tu)
        if nopdl:
            out.setdefault(name + "_nopdl", (tu, False))

    if quick:
        stream(32, 8, 4)
        stream(128, 4, 4)
        xr(256, 8, 2)
    elif (kind, K, wdt) in FULL_SWEEP and xreg_only:
        if base.xrows:
            out["default_nopdl"] = (base, False)
        for tpr in (128, 256, 512):
            for xrows in (2, 4, 8):
                for unroll in (1, 2):
                    xr(tpr, xrows, unroll, nopdl=tpr >= 256)
        xr(256, 8, 1, pf=True, nopdl=True)  # the L2 bulk prefetch (2026-11-21 gemv-v8: slower everywhere)
    elif (kind, K, wdt) in FULL_SWEEP:
        for tpr, rows, unroll in ((32, 4, 8), (128, 1, 8), (256, 1, 4)):
            out.setdefault(f"classic_t{tpr}_u{unroll}", ge.Tuning(vec, tpr, rows, unroll))
        for unroll in (2, 4, 8):
            for persist in (2, 4, 8):
                stream(32, unroll, persist)
            stream(32, unroll, 0)
        for ld in ("", "cs"):
            stream(32, base.unroll, 4, ld)
            stream(32, 8 if base.unroll != 8 else 4, 4, ld)
        for tpr in (64, 128, 256):
            for unroll in (4, 8):
                stream(tpr, unroll, 16 * 32 // tpr)
                stream(tpr, unroll, 0)
        for tpr in (64, 128, 256, 512, 1024):
            for xrows in (4, 8, 16):
                for unroll in (1, 2, 4):
                    xr(tpr, xrows, unroll)
        xr(256, 8, 2, "")
        xr(256, 8, 2, "cs")
    else:
        out.setdefault("classic_t32_u8", ge.Tuning(vec, 32, 4, 8))
        for unroll in (4, 8):
            stream(32, unroll, 4)
        stream(32, 8, 8)
        stream(32, 4, 4, "")
        stream(128, 4, 4)
        stream(256, 4, 2)
        for tpr, xrows in ((256, 8), (128, 8), (256, 4), (64, 8)):
            xr(tpr, xrows, 2)
    seen, uniq = set(), {}
    for name, v in out.items():
        key = v if isinstance(v, tuple) else (v, None)
        if key not in seen:
            seen.add(key)
            uniq[name] = v
    return uniq


def graph_time(cp, timeit, body) -> float:
    """Median time of one replay of the CUDA graph captured from ``body(stream)``."""
    st = cp.cuda.Stream(non_blocking=True)
    st.begin_capture()
    body(st)
    graph = st.end_capture()
    graph.launch()
    cp.cuda.runtime.deviceSynchronize()
    return timeit(lambda: graph.launch())


def graph_time_steady(cp, body, replays: int = 20, repeats: int = 7) -> float:
    """Median time of one replay of the CUDA graph captured from ``body(stream)`` when ``replays``
    replays run back to back between two events, with no L2 flush in between: the decode steady
    state (the R weight copies of one replay are >= 256 MB, so none is still in L2 when it is read
    again, and the L2 holds clean weight lines, not the dirty lines a write flush leaves: a flush
    that zeroes a buffer makes the first loads of the next replay wait for ~L2-size write-backs
    that a decode step, whose kernels write only small activations, does not pay)."""
    st = cp.cuda.Stream(non_blocking=True)
    st.begin_capture()
    body(st)
    graph = st.end_capture()
    for _ in range(3):
        graph.launch(stream=st)
    st.synchronize()
    times = []
    for _ in range(repeats):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(st)
        for _ in range(replays):
            graph.launch(stream=st)
        b.record(st)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) * 1e-3 / replays)
    return float(sorted(times)[len(times) // 2])


def empty_launch(cp, timeit, k) -> float:
    """An empty kernel with ``k``'s grid and block, launched the same way: the single-launch floor."""
    fn = cp.RawKernel('extern "C" __global__ void gemv_empty(float* p) {}', "gemv_empty")
    buf = cp.empty(1, cp.float32)
    return timeit(lambda: fn(k.grid, k.workgroup_size, (buf,)))


def copy_ceiling(cp, timeit) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    n = 1 << 29
    src, dst = cp.ones(n, cp.uint16), cp.empty(n, cp.uint16)
    t = timeit(lambda: cp.copyto(dst, src))
    return 2 * 2 * n / t / 1e9


def run_case(cp, timeit, timeit_fast, rng, ceiling, sms, name, kind, K, M, wdt, quick, xreg_only=False):
    """Check every variant of one case, then time it single-launch and back-to-back; the default's
    repeat and the cuBLAS baseline."""
    g = build_graph(kind, K, M, wdt)
    fused, _ = rewrite(g, default_patterns())
    node = fused.outputs[0]
    assert node.op == "FUSED" and node.params["kernel"] == "gemv_epilogue", node.op
    p = ge.plan(node)
    wbytes = sum(node.src[i].nbytes for i in p.weights)

    def fresh():
        return leaf_values(cp, rng, g, K)

    def gbs(t):
        return wbytes / t / 1e9 if t == t else None

    def pct(t):
        return 100 * wbytes / t / 1e9 / ceiling if t == t else None

    vs = variants(node, p, kind, K, wdt, quick, xreg_only)
    # back-to-back: R launches over R weight copies (>= 256 MB in all, so no copy stays in L2),
    # captured in a CUDA graph (no CPU launch gaps): the steady state of a decode step
    R = max(2, min(32, -(-(256 << 20) // wbytes)))
    sets = [fresh() for _ in range(R)]
    timings = {}
    for vname, v in vs.items():
        tu, pdl = v if isinstance(v, tuple) else (v, None)
        k = ge.build(node, "cuda", tu, sms=sms)
        vals = fresh()
        bufs = [vals[b.tensor.root.name] if not b.write else cp.full(M, cp.nan, cp.float32) for b in k.bindings]
        prm = cr.params_value(k)
        cr.launch(k, bufs, prm, pdl=pdl)
        cp.cuda.runtime.deviceSynchronize()
        ref = reference(cp, kind, vals, K, M)
        out = bufs[-1].astype(cp.float64)
        rel = float(cp.linalg.norm(out - ref) / cp.linalg.norm(ref))
        ok = bool(cp.all(cp.isfinite(out))) and rel <= REL_BOUND
        t = t_b2b = t_steady = float("nan")
        if ok:
            tf = timeit if vname == "default" else timeit_fast
            t = tf(lambda k=k, bufs=bufs, prm=prm, pdl=pdl: cr.launch(k, bufs, prm, pdl=pdl))
            seq_bufs = [[v[b.tensor.root.name] if not b.write else cp.full(M, cp.nan, cp.float32)
                         for b in k.bindings] for v in sets]
            def seq(st, k=k, sb=seq_bufs, prm=prm, pdl=pdl):
                for bb in sb:
                    cr.launch(k, bb, prm, stream=st, pdl=pdl)

            t_b2b = graph_time(cp, tf, seq) / R
            t_steady = graph_time_steady(cp, seq) / R
            # the replays' outputs: every copy's result checked too (a PDL race would show here)
            for bb, vv in zip(seq_bufs, sets, strict=True):
                r2 = reference(cp, kind, vv, K, M)
                rel = max(rel, float(cp.linalg.norm(bb[-1].astype(cp.float64) - r2) / cp.linalg.norm(r2)))
            ok = rel <= REL_BOUND
            del seq_bufs
        timings[vname] = {"entry": k.entry, "tuning": vars(tu), "pdl": cr.uses_pdl(k) if pdl is None else pdl,
                          "grid": list(k.grid),
                          "block": k.workgroup_size[0], "rel_err": rel, "ok": ok,
                          "s": t, "gbs": gbs(t), "pct_copy": pct(t),
                          "b2b_s": t_b2b, "b2b_gbs": gbs(t_b2b), "b2b_pct_copy": pct(t_b2b),
                          "steady_s": t_steady, "steady_gbs": gbs(t_steady), "steady_pct_copy": pct(t_steady)}
        print(f"  {name:24s} {vname:20s} {k.entry:52s} grid {k.grid[0]:5d} rel {rel:.1e} "
              f"{'OK ' if ok else 'BAD'} {t * 1e6:7.2f} us {pct(t) or float('nan'):5.1f}% | b2b "
              f"{t_b2b * 1e6:7.2f} us {pct(t_b2b) or float('nan'):5.1f}% | steady {t_steady * 1e6:7.2f} us "
              f"{pct(t_steady) or float('nan'):5.1f}%", flush=True)
    # same version timed twice: the spread
    k = ge.build(node, "cuda", vs["default"] if not isinstance(vs["default"], tuple) else vs["default"][0], sms=sms)
    vals = fresh()
    bufs = [vals[b.tensor.root.name] if not b.write else cp.full(M, cp.nan, cp.float32) for b in k.bindings]
    prm = cr.params_value(k)
    t_again = timeit(lambda: cr.launch(k, bufs, prm))
    # cuBLAS (cupy.matmul) per MUL_MAT + fusec's epilogue kernel
    cdt = cp.float16 if wdt == "f16" else cp.float32
    x_c = vals["x"].reshape(K, 1).astype(cdt)
    if kind == "add":
        ws = [vals["w"].reshape(M, K)]
    else:
        ws = [vals["wg"].reshape(M, K), vals["wu"].reshape(M, K)]
    prods = [cp.matmul(w, x_c) for w in ws]
    ek = epilogue_kernel(kind, M, "f16" if wdt == "f16" else "f32")
    second = prods[1] if kind != "add" else vals["r"].reshape(M, 1).astype(cdt)
    ebufs = [prods[0].reshape(-1), second.reshape(-1), cp.full(M, cp.nan, cdt)]
    eprm = cr.params_value(ek)

    def unfused():
        for i, w in enumerate(ws):
            cp.matmul(w, x_c, out=prods[i])
        cr.launch(ek, ebufs, eprm)

    unfused()
    cp.cuda.runtime.deviceSynchronize()
    ref = reference(cp, kind, vals, K, M)
    rel_u = float(cp.linalg.norm(ebufs[-1].astype(cp.float64) - ref) / cp.linalg.norm(ref))
    t_unf = timeit(unfused)
    t_blas = timeit(lambda: [cp.matmul(w, x_c, out=prods[i]) for i, w in enumerate(ws)])
    names = ["w"] if kind == "add" else ["wg", "wu"]
    seq_ws = [[v[nm].reshape(M, K) for nm in names] for v in sets]

    def unfused_seq(st):
        with st:
            for wl in seq_ws:
                for i, w in enumerate(wl):
                    cp.matmul(w, x_c, out=prods[i])
                cr.launch(ek, ebufs, eprm, stream=st)

    try:
        t_unf_seq = graph_time(cp, timeit, unfused_seq) / R
        t_unf_steady = graph_time_steady(cp, unfused_seq) / R
    except Exception as e:  # cuBLAS under stream capture may be refused
        print(f"  cuBLAS graph capture failed: {e}")
        t_unf_seq = t_unf_steady = None
    okv = {n: v for n, v in timings.items() if v["ok"]}
    if not okv:
        raise SystemExit(f"{name}: no variant passed the correctness check")
    best_n = min(okv, key=lambda n: okv[n]["s"])
    best_b = min(okv, key=lambda n: okv[n]["b2b_s"])
    best_st = min(okv, key=lambda n: okv[n]["steady_s"])
    best, bb = okv[best_n], okv[best_b]
    d = timings["default"]
    t_seq = d["b2b_s"]
    res = {"case": name, "kind": kind, "K": K, "M": M, "weight_dtype": wdt, "weight_bytes": wbytes,
           "sms": sms, "variants": timings, "default_tuning": d["tuning"], "default_ok": d["ok"],
           "default_s": d["s"], "default_again_s": t_again,
           "default_gbs": d["gbs"], "default_pct_copy": d["pct_copy"],
           "best_variant": best_n, "best_entry": best["entry"], "best_tuning": best["tuning"],
           "best_gbs": best["gbs"], "best_pct_copy": best["pct_copy"],
           "best_b2b_variant": best_b, "best_b2b_entry": bb["entry"], "best_b2b_tuning": bb["tuning"],
           "best_b2b_s": bb["b2b_s"], "best_b2b_gbs": bb["b2b_gbs"], "best_b2b_pct_copy": bb["b2b_pct_copy"],
           "cublas_plus_epilogue_s": t_unf, "cublas_plus_epilogue_gbs": wbytes / t_unf / 1e9,
           "cublas_plus_epilogue_rel_err": rel_u, "cublas_only_s": t_blas,
           "cublas_only_gbs": wbytes / t_blas / 1e9,
           "speedup_vs_cublas_plus_epilogue": t_unf / d["s"] if d["ok"] else None,
           "b2b_copies": R, "b2b_s": t_seq, "b2b_gbs": gbs(t_seq), "b2b_pct_copy": pct(t_seq),  # default
           "best_steady_variant": best_st, "best_steady_tuning": okv[best_st]["tuning"],
           "best_steady_s": okv[best_st]["steady_s"], "best_steady_pct_copy": okv[best_st]["steady_pct_copy"],
           "steady_s": d["steady_s"], "steady_pct_copy": d["steady_pct_copy"],
           "steady_cublas_plus_epilogue_s": t_unf_steady,
           "steady_cublas_plus_epilogue_pct_copy": pct(t_unf_steady) if t_unf_steady else None,
           "b2b_cublas_plus_epilogue_s": t_unf_seq,
           "b2b_cublas_plus_epilogue_gbs": wbytes / t_unf_seq / 1e9 if t_unf_seq else None,
           "empty_launch_s": empty_launch(cp, timeit, k)}
    return res


FFN_DIMS = (2048, 8192)  # Llama-3.2-1B: n_embd, n_ff
VIEW_OPS = {"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"}


def build_ffn_block(n_embd: int, n_ff: int, wdt: str = "f16"):
    """Llama's decode FFN block as llama.cpp builds it: ``y = x + W_down(swiglu(W_gate(h), W_up(h)))``
    with ``h = rms_norm(x) * ffn_norm`` (one token)."""
    b = GraphBuilder()
    x = b.input("x", "f32", (n_embd, 1))
    h = b.mul(b.rms_norm(x, 1e-5, name="norm"), b.weight("ffn_norm", "f32", (n_embd,)), name="h")
    g = b.mul_mat(b.weight("w_gate", wdt, (n_embd, n_ff)), h, name="g")
    u = b.mul_mat(b.weight("w_up", wdt, (n_embd, n_ff)), h, name="u")
    d = b.mul_mat(b.weight("w_down", wdt, (n_ff, n_embd)), b.swiglu(g, u, name="s"), name="d")
    return b.build([b.add(d, x, name="y")])


def run_ffn_chain(cp, timeit, ceiling) -> dict:
    """The FFN block of one decode step as fusec runs it on CUDA: the rewritten graph's kernels (norm
    epilogue, gate/up SWIGLU GEMV, down GEMV + residual ADD) launched in order over R copies of the
    weights in one CUDA graph, with programmatic dependent launch as the backend does it and with PDL
    off. Checked against the interpreter first (every copy after the timed replays too). % copy on
    the weight bytes (the three matrices)."""
    from fusec.interp import interpret  # noqa: PLC0415

    n_embd, n_ff = FFN_DIMS
    g = build_ffn_block(n_embd, n_ff)
    fused, _ = rewrite(g, default_patterns())
    kernels = [emit(t, "cuda") for t in fused.nodes if t.src and t.op not in VIEW_OPS]
    wnames = ("w_gate", "w_up", "w_down")
    wbytes = sum(t.nbytes for t in g.leaves if t.name in wnames)
    R = max(2, -(-(256 << 20) // wbytes))
    host = {t.name: (np.random.default_rng(7).standard_normal(t.ne[::-1]) *
                     (1.0 / np.sqrt(t.ne[0]) if t.name.startswith("w_") else 1.0)).astype(t.dtype.np)
            for t in g.leaves}
    host["ffn_norm"] = (1.0 + 0.1 * host["ffn_norm"]).astype(np.float32)
    ref = interpret(g, host)["y"].reshape(-1).astype(np.float64)
    shared = {}
    copies = [{n: cp.asarray(host[n]) for n in wnames} for _ in range(R)]

    def buf(root, r):
        if root.name in wnames:
            return copies[r][root.name]
        if root.name not in shared:
            shared[root.name] = cp.asarray(host[root.name]) if root.name in host else \
                cp.full(root.span_bytes // 4, cp.nan, cp.float32)
        return shared[root.name]

    bound = [[(k, [buf(b.tensor.root, r) for b in k.bindings], cr.params_value(k)) for k in kernels]
             for r in range(R)]
    out_name = fused.outputs[0].root.name

    def body(pdl):
        def seq(st):
            for launches in bound:
                for k, bufs, prm in launches:
                    cr.launch(k, bufs, prm, stream=st, pdl=None if pdl else False)
        return seq

    res = {"case": "FFN block (norm -> gate/up -> down + ADD)", "n_embd": n_embd, "n_ff": n_ff,
           "kernels": [k.entry for k in kernels], "pdl_kernels": [k.entry for k in kernels if cr.uses_pdl(k)],
           "weight_bytes": wbytes, "copies": R}
    for name, pdl in (("pdl", True), ("nopdl", False)):
        shared[out_name].fill(cp.nan)
        graph_time_steady(cp, body(pdl), replays=2, repeats=1)
        got = cp.asnumpy(shared[out_name]).astype(np.float64)[: ref.size]
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) if np.all(np.isfinite(got)) else float("inf")
        ts = graph_time_steady(cp, body(pdl)) / R
        tb = graph_time(cp, timeit, body(pdl)) / R
        res[name] = {"rel_err": rel, "ok": rel <= REL_BOUND, "steady_s": ts, "b2b_s": tb,
                     "steady_pct_copy": 100 * wbytes / ts / 1e9 / ceiling,
                     "b2b_pct_copy": 100 * wbytes / tb / 1e9 / ceiling}
        print(f"  FFN block {name:6s} rel {rel:.1e} {'OK ' if rel <= REL_BOUND else 'BAD'} steady {ts * 1e6:7.2f} us "
              f"{res[name]['steady_pct_copy']:5.1f}% | b2b {tb * 1e6:7.2f} us {res[name]['b2b_pct_copy']:5.1f}% "
              f"(weights {wbytes >> 20} MiB, kernels {', '.join(res['kernels'])})", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_gemv.json")
    ap.add_argument("--quick", action="store_true", help="default, classic and two alternatives per case")
    ap.add_argument("--xreg-sweep", action="store_true",
                    help="the FFN cases sweep only the x-in-registers body (consecutive / spread rows)")
    args = ap.parse_args()
    import cupy as cp
    from triton.testing import do_bench

    def timeit(fn) -> float:
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1e-3

    def timeit_fast(fn) -> float:  # the variant sweep
        return float(do_bench(fn, warmup=10, rep=80, return_mode="median")) * 1e-3

    t0 = time.perf_counter()
    ceiling = copy_ceiling(cp, timeit)
    props = cp.cuda.runtime.getDeviceProperties(0)
    sms = int(props["multiProcessorCount"])
    rng = cp.random.default_rng(1234)
    gpu = props["name"].decode()
    meta = {"date": dt.date.today().isoformat(), "host": platform.node(), "gpu": gpu, "sms": sms,
            "copy_ceiling_gbs": ceiling,
            "timing": "triton.testing.do_bench median, L2 flushed (steady: events around 20 graph replays, no flush)",
            "gbs_on": "weight bytes", "rel_bound": REL_BOUND, "quick": args.quick, "xreg_sweep": args.xreg_sweep}
    results = []
    for case in CASES:  # the JSON is rewritten after each case: a timeout keeps the finished ones
        results.append(run_case(cp, timeit, timeit_fast, rng, ceiling, sms, *case, args.quick, args.xreg_sweep))
        meta["wall_s"] = time.perf_counter() - t0
        meta["complete"] = len(results) == len(CASES)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    ffn = run_ffn_chain(cp, timeit, ceiling)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "ffn_block": ffn}, indent=1))
    print(f"\ncopy ceiling {ceiling:.0f} GB/s (1 GiB device copy), {sms} SMs, {meta['wall_s']:.0f} s")
    nan = float("nan")
    hdr = f"{'case':24s} {'KxM':>10s} {'fused us':>9s} {'again':>7s} {'%copy':>6s} {'best%':>6s} " \
          f"{'cuBLAS+ep us':>12s} {'cuBLAS us':>9s} {'speedup':>7s} {'empty':>6s} | b2b {'def us':>6s} " \
          f"{'def%':>6s} {'best%':>6s} {'cuBLAS+ep':>9s}  best b2b variant"
    print(hdr)
    for r in results:
        print(f"{r['case']:24s} {r['K']:>5d}x{r['M']:<5d}{r['default_s'] * 1e6:9.2f} {r['default_again_s'] * 1e6:7.2f} "
              f"{r['default_pct_copy'] or nan:5.1f}% {r['best_pct_copy']:5.1f}% "
              f"{r['cublas_plus_epilogue_s'] * 1e6:12.2f} {r['cublas_only_s'] * 1e6:9.2f} "
              f"{r['speedup_vs_cublas_plus_epilogue'] or nan:6.2f}x {r['empty_launch_s'] * 1e6:6.2f} | "
              f"{r['b2b_s'] * 1e6:9.2f} {r['b2b_pct_copy'] or nan:5.1f}% {r['best_b2b_pct_copy']:5.1f}% "
              f"{(r['b2b_cublas_plus_epilogue_s'] or nan) * 1e6:9.2f}  {r['best_b2b_variant']}")
    print("\nsteady state (graph replays back to back, no flush): % of copy, default / best / cuBLAS+ep")
    for r in results:
        print(f"  {r['case']:24s} {r['steady_pct_copy'] or nan:5.1f}% {r['best_steady_pct_copy']:5.1f}% "
              f"{r['steady_cublas_plus_epilogue_pct_copy'] or nan:5.1f}%  {r['best_steady_variant']}")
    print("\ndefault (tune()) vs best b2b tuning per case:")
    for r in results:
        print(f"  {r['case']:24s} default {r['b2b_pct_copy'] or nan:5.1f}% {r['default_tuning']}\n"
              f"  {'':24s} best    {r['best_b2b_pct_copy']:5.1f}% {r['best_b2b_tuning']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
