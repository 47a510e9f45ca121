"""IR: tensors, graph, op registry, builder, JSON (de)serialization."""

from .builder import GraphBuilder
from .dtypes import F16, F32, I32, DType
from .graph import Graph, topo_sort
from .ops import REGISTRY, VIEW_OPS, OpDef, get_op
from .serialize import dumps, graph_from_dict, graph_to_dict, loads
from .shape import can_repeat, contiguous_nb, is_contiguous, is_contiguous_rows, nelements, nrows
from .tensor import Tensor

__all__ = [
    "F16", "F32", "I32", "DType", "Graph", "GraphBuilder", "REGISTRY", "VIEW_OPS", "OpDef", "Tensor",
    "can_repeat", "contiguous_nb", "dumps", "get_op", "graph_from_dict", "graph_to_dict", "is_contiguous",
    "is_contiguous_rows", "loads", "nelements", "nrows", "topo_sort",
]
