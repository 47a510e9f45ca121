"""The CUDA measurer: fusec's CUDA kernels through CuPy, timed against the copy, the unfused
sequence, torch eager and ``torch.compile``.

Timing (:class:`CudaTimer`): ``triton.testing.do_bench`` (L2 flushed between repetitions, median)
when Triton and torch work, else CUDA events around single launches with a 256 MiB buffer cleared
before each (L2 flush), median. Small cases are also timed back to back (:meth:`CudaTimer.b2b`:
``launches`` calls between two events, per-launch time, no flush) and their host dispatch time is
measured (:meth:`CudaTimer.host`: wall time of the launch call alone). All times in microseconds.
torch / triton missing: those peers are left out with a note.

Per case also an empty kernel with the fused kernel's signature, grid and block, launched with the
same arguments (``t_empty_sig_us`` / ``t_empty_sig_b2b_us``): the small-size floor of G6 (the
argument-less empty launch of ``overhead`` costs less host time than a launch with five arguments).
With ``variants`` every candidate kernel of :func:`fusec.bench.norm_variants.cuda_variants` is run on
the case's buffers (output poisoned with NaN), compared with the reference on the device, and only
then timed (``row["variants"][name]``: kernel, nmse, t_us, pct_ceiling and, small cases, t_b2b_us).
"""

from __future__ import annotations

import statistics
import subprocess
import time

import numpy as np

from ..backends import cuda_runtime as cr
from ..codegen import emit, needs_kernel
from ..errors import BackendError
from ..ir.graph import Graph
from .cases import EPS, Prepared, nmse, within_tol
from .runner import Measurer

FLUSH_BYTES = 256 << 20
CEILING_BYTES = 1 << 30
EMPTY_SRC = 'extern "C" __global__ void fusec_bench_empty() {}\n'
PEER_CHECK_MAX_BYTES = 256 << 20
"""torch peers' outputs are compared with the reference (``nmse_<peer>``) up to this case size."""


_EMPTY_TYPES = {"u32": "unsigned int", "i32": "int", "f32": "float"}


def empty_like(k):
    """An empty CUDA kernel (``cupy.RawKernel``) with ``k``'s signature: its bindings as pointers and
    the Params struct by value (launched with ``k``'s grid, block and arguments: the same host cost)."""
    import cupy as cp  # noqa: PLC0415

    fields = "".join(f"    {_EMPTY_TYPES[t]} {n};\n" for n, t, _ in k.params) or "    unsigned int _unused;\n"
    ptrs = "".join(f"const void* __restrict__ b{i}, " for i in range(len(k.bindings)))
    src = f"struct Params {{\n{fields}}};\nextern \"C\" __global__ void fusec_empty({ptrs}const Params p) {{}}\n"
    return cp.RawKernel(src, "fusec_empty", options=("-std=c++17",))


class CudaTimer:
    """Times a no-argument callable that enqueues work on CuPy's/torch's current (legacy default) stream."""

    def __init__(self, cp, notes: list[str], probe):
        """``probe``: a cheap callable launching one kernel, used to try ``do_bench`` once."""
        self.cp = cp
        self.do_bench = None
        try:
            from triton.testing import do_bench  # noqa: PLC0415

            float(do_bench(probe, warmup=1, rep=5, return_mode="median"))
            self.do_bench = do_bench
            self.method = "triton.testing.do_bench (warmup 25 ms, rep 100 ms, L2 flushed, median)"
        except Exception as e:  # noqa: BLE001 - ImportError, no torch, an old Triton without return_mode
            notes.append(f"triton.testing.do_bench unavailable ({type(e).__name__}: {e}); "
                         "timing with CUDA events and an explicit 256 MiB L2 flush")
            self.method = "CUDA events around single launches (256 MiB buffer cleared before each: L2 flush), median"
        self._flush = cp.empty(FLUSH_BYTES // 4, dtype=cp.int32)

    def __call__(self, fn, reps: int = 50, quick: bool = False) -> float:
        """Median time of one call of ``fn`` in microseconds (L2 flushed before each); ``quick``:
        do_bench with 10 ms warm-up and 40 ms of repetitions (the variant sweep)."""
        if self.do_bench is not None:
            warm, rep = (10, 40) if quick else (25, 100)
            return float(self.do_bench(fn, warmup=warm, rep=rep, return_mode="median")) * 1e3
        cp = self.cp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            self._flush.fill(0)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            ts.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
        return statistics.median(ts)

    def b2b(self, fn, launches: int = 200, reps: int = 7) -> float:
        """Per-call time in microseconds of ``launches`` calls back to back between two events (median
        of ``reps``); no flush: this is the launch-bound regime of small sizes."""
        cp = self.cp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(10):
            fn()
        ts = []
        for _ in range(reps):
            start.record()
            for _ in range(launches):
                fn()
            stop.record()
            stop.synchronize()
            ts.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / launches)
        return statistics.median(ts)

    def host(self, fn, calls: int = 200, sync_every: int = 50) -> float:
        """Median host wall time in microseconds of the call itself (enqueue only; the device is
        synchronized every ``sync_every`` calls, outside the timed region, so the queue never fills)."""
        ts = []
        dev = self.cp.cuda.Device()
        dev.synchronize()
        for i in range(calls):
            t0 = time.perf_counter_ns()
            fn()
            ts.append((time.perf_counter_ns() - t0) * 1e-3)
            if (i + 1) % sync_every == 0:
                dev.synchronize()
        dev.synchronize()
        return statistics.median(ts)


