"""The wgpu measurer: fusec's WGSL kernels through wgpu-py (Vulkan on a GPU, lavapipe on a CPU).

Timing (:class:`WgpuTimer`): GPU time from timestamp queries when the device has
``timestamp-query`` (compute pass ``timestamp_writes`` at the beginning and end of the pass,
resolved into a buffer and read back, ticks times the queue's timestamp period: ns), with the
fused kernel, the unfused sequence (one pass, as :class:`fusec.backends.wgpu_backend.WgpuExecutable`
encodes it) and a WGSL vec4 copy kernel (this backend's ceiling) each preceded by a 256 MiB
``clear_buffer`` (L2 flush); median over repetitions. Without timestamps: CPU wall time around
submit + wait (a note says so). Small cases are also timed back to back (many dispatches in one
pass, per-dispatch time), and the host time of encoding one dispatch and of finish + submit is
measured. All times in microseconds.

Validity on a GPU (``bench/notes-norm-wgsl.md``: one H200 run had every per-case copy at
1.4-1.7 TB/s against a 4.1 TB/s ceiling): before each timing the GPU runs ``WARM_S`` of flushed
passes of the timed dispatches (as do_bench warms up for 25 ms), so clocks that fell during the
host gaps of the check (full-size read-backs, nmse on the CPU) are back up; each large case times
the same-size copy before and after its kernels (``t_copy_us``, ``t_copy_after_us``) and is flagged
when either is below ``SLOW_COPY_FRACTION`` of the ceiling or they differ by more than
``COPY_DRIFT``; the per-case buffers are destroyed and collected before the next case.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import statistics
import time

import numpy as np

from ..backends import wgpu_runtime as rt
from ..codegen import emit, needs_kernel
from ..codegen.kernel import Binding, Kernel
from ..errors import BackendError
from ..ir.dtypes import F32
from ..ir.graph import Graph
from .cases import Prepared, nmse, within_tol
from .runner import Measurer, SkipCase

COPY_VPT = 1
"""vec4<f32> each thread of the copy kernel moves (all loads issued before the stores). H200,
Vulkan, 256 MiB per side, balanced grid (2026-11-21): 1 -> 4080 GB/s, 2 -> 3968, 4 -> 3957,
8 -> 3913; the old grid (x = 65535, half of the workgroups idle) with 1 -> 3168."""


SPIN_UP_S = 2.0
"""Seconds of copy passes before the first timing (a Vulkan GPU idling at low clocks otherwise makes
the first cases, and once a whole run, slow)."""

SLOW_COPY_FRACTION = 0.8
"""A large case whose side-by-side copy runs below this fraction of the run's copy ceiling is flagged."""

COPY_DRIFT = 0.15
"""A large case whose copy timed after its kernels differs from the one timed before by more than
this fraction is flagged (the GPU changed state while the case was timed)."""

SWEEP_SAMPLE_ROWS = 32
"""Rows read back (at the start, middle and end of the output) to check a candidate of the sweep."""

WARM_S = 0.4
"""Seconds of flushed passes of the timed dispatches, fed without host waits, before each timing (GPU
only; CPU adapters: 3 passes). 50 ms with a host wait after every 10 passes left the H200's SM clock
at 345-990 MHz for whole runs (nvidia-smi log, 2026-11-21-h200-wgpu-diag)."""

WARM_QUEUE = 4
"""Warm-up submissions in flight before the host waits for the GPU once."""


