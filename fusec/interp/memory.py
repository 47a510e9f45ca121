"""Tensor memory as ggml lays it out: one byte buffer per root tensor, strided windows for views.

Every root (non-view) tensor owns a 1-D ``uint8`` buffer of ``span_bytes`` bytes. The numpy array
of any tensor -- root or view -- is a window onto its root's buffer: shape ``ne[::-1]``, byte
strides ``nb[::-1]``, starting ``view_offs`` bytes in (the layout of ``ggml_view_4d``). Writing
through a window (SET_ROWS, CPY) therefore changes every other window onto the same root, as
writing to ``tensor->data`` does in ggml.
"""

from __future__ import annotations

import numpy as np

from ..ir.tensor import Tensor
from .errors import InterpError


class Memory:
    """Root buffers of one evaluation, keyed by root :class:`Tensor` (identity)."""

    def __init__(self) -> None:
        self._buffers: dict[Tensor, np.ndarray] = {}
        # extra outputs of multi-output FUSED nodes: (id(node), k) -> value, until FUSED_OUTPUT stores it
        self.extra: dict[tuple[int, int], np.ndarray] = {}

    def has(self, root: Tensor) -> bool:
        return root in self._buffers

    def allocate(self, root: Tensor) -> None:
        """Give ``root`` a fresh zero-filled buffer of ``root.span_bytes`` bytes."""
        self._buffers[root] = np.zeros(root.span_bytes, dtype=np.uint8)

    def adopt(self, root: Tensor, array: np.ndarray) -> None:
        """Use ``array`` (C-contiguous, ``root``'s dtype and element count) as ``root``'s memory,
        without copying: writes into ``root`` are visible in ``array``."""
        self._buffers[root] = array.reshape(-1).view(np.uint8)

    def window(self, t: Tensor) -> np.ndarray:
        """The array of ``t``: shape ``ne[::-1]``, dtype ``t.dtype``, aliasing its root's buffer.

        Raises :class:`InterpError` when the root has no memory yet (a source evaluated out of
        order) or the window does not fit the buffer.
        """
        buf = self._buffers.get(t.root)
        if buf is None:
            raise InterpError(f"memory of {t.root.name!r} read before it was written", node=repr(t.name))
        try:
            return np.ndarray(shape=t.ne[::-1], dtype=t.dtype.np, buffer=buf, offset=t.view_offs,
                              strides=t.nb[::-1])
        except (ValueError, TypeError) as e:
            raise InterpError(f"window (offset {t.view_offs}, nb {list(t.nb)}) does not fit the "
                              f"{buf.size} bytes of {t.root.name!r}: {e}", node=repr(t.name)) from None

    def store(self, t: Tensor, value: np.ndarray) -> None:
        """Write ``value`` (any shape with ``t.nelements`` elements, any numeric dtype) into the
        window of ``t``, converting to ``t.dtype`` (float -> f16 rounds to nearest even)."""
        win = self.window(t)
        np.copyto(win, np.reshape(value, win.shape), casting="unsafe")


def coerce_value(t: Tensor, value: object, field: str = "values") -> np.ndarray:
    """``value`` as an array of ``t``'s dtype and shape ``ne[::-1]`` (a view of ``value`` when it
    already is one, else a converted copy).

    Raises :class:`InterpError` when the element count differs from ``t.nelements``, the value is
    not numeric, or an i32 tensor is given float values or integers outside the i32 range.
    """
    arr = np.asarray(value)
    if arr.size != t.nelements:
        raise InterpError(f"value has {arr.size} elements {arr.shape}, expected {t.nelements} "
                          f"(ne={list(t.ne)})", node=repr(t.name), field=field)
    dt = t.dtype.np
    if not t.dtype.is_float and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise InterpError(f"i32 tensor given a {arr.dtype} value", node=repr(t.name), field=field)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InterpError(f"value of dtype {arr.dtype} is not numeric", node=repr(t.name), field=field)
    if not t.dtype.is_float and arr.size and np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(dt)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise InterpError(f"value outside the i32 range [{info.min}, {info.max}]", node=repr(t.name),
                              field=field)
    return arr.reshape(t.ne[::-1]).astype(dt, copy=False)


def bind_root(mem: Memory, t: Tensor, value: object, alias: bool, field: str = "values") -> None:
    """Give the root tensor ``t`` its memory from ``value``.

    With ``alias`` and a writeable C-contiguous ``value`` of exactly ``t``'s dtype (``t`` itself
    contiguous), ``value`` becomes ``t``'s memory (no copy; in-place writes show in it). Otherwise
    the value is converted and copied. Raises :class:`InterpError` (see :func:`coerce_value`).
    """
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if (alias and arr.dtype == t.dtype.np and arr.flags.c_contiguous and arr.flags.writeable
            and arr.size == t.nelements and t.is_contiguous):
        mem.adopt(t, arr)
        return
    vals = coerce_value(t, arr, field)
    mem.allocate(t)
    mem.store(t, vals)