class CudaGraphRunner:
    """Device buffers for every root tensor of ``graph`` and the launches of its CUDA kernels.

    Leaves get their values from ``values`` (by name); every other root (intermediates, the output)
    is filled with NaN, so an output the kernels never write fails the check.
    """

    def __init__(self, graph: Graph, values: dict[str, np.ndarray], cp):
        self.cp = cp
        self.bufs: dict[int, object] = {}
        self.by_name: dict[str, object] = {}
        for t in graph.nodes:
            r = t.root
            if id(r) in self.bufs:
                continue
            if r.name in values and r.op == "NONE":
                buf = cp.asarray(np.ascontiguousarray(values[r.name]).reshape(-1))
            else:
                buf = cp.full(r.span_bytes // r.dtype.size, np.nan, dtype=r.dtype.np)
            self.bufs[id(r)] = buf
            self.by_name[r.name] = buf
        self.kernels = [emit(t, "cuda") for t in graph.nodes if needs_kernel(t)]
        self.launches = []
        for k in self.kernels:
            fn = cr.module(k)
            args = (*[self.bufs[id(b.tensor.root)] for b in k.bindings], cr.params_array(k))
            self.launches.append((fn, k.grid, k.workgroup_size, args))
        self.output = graph.outputs[0]

    def __call__(self) -> None:
        for fn, grid, block, args in self.launches:
            fn(grid, block, args)

    def out(self) -> np.ndarray:
        return self.cp.asnumpy(self.bufs[id(self.output.root)])


def _nvidia_driver() -> str | None:
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - optional
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(modname: str) -> str | None:
    try:
        mod = __import__(modname)
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001 - absent or broken install
        return None


class CudaMeasurer(Measurer):
    """fusec's CUDA kernels (CuPy) and their peers. ``use_torch=False`` leaves torch out."""

    name = "cuda"

    def __init__(self, use_torch: bool = True, variants: bool = False) -> None:
        super().__init__()
        self.use_torch = use_torch
        self.variants = variants
        self.torch = None
        self._cur: tuple | None = None

    def setup(self, timing: bool) -> None:
        if not cr.available():
            raise BackendError("the cuda bench needs CuPy and a CUDA device")
        import cupy as cp  # noqa: PLC0415

        self.cp = cp
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        self.meta.update(
            gpu=name.decode() if isinstance(name, bytes) else str(name),
            compute_capability=f"{props['major']}.{props['minor']}", sms=props["multiProcessorCount"],
            memory_gib=round(props["totalGlobalMem"] / 2**30, 1), driver=_nvidia_driver(),
            cuda_driver_api=cp.cuda.runtime.driverGetVersion(), cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
            cupy=cp.__version__, torch=None, torch_cuda=None, triton=_version("triton"))
        if self.use_torch:
            try:
                import torch  # noqa: PLC0415
                import torch.nn.functional as F  # noqa: N812, PLC0415

                if not torch.cuda.is_available():
                    raise RuntimeError("torch has no CUDA device")
                self.torch, self.F = torch, F
                self.meta.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
            except Exception as e:  # noqa: BLE001 - torch absent or CPU-only
                self.notes.append(f"torch unavailable ({type(e).__name__}: {e}): no torch eager / torch.compile peers")
        else:
            self.notes.append("torch peers disabled (--no-torch)")
        if self.meta["triton"] is None:
            self.notes.append("triton not installed")
        self._empty = cp.RawKernel(EMPTY_SRC, "fusec_bench_empty")
        if not timing:
            return
        self.timer = CudaTimer(cp, self.notes, self._launch_empty)
        self.meta["timing"] = self.timer.method
        self.meta["b2b"] = "200 launches between two CUDA events, per-launch time, median of 7, no L2 flush"
        t_memcpy, t_kernel = self._copy_times(CEILING_BYTES)
        ov = self.overhead
        ov["copy_ceiling_bytes"] = 2 * CEILING_BYTES
        ov["copy_memcpy_gbs"] = 2 * CEILING_BYTES / (t_memcpy * 1e-6) / 1e9
        ov["copy_kernel_gbs"] = 2 * CEILING_BYTES / (t_kernel * 1e-6) / 1e9
        ov["copy_ceiling_gbs"] = max(ov["copy_memcpy_gbs"], ov["copy_kernel_gbs"])
        empty = self._launch_empty
        ov["empty_launch_us"] = self.timer(empty)
        ov["empty_launch_b2b_us"] = self.timer.b2b(empty)
        ov["host_dispatch_empty_us"] = self.timer.host(empty)
        self.meta["copy_ceiling"] = ("max of cudaMemcpy device-to-device and cupy.copyto, 1 GiB read + 1 GiB "
                                     "written")
        cp.get_default_memory_pool().free_all_blocks()

    def _copy_times(self, nbytes: int) -> tuple[float, float]:
        """Times in microseconds of copying ``nbytes`` device to device: cudaMemcpy, ``cupy.copyto``."""
        cp = self.cp
        src = cp.ones(nbytes // 4, dtype=cp.float32)
        dst = cp.empty_like(src)
        t_memcpy = self.timer(lambda: dst.data.copy_from_device_async(src.data, nbytes))
        t_kernel = self.timer(lambda: cp.copyto(dst, src))
        return t_memcpy, t_kernel

    def _launch_empty(self) -> None:
        self._empty((1,), (32,), ())

    # -- per case ------------------------------------------------------------------------------------
    def check(self, prep: Prepared) -> dict:
        rf = CudaGraphRunner(prep.fused, prep.values, self.cp)
        ru = CudaGraphRunner(prep.graph, prep.values, self.cp)
        self._cur = (rf, ru)
        rf()
        ru()
        self.cp.cuda.Device().synchronize()
        return {"nmse_fused": nmse(rf.out(), prep.ref), "nmse_unfused": nmse(ru.out(), prep.ref),
                "fused_kernel": rf.kernels[0].entry, "n_fused_kernels": len(rf.kernels),
                "n_unfused_kernels": len(ru.kernels)}

    def time(self, prep: Prepared, row: dict) -> None:
        cp, timer = self.cp, self.timer
        rf, ru = self._cur
        half = prep.case.bytes // 2
        src, dst = cp.empty(half, cp.uint8), cp.empty(half, cp.uint8)
        fns = {"copy": lambda: dst.data.copy_from_device_async(src.data, half), "fused": rf, "unfused": ru}
        fns.update(self._torch_peers(prep, rf, row))
        for name, fn in fns.items():
            try:
                row[f"t_{name}_us"] = timer(fn)
                if prep.case.small:
                    row[f"t_{name}_b2b_us"] = timer.b2b(fn)
            except Exception as e:  # noqa: BLE001 - one failing peer must not lose the case
                if name == "fused":
                    raise
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"
        if prep.case.small:
            row["host_dispatch_fused_us"] = timer.host(rf)
            row["host_dispatch_unfused_us"] = timer.host(ru)
        try:
            fn, grid, block, args = rf.launches[0]
            empty = empty_like(rf.kernels[0])
            launch = lambda: empty(grid, block, args)  # noqa: E731
            row["t_empty_sig_us"] = timer(launch)
            if prep.case.small:
                row["t_empty_sig_b2b_us"] = timer.b2b(launch)
        except Exception as e:  # noqa: BLE001
            row["empty_sig_error"] = f"{type(e).__name__}: {e}"
        if self.variants:
            del src, dst, fns
            self._sweep(prep, rf, row)

    def _sweep(self, prep: Prepared, rf: CudaGraphRunner, row: dict) -> None:
        """Check, then time, every candidate kernel of the case on ``rf``'s buffers (``row["variants"]``)."""
        from .norm_variants import cuda_variants  # noqa: PLC0415

        cp, timer, case = self.cp, self.timer, prep.case
        node = rf.kernels[0].node
        out = rf.bufs[id(rf.output.root)]
        ref = cp.asarray(prep.ref.reshape(-1))
        ceiling = self.overhead.get("copy_ceiling_gbs")
        res: dict[str, dict] = {}
        for name, make in cuda_variants(node).items():
            v: dict = {}
            res[name] = v
            try:
                k = make()
                v["kernel"] = k.entry
                v["grid"] = list(k.grid)
                v["block"] = k.workgroup_size[0]
                fn = cr.module(k)
                args = (*[rf.bufs[id(b.tensor.root)] for b in k.bindings], cr.params_array(k))
                launch = lambda fn=fn, k=k, args=args: fn(k.grid, k.workgroup_size, args)  # noqa: E731
                out.fill(cp.nan)
                launch()
                cp.cuda.Device().synchronize()
                v["nmse"] = nmse(out[:ref.size], ref, xp=cp)
                if not within_tol(v["nmse"], case.dtype):
                    v["error"] = "incorrect output"
                    continue
                v["t_us"] = timer(launch, quick=True)
                if ceiling:
                    v["pct_ceiling"] = 100.0 * case.bytes / (v["t_us"] * 1e-6) / 1e9 / ceiling
                if case.small:
                    v["t_b2b_us"] = timer.b2b(launch)
            except Exception as e:  # noqa: BLE001 - one failing candidate must not lose the case
                v["error"] = f"{type(e).__name__}: {e}"
        row["variants"] = res
        del ref

    def _torch_peers(self, prep: Prepared, rf: CudaGraphRunner, row: dict) -> dict:
        """Callables for torch eager (naive, F.rms_norm) and torch.compile(naive) on ``rf``'s inputs."""
        torch, F = self.torch, getattr(self, "F", None)
        if torch is None:
            return {}
        c = prep.case
        x = torch.from_dlpack(rf.by_name["x"]).view(c.rows, c.n)
        w = torch.from_dlpack(rf.by_name["w"]).view(c.n)
        b = torch.from_dlpack(rf.by_name["b"]).view(c.rows, c.n) if c.with_add else None

        def naive(x, w, b=None):
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w
            return y + b if b is not None else y

        def frms(x, w, b=None):
            y = F.rms_norm(x, (x.shape[-1],), w, EPS)
            return y + b if b is not None else y

        peers = {"torch_naive": naive, "torch_rms_norm": frms}
        try:
            torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no dynamic shapes
            comp = torch.compile(naive, dynamic=False)
            comp(x, w, b)
            peers["torch_compile"] = comp
        except Exception as e:  # noqa: BLE001 - inductor failures are reported, not fatal
            row["torch_compile_error"] = f"{type(e).__name__}: {e}"
        out = {}
        for name, fn in peers.items():
            try:
                y = fn(x, w, b)
                torch.cuda.synchronize()
                if c.bytes <= PEER_CHECK_MAX_BYTES:
                    row[f"nmse_{name}"] = nmse(y.float().cpu().numpy(), prep.ref)
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"
                continue
            out[name] = lambda fn=fn: fn(x, w, b)
        return out

    def release(self) -> None:
        self._cur = None
        if getattr(self, "cp", None) is not None:
            self.cp.cuda.Device().synchronize()
            self.cp.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()


__all__ = ["CudaGraphRunner", "CudaMeasurer", "CudaTimer", "empty_like"]
