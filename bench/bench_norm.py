"""Side-by-side benchmark of fusec's fused RMS_NORM->MUL(->ADD) CUDA kernels (run on the GPU machine).

For each case it builds the unfused graph with fusec's builder, rewrites it with the shipped
patterns, emits the fused CUDA kernel and the unfused kernel sequence, checks both against the
numpy interpreter (output poisoned with NaN before the checked run; normalized MSE), then times, in
the same process: the device copy of the same bytes (copy ceiling), fusec's unfused kernel
sequence, fusec's fused kernel, torch eager (naive and F.rms_norm) and torch.compile of the naive
function when torch is available. Timing: ``triton.testing.do_bench`` (L2 flushed between
repetitions, median) when Triton is present, else CUDA events around single launches.

Bytes counted (minimum traffic): read x, read w (and b), write y. GB/s = bytes / median time.

Also timed per case: an empty kernel with the fused kernel's signature, grid and block, launched the
same way (CuPy, params by value): the launch floor for the small-size goal (fused time over
empty-launch time + bytes at the copy ceiling), and with ``--variants`` the fused kernel's
alternatives (``norm_epilogue.build``): ``ptr`` params through a pointer to device memory (the old
convention), ``nopf`` operands loaded after the reduction, ``vpt2``/``vpt8`` 2/8 vectors per
thread instead of 4 (each checked against the interpreter like the shipped kernel).

Usage: python bench/bench_norm.py [--quick] [--variants] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusec.backends import cuda_runtime as cr  # noqa: E402
from fusec.codegen import emit, needs_kernel  # noqa: E402
from fusec.codegen.families import norm_epilogue as ne  # noqa: E402
from fusec.dsl import default_patterns  # noqa: E402
from fusec.interp import interpret  # noqa: E402
from fusec.ir import GraphBuilder  # noqa: E402
from fusec.rewrite import rewrite  # noqa: E402

EPS = 1e-6


def build(rows: int, n: int, dtype: str, with_add: bool):
    b = GraphBuilder()
    x = b.input("x", dtype, (n, rows))
    w = b.weight("w", dtype, (n,))
    y = b.mul(b.rms_norm(x, EPS, name="norm"), w, name="y" if not with_add else "m")
    if with_add:
        r = b.input("r", dtype, (n, rows))
        y = b.add(y, r, name="y")
    return b.build([y])


def nmse(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / max(np.sum(b * b), 1e-300))


class Runner:
    """Device buffers for every root tensor of a graph and the launches of its kernels."""

    def __init__(self, graph, values, cp, make=None):
        self.cp = cp
        self.bufs = {}
        for t in graph.nodes:
            r = t.root
            if id(r) in self.bufs:
                continue
            if r.name in values:
                self.bufs[id(r)] = cp.asarray(np.ascontiguousarray(values[r.name]).reshape(-1))
            else:
                self.bufs[id(r)] = cp.full(r.span_bytes // r.dtype.size, np.nan, dtype=r.dtype.np)
        self.kernels = [(make or emit)(t, "cuda") for t in graph.nodes if needs_kernel(t)]
        self.launches = []
        for k in self.kernels:
            fn = cr.module(k)
            params = cr.params_array(k) if k.meta.get("params_by_pointer") else cr.params_value(k)
            args = [self.bufs[id(bd.tensor.root)] for bd in k.bindings]
            self.launches.append((k, fn, args, params))

    def __call__(self):
        for k, fn, args, params in self.launches:
            fn(k.grid, k.workgroup_size, (*args, params))

    def out(self, t):
        return self.cp.asnumpy(self.bufs[id(t.root)])


def empty_launch(k):
    """(fn, args-builder) of an empty kernel with ``k``'s signature (bindings, Params by value)."""
    import cupy as cp  # noqa: PLC0415

    ty = {"u32": "unsigned int", "i32": "int", "f32": "float"}
    fields = "".join(f"    {ty[t]} {n};\n" for n, t, _ in k.params)
    ptrs = "".join(f"const void* __restrict__ b{i}, " for i in range(len(k.bindings)))
    src = f"struct Params {{\n{fields}}};\nextern \"C\" __global__ void fusec_empty({ptrs}const Params p) {{}}\n"
    return cp.RawModule(code=src, options=("-std=c++17",)).get_function("fusec_empty")


