"""The numpy reference backend: runs graphs with :func:`fusec.interp.interpret` on the host."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import BackendError
from ..ir.graph import Graph
from ..ir.tensor import Tensor
from .base import Backend, Executable


class NumpyBackend(Backend):
    """Host backend over the reference interpreter (ggml semantics, f32 arithmetic).

    Persistent leaves are stored as C-contiguous numpy arrays of their own dtype; the interpreter
    uses them as the leaves' memory, so SET_ROWS into a KV cache updates the stored array in place.
    """

    name = "numpy"

    def __init__(self) -> None:
        self._store: dict[str, np.ndarray] = {}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy ``weights`` (name -> float32/float16/int32 array) into the store; see :class:`Backend`."""
        for name, arr in weights.items():
            a = np.asarray(arr)
            if a.dtype not in (np.float32, np.float16, np.int32):
                raise BackendError(f"numpy backend: weight {name!r} has unsupported dtype {a.dtype} "
                                   "(expected float32, float16 or int32)")
            self._store[name] = np.array(a, copy=True, order="C")

    def read_weight(self, name: str) -> np.ndarray:
        """A copy of the stored leaf ``name``; raises :class:`BackendError` when absent."""
        try:
            return self._store[name].copy()
        except KeyError:
            raise BackendError(f"numpy backend: no weight named {name!r} is stored") from None

    def compile(self, graph: Graph) -> NumpyExecutable:
        """Nothing to build: returns an executable that interprets ``graph``."""
        return NumpyExecutable(self, graph)

    def _persistent(self, leaf: Tensor) -> np.ndarray:
        """The stored array of a ``weight`` leaf, viewed with shape ``ne[::-1]`` (shares memory)."""
        arr = self._store.get(leaf.name)
        if arr is None:
            raise BackendError(f"numpy backend: weight {leaf.name!r} (ne={list(leaf.ne)}, {leaf.dtype}) "
                               "was never set with set_weights")
        if arr.dtype != leaf.dtype.np or arr.size != leaf.nelements:
            raise BackendError(f"numpy backend: stored weight {leaf.name!r} is {arr.dtype}{list(arr.shape)}, "
                               f"the graph needs {leaf.dtype} ne={list(leaf.ne)}")
        return arr.reshape(leaf.ne[::-1])


class NumpyExecutable(Executable):
    """A graph bound to a :class:`NumpyBackend`; each :meth:`run` interprets it."""

    def __init__(self, backend: NumpyBackend, graph: Graph) -> None:
        self.backend = backend
        self.graph = graph
        self._weights = [t for t in graph.leaves if "weight" in t.flags]
        self._inputs = [t for t in graph.leaves if "weight" not in t.flags]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Interpret the graph; see :meth:`Executable.run`. Raises :class:`BackendError` for a
        missing input or weight; the interpreter's ``InterpError`` for bad values."""
        from ..interp import interpret  # lazy: the interpreter is only needed to run

        values: dict[str, np.ndarray] = {t.name: self.backend._persistent(t) for t in self._weights}
        missing = [t.name for t in self._inputs if t.name not in inputs]
        if missing:
            raise BackendError(f"numpy backend: no value for input(s) {', '.join(missing)}")
        values.update({t.name: inputs[t.name] for t in self._inputs})
        return interpret(self.graph, values)
