"""Launch, once each, the kernels whose last bandwidth percent is in question, for Nsight Compute.

Run under ``ncu`` on the GPU machine (``bash bench/device_session.sh profile`` does), e.g.::

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section WarpStateStats --section LaunchStats \\
        python3 bench/profile_kernels.py

Kernels (each launched twice: a warm-up, then the one to read; ``--only`` picks by substring):

* ``gemv``: the FFN down GEMV + residual ADD (f16 weights 8192 -> 2048) with ``tune()``'s tuning,
  the classic body, and the FFN gate/up SWIGLU (2048 -> 8192);
* ``read``: ``probe_ceilings.py``'s read-only kernel over 32 MiB (256 threads, 2 and 8 blocks/SM);
* ``norm``: fusec's fused RMS_NORM -> MUL, f32 8192 x 4096, and torch.compile's kernel for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def gemv(cp):
    import bench_gemv as bg

    from fusec.backends import cuda_runtime as cr
    from fusec.codegen.families import gemv_epilogue as ge
    from fusec.dsl import default_patterns
    from fusec.rewrite import rewrite

    for kind, K, M in (("add", 8192, 2048), ("swiglu", 2048, 8192)):
        g = bg.build_graph(kind, K, M, "f16")
        node = rewrite(g, default_patterns())[0].outputs[0]
        p = ge.plan(node)
        tunings = [ge.tune(node, p, "cuda")]
        if kind == "add":
            tunings.append(ge.tune_classic(node, p, "cuda"))
        for tu in tunings:
            k = ge.build(node, "cuda", tu)
            vals = bg.leaf_values(cp, cp.random.default_rng(0), g, K)
            bufs = [vals[b.tensor.root.name] if not b.write else cp.empty(M, cp.float32) for b in k.bindings]
            for _ in range(2):
                cr.launch(k, bufs, cr.params_value(k))
            cp.cuda.runtime.deviceSynchronize()
            print("launched", k.entry, k.grid, k.workgroup_size)


def read(cp):
    import probe_ceilings as pc

    nbytes = 32 << 20
    sms = int(cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"])
    buf = cp.ones(nbytes // 4, cp.uint32)
    out = cp.zeros(sms * 16, cp.uint32)
    k = cp.RawKernel(pc.READ_SRC.replace("THREADS", "256").replace("UNROLL", "4"), "probe_read")
    for b in (2, 8):
        for _ in range(2):
            k((sms * b,), (256,), (buf, cp.uint64(nbytes // 16), out))
        cp.cuda.runtime.deviceSynchronize()
        print("launched probe_read", sms * b)


def norm(cp):
    import torch

    from fusec.backends import cuda_runtime as cr
    from fusec.bench import cases
    from fusec.codegen import emit
    from fusec.dsl import default_patterns

    case = cases.Case("rms_norm_mul", "f32", 8192, 4096)
    pr = cases.prepare(case, default_patterns())
    node = next(t for t in pr.fused.nodes if t.op == "FUSED")
    k = emit(node, "cuda")
    vals = {n: cp.asarray(v) for n, v in pr.values.items()}
    bufs = [vals[b.tensor.root.name] if not b.write else cp.empty(case.rows * case.n, cp.float32)
            for b in k.bindings]
    for _ in range(2):
        cr.launch(k, bufs, cr.params_value(k))
    cp.cuda.runtime.deviceSynchronize()
    print("launched", k.entry, k.grid, k.workgroup_size)

    def f(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    x = torch.randn(8192, 4096, device="cuda")
    w = torch.randn(4096, device="cuda")
    cf = torch.compile(f)
    for _ in range(3):
        cf(x, w)
    torch.cuda.synchronize()
    print("launched torch.compile rms_norm_mul")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated subset of gemv,read,norm")
    args = ap.parse_args()
    import cupy as cp

    for name, fn in (("gemv", gemv), ("read", read), ("norm", norm)):
        if not args.only or name in args.only.split(","):
            fn(cp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
