"""Element-wise epilogue chains of fused kernels, shared by the families that end in one
(``norm_epilogue``: RMS_NORM/NORM then the chain; ``gemv_epilogue``: MUL_MAT(s) then the chain).

An epilogue is a sequence of binary ops (MUL, ADD, SUB, DIV), each combining the running value with
one fused input broadcast to it with ggml's rule (``ggml_can_repeat``: ``i % ne``) and keeping its
shape; the commutative MUL/ADD may have the running value on either side, SUB/DIV only as ``src[0]``
(as ggml_sub / ggml_div).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import CodegenError
from ..ir.shape import can_repeat
from ..ir.tensor import Tensor

EPILOGUE_OPS = {"MUL": "*", "ADD": "+", "SUB": "-", "DIV": "/"}
COMMUTATIVE = frozenset({"MUL", "ADD"})


def fused_input_index(t: Tensor | None) -> int | None:
    """``src`` index of the FUSED node that decomposition placeholder ``t`` stands for (else None)."""
    if t is not None and t.is_leaf and "fused_input" in t.params:
        return int(t.params["fused_input"])
    return None


def walk_epilogue(ops: Sequence[Tensor], running: Tensor,
                  fail: Callable[[str], CodegenError]) -> tuple[list[tuple[str, Tensor]], Tensor]:
    """Walk the decomposition ops ``ops`` that follow ``running`` (the kernel's main result).

    Returns the steps ``[(op, operand placeholder)]`` in order and the last value of the chain.
    Raises ``fail(message)`` (a :class:`CodegenError` naming the node) for an op that is not an
    epilogue op, an operand that is not a fused input, SUB/DIV with the running value as ``src[1]``,
    or an operand that does not broadcast to the running value's shape.
    """
    steps: list[tuple[str, Tensor]] = []
    for t in ops:
        if t.op not in EPILOGUE_OPS:
            raise fail(f"{t.op} ({t.name!r}) is not one of {'/'.join(EPILOGUE_OPS)}")
        a, b = t.src
        if a is running and b is not running:
            other = b
        elif b is running and a is not running and t.op in COMMUTATIVE:
            other = a
        else:
            raise fail(f"{t.op} ({t.name!r}) must combine the previous value with one fused input "
                       "(as src[0] for SUB/DIV)")
        if fused_input_index(other) is None:
            raise fail(f"{t.op} ({t.name!r}) operand {other!r} is not a fused input")
        if tuple(t.ne) != tuple(running.ne) or not can_repeat(other.ne, running.ne):
            raise fail(f"{t.op} ({t.name!r}) operand ne={list(other.ne)} does not broadcast to the "
                       f"result ne={list(running.ne)}")
        steps.append((t.op, other))
        running = t
    return steps, running