def copy_wgsl(vpt: int = COPY_VPT) -> str:
    """The WGSL copy-ceiling kernel: each 256-thread workgroup copies a block of ``256 * vpt``
    vec4<f32>; thread ``lid`` moves vec4s ``lid + k * 256`` of the block (coalesced), loading all
    ``vpt`` before storing (64 bytes in flight per thread at ``vpt = 4``)."""
    loads = "\n".join(f"    let i{k} = b + {k * 256}u;\n    var v{k} = vec4<f32>(0.0);\n"
                      f"    if (i{k} < p.n4) {{ v{k} = src[i{k}]; }}" for k in range(vpt))
    stores = "\n".join(f"    if (i{k} < p.n4) {{ dst[i{k}] = v{k}; }}" for k in range(vpt))
    return f"""// fusec bench: storage-to-storage copy, {vpt} vec4<f32> per thread (the WGSL copy ceiling)
struct Params {{
    n4: u32,
    grid_x: u32,
}};
@group(0) @binding(2) var<uniform> p: Params;
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn copy_vec4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
    let b = (wg.y * p.grid_x + wg.x) * {256 * vpt}u + lid;
{loads}
{stores}
}}
"""


COPY_WGSL = copy_wgsl()
EMPTY_WGSL = "// fusec bench: an empty kernel (launch overhead)\n@compute @workgroup_size(32)\nfn empty_kernel() {}\n"
FLUSH_BYTES = 256 << 20
CEILING_BYTES = 256 << 20
CPU_MAX_BYTES = 32 << 20
"""On a CPU adapter (lavapipe) cases moving more bytes than this are skipped."""
MAX_WG = 65535


_BINDING = re.compile(r"^@group\(0\) @binding\(\d+\) var(?:<(?P<space>\w+)(?:, *\w+)?>)? (?P<name>\w+) *:.*;$", re.M)
_STRUCT = re.compile(r"^struct \w+ \{.*?^\};$", re.M | re.S)
_WG_SIZE = re.compile(r"@workgroup_size\(([^)]*)\)")


def empty_like(k: Kernel) -> Kernel:
    """An empty kernel with ``k``'s bindings, parameter struct, workgroup size and grid: the
    small-size floor of G6 on wgpu. wgpu orders dispatches that write a storage buffer with a
    barrier, so back-to-back dispatches of the fused kernel pay for barriers that an argument-less
    empty kernel does not; this one binds the same buffers with the same access modes (each binding
    touched in a branch no invocation takes, so the pipeline layout keeps it) and pays them too."""
    decls = re.findall(r"^enable \w+;$", k.source, re.M) + [m.group(0) for m in _STRUCT.finditer(k.source)]
    uses = []
    for m in _BINDING.finditer(k.source):
        decls.append(m.group(0))
        uses.append(f"_ = {m.group('name')};" if m.group("space") == "uniform" else f"_ = {m.group('name')}[0];")
    size = _WG_SIZE.search(k.source)
    if size is None or not uses:
        raise BackendError(f"kernel {k.entry}: cannot read its bindings / workgroup size for an empty twin")
    body = "\n        ".join(uses)
    src = ("// fusec bench: an empty kernel with the bindings of " + k.entry + "\n" + "\n".join(decls) +
           f"\n\n@compute @workgroup_size({size.group(1)})\nfn empty_sig(@builtin(global_invocation_id) gid: "
           f"vec3<u32>) {{\n    if (gid.x == 0xffffffffu) {{\n        {body}\n    }}\n}}\n")
    return dataclasses.replace(k, source=src, entry="empty_sig")


