"""IR tensors: one node of a computation graph, as a ``ggml_tensor`` is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .dtypes import DType
from .shape import Nb, Ne, is_contiguous, is_contiguous_rows, nelements, span_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .graph import Graph

FLAGS = frozenset({"input", "output", "weight"})


@dataclass(eq=False)
class Tensor:
    """A node of the graph: a leaf (``op == "NONE"``) or the result of ``op`` applied to ``src``.

    Attributes:
        id: unique integer within its graph (JSON key; not part of semantics).
        op: ggml op name (``"RMS_NORM"``, ``"MUL"``, ...; ``"NONE"`` for leaves, ``"FUSED"`` for a
            rewritten subgraph).
        src: sources in ggml order (``src[0]``, ``src[1]``, ...); ``None`` for an absent optional.
        params: op parameters (JSON scalars/lists), e.g. ``{"eps": 1e-6}`` for RMS_NORM.
        dtype: element type of the result.
        ne: shape, ggml order (4 entries, innermost first).
        nb: byte strides, ggml order.
        name: display name (llama.cpp names such as ``attn_norm-0``).
        flags: subset of ``{"input", "output", "weight"}``.
        view_src: for views (VIEW, RESHAPE, PERMUTE, TRANSPOSE, SET_ROWS, CPY), the non-view tensor
            whose memory this one aliases; ``None`` otherwise.
        view_offs: byte offset into ``view_src``'s memory.
        decomposition: for ``FUSED`` nodes, the matched subgraph (its leaves are placeholders bound
            to ``src`` in order; its single output is this node's value).
    """

    id: int
    op: str
    src: tuple[Tensor | None, ...]
    params: dict[str, Any]
    dtype: DType
    ne: Ne
    nb: Nb
    name: str
    flags: set[str] = field(default_factory=set)
    view_src: Tensor | None = None
    view_offs: int = 0
    decomposition: Graph | None = None

    # -- layout -------------------------------------------------------------------------------
    @property
    def is_view(self) -> bool:
        return self.view_src is not None

    @property
    def nelements(self) -> int:
        return nelements(self.ne)

    @property
    def nbytes(self) -> int:
        """Bytes of the elements themselves (``nelements * type_size``)."""
        return self.nelements * self.dtype.size

    @property
    def span_bytes(self) -> int:
        """Bytes addressed from the first element to one past the last."""
        return span_bytes(self.ne, self.nb, self.dtype.size)

    @property
    def is_contiguous(self) -> bool:
        return is_contiguous(self.ne, self.nb, self.dtype.size)

    @property
    def is_contiguous_rows(self) -> bool:
        return is_contiguous_rows(self.ne, self.nb, self.dtype.size)

    @property
    def root(self) -> Tensor:
        """The tensor owning the memory (itself unless a view)."""
        return self.view_src if self.view_src is not None else self

    @property
    def is_leaf(self) -> bool:
        return self.op == "NONE"

    def __repr__(self) -> str:  # short and stable
        ne = "x".join(str(v) for v in self.ne)
        return f"<{self.op} {self.name!r} {self.dtype} [{ne}]>"
