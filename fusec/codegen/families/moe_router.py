"""``moe_router`` family: the fused Mixture-of-Experts router (patterns/moe.fuse), one workgroup per
token: softmax over the experts, top-k by a bitonic sort in workgroup memory, gather of the k
probabilities and, optionally, their renormalization. Two outputs: the weights and the expert ids."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import CodegenError
from ...ir.tensor import Tensor
from .. import family
from ..env import TYPE_NAMES, render
from ..kernel import Binding, Kernel
from ..layout import layout_params
from .argsort import MAX_COLS, MAX_WG, padded_cols
from .soft_max import row_grid

TEMPLATES = {"wgsl": "wgsl/moe_router.wgsl.j2", "cuda": "cuda/moe_router.cu.j2", "msl": "msl/moe_router.metal.j2"}


@dataclass(frozen=True)
class RouterPlan:
    """What the decomposition computes: softmax ``scale``, the ids output ``ids`` (the VIEW of the
    descending ARGSORT, a decomposition output), ``k`` experts used, and the CLAMP bounds of the
    renormalization (``norm`` False: the gathered probabilities are the weights)."""

    scale: float
    ids: Tensor
    k: int
    norm: bool
    lo: float
    hi: float


def _fail(node: Tensor, why: str) -> CodegenError:
    return CodegenError(f"node {node.name!r}: moe_router family cannot render this decomposition: {why}")


def plan(node: Tensor) -> RouterPlan:
    """Read the router chain from ``node``'s decomposition (see patterns/moe.fuse); raises
    :class:`CodegenError` naming the node for any other structure."""
    sub = node.decomposition
    if node.op != "FUSED" or sub is None:
        raise CodegenError(f"node {node.name!r}: moe_router family renders FUSED router nodes, not {node.op}")
    ops = {}
    for t in sub.nodes:
        if not t.is_leaf:
            if t.op in ops and t.op != "RESHAPE":
                raise _fail(node, f"two {t.op} nodes")
            ops.setdefault(t.op, t)
    need = {"SOFT_MAX", "ARGSORT", "VIEW", "RESHAPE", "GET_ROWS"}
    norm = "DIV" in ops
    if norm:
        need |= {"SUM_ROWS", "CLAMP", "DIV"}
    if set(ops) != need:
        raise _fail(node, f"ops {sorted(ops)}, expected {sorted(need)}")
    sm, srt, view, gr = ops["SOFT_MAX"], ops["ARGSORT"], ops["VIEW"], ops["GET_ROWS"]
    x = sm.src[0]
    if len(sm.src) > 1 and sm.src[1] is not None:
        raise _fail(node, "SOFT_MAX with a mask")
    if not (x.is_leaf and x.params.get("fused_input") == 0 and x.dtype.value == "f32" and x.ne[2] == x.ne[3] == 1):
        raise _fail(node, "the logits must be the f32 2-D fused input 0")
    if srt.src[0] is not sm or int(srt.params["order"]) != 1 or view.src[0] is not srt or view.view_offs != 0:
        raise _fail(node, "the ids must be the first columns of a descending ARGSORT of the softmax")
    if view.nb[:2] != srt.nb[:2] or view.ne[1:] != srt.ne[1:] or view.ne[0] > srt.ne[0]:
        raise _fail(node, "the ids view must keep the sort's rows and strides")
    if gr.src[1] is not view or gr.src[0].op != "RESHAPE" or gr.src[0].src[0] is not sm or gr.src[0].ne[0] != 1:
        raise _fail(node, "GET_ROWS must gather the reshaped softmax [1, n_expert, n_tokens] by the ids")
    if x.ne[0] > MAX_COLS:
        raise _fail(node, f"{x.ne[0]} experts exceed the {MAX_COLS} the workgroup-memory sort holds")
    if len(sub.outputs) != 2 or sub.outputs[1] is not view:
        raise _fail(node, "the outputs must be the weights and the ids view")
    root = sub.outputs[0]
    lo = hi = 0.0
    if norm:
        div, clamp, su = ops["DIV"], ops["CLAMP"], ops["SUM_ROWS"]
        w2 = div.src[0]
        if (root is not div or w2.op != "RESHAPE" or w2.src[0] is not gr or div.src[1] is not clamp
                or clamp.src[0] is not su or su.src[0] is not w2 or w2.ne[0] != view.ne[0]):
            raise _fail(node, "the renormalization must be DIV(w, CLAMP(SUM_ROWS(w))) over the k weights")
        lo, hi = float(clamp.params["min"]), float(clamp.params["max"])
    elif root is not gr:
        raise _fail(node, "the weights output must be the GET_ROWS result")
    return RouterPlan(float(sm.params.get("scale", 1.0)), view, int(view.ne[0]), norm, lo, hi)


@family("moe_router")
def emit_moe_router(node: Tensor, backend: str) -> Kernel:
    """Kernel of a fused router (patterns ``moe_router``, ``moe_router_norm``).

    Per token row of the logits ``x`` (f32 ``ne = [n_expert, n_tokens]``, any strides, ``n_expert <=
    1024``): ``p = softmax(scale·x)`` (f32 max and sum by workgroup reduction), the indices sorted by
    descending ``p`` (bitonic network over ``npad = 2^ceil(log2 n_expert)`` slots in workgroup memory,
    ties by ascending index, exactly as the unfused ARGSORT), then for ``j < k``: ``ids[j] =
    idx[j]`` (written at the ids view's strides, output 1) and ``w[j] = p[idx[j]]`` (output 0,
    contiguous ``[1, k, n_tokens]`` or ``[k, n_tokens]``), divided by ``MAX(MIN(sum_j w[j], hi), lo)``
    with the CLAMP's bounds when the pattern renormalizes (the sum in f32, in order j = 0..k-1).

    Launch: one workgroup of ``min(max(npad, 32), 256)`` threads per token, rows folded into a 2-D
    grid. Bindings: ``src0`` (logits), ``dst`` (weights), ``ids`` (written; bound to the memory of the
    node's FUSED_OUTPUT of index 1). Raises :class:`CodegenError` for a decomposition of another shape.
    """
    p = plan(node)
    x = node.src[0]
    npad = padded_cols(x.ne[0])
    wg = min(max(npad, 32), MAX_WG)
    bindings = [Binding("src0", x, x.dtype), Binding("dst", node, node.dtype, write=True),
                Binding("ids", p.ids, p.ids.dtype, write=True)]
    params = (layout_params("src0", x) + layout_params("dst", node, ne=False, nb=False)
              + layout_params("ids", p.ids, ne=False))
    params += [("k", "u32", p.k), ("scale", "f32", p.scale), ("lo", "f32", p.lo), ("hi", "f32", p.hi)]
    entry = f"moe_router{'_norm' if p.norm else ''}_n{npad}"
    source = render(TEMPLATES[backend], backend=backend, entry=entry, node_name=node.name, wg=wg, threads=wg,
                    npad=npad, norm=p.norm, bindings=bindings,
                    elem_types=[TYPE_NAMES[backend][b.dtype] for b in bindings], params=params)
    return Kernel(backend, "moe_router", entry, source, bindings, params, (wg, 1, 1), row_grid(x.ne[1]), node,
                  meta={"npad": npad, "k": p.k})
