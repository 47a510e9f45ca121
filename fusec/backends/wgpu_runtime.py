"""wgpu-py plumbing shared by the wgpu backend, the kernel tests and the benchmarks.

One process-wide device (the default adapter: lavapipe on a CPU-only Linux machine with
``mesa-vulkan-drivers``, the GPU's Vulkan driver elsewhere), a pipeline cache keyed by kernel
source, parameter packing, and :func:`run_kernel` for single-kernel runs on numpy arrays.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Mapping

import numpy as np

from ..codegen.kernel import Kernel
from ..errors import BackendError

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")


def _wgpu():
    try:
        import wgpu  # noqa: PLC0415
    except ImportError:
        raise BackendError("the wgpu backend needs wgpu-py: pip install 'fusec[wgpu]'") from None
    return wgpu


@functools.cache
def _adapter():
    wgpu = _wgpu()
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu raises plain RuntimeError when no adapter exists
        raise BackendError(f"no WebGPU adapter available ({e}); on Debian: apt-get install mesa-vulkan-drivers") \
            from None
    if adapter is None:
        raise BackendError("no WebGPU adapter available; on Debian: apt-get install mesa-vulkan-drivers")
    return adapter


def available() -> bool:
    """True when wgpu-py imports and an adapter exists."""
    try:
        _adapter()
        return True
    except BackendError:
        return False


@functools.cache
def device():
    """The shared ``GPUDevice`` (with ``shader-f16`` and timestamp queries when the adapter has them)."""
    adapter = _adapter()
    feats = [f for f in ("shader-f16", "timestamp-query", "subgroup") if f in adapter.features]
    lim = adapter.limits
    wanted = {k: lim[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                    "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
                                    "max-compute-workgroup-size-x", "max-storage-buffers-per-shader-stage",
                                    "max-compute-workgroups-per-dimension") if k in lim}
    return adapter.request_device_sync(required_features=feats, required_limits=wanted)


def adapter_info() -> dict:
    return dict(_adapter().info)


def has_feature(name: str) -> bool:
    return name in device().features


@functools.lru_cache(maxsize=512)
def _pipeline_cached(source: str, entry: str):
    dev = device()
    try:
        mod = dev.create_shader_module(code=source)
        return dev.create_compute_pipeline(layout="auto", compute={"module": mod, "entry_point": entry})
    except Exception as e:
        raise BackendError(f"WGSL kernel '{entry}' failed to compile: {e}") from None


def pipeline(k: Kernel):
    """Compiled compute pipeline for ``k`` (cached by source text and entry point)."""
    return _pipeline_cached(k.source, k.entry)


def validate(source: str, entry: str) -> None:
    """Compile WGSL with naga (wgpu's compiler); raises :class:`BackendError` with its diagnostics."""
    _pipeline_cached(source, entry)


_FMT = {"u32": "<I", "i32": "<i", "f32": "<f"}


def pack_params(k: Kernel) -> bytes:
    """The kernel's parameter struct as bytes (4-byte fields in order, padded to 16 bytes)."""
    raw = b"".join(struct.pack(_FMT[t], v) for _, t, v in k.params) or b"\0" * 4
    return raw + b"\0" * (-len(raw) % 16)


def _padded(nbytes: int) -> int:
    return max(16, (nbytes + 3) // 4 * 4)


def storage_buffer(nbytes: int, data: bytes | None = None):
    """A storage buffer of at least ``nbytes`` (rounded up to 4), optionally initialised."""
    wgpu = _wgpu()
    usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
    dev = device()
    buf = dev.create_buffer(size=_padded(nbytes), usage=usage)
    if data is not None and len(data):
        pad = -len(data) % 4
        dev.queue.write_buffer(buf, 0, bytes(data) + b"\0" * pad)
    return buf


def uniform_buffer(data: bytes):
    wgpu = _wgpu()
    dev = device()
    buf = dev.create_buffer(size=len(data), usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST)
    dev.queue.write_buffer(buf, 0, data)
    return buf


def bind_group(k: Kernel, buffers: list, params_buf):
    """Bind group 0: the storage buffers in ``k.bindings`` order (a binding with a ``window`` binds
    that byte range of its buffer), then the parameter uniform.

    Raises :class:`BackendError` naming the kernel, its node and the tensor when a binding exceeds
    the device's ``max-storage-buffer-binding-size`` (lavapipe: 128 MiB) or a window leaves its
    buffer."""
    limit = device().limits.get("max-storage-buffer-binding-size", 1 << 27)
    entries = []
    for i, (bnd, b) in enumerate(zip(k.bindings, buffers, strict=True)):
        off, size = bnd.window if bnd.window is not None else (0, b.size)
        what = (f"kernel {k.entry} (node {k.node.name if k.node is not None else '?'!r}): binding {bnd.name!r} "
                f"({bnd.tensor.name if bnd.tensor is not None else bnd.scratch!r})")
        if off + size > b.size:
            raise BackendError(f"{what}: window {off}+{size} leaves its buffer of {b.size} bytes")
        if size > limit:
            raise BackendError(f"{what}: {size} bytes exceed this device's storage-buffer binding limit of "
                               f"{limit} bytes (max-storage-buffer-binding-size)")
        entries.append({"binding": i, "resource": {"buffer": b, "offset": off, "size": size}})
    entries.append({"binding": len(buffers), "resource": {"buffer": params_buf, "offset": 0,
                                                          "size": params_buf.size}})
    return device().create_bind_group(layout=pipeline(k).get_bind_group_layout(0), entries=entries)


def encode(encoder, k: Kernel, group) -> None:
    """Record one dispatch of ``k`` into ``encoder``."""
    pas = encoder.begin_compute_pass()
    pas.set_pipeline(pipeline(k))
    pas.set_bind_group(0, group)
    pas.dispatch_workgroups(*k.grid)
    pas.end()


def read_buffer(buf, nbytes: int) -> bytes:
    return bytes(device().queue.read_buffer(buf))[:nbytes]


def run_kernel(k: Kernel, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one WGSL kernel on numpy arrays and return the written buffers.

    ``arrays`` maps each binding name to the *root memory* of its tensor: a 1-D (or any-shape)
    array of the binding's dtype covering ``tensor.root.span_bytes``. Returns, for every binding
    with ``write=True``, a flat array of the same dtype and size read back from the device.
    Raises :class:`BackendError` when the kernel does not compile or a binding is missing.
    """
    if k.backend != "wgsl":
        raise BackendError(f"run_kernel runs WGSL kernels, got a {k.backend} kernel")
    bufs = []
    for b in k.bindings:
        if b.name not in arrays:
            raise BackendError(f"kernel {k.entry}: no array for binding {b.name!r}")
        a = np.ascontiguousarray(arrays[b.name], dtype=b.dtype.np)
        bufs.append(storage_buffer(a.nbytes, a.tobytes()))
    group = bind_group(k, bufs, uniform_buffer(pack_params(k)))
    enc = device().create_command_encoder()
    encode(enc, k, group)
    device().queue.submit([enc.finish()])
    out = {}
    for b, buf in zip(k.bindings, bufs, strict=True):
        if b.write:
            n = np.asarray(arrays[b.name]).size
            out[b.name] = np.frombuffer(read_buffer(buf, n * b.dtype.size), dtype=b.dtype.np).copy()
    return out
