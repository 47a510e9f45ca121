"""Shape and layout helpers in ggml's vocabulary.

All shapes here are ggml ``ne`` tuples: 4 entries, *innermost first* (``ne[0]`` is the row length).
Strides are ggml ``nb`` tuples: 4 entries, in *bytes*, same axis order. numpy arrays of a tensor use
the reverse order, ``shape == ne[::-1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_DIMS = 4

Ne = tuple[int, int, int, int]
Nb = tuple[int, int, int, int]


def norm_ne(ne: Sequence[int]) -> Ne:
    """Pad ``ne`` with 1s to 4 entries; raises ``ValueError`` for more than 4 or non-positive dims."""
    ne = [int(v) for v in ne]
    if not 1 <= len(ne) <= MAX_DIMS:
        raise ValueError(f"expected 1..4 dims, got {len(ne)}")
    if any(v < 1 for v in ne):
        raise ValueError(f"dims must be >= 1, got {ne}")
    return tuple(ne + [1] * (MAX_DIMS - len(ne)))  # type: ignore[return-value]


def contiguous_nb(ne: Sequence[int], type_size: int) -> Nb:
    """Byte strides of a contiguous row-major tensor (as ``ggml_new_tensor_impl``)."""
    nb = [type_size]
    for i in range(1, MAX_DIMS):
        nb.append(nb[-1] * ne[i - 1])
    return tuple(nb)  # type: ignore[return-value]


def nelements(ne: Sequence[int]) -> int:
    n = 1
    for v in ne:
        n *= v
    return n


def nrows(ne: Sequence[int]) -> int:
    """Number of rows, ``ne[1]*ne[2]*ne[3]`` (as ``ggml_nrows``)."""
    return ne[1] * ne[2] * ne[3]


def span_bytes(ne: Sequence[int], nb: Sequence[int], type_size: int) -> int:
    """Bytes from the first to one past the last element addressed by ``ne``/``nb``."""
    return sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + type_size


def can_repeat(t0_ne: Sequence[int], t1_ne: Sequence[int]) -> bool:
    """True when a tensor of shape ``t0_ne`` can be broadcast to ``t1_ne`` (as ``ggml_can_repeat``:
    every ``t1.ne[i]`` is a multiple of ``t0.ne[i]``)."""
    return all(b % a == 0 for a, b in zip(t0_ne, t1_ne, strict=True))


def is_contiguous(ne: Sequence[int], nb: Sequence[int], type_size: int) -> bool:
    """Row-major without gaps, ignoring dims of size 1 (as ``ggml_is_contiguous``)."""
    nxt = type_size
    for i in range(MAX_DIMS):
        if ne[i] != 1:
            if nb[i] != nxt:
                return False
            nxt *= ne[i]
    return True


def is_contiguous_rows(ne: Sequence[int], nb: Sequence[int], type_size: int) -> bool:
    """Elements of a row are adjacent (as ``ggml_is_contiguous_rows``)."""
    return ne[0] == 1 or nb[0] == type_size