def _grid(n_wg: int) -> tuple[int, int, int]:
    """2-D grid of at least ``n_wg`` workgroups with fewer than y of them idle (x balanced, not
    x = 65535 with a nearly empty last row of workgroups)."""
    gx = -(-n_wg // -(-n_wg // MAX_WG))
    return gx, -(-n_wg // gx), 1


def copy_kernel(nbytes: int, vpt: int = COPY_VPT) -> Kernel:
    """The vec4 copy kernel for ``nbytes`` per side (rounded up to 16 bytes)."""
    n4 = -(-nbytes // 16)
    grid = _grid(-(-n4 // (256 * vpt)))
    src = COPY_WGSL if vpt == COPY_VPT else copy_wgsl(vpt)
    bindings = [Binding("src", None, F32), Binding("dst", None, F32, write=True)]
    return Kernel("wgsl", "bench_copy", "copy_vec4", src, bindings, [("n4", "u32", n4), ("grid_x", "u32", grid[0])],
                  (256, 1, 1), grid)


def encode_pass(enc, dispatches, repeat: int = 1, ts: tuple | None = None) -> None:
    """Record ``repeat`` rounds of ``dispatches`` (``(pipeline, bind group | None, grid)``) in one
    compute pass; ``ts = (query_set, i)`` writes timestamps ``i`` (begin) and ``i + 1`` (end)."""
    kw = {}
    if ts is not None:
        kw["timestamp_writes"] = {"query_set": ts[0], "beginning_of_pass_write_index": ts[1],
                                  "end_of_pass_write_index": ts[1] + 1}
    cpass = enc.begin_compute_pass(**kw)
    for _ in range(repeat):
        for pipe, group, grid in dispatches:
            cpass.set_pipeline(pipe)
            if group is not None:
                cpass.set_bind_group(0, group)
            cpass.dispatch_workgroups(*grid)
    cpass.end()


def timestamp_period() -> float | None:
    """Nanoseconds per timestamp tick of the device's queue (wgpu-native), ``None`` when unknown."""
    try:
        from wgpu.backends.wgpu_native import lib  # noqa: PLC0415

        return float(lib.wgpuQueueGetTimestampPeriod(rt.device().queue._internal))
    except Exception:  # noqa: BLE001 - older wgpu-native without the call
        return None


def wait_idle() -> None:
    """Block until the queue's submitted work is done (reads back a 16-byte buffer; wgpu-py's
    ``on_submitted_work_done_sync`` does not work with every wgpu-native build)."""
    global _TINY
    if _TINY is None:
        _TINY = rt.storage_buffer(16)
    rt.read_buffer(_TINY, 4)


_TINY = None


class WgpuTimer:
    """Times lists of dispatches on the shared device; see the module docstring."""

    def __init__(self, notes: list[str], flush_bytes: int, warm_s: float = 0.0):
        """``warm_s``: seconds of warm-up passes before each timing (0: three passes)."""
        self.warm_s = warm_s
        self.ts = rt.has_feature("timestamp-query")
        self.period = 1.0
        if self.ts:
            p = timestamp_period()
            if p is None:
                notes.append("timestamp period unknown (wgpu-native without wgpuQueueGetTimestampPeriod): 1 ns/tick")
            else:
                self.period = p
            self.method = (f"timestamp queries (compute pass begin/end, {self.period:g} ns/tick), "
                           f"{flush_bytes >> 20} MiB clear_buffer before each repetition (L2 flush), median")
        else:
            notes.append("device without timestamp-query: times are CPU wall time around submit + wait")
            self.method = "CPU wall time around submit + wait (no timestamp-query), L2 flushed before, median"
        self.flush = rt.storage_buffer(flush_bytes)

    def _times(self, dispatches, reps: int, repeat: int, flush: bool) -> list[float]:
        wgpu = rt._wgpu()
        dev = rt.device()
        if self.ts:
            qs = dev.create_query_set(type="timestamp", count=2 * reps)
            enc = dev.create_command_encoder()
            for i in range(reps):
                if flush:
                    enc.clear_buffer(self.flush, 0, self.flush.size)
                encode_pass(enc, dispatches, repeat, (qs, 2 * i))
            res = dev.create_buffer(size=16 * reps, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
            enc.resolve_query_set(qs, 0, 2 * reps, res, 0)
            dev.queue.submit([enc.finish()])
            raw = np.frombuffer(bytes(dev.queue.read_buffer(res)), dtype=np.uint64).reshape(reps, 2)
            ticks = raw[:, 1].astype(np.float64) - raw[:, 0].astype(np.float64)
            res.destroy()
            qs.destroy()
            return list(ticks * self.period * 1e-3 / repeat)
        out = []
        for _ in range(reps):
            if flush:
                enc = dev.create_command_encoder()
                enc.clear_buffer(self.flush, 0, self.flush.size)
                dev.queue.submit([enc.finish()])
                wait_idle()
            enc = dev.create_command_encoder()
            encode_pass(enc, dispatches, repeat)
            cmd = enc.finish()
            t0 = time.perf_counter()
            dev.queue.submit([cmd])
            wait_idle()
            out.append((time.perf_counter() - t0) * 1e6 / repeat)
        return out

    def spin_up(self, dispatches, seconds: float = 2.0) -> int:
        """Keep the GPU busy with ``dispatches`` for at least ``seconds`` of wall time (so it leaves
        its idle clocks before anything is timed); returns the number of passes submitted."""
        dev = rt.device()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            enc = dev.create_command_encoder()
            encode_pass(enc, dispatches, 20)
            dev.queue.submit([enc.finish()])
            wait_idle()
            n += 1
        return n

    def warm(self, dispatches, n: int = 3) -> None:
        """At least ``n`` passes of ``dispatches``, then more (each after an L2 flush, 10 per
        submission) until ``warm_s`` seconds have passed, submitted without waiting in between
        (at most ``WARM_QUEUE`` submissions ahead of the GPU): the GPU never idles, so its clock
        governor, which lowers the SM clock when the GPU waits for the host between submissions
        (H200: 345-990 MHz instead of 1980 in such gaps, ``bench/notes-norm-wgsl.md``), keeps it up.
        The timed submission follows without a wait."""
        dev = rt.device()
        t0, done = time.perf_counter(), 0
        while done < n or time.perf_counter() - t0 < self.warm_s:
            enc = dev.create_command_encoder()
            for _ in range(10 if self.warm_s else 1):
                if self.warm_s:
                    enc.clear_buffer(self.flush, 0, self.flush.size)
                encode_pass(enc, dispatches)
            dev.queue.submit([enc.finish()])
            done += 1
            if self.warm_s and done % WARM_QUEUE == 0:
                wait_idle()
        if not self.warm_s:
            wait_idle()

    def __call__(self, dispatches, reps: int = 30) -> float:
        """Median time in microseconds of one pass running ``dispatches`` (flushed before each)."""
        self.warm(dispatches)
        return float(statistics.median(self._times(dispatches, reps, 1, True)))

    def b2b(self, dispatches, launches: int = 200, reps: int = 7) -> float:
        """Per-round time in microseconds of ``launches`` rounds of ``dispatches`` in one pass (no flush)."""
        self.warm(dispatches)
        return float(statistics.median(self._times(dispatches, reps, launches, False)))

    def host_encode(self, dispatches, calls: int = 200) -> float:
        """Median host wall time in microseconds of recording one pass of ``dispatches``."""
        dev = rt.device()
        ts = []
        enc = dev.create_command_encoder()
        for i in range(calls):
            if i % 50 == 49:
                enc = dev.create_command_encoder()
            t0 = time.perf_counter_ns()
            encode_pass(enc, dispatches)
            ts.append((time.perf_counter_ns() - t0) * 1e-3)
        return statistics.median(ts)

    def host_submit(self, dispatches, calls: int = 50) -> float:
        """Median host wall time in microseconds of ``finish()`` + ``queue.submit`` of one pass."""
        dev = rt.device()
        ts = []
        for _ in range(calls):
            enc = dev.create_command_encoder()
            encode_pass(enc, dispatches)
            t0 = time.perf_counter_ns()
            dev.queue.submit([enc.finish()])
            ts.append((time.perf_counter_ns() - t0) * 1e-3)
            wait_idle()
        return statistics.median(ts)


class WgpuGraphRunner:
    """Storage buffers for every root tensor of ``graph`` and the dispatches of its WGSL kernels.

    Leaves get their values from ``values``; every other root is filled with NaN. Raises
    :class:`SkipCase` when a buffer exceeds the device's storage-binding limit.
    """

    def __init__(self, graph: Graph, values: dict[str, np.ndarray]):
        lim = rt.device().limits
        max_bind = min(lim.get("max-storage-buffer-binding-size", 1 << 27), lim.get("max-buffer-size", 1 << 28))
        self.bufs: dict[int, object] = {}
        for t in graph.nodes:
            r = t.root
            if id(r) in self.bufs:
                continue
            if r.span_bytes > max_bind:
                self.destroy()
                raise SkipCase(f"tensor {r.name!r} needs a {r.span_bytes:,}-byte storage buffer, over the device's "
                               f"limit of {max_bind:,}")
            if r.op == "NONE" and r.name in values:
                data = np.ascontiguousarray(values[r.name], dtype=r.dtype.np).tobytes()
            else:
                data = np.full(r.span_bytes // r.dtype.size, np.nan, dtype=r.dtype.np).tobytes()
            self.bufs[id(r)] = rt.storage_buffer(r.span_bytes, data)
        self.kernels = [emit(t, "wgsl") for t in graph.nodes if needs_kernel(t)]
        self.dispatches = [self.dispatch(k) for k in self.kernels]
        self.output = graph.outputs[0]

    def dispatch(self, k: Kernel) -> tuple:
        """``(pipeline, bind group, grid)`` of ``k`` on these buffers (its bindings' tensors' roots)."""
        group = rt.bind_group(k, [self.bufs[id(b.tensor.root)] for b in k.bindings],
                              rt.uniform_buffer(rt.pack_params(k)))
        return (rt.pipeline(k), group, k.grid)

    def run(self) -> None:
        dev = rt.device()
        enc = dev.create_command_encoder()
        encode_pass(enc, self.dispatches)
        dev.queue.submit([enc.finish()])

    def out(self) -> np.ndarray:
        r = self.output.root
        return np.frombuffer(rt.read_buffer(self.bufs[id(r)], r.span_bytes), dtype=r.dtype.np)

    def destroy(self) -> None:
        for b in self.bufs.values():
            b.destroy()
        self.bufs = {}


class WgpuMeasurer(Measurer):
    """fusec's WGSL kernels, the WGSL copy kernel and an empty kernel on the default wgpu adapter."""

    name = "wgpu"

    def __init__(self, variants: bool = False) -> None:
        super().__init__()
        self._cur: tuple | None = None
        self._extra: list = []
        self.variants = variants

    def setup(self, timing: bool) -> None:
        if not rt.available():
            raise BackendError("the wgpu bench needs wgpu-py and a WebGPU adapter")
        import wgpu  # noqa: PLC0415

        info = rt.adapter_info()
        dev = rt.device()
        self.cpu = info.get("adapter_type") == "CPU"
        lim = dev.limits
        self.meta.update(wgpu=wgpu.__version__, gpu=info.get("device"), adapter=info,
                         features=sorted(str(f) for f in dev.features),
                         max_storage_buffer_binding_size=lim.get("max-storage-buffer-binding-size"),
                         timestamp_period_ns=timestamp_period())
        if self.cpu:
            self.notes.append(f"CPU adapter ({info.get('device')}): cases over {CPU_MAX_BYTES >> 20} MiB skipped; "
                              "times are not GPU numbers")
        pipe = dev.create_compute_pipeline(layout="auto", compute={
            "module": dev.create_shader_module(code=EMPTY_WGSL), "entry_point": "empty_kernel"})
        self._empty = [(pipe, None, (1, 1, 1))]
        if not timing:
            return
        small = self.cpu
        self.timer = WgpuTimer(self.notes, (8 << 20) if small else FLUSH_BYTES, 0.0 if small else WARM_S)
        self.meta["timing"] = self.timer.method
        self.meta["b2b"] = "200 rounds of dispatches in one compute pass, per-round time, median of 7, no flush"
        max_bind = min(lim.get("max-storage-buffer-binding-size", 1 << 27), lim.get("max-buffer-size", 1 << 28))
        nbytes = min((8 << 20) if small else CEILING_BYTES, max_bind) // 16 * 16
        disp, bufs = self._copy_dispatch(nbytes)
        if not self.cpu:
            self.timer.spin_up(disp, SPIN_UP_S)
            self.notes.append(f"GPU spun up with {SPIN_UP_S:g} s of copy passes before timing")
        t = self.timer(disp)
        for b in bufs:
            b.destroy()
        ov = self.overhead
        ov["copy_ceiling_bytes"] = 2 * nbytes
        ov["copy_ceiling_gbs"] = 2 * nbytes / (t * 1e-6) / 1e9
        ov["empty_launch_us"] = self.timer(self._empty)
        ov["empty_launch_b2b_us"] = self.timer.b2b(self._empty)
        ov["host_encode_empty_us"] = self.timer.host_encode(self._empty)
        ov["host_submit_empty_us"] = self.timer.host_submit(self._empty)
        self.meta["copy_ceiling"] = (f"WGSL vec4 storage-to-storage copy ({COPY_VPT} vec4 per thread), "
                                     f"{nbytes >> 20} MiB read + written")

    def _copy_dispatch(self, nbytes: int, vpt: int = COPY_VPT):
        k = copy_kernel(nbytes, vpt)
        src = rt.storage_buffer(k.param("n4") * 16)
        dst = rt.storage_buffer(k.param("n4") * 16)
        group = rt.bind_group(k, [src, dst], rt.uniform_buffer(rt.pack_params(k)))
        return [(rt.pipeline(k), group, k.grid)], [src, dst]

    # -- per case ------------------------------------------------------------------------------------
    def check(self, prep: Prepared) -> dict:
        c = prep.case
        if c.dtype == "f16" and not rt.has_feature("shader-f16"):
            raise SkipCase("the device has no shader-f16")
        if self.cpu and c.bytes > CPU_MAX_BYTES:
            raise SkipCase(f"CPU adapter: case moves {c.bytes:,} bytes (limit {CPU_MAX_BYTES:,})")
        rf = WgpuGraphRunner(prep.fused, prep.values)
        try:
            ru = WgpuGraphRunner(prep.graph, prep.values)
        except BaseException:
            rf.destroy()
            raise
        self._cur = (rf, ru)
        rf.run()
        ru.run()
        return {"nmse_fused": nmse(rf.out(), prep.ref), "nmse_unfused": nmse(ru.out(), prep.ref),
                "fused_kernel": rf.kernels[0].entry, "n_fused_kernels": len(rf.kernels),
                "n_unfused_kernels": len(ru.kernels)}

    def time(self, prep: Prepared, row: dict) -> None:
        rf, ru = self._cur
        timer = self.timer
        fns = {"fused": rf.dispatches, "unfused": ru.dispatches}
        half = prep.case.bytes // 2
        lim = rt.device().limits.get("max-storage-buffer-binding-size", 1 << 27)
        if -(-half // 16) * 16 <= lim:
            disp, bufs = self._copy_dispatch(half)
            self._extra.extend(bufs)
            fns = {"copy": disp, **fns}
        if prep.case.small and len(rf.kernels) == 1:  # the G6 floor: an empty kernel with the same bindings
            fns["empty_sig"] = [rf.dispatch(empty_like(rf.kernels[0]))]
        for name, disp in fns.items():
            row[f"t_{name}_us"] = timer(disp)
            if prep.case.small:
                row[f"t_{name}_b2b_us"] = timer.b2b(disp)
        ceiling = self.overhead.get("copy_ceiling_gbs")
        if "t_copy_us" in row and ceiling and not prep.case.small:
            row["t_copy_after_us"] = timer(fns["copy"])
            slow = [prep.case.bytes / (row[k] * 1e-6) / 1e9 for k in ("t_copy_us", "t_copy_after_us")]
            drift = abs(row["t_copy_after_us"] / row["t_copy_us"] - 1.0)
            if min(slow) < SLOW_COPY_FRACTION * ceiling:  # the GPU was not at full speed while this case ran
                row["flag"] = (f"slow GPU: this case's copy ran at {slow[0]:.0f} GB/s before and {slow[1]:.0f} after "
                               f"its kernels, < {SLOW_COPY_FRACTION:.0%} of the {ceiling:.0f} GB/s ceiling; rerun "
                               "before using")
            elif drift > COPY_DRIFT:
                row["flag"] = (f"unsteady GPU: this case's copy took {row['t_copy_us']:.1f} us before and "
                               f"{row['t_copy_after_us']:.1f} us after its kernels; rerun before using")
        if prep.case.small:
            row["host_encode_fused_us"] = timer.host_encode(rf.dispatches)
            row["host_encode_unfused_us"] = timer.host_encode(ru.dispatches)
            row["host_submit_fused_us"] = timer.host_submit(rf.dispatches)
        if self.variants and prep.case.large:
            self._sweep(prep, rf, row)

    def _sweep(self, prep: Prepared, rf: WgpuGraphRunner, row: dict) -> None:
        """Check, then time, every WGSL candidate of the case on ``rf``'s buffers (``row["variants"]``).
        The output is cleared to zero on the device (an unwritten row fails the check) and only
        sampled rows are read back (:data:`SWEEP_SAMPLE_ROWS` at the start, middle and end: no
        full-size transfers between timings)."""
        from .norm_variants import wgsl_variants  # noqa: PLC0415

        c = prep.case
        dev = rt.device()
        out = rf.bufs[id(rf.output.root)]
        ceiling = self.overhead.get("copy_ceiling_gbs")
        starts = sorted({0, max(0, c.rows // 2 - SWEEP_SAMPLE_ROWS // 2), max(0, c.rows - SWEEP_SAMPLE_ROWS)})
        ref = prep.ref.reshape(c.rows, c.n)
        res: dict[str, dict] = {}
        for name, make in wgsl_variants(rf.kernels[0].node).items():
            v: dict = {}
            res[name] = v
            try:
                k = make()
                v.update(kernel=k.entry, grid=list(k.grid), block=k.workgroup_size[0])
                disp = [rf.dispatch(k)]
                enc = dev.create_command_encoder()
                enc.clear_buffer(out, 0, out.size)
                encode_pass(enc, disp)
                dev.queue.submit([enc.finish()])
                num = den = 0.0
                for s0 in starts:
                    nr = min(SWEEP_SAMPLE_ROWS, c.rows - s0)
                    raw = dev.queue.read_buffer(out, s0 * c.n * c.esize, nr * c.n * c.esize)
                    got = np.frombuffer(bytes(raw), dtype=c.np_dtype).astype(np.float64)
                    want = ref[s0:s0 + nr].reshape(-1).astype(np.float64)
                    num += float(np.sum((got - want) ** 2))
                    den += float(np.sum(want * want))
                v["nmse_sampled"] = num / (den or 1.0)
                if not within_tol(v["nmse_sampled"], c.dtype):
                    v["error"] = "incorrect output"
                    continue
                v["t_us"] = self.timer(disp)
                if ceiling:
                    v["pct_ceiling"] = 100.0 * c.bytes / (v["t_us"] * 1e-6) / 1e9 / ceiling
                if row.get("t_copy_us"):
                    v["pct_copy"] = 100.0 * row["t_copy_us"] / v["t_us"]
            except Exception as e:  # noqa: BLE001 - one failing candidate must not lose the case
                v["error"] = f"{type(e).__name__}: {e}"
        row["variants"] = res

    def release(self) -> None:
        if self._cur is not None:
            for r in self._cur:
                r.destroy()
            self._cur = None
        for b in self._extra:
            b.destroy()
        self._extra = []
        gc.collect()  # wgpu-py releases staging / query buffers of the case when their objects go


__all__ = [
    "COPY_VPT", "COPY_WGSL", "copy_wgsl", "EMPTY_WGSL", "WgpuGraphRunner",
    "WgpuMeasurer", "WgpuTimer", "copy_kernel", "encode_pass",
]
