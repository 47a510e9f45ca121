"""Check and time WGSL norm_epilogue variants and copy-kernel variants in one process (wgpu).

python3 bench/wgsl_norm_variants.py [--small] [--out file.json]
Each norm variant is checked against the interpreter at rows=61 (same n / dtype / pattern, same
source), then timed at the full size with random (tiled) data; sampled rows of the full-size output
(NaN-poisoned before) are compared with a numpy reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusec.backends import wgpu_runtime as rt  # noqa: E402
from fusec.bench import cases as C  # noqa: E402
from fusec.bench import measure_wgpu as mw  # noqa: E402
from fusec.codegen.families import norm_epilogue as ne  # noqa: E402
from fusec.dsl import default_patterns  # noqa: E402
from fusec.interp import interpret  # noqa: E402
from fusec.rewrite import rewrite  # noqa: E402

BASE = dict(ne.WGSL_OPTS)
VARIANTS = {
    "old": dict(f16x8=False, reduce="tree", prefetch_floats=0, balanced_grid=False),
    "grid": dict(f16x8=False, reduce="tree", prefetch_floats=0),
    "x8": dict(reduce="tree", prefetch_floats=0),
    "two": dict(reduce="two", prefetch_floats=0),
    "sg": dict(reduce="subgroup", prefetch_floats=0),
    "pf32": dict(reduce="two", prefetch_floats=32),
    "pf64": dict(reduce="two", prefetch_floats=64),
    "sgpf64": dict(reduce="subgroup", prefetch_floats=64),
    "stream": dict(reduce="two", prefetch_floats=32, tu="stream"),
    "half_tpr": dict(reduce="two", prefetch_floats=32, tu="half"),
    "t512": dict(reduce="two", prefetch_floats=32, tu="t512"),
}


def fused_node(case):
    g = C.build_graph(case)
    f, _ = rewrite(g, default_patterns())
    return g, f, [t for t in f.nodes if t.op == "FUSED"][0]


def kernel(node, var):
    ne.WGSL_OPTS.clear()
    ne.WGSL_OPTS.update(BASE)
    ne.WGSL_OPTS.update({k: v for k, v in var.items() if k != "tu"})
    p = ne.plan(node)
    tu = ne.tune(node, p, "wgsl")
    how = var.get("tu")
    if how == "stream":
        tu = ne.Tuning(tu.vec, 256, 1, 0)
    elif how == "half":
        if tu.tpr < 64 or tu.slots == 0 or tu.slots * tu.vec * 2 > 64:
            return None
        tu = ne.Tuning(tu.vec, tu.tpr // 2, tu.rows, tu.slots * 2)
    elif how == "t512":
        if tu.tpr != 256 or tu.slots < 2:
            return None
        tu = ne.Tuning(tu.vec, 512, 1, tu.slots // 2)
    k = ne.build(node, "wgsl", tu)
    ne.WGSL_OPTS.clear()
    ne.WGSL_OPTS.update(BASE)
    return k


def run_check(case, var):
    """nmse of the variant at rows=61 against the interpreter (output NaN-poisoned)."""
    small = C.Case(case.pattern, case.dtype, 61, case.n)
    g, f, node = fused_node(small)
    k = kernel(node, var)
    if k is None:
        return None, None
    vals = C.make_inputs(small, seed=int(time.time()) % 1000)
    ref = interpret(g, vals)[C.OUTPUT]
    arrays = {b.name: (np.full(ref.size, np.nan, b.dtype.np) if b.write else vals[b.tensor.root.name])
              for b in k.bindings}
    y = rt.run_kernel(k, arrays)["dst"]
    return C.nmse(y, ref), k.entry


def ref_rows(case, x, w, b, rows):
    xr = x[rows].astype(np.float64)
    y = xr / np.sqrt((xr * xr).mean(axis=1, keepdims=True) + C.EPS) * w.astype(np.float64)
    if b is not None:
        y = y + b[rows].astype(np.float64)
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default="variants.json")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dtypes", default="f32,f16")
    ap.add_argument("--rows", default="")
    ap.add_argument("--ns", default="")
    ap.add_argument("--no-copies", action="store_true")
    ap.add_argument("--no-big-check", action="store_true")
    a = ap.parse_args()
    dev = rt.device()
    print("adapter:", rt.adapter_info().get("device"), "features:", sorted(str(f) for f in dev.features), flush=True)
    notes = []
    timer = mw.WgpuTimer(notes, (8 << 20) if a.small else mw.FLUSH_BYTES)
    res = {"copy": {}, "cases": []}
    cb = (8 << 20) if a.small else mw.CEILING_BYTES
    # copy ceiling variants (old = 1 vec4 per thread, grid x = 65535)
    copies = [("old_v1", 1, True), ("v1", 1, False), ("v2", 2, False), ("v4", 4, False),
              ("v8", 8, False), ("v4b", 4, False), ("v1b", 1, False)]
    for name, vpt, old in [] if a.no_copies else copies:
        k = mw.copy_kernel(cb, vpt)
        if old:
            gx = min(-(-k.param("n4") // 256), 65535)
            n_wg = -(-k.param("n4") // 256)
            grid = (gx, -(-n_wg // gx), 1)
            k = mw.Kernel("wgsl", "bench_copy", "copy_vec4", mw.copy_wgsl(1), [],
                          [("n4", "u32", k.param("n4")), ("grid_x", "u32", gx)], (256, 1, 1), grid)
        src = rt.storage_buffer(k.param("n4") * 16)
        dst = rt.storage_buffer(k.param("n4") * 16)
        disp = [(rt.pipeline(k), rt.bind_group(k, [src, dst], rt.uniform_buffer(rt.pack_params(k))), k.grid)]
        t = timer(disp)
        res["copy"][name] = 2 * cb / (t * 1e-6) / 1e9
        print(f"copy {name}: grid {k.grid} {t:.1f} us {res['copy'][name]:.0f} GB/s", flush=True)
        src.destroy()
        dst.destroy()
    ceil = max(res["copy"].values(), default=4080.0)
    names = a.variants.split(",")
    rows_l = (61, 512) if a.small else (512, 8192, 65536)
    ns = (1024, 4096) if a.small else (4096, 8192)
    if a.rows:
        rows_l = tuple(int(r) for r in a.rows.split(","))
    if a.ns:
        ns = tuple(int(r) for r in a.ns.split(","))
    base = np.random.default_rng(1).standard_normal(1 << 22, dtype=np.float32)
    lim = dev.limits.get("max-storage-buffer-binding-size")
    for pat in C.PATTERNS:
        for dt in a.dtypes.split(","):
            for n in ns:
                for rows in rows_l:
                    case = C.Case(pat, dt, rows, n)
                    if rows * n * case.esize > lim or (rows == 512 and n == 8192):
                        continue
                    npd = case.np_dtype
                    x = np.resize(base, rows * n).reshape(rows, n).astype(npd)
                    w = base[7:7 + n].astype(npd)
                    b = np.resize(base[::-1], rows * n).reshape(rows, n).astype(npd) if case.with_add else None
                    bx = rt.storage_buffer(x.nbytes, x.tobytes())
                    bw = rt.storage_buffer(w.nbytes, w.tobytes())
                    bb = rt.storage_buffer(b.nbytes, b.tobytes()) if b is not None else None
                    by = rt.storage_buffer(x.nbytes)
                    bufs = {"x": bx, "w": bw, "b": bb, "y": by}
                    cdisp, cbufs = mw.WgpuMeasurer._copy_dispatch(None, C.min_bytes(case) // 2)
                    row = {"case": case.key, "bytes": C.min_bytes(case), "t_copy": timer(cdisp)}
                    for cbf in cbufs:
                        cbf.destroy()
                    _, _, node = fused_node(case)
                    nan = None if a.no_big_check else np.full(rows * n, np.nan, npd).tobytes()
                    sample = np.unique(np.r_[0, 1, rows // 2, rows - 2, rows - 1,
                                             np.arange(3, rows, max(1, rows // 64))])
                    for vn in names:
                        var = VARIANTS[vn]
                        try:
                            err, entry = run_check(case, var)
                            if err is None:
                                continue
                            k = kernel(node, var)
                            group = rt.bind_group(k, [bufs[bd.tensor.root.name] for bd in k.bindings],
                                                  rt.uniform_buffer(rt.pack_params(k)))
                            disp = [(rt.pipeline(k), group, k.grid)]
                            err_big = 0.0
                            if not a.no_big_check:
                                dev.queue.write_buffer(by, 0, nan)
                                enc = dev.create_command_encoder()
                                mw.encode_pass(enc, disp)
                                dev.queue.submit([enc.finish()])
                                y = np.frombuffer(rt.read_buffer(by, x.nbytes), npd).reshape(rows, n)[sample]
                                err_big = C.nmse(y, ref_rows(case, x, w, b, sample))
                            t = timer(disp)
                            ok = C.within_tol(err, dt) and C.within_tol(err_big, dt)
                            row[vn] = {"t": t, "nmse": err, "nmse_big": err_big, "ok": ok, "entry": k.entry,
                                       "grid": k.grid}
                        except Exception as e:  # noqa: BLE001
                            row[vn] = {"error": str(e)[:300]}
                            print(f"  {case.key} {vn}: ERROR {str(e)[:300]}", flush=True)
                    if names and names[0] in row and "t" in row[names[0]]:
                        # spread check: the last variant again
                        row["repeat_" + names[1 if len(names) > 1 else 0]] = timer(disp)
                    for bf in bufs.values():
                        if bf is not None:
                            bf.destroy()
                    res["cases"].append(row)
                    cells = []
                    for vn in names:
                        r = row.get(vn)
                        if r and "t" in r:
                            pct = 100 * row["bytes"] / (r["t"] * 1e-6) / 1e9 / ceil
                            cells.append(f"{vn}={pct:.1f}{'' if r['ok'] else '!'}")
                        elif r:
                            cells.append(f"{vn}=ERR")
                    print(f"{case.key:34s} copy={100 * row['bytes'] / (row['t_copy'] * 1e-6) / 1e9 / ceil:.1f} "
                          + " ".join(cells), flush=True)
                    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print("ceiling", ceil)


if __name__ == "__main__":
    main()