VARIANTS = {
    "ptr": lambda t, b: ne.build(t, b, params_by_pointer=True),
    "nopf": lambda t, b: ne.build(t, b, prefetch=False),
    "vpt2": lambda t, b: ne.build(t, b, ne.tune(t, ne.plan(t), b, vpt=2)),
    "vpt8": lambda t, b: ne.build(t, b, ne.tune(t, ne.plan(t), b, vpt=8)),
}


def copy_ceiling(cp, timeit) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    src = cp.random.standard_normal(1 << 28, dtype=cp.float32)
    dst = cp.empty_like(src)
    t = timeit(lambda: dst.__setitem__(Ellipsis, src))
    return 2 * src.nbytes / t / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench_norm.json")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also time the fused kernel's alternatives")
    args = ap.parse_args()
    import cupy as cp

    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    torch = None
    if not args.no_torch:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            torch = None

    def timeit(fn):
        if do_bench is not None:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e-3
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(5):
            fn()
        ts = []
        for _ in range(50):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            ts.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
        return float(np.median(ts))

    pats = default_patterns()
    rows_list = [1, 32, 512, 8192, 65536] if not args.quick else [32, 8192]
    ns = [4096, 8192] if not args.quick else [4096]
    results = []
    # copy ceiling: a large device-to-device copy (bytes read + written)
    ceiling = copy_ceiling(cp, timeit)
    print(f"copy ceiling: {ceiling:.0f} GB/s")
    rng = np.random.default_rng(0)
    for with_add in (False, True):
        for dtype in ("f32", "f16"):
            for n in ns:
                for rows in rows_list:
                    g = build(rows, n, dtype, with_add)
                    fused, rep = rewrite(g, pats)
                    npd = np.float32 if dtype == "f32" else np.float16
                    vals = {"x": rng.standard_normal((rows, n)).astype(npd), "w": rng.standard_normal(n).astype(npd)}
                    if with_add:
                        vals["r"] = rng.standard_normal((rows, n)).astype(npd)
                    ref = interpret(g, vals)["y"].reshape(rows, n)
                    rf = Runner(fused, vals, cp)
                    ru = Runner(g, vals, cp)
                    yf, yu = fused.outputs[0], g.outputs[0]
                    rf()
                    ru()
                    cp.cuda.Device().synchronize()
                    err_f = nmse(rf.out(yf).reshape(rows, n), ref)
                    err_u = nmse(ru.out(yu).reshape(rows, n), ref)
                    tol = 1e-7 if dtype == "f32" else 1e-5
                    ok = err_f <= tol and err_u <= tol
                    esz = np.dtype(npd).itemsize
                    nbytes = (rows * n * (3 if with_add else 2) + n) * esz
                    row = {"pattern": "rms_norm_mul_add" if with_add else "rms_norm_mul", "dtype": dtype,
                           "rows": rows, "n": n, "bytes": nbytes, "nmse_fused": err_f, "nmse_unfused": err_u,
                           "correct": ok, "fused_kernel": rf.kernels[0].entry,
                           "n_fused_kernels": len(rf.kernels), "n_unfused_kernels": len(ru.kernels)}
                    t_f = timeit(rf)
                    t_u = timeit(ru)
                    row.update(t_fused_us=t_f * 1e6, t_unfused_us=t_u * 1e6,
                               gbs_fused=nbytes / t_f / 1e9, gbs_unfused=nbytes / t_u / 1e9)
                    row["pct_ceiling_fused"] = 100 * row["gbs_fused"] / ceiling
                    row["speedup_vs_unfused"] = t_u / t_f
                    k0, _, a0, p0 = rf.launches[0]
                    fe = empty_launch(k0)
                    t_e = timeit(lambda fe=fe, k0=k0, a=(*a0, p0): fe(k0.grid, k0.workgroup_size, a))
                    floor = t_e + nbytes / (ceiling * 1e9)
                    row.update(t_empty_us=t_e * 1e6, t_floor_us=floor * 1e6, small_ratio=t_f / floor)
                    if args.variants:
                        for vn, mk in VARIANTS.items():
                            rv = Runner(fused, vals, cp, make=mk)
                            rv()
                            cp.cuda.Device().synchronize()
                            ev = nmse(rv.out(yf).reshape(rows, n), ref)
                            ok = ok and ev <= tol
                            row[f"nmse_{vn}"] = ev
                            row[f"kernel_{vn}"] = rv.kernels[0].entry
                            row[f"t_{vn}_us"] = timeit(rv) * 1e6
                        row["correct"] = ok
                    if torch is not None:
                        tx = torch.tensor(vals["x"], device="cuda")
                        tw = torch.tensor(vals["w"], device="cuda")
                        tr = torch.tensor(vals["r"], device="cuda") if with_add else None

                        def naive(x, w, r=None):
                            xf = x.float()
                            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w
                            return y + r if r is not None else y

                        def frms(x, w, r=None):
                            y = F.rms_norm(x, (x.shape[-1],), w, EPS)
                            return y + r if r is not None else y

                        torch._dynamo.reset()  # one fresh compile per case (no recompile-limit fallback)
                        comp = torch.compile(naive, dynamic=False)
                        for name, fn in (("torch_naive", naive), ("torch_rms_norm", frms), ("torch_compile", comp)):
                            fn(tx, tw, tr)
                            torch.cuda.synchronize()
                            t = timeit(lambda fn=fn, a=(tx, tw, tr): fn(*a))
                            row[f"t_{name}_us"] = t * 1e6
                            row[f"speedup_vs_{name}"] = t / t_f
                    results.append(row)
                    print(f"{row['pattern']:17s} {dtype} rows {rows:6d} n {n:5d}: fused {t_f*1e6:8.1f} us "
                          f"{row['gbs_fused']:6.0f} GB/s ({row['pct_ceiling_fused']:4.0f}% of copy) "
                          f"unfused {t_u*1e6:8.1f} us x{row['speedup_vs_unfused']:.2f}"
                          + (f" vs compile x{row.get('speedup_vs_torch_compile', 0):.2f}" if torch else "")
                          + f" empty {t_e*1e6:.1f} us small x{row['small_ratio']:.2f}"
                          + "".join(f" {vn} {row[f't_{vn}_us']:.1f}" for vn in VARIANTS if args.variants)
                          + ("" if ok else f"  WRONG nmse {err_f:.1e}/{err_u:.1e}"), flush=True)
    meta = {"date": dt.date.today().isoformat(), "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "driver": cp.cuda.runtime.driverGetVersion(),
            "cupy": cp.__version__, "torch": getattr(torch, "__version__", None), "python": platform.python_version(),
            "copy_ceiling_gbs": ceiling, "timing": "triton.testing.do_bench median, L2 flushed" if do_bench else
            "CUDA events median"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(json.dumps(meta))
    print("pattern          dt    rows     n   fused_us  GB/s  %copy  xcompile  xunfused  empty_us  small_x"
          + "".join(f" {vn:>7s}" for vn in VARIANTS if args.variants))
    for r in results:
        print(f"{r['pattern']:16s} {r['dtype']} {r['rows']:6d} {r['n']:5d} {r['t_fused_us']:9.1f} {r['gbs_fused']:5.0f}"
              f" {r['pct_ceiling_fused']:6.1f} {r.get('speedup_vs_torch_compile', 0):9.2f}"
              f" {r['speedup_vs_unfused']:9.2f}"
              f" {r['t_empty_us']:9.2f} {r['small_ratio']:8.2f}"
              + "".join(f" {r[f't_{vn}_us']:7.1f}" for vn in VARIANTS if args.variants)
              + ("" if r["correct"] else " WRONG"))
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
