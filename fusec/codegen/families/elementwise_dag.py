"""``elementwise_dag`` family: any FUSED node whose decomposition is a DAG of element-wise ops.

The decomposition (``node.decomposition``, built by the rewriter from a pattern with
``kernel elementwise_dag``, e.g. ``patterns/elementwise.fuse``) may hold:

* unary ops ``SCALE`` (``x*s + b``, ggml_scale / ggml_scale_bias), ``SILU``, ``GELU`` (tanh
  approximation), ``TANH``, ``SIGMOID``, ``SQR``, ``SQRT``, ``RSQRT`` (ggml unary ops; RSQRT is a fusec
  extension), and
* binary ops ``ADD``, ``SUB``, ``MUL``, ``DIV`` (ggml_add / sub / mul / div),

whose leaves are the FUSED node's inputs (placeholders with ``params["fused_input"]``). Every value
(input or intermediate) must broadcast to the output's ``ne`` with ggml's rule (``ggml_can_repeat``,
indexed ``i % ne``), so computing the whole DAG at each output index gives the unfused result.

The kernel is the map skeleton of :mod:`fusec.codegen.families.elementwise` (one thread per output
element, or 4 per thread when rows are aligned; broadcast operands; folded 2-D grid): each input is
read once into an f32 register, then a helper ``dag_value`` evaluates the ops in topological order,
one f32 register per intermediate (a DAG: a value used twice is computed once), and the result is
stored as the output dtype. SCALE's ``s``/``b`` are runtime parameters ``s<j>``/``b<j>``; the source
depends only on dtypes, the DAG's structure and the vector width.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...errors import CodegenError
from ...ir.shape import can_repeat
from ...ir.tensor import Tensor
from .. import family
from ..epilogue import EPILOGUE_OPS, fused_input_index
from ..kernel import Binding, Kernel
from .elementwise import Operand, Param, emit_map

UNARY_ACT = {"SILU": "silu", "GELU": "gelu", "TANH": "tanh", "SIGMOID": "sigmoid", "SQR": "sqr", "SQRT": "sqrt",
             "RSQRT": "rsqrt"}
"""Activation ops -> ``templates/common/elementwise.j2::act_fn`` helper names (SCALE is separate)."""
UNARY_OPS = frozenset({"SCALE", *UNARY_ACT})
BINARY_OPS = EPILOGUE_OPS  # ADD/SUB/MUL/DIV -> C operator


@dataclass(frozen=True)
class DagStep:
    """``r<index> = op(args)``; ``args`` are register names (``x<k>`` inputs, ``r<j>`` earlier steps);
    ``scale`` is the SCALE parameter slot (``s<scale>``, ``b<scale>``) or -1."""

    op: str
    args: tuple[str, ...]
    scale: int = -1


@dataclass(frozen=True)
class DagPlan:
    """What the kernel computes: registers ``x<k>`` = ``src[inputs[k]]`` (broadcast when
    ``bcast[k]``), then ``steps``; the result is the last step's register."""

    inputs: tuple[int, ...]
    bcast: tuple[bool, ...]
    steps: tuple[DagStep, ...]
    scales: tuple[tuple[float, float], ...]  # (s, b) of each SCALE, in step order

    @property
    def acts(self) -> list[str]:
        """Activation helpers needed, in first-use order."""
        return list(dict.fromkeys(UNARY_ACT[s.op] for s in self.steps if s.op in UNARY_ACT))

    @property
    def tag(self) -> str:
        """Short name: the op names in order plus a hash of the wiring (entry names stay distinct)."""
        wiring = repr((self.inputs, self.bcast, [(s.op, s.args) for s in self.steps]))
        ops = "_".join(s.op.lower() for s in self.steps)
        if len(ops) > 40:
            ops = f"{self.steps[0].op.lower()}_{len(self.steps)}ops"
        return f"dag_{ops}_{hashlib.sha1(wiring.encode()).hexdigest()[:6]}"


def _fail(node: Tensor, msg: str) -> CodegenError:
    return CodegenError(f"node {node.name!r}: elementwise_dag cannot render it: {msg}")


