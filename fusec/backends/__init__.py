"""Backends: where compiled graphs run. :func:`get_backend` picks one by name.

``numpy`` (reference interpreter, always available), ``wgpu`` (WGSL through wgpu-py) and ``cuda``
(CUDA through CuPy); the last two are imported lazily so that their libraries are optional.
"""

from __future__ import annotations

import importlib

from ..errors import BackendError
from .base import Backend, Executable

BACKENDS: dict[str, tuple[str, str]] = {
    "numpy": ("fusec.backends.numpy_backend", "NumpyBackend"),
    "wgpu": ("fusec.backends.wgpu_backend", "WgpuBackend"),
    "cuda": ("fusec.backends.cuda_backend", "CudaBackend"),
}
"""Backend name -> (module, class)."""

AUTO_ORDER = ("cuda", "wgpu", "numpy")
"""Preference order of ``get_backend("auto")``."""


def backend_class(name: str) -> type[Backend]:
    """The :class:`Backend` subclass registered as ``name`` (imported on demand).

    Raises :class:`BackendError` for an unknown name or a backend whose module cannot be imported.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join([*BACKENDS, 'auto'])}")
    module, cls = BACKENDS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendError(f"backend {name!r} cannot be loaded: {e}") from None


def get_backend(name: str) -> Backend:
    """A new backend instance: ``"numpy"``, ``"wgpu"``, ``"cuda"`` or ``"auto"`` (the first of cuda,
    wgpu, numpy that is available).

    Raises :class:`BackendError` for an unknown name or a backend not available on this machine
    (e.g. ``cuda`` without an NVIDIA GPU), naming the reason.
    """
    if name == "auto":
        for cand in AUTO_ORDER:
            try:
                cls = backend_class(cand)
                if cls.available():
                    return cls()
            except BackendError:
                continue
        raise BackendError("no backend is available")  # unreachable while numpy exists
    cls = backend_class(name)
    if not cls.available():
        raise BackendError(f"backend {name!r} is not available on this machine (no device or driver found)")
    return cls()


__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "Executable", "backend_class", "get_backend"]
