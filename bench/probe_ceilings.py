"""What one kernel can read in a decode step: read-only and copy ceilings per size, back to back.

The GEMV goal of issue 6 is stated against the copy ceiling (a 1 GiB device-to-device copy), but a
decode GEMV is one kernel reading 2-64 MiB of weights: each launch pays a ramp (blocks scheduled,
first loads in flight) and a drain (the last loads, the stores). This probe measures the best a
kernel with *no* arithmetic does at those sizes, in the bench harness's own back-to-back mode (one
captured CUDA graph launching the kernel over R distinct buffers, >= 256 MiB in all, so no launch
gaps and no L2 reuse), so the GEMV numbers can be read against what is reachable at all:

* ``read``: every byte of the buffer loaded once with 16-byte loads (``ld.global.nc`` with
  ``L1::no_allocate``), XOR-folded, one word written per block; grids of ``bps`` blocks per SM
  x ``threads`` threads, grid-stride loop with ``unroll`` loads in flight per thread;
* ``copy``: ``cupy.copyto`` of half the bytes (bytes read + written = the size), as the 1 GiB
  ceiling is counted.

Each is timed twice: with ``do_bench`` (an L2 flush -- zeroing 256 MB -- before every graph replay)
and in the steady state (``bench_gemv.graph_time_steady``: replays back to back, no flush).

Also prints, for the norm kernels of issue 3, the Triton source torch.compile generates for
``x * rsqrt(mean(x^2) + eps) * w`` (f32, 8192 x 4096) so its launch configuration can be compared
with fusec's.

Usage (GPU machine): python bench/probe_ceilings.py [--out FILE.json] [--no-triton]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_gemv  # noqa: E402

READ_SRC = r"""
extern "C" __global__ void __launch_bounds__(THREADS) probe_read(const uint4* __restrict__ p,
                                                                 unsigned long long n16,
                                                                 unsigned int* __restrict__ out) {
    unsigned int acc = 0u;
    const unsigned long long stride = (unsigned long long)gridDim.x * THREADS;
    unsigned long long i = (unsigned long long)blockIdx.x * THREADS + threadIdx.x;
    for (; i + (UNROLL - 1) * stride < n16; i += UNROLL * stride) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const uint4* q = p + i + u * stride;
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(q));
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) { const uint4 v = p[i]; acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    acc = __reduce_xor_sync(0xffffffffu, acc);
    if ((threadIdx.x & 31u) == 0u) atomicXor(out + blockIdx.x, acc);
}
"""

SIZES_MIB = (2, 8, 32, 64, 256)
CONFIGS = [(t, b, u) for t in (256, 512, 1024) for b in (1, 2, 4, 8) for u in (2, 4, 8) if t * b <= 2048]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_ceilings.json")
    ap.add_argument("--no-triton", action="store_true")
    args = ap.parse_args()
    import cupy as cp
    from triton.testing import do_bench

    def timeit(fn) -> float:
        return float(do_bench(fn, warmup=10, rep=60, return_mode="median")) * 1e-3

    props = cp.cuda.runtime.getDeviceProperties(0)
    sms = int(props["multiProcessorCount"])
    ceiling = copy_ceiling(cp, timeit)
    print(f"copy ceiling (1 GiB copyto): {ceiling:.0f} GB/s on {sms} SMs", flush=True)
    kernels = {(t, u): cp.RawKernel(READ_SRC.replace("THREADS", str(t)).replace("UNROLL", str(u)), "probe_read")
               for t, _, u in CONFIGS}
    results = [measure_size(cp, timeit, kernels, sms, ceiling, mib) for mib in SIZES_MIB]

    triton_src = None
    if not args.no_triton:
        triton_src = dump_triton_norm()
    meta = {"date": dt.date.today().isoformat(), "host": platform.node(), "gpu": props["name"].decode(),
            "sms": sms, "copy_ceiling_gbs": ceiling, "cupy": cp.__version__,
            "timing": "do_bench median (L2 flushed) of one CUDA graph replay / launches in it"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "triton_norm_src": triton_src},
                                         indent=1))
    print(f"wrote {args.out}")
    return 0


def copy_ceiling(cp, timeit) -> float:
    """GB/s of a 1 GiB device-to-device ``cupy.copyto`` (bytes read + written), as bench_gemv.py."""
    n = 1 << 29
    src, dst = cp.ones(n, cp.uint16), cp.empty(n, cp.uint16)
    return 4 * n / timeit(lambda: cp.copyto(dst, src)) / 1e9


def measure_size(cp, timeit, kernels, sms, ceiling, mib) -> dict:
    """Every read configuration and the copy at ``mib`` MiB, back to back over R buffers."""
    nbytes = mib << 20
    reps = max(1, (256 << 20) // nbytes)
    bufs = [cp.full(nbytes // 4, i + 1, cp.uint32) for i in range(reps)]
    halves = [cp.empty(nbytes // 4, cp.uint16) for _ in range(reps)]
    outs = cp.zeros(sms * 16, cp.uint32)

    def graph_time(body):
        return bench_gemv.graph_time(cp, timeit, body) / reps, bench_gemv.graph_time_steady(cp, body) / reps

    def launches(st, k, grid, t):
        for buf in bufs:
            k((grid,), (t,), (buf, cp.uint64(nbytes // 16), outs), stream=st)

    def copies(st):
        with st:
            for i in range(reps):
                cp.copyto(halves[i], bufs[i][: nbytes // 8].view(cp.uint16))

    row = {"mib": mib, "reps": reps, "read": {}}
    for t, b, u in CONFIGS:
        k, grid = kernels[(t, u)], sms * b
        # correctness: the XOR of a buffer of equal words is 0 (an even word count)
        outs.fill(0)
        k((grid,), (t,), (bufs[0], cp.uint64(nbytes // 16), outs))
        ok = int(np.bitwise_xor.reduce(cp.asnumpy(outs[:grid]))) == 0
        tb, ts = graph_time(lambda st, k=k, grid=grid, t=t: launches(st, k, grid, t))
        row["read"][f"t{t}_b{b}_u{u}"] = {"ok": ok, "s": tb, "gbs": nbytes / tb / 1e9,
                                          "pct_copy": 100 * nbytes / tb / 1e9 / ceiling,
                                          "steady_s": ts, "steady_pct_copy": 100 * nbytes / ts / 1e9 / ceiling}
    best = max(row["read"], key=lambda c: row["read"][c]["gbs"] if row["read"][c]["ok"] else 0)
    best_st = max(row["read"], key=lambda c: -row["read"][c]["steady_s"] if row["read"][c]["ok"] else -1)
    tc, tcs = graph_time(copies)
    row.update(best_read=best, best_read_pct_copy=row["read"][best]["pct_copy"],
               best_read_s=row["read"][best]["s"], copy_s=tc, copy_pct=100 * nbytes / tc / 1e9 / ceiling,
               best_steady_read=best_st, best_steady_read_pct_copy=row["read"][best_st]["steady_pct_copy"],
               copy_steady_pct=100 * nbytes / tcs / 1e9 / ceiling)
    print(f"{mib:4d} MiB x{reps:3d}: best read {row['best_read_pct_copy']:5.1f}% of copy "
          f"({row['best_read_s'] * 1e6:8.2f} us, {best}); copy of the size {row['copy_pct']:5.1f}% "
          f"({tc * 1e6:8.2f} us)", flush=True)
    print(f"      steady (no flush): best read {row['best_steady_read_pct_copy']:5.1f}% ({best_st}), copy "
          f"{row['copy_steady_pct']:5.1f}%", flush=True)
    top = sorted(row["read"].items(), key=lambda kv: -kv[1]["gbs"])[:6]
    print("      top: " + ", ".join(f"{c} {v['pct_copy']:.1f}%" for c, v in top), flush=True)
    return row


def dump_triton_norm() -> str | None:
    """The Triton kernel(s) torch.compile generates for the naive RMS_NORM -> MUL (f32, 8192 x 4096)."""
    import torch

    def f(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    x = torch.randn(8192, 4096, device="cuda")
    w = torch.randn(4096, device="cuda")
    from torch._inductor.utils import run_and_get_code

    t0 = time.perf_counter()
    _, codes = run_and_get_code(torch.compile(f), x, w)
    src = "\n\n".join(codes)
    keep = [ln for ln in src.splitlines() if any(s in ln for s in (
        "@triton", "def triton", "tl.load", "tl.store", "XBLOCK", "R0_BLOCK", "RBLOCK", "num_warps",
        "triton_meta", "inductor_meta", "grid", "tl.sum", "rsqrt", "reduction_hint", "eviction"))]
    print(f"torch.compile code ({time.perf_counter() - t0:.1f} s), relevant lines:")
    print("\n".join("   " + ln[:220] for ln in keep[:80]), flush=True)
    return src if os.environ.get("PROBE_FULL_TRITON") else "\n".join(keep)


if __name__ == "__main__":
    raise SystemExit(main())
