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
"""

from __future__ import annotations

import functools
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


def launch(k: Kernel, buffers: Sequence, params=None, stream=None) -> None:
    """Launch ``k`` with ``k.grid`` blocks of ``k.workgroup_size`` threads.

    ``buffers`` are device arrays in ``k.bindings`` order (each the root memory of its tensor);
    ``params`` is :func:`params_value`'s result (computed when omitted; precompute it for repeated
    launches). Raises :class:`BackendError` on a count mismatch.
    """
    if len(buffers) != len(k.bindings):
        raise BackendError(f"kernel {k.entry}: {len(k.bindings)} bindings, got {len(buffers)} buffers")
    fn = module(k)
    if params is None:
        params = params_array(k)
    args = tuple(buffers) + (params,)
    if stream is not None:
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


__all__ = ["available", "launch", "module", "pack_params", "params_array", "params_value", "run_kernel"]
