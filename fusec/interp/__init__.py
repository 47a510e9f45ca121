"""The numpy reference interpreter: ggml semantics for every op of :data:`fusec.ir.ops.REGISTRY`.

It is the reference every equivalence test compares against::

    from fusec.interp import interpret, evaluate, eval_node

    outs = interpret(graph, {"x": x, "w": w})        # {output name: array of shape ne[::-1]}
    vals = evaluate(graph, {"x": x, "w": w})         # {Tensor: array} for every node
    y = eval_node(node, [x_value, w_value])          # one op from its source values

Memory follows ggml: every root tensor owns a byte buffer, views are strided windows onto it and
SET_ROWS/CPY -- and FUSED nodes whose decomposition ends in one of them -- write into their
destination in place (a KV-cache array passed in ``values`` is updated across calls). Modules:
:mod:`.memory` (buffers, windows, binding), :mod:`.kernels` and :mod:`.rope` (per-op numpy kernels),
:mod:`.engine` (graph execution).
"""

from .engine import INPLACE_OPS, eval_node, evaluate, interpret
from .errors import InterpError

__all__ = ["INPLACE_OPS", "InterpError", "eval_node", "evaluate", "interpret"]
