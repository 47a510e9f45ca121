"""The interface every fusec backend implements (numpy reference, wgpu, cuda).

A backend holds *persistent* leaves by name -- the model weights and the KV caches -- in its own
(device) memory; :meth:`Backend.compile` turns a graph (after fusion) into an :class:`Executable`
whose :meth:`Executable.run` binds the per-step inputs by leaf name and returns the graph outputs.
SET_ROWS / CPY nodes (and FUSED nodes ending in one, e.g. ROPE -> VIEW -> SET_ROWS) whose
destination is a persistent leaf update it in place, so the KV cache
written by one run is read by the next, as ``llama_kv_cache`` buffers are in llama.cpp.

Arrays crossing the interface use the IR's convention: numpy shape ``ne[::-1]`` (any shape with
the right element count is accepted on input), dtype of the leaf (float32, float16 or int32).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import numpy as np

from ..ir.graph import Graph


class Backend(abc.ABC):
    """A device that stores persistent tensors and runs compiled graphs.

    Attributes:
        name: registry name (``"numpy"``, ``"wgpu"``, ``"cuda"``).
    """

    name: str = "?"

    @classmethod
    def available(cls) -> bool:
        """Whether this backend can run on this machine (device and libraries present)."""
        return True

    @abc.abstractmethod
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Store (or replace) persistent leaves by name: weights *and* KV caches.

        Arrays are copied into backend memory; later SET_ROWS writes into a stored leaf persist
        across runs. Raises :class:`fusec.errors.BackendError` for an unsupported dtype.
        """

    @abc.abstractmethod
    def read_weight(self, name: str) -> np.ndarray:
        """A host copy of the persistent leaf ``name`` (numpy shape as stored, its dtype).

        Raises :class:`fusec.errors.BackendError` when no such leaf is stored.
        """

    @abc.abstractmethod
    def compile(self, graph: Graph) -> Executable:
        """Plan memory and build kernels for ``graph`` (typically after fusion).

        Every leaf flagged ``weight`` must be stored with :meth:`set_weights` (with the leaf's
        dtype and element count) before :meth:`Executable.run`. Raises
        :class:`fusec.errors.BackendError` for an op or fused kernel the backend cannot run.
        """


class Executable(abc.ABC):
    """A graph compiled for one backend; run it any number of times.

    Attributes:
        graph: the compiled graph.
    """

    graph: Graph

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once with the non-persistent leaves bound by name (``inp_tokens``, ``kq_mask``...).

        Returns the graph outputs by ``Tensor.name``: fresh host arrays of numpy shape
        ``ne[::-1]`` (4-D) and the output's dtype. Persistent leaves written in place (KV caches)
        keep the new values for later runs. Raises :class:`fusec.errors.BackendError` for a
        missing input or a persistent leaf that was never stored.
        """