def plan(node: Tensor) -> DagPlan:
    """The :class:`DagPlan` of a FUSED node whose decomposition is an element-wise DAG.

    Raises :class:`CodegenError` naming the node when it is not a FUSED node with a decomposition
    of one output, an op is not one of SCALE/SILU/GELU/TANH/SIGMOID/SQR/SQRT/RSQRT/ADD/SUB/MUL/DIV, a
    leaf is not a fused input, a value does not broadcast (``ggml_can_repeat``) to the output's
    ``ne``, or the output's ``ne``/dtype differ from the node's.
    """
    if node.op != "FUSED" or node.decomposition is None:
        raise _fail(node, f"op {node.op} is not a FUSED node with a decomposition")
    sub = node.decomposition
    if len(sub.outputs) != 1:
        raise _fail(node, f"the decomposition has {len(sub.outputs)} outputs, not 1")
    out = sub.outputs[0]
    if tuple(out.ne) != tuple(node.ne) or out.dtype != node.dtype:
        raise _fail(node, "the decomposition's output differs from the node in ne or dtype")
    regs: dict[int, str] = {}
    inputs: list[int] = []
    bcast: list[bool] = []
    steps: list[DagStep] = []
    scales: list[tuple[float, float]] = []

    def reg(t: Tensor | None, user: Tensor) -> str:
        if t is None:
            raise _fail(node, f"{user.op} ({user.name!r}) has an absent source")
        if id(t) in regs:
            return regs[id(t)]
        i = fused_input_index(t)
        if i is None:
            raise _fail(node, f"{user.op} ({user.name!r}) reads {t.name!r} ({t.op}), neither a fused input "
                              "nor an earlier element-wise op")
        if not can_repeat(t.ne, out.ne):
            raise _fail(node, f"input {t.name!r} ne={list(t.ne)} does not broadcast to the output "
                              f"ne={list(out.ne)}")
        regs[id(t)] = f"x{len(inputs)}"
        inputs.append(i)
        bcast.append(tuple(t.ne) != tuple(out.ne))
        return regs[id(t)]

    for t in sub.ops:
        if t.op in UNARY_OPS:
            want = 1
        elif t.op in BINARY_OPS:
            want = 2
        else:
            raise _fail(node, f"{t.op} ({t.name!r}) is not an element-wise op "
                              f"({'/'.join(sorted(UNARY_OPS))}/{'/'.join(BINARY_OPS)})")
        srcs = [s for s in t.src]
        while len(srcs) > want and srcs[-1] is None:
            srcs.pop()
        if len(srcs) != want:
            raise _fail(node, f"{t.op} ({t.name!r}) has {len(srcs)} sources, not {want}")
        if not can_repeat(t.ne, out.ne):
            raise _fail(node, f"{t.op} ({t.name!r}) ne={list(t.ne)} does not broadcast to the output "
                              f"ne={list(out.ne)}")
        args = tuple(reg(s, t) for s in srcs)
        scale = -1
        if t.op == "SCALE":
            scale = len(scales)
            scales.append((float(t.params.get("s", 1.0)), float(t.params.get("b", 0.0))))
        steps.append(DagStep(t.op, args, scale))
        regs[id(t)] = f"r{len(steps) - 1}"
    if not steps or regs.get(id(out)) != f"r{len(steps) - 1}":
        raise _fail(node, "the decomposition's output is not its last element-wise op")
    return DagPlan(tuple(inputs), tuple(bcast), tuple(steps), tuple(scales))


def _expr(step: DagStep) -> str:
    if step.op == "SCALE":
        return f"{step.args[0]} * s{step.scale} + b{step.scale}"
    if step.op in UNARY_ACT:
        return f"op_{UNARY_ACT[step.op]}({step.args[0]})"
    return f"{step.args[0]} {BINARY_OPS[step.op]} {step.args[1]}"


@family("elementwise_dag")
def emit_elementwise_dag(node: Tensor, backend: str) -> Kernel:
    """Kernel for a FUSED element-wise DAG (see the module docstring; ggml semantics of each op as
    in ``ggml.c``: ggml_scale_bias, ggml_silu/gelu/tanh/sigmoid/sqr/sqrt, ggml_add/sub/mul/div).

    Shapes: the output ``ne`` (ggml order) is the node's; each used source ``src[i]`` has an ``ne``
    dividing it per dimension (``ggml_can_repeat``) and any strides (whole elements). Dtypes: each
    source f32 or f16, the output f32 or f16 (the node's); arithmetic in f32 registers.

    Bindings: ``src<i>`` for each used source (ascending order of first use in the DAG), then ``dst``
    (written, contiguous). Parameters: ``n``, ``dst_ne0..3``, each operand's layout, then ``s<j>``,
    ``b<j>`` of each SCALE. Raises :class:`CodegenError` naming the node for anything :func:`plan`
    refuses, an unknown backend or a destination that is a view.
    """
    p = plan(node)
    srcs = [Binding(f"src{i}", node.src[i], node.src[i].dtype) for i in p.inputs]
    operands = [Operand.of(f"src{i}", f"src{i}", node.src[i], bcast=b) for i, b in zip(p.inputs, p.bcast, strict=True)]
    extra: list[Param] = []
    for j, (s, b) in enumerate(p.scales):
        extra += [(f"s{j}", "f32", s), (f"b{j}", "f32", b)]
    return emit_map(node, backend, family="elementwise_dag", op=p.tag, srcs=srcs, operands=operands,
                    extra_params=extra, acts=p.acts, n_scales=len(p.scales),
                    steps=[{"reg": f"r{k}", "expr": _expr(s)} for k, s in enumerate(p.steps)],
                    result=f"r{len(p.steps) - 1}")
