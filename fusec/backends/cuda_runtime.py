"""CuPy plumbing for CUDA kernels: module cache, parameter packing, launches, single-kernel runs.

Mirrors :mod:`fusec.backends.wgpu_runtime`. Generated CUDA kernels have the signature
``extern "C" __global__ void <entry>(T* binding0, ..., const Params p)``: storage buffers in
``Kernel.bindings`` order, then the parameter struct *by value* (4-byte fields in ``Kernel.params``
order, as :func:`fusec.backends.wgpu_runtime.pack_params`), so it lives in the kernel's parameter
space (constant bank) and costs no dependent device-memory load before the kernel's first access.
On the host the struct is a numpy structured scalar (:func:`params_value`), which CuPy copies into
the launch's argument buffer.
CuPy is optional (``pip install 'fusec[cuda]'``); every entry point except :func:`available`
raises :class:`~fusec.errors.BackendError` without it.

Programmatic dependent launch (PDL, sm_90+): a kernel whose ``meta["pdl"]`` is true (its source calls
``griddepcontrol.launch_dependents`` and ``griddepcontrol.wait`` before touching anything another
kernel writes) is launched through the driver's ``cuLaunchKernelEx`` with
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``, so it may start while the previous kernel of
the stream drains (under stream capture this becomes a programmatic edge of the CUDA graph).
``FUSEC_CUDA_PDL=0`` turns it off; devices below compute capability 9.0 never use it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from ..codegen.kernel import Kernel
from ..errors import BackendError

_FMT = {"u32": "<I", "i32": "<i", "f32": "<f"}


def _cupy():
    try:
        import cupy  # noqa: PLC0415
    except ImportError:
        raise BackendError("the CUDA backend needs CuPy: pip install 'fusec[cuda]'") from None
    return cupy


@functools.cache
def available() -> bool:
    """True when CuPy imports and at least one CUDA device exists."""
    try:
        cp = _cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # BackendError, CUDARuntimeError (no driver), ...
        return False


@functools.lru_cache(maxsize=512)
def _function(source: str, entry: str, dynamic_shared: int = 0):
    """Compile ``entry`` of ``source``; with ``dynamic_shared`` bytes of dynamic shared memory (static +
    dynamic may pass the 48 KiB default) raise the function's
    ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` to it, once, on the cached function."""
    cp = _cupy()
    try:
        mod = cp.RawModule(code=source, options=("-std=c++17",))
        fn = mod.get_function(entry)
    except Exception as e:
        raise BackendError(f"CUDA kernel '{entry}' failed to compile: {e}") from None
    if dynamic_shared > 0:
        try:
            if hasattr(fn, "max_dynamic_shared_size_bytes"):  # cupy.RawKernel
                fn.max_dynamic_shared_size_bytes = int(dynamic_shared)
            else:  # cupy.cuda.Function
                cp.cuda.driver.funcSetAttribute(
                    fn.ptr, cp.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(dynamic_shared))
        except Exception as e:
            raise BackendError(f"CUDA kernel '{entry}': {dynamic_shared} bytes of shared memory: {e}") from None
    return fn


def module(k: Kernel):
    """The compiled ``cupy.RawKernel`` for ``k`` (cached by source text, entry point and
    ``k.dynamic_shared``, which the function is allowed). Launch it with ``shared_mem=k.dynamic_shared``."""
    if k.backend != "cuda":
        raise BackendError(f"cuda_runtime runs CUDA kernels, got a {k.backend} kernel")
    return _function(k.source, k.entry, k.dynamic_shared)


def pack_params(k: Kernel) -> bytes:
    """The parameter struct as bytes: 4-byte little-endian fields in ``k.params`` order."""
    return b"".join(struct.pack(_FMT[t], v) for _, t, v in k.params) or b"\0" * 4


_NP = {"u32": "<u4", "i32": "<i4", "f32": "<f4"}


def params_value(k: Kernel):
    """The parameter struct as a numpy structured scalar (``numpy.void``; fields named and typed as
    ``k.params``, 4 bytes each, no padding): the by-value kernel argument :func:`launch` passes.
    A kernel without params gets one unused 4-byte field (its struct is never empty in the source)."""
    fields = [(n, _NP[t]) for n, t, _ in k.params] or [("_unused", "<u4")]
    dt = np.dtype(fields)
    return np.frombuffer(pack_params(k), dtype=dt)[0]


def params_array(k: Kernel):
    """The kernel's parameter argument for :func:`launch` / a raw CuPy call: for kernels rendered
    with the old pointer convention (``norm_epilogue.build(..., params_by_pointer=True)``, kept to
    measure the difference) the struct copied to device memory (a ``cupy.ndarray`` of bytes); for
    every other kernel (params by value) :func:`params_value`, so older callers stay correct."""
    if not k.meta.get("params_by_pointer"):
        return params_value(k)
    cp = _cupy()
    return cp.asarray(np.frombuffer(pack_params(k), dtype=np.uint8))


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_ubyte * 4), ("value", ctypes.c_ubyte * 64)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def _launch_kernel_ex():
    """The driver's ``cuLaunchKernelEx`` (ctypes), or None where the driver library lacks it."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return fn


@functools.cache
def pdl_supported() -> bool:
    """True when programmatic dependent launches are used: ``FUSEC_CUDA_PDL`` is not ``0``, the current
    device has compute capability >= 9.0 and the driver exports ``cuLaunchKernelEx``."""
    if os.environ.get("FUSEC_CUDA_PDL", "1") == "0" or not available():
        return False
    cp = _cupy()
    return int(cp.cuda.Device().compute_capability) >= 90 and _launch_kernel_ex() is not None


def uses_pdl(k: Kernel) -> bool:
    """Whether :func:`launch` (and the CUDA backend) launch ``k`` with programmatic stream serialization."""
    return bool(k.meta.get("pdl")) and pdl_supported()


def launch_pdl(fn, grid, block, args: Sequence, shared_mem: int = 0, stream=None) -> None:
    """Launch the compiled kernel ``fn`` (a ``cupy.RawKernel``) with programmatic stream serialization on
    ``stream`` (a ``cupy.cuda.Stream``; default the current one). ``args``: device arrays (passed as
    their pointers) and numpy scalars / structured scalars (passed by value). Raises
    :class:`BackendError` when the driver refuses the launch."""
    cp = _cupy()
    stream = stream or cp.cuda.get_current_stream()
    holders = []
    for a in args:
        if isinstance(a, np.generic):
            holders.append(ctypes.create_string_buffer(a.tobytes(), max(1, a.nbytes)))
        else:
            holders.append(ctypes.c_uint64(a.data.ptr))
    ptrs = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1  # programmaticStreamSerializationAllowed (an int at the union's start)
    cfg = _LaunchConfig(*grid, *block, int(shared_mem), ctypes.c_void_p(stream.ptr), ctypes.pointer(attr), 1)
    fptr = getattr(fn, "kernel", fn).ptr
    rc = _launch_kernel_ex()(ctypes.byref(cfg), ctypes.c_void_p(fptr), ptrs, None)
    if rc != 0:
        raise BackendError(f"cuLaunchKernelEx (programmatic dependent launch) failed: CUresult {rc}")


def launch(k: Kernel, buffers: Sequence, params=None, stream=None, *, pdl: bool | None = None) -> None:
    """Launch ``k`` with ``k.grid`` blocks of ``k.workgroup_size`` threads.

    ``buffers`` are device arrays in ``k.bindings`` order (each the root memory of its tensor);
    ``params`` is :func:`params_value`'s result (computed when omitted; precompute it for repeated
    launches). ``pdl``: programmatic dependent launch (default :func:`uses_pdl`; ``True`` for a kernel
    without ``meta["pdl"]`` is refused). Raises :class:`BackendError` on a count mismatch.
    """
    if len(buffers) != len(k.bindings):
        raise BackendError(f"kernel {k.entry}: {len(k.bindings)} bindings, got {len(buffers)} buffers")
    if pdl and not k.meta.get("pdl"):
        raise BackendError(f"kernel {k.entry} does not wait for the previous kernel (no meta['pdl']): "
                           "a programmatic dependent launch of it would race")
    fn = module(k)
    if params is None:
        params = params_array(k)
    args = tuple(buffers) + (params,)
    if uses_pdl(k) if pdl is None else pdl:
        launch_pdl(fn, k.grid, k.workgroup_size, args, k.dynamic_shared, stream)
    elif stream is not None:
        with stream:
            fn(k.grid, k.workgroup_size, args, shared_mem=k.dynamic_shared)
    else:
        fn(k.grid, k.workgroup_size, args, shared_mem=k.dynamic_shared)


def run_kernel(k: Kernel, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one CUDA kernel on numpy arrays and return the written buffers.

    ``arrays`` maps each binding name to the root memory of its tensor (any shape, converted to the
    binding's dtype and flattened). Returns, for every binding with ``write=True``, a flat numpy
    array of the same dtype and size copied back from the device. Raises :class:`BackendError`
    when CuPy is missing, the kernel does not compile, or a binding has no array.
    """
    cp = _cupy()
    bufs = []
    for b in k.bindings:
        if b.name not in arrays:
            raise BackendError(f"kernel {k.entry}: no array for binding {b.name!r}")
        a = np.ascontiguousarray(arrays[b.name], dtype=b.dtype.np).reshape(-1)
        bufs.append(cp.asarray(a))
    launch(k, bufs)
    cp.cuda.get_current_stream().synchronize()
    return {b.name: cp.asnumpy(buf) for b, buf in zip(k.bindings, bufs, strict=True) if b.write}


__all__ = ["available", "launch", "launch_pdl", "module", "pack_params", "params_array", "params_value",
           "pdl_supported", "run_kernel", "uses_pdl"]
