"""Element types of the IR (a subset of ggml's ``ggml_type``)."""

from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    """Element type. Values are the names used in JSON graphs and patterns."""

    F32 = "f32"
    F16 = "f16"
    I32 = "i32"

    @property
    def size(self) -> int:
        """Bytes per element (looked up by the value string: hashing an enum member runs Python code,
        and codegen asks for sizes thousands of times a graph)."""
        return _SIZES_BY_VALUE[self._value_]

    @property
    def np(self) -> np.dtype:
        """The numpy dtype with the same bit layout."""
        return np.dtype(_NP[self])

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16)

    @classmethod
    def parse(cls, s: str) -> "DType":
        """``DType.parse('f16')``; raises ``ValueError`` naming the accepted names."""
        try:
            return cls(str(s).lower())
        except ValueError:
            raise ValueError(f"unknown dtype {s!r} (expected one of {', '.join(d.value for d in cls)})") from None

    def __str__(self) -> str:
        return self.value


_SIZES = {DType.F32: 4, DType.F16: 2, DType.I32: 4}
_SIZES_BY_VALUE = {d.value: n for d, n in _SIZES.items()}
_NP = {DType.F32: np.float32, DType.F16: np.float16, DType.I32: np.int32}

F32, F16, I32 = DType.F32, DType.F16, DType.I32
