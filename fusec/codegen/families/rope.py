"""ROPE kernels (ggml_rope_ext) and the rotary-embedding fusions around them: one workgroup per row
of ``ne[0]`` (one head of one token), one thread per rotated pair or copied element.

One mechanism serves the plain ROPE op and every FUSED node with ``params["kernel"] == "rope"``
(``patterns/rope.fuse``): :func:`plan` walks the node's decomposition into a :class:`RopePlan`,

* an optional *prologue*: RMS_NORM / NORM over the row followed by an element-wise epilogue chain
  (MUL/ADD/SUB/DIV by operands broadcast to the row, :mod:`fusec.codegen.epilogue`), as Qwen3's q/k
  norm ``RMS_NORM(head_dim) -> MUL(q_norm)`` before RoPE;
* the ROPE itself (modes normal and neox, ``n_dims < ne[0]`` with the tail copied, frequency
  factors, YaRN parameters);
* an optional *writer*: the roped rows scattered through a SET_ROWS index into a KV cache, reached
  through contiguous VIEW/RESHAPE reinterpretations of the rope result (llama.cpp's ``cpy_k``:
  ``ROPE -> VIEW [n_embd_k_gqa, n_tokens] -> SET_ROWS(cache_k, k_idxs)``). The FUSED node then
  writes into the cache in place (its result is a view of the cache, see
  ``fusec.rewrite.fuse.fused_alias_input``), converting to the cache dtype (f32 or f16).

The generated source depends only on dtypes, mode, the prologue chain and whether a writer / freq
factors are present; shapes, strides, offsets and rope scalars are runtime parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import CodegenError
from ...interp.rope import ROPE_MODE_NEOX, yarn_corr_dims
from ...ir.dtypes import F32
from ...ir.ops import VIEW_OPS
from ...ir.tensor import Tensor
from .. import family
from ..env import TYPE_NAMES, render
from ..epilogue import EPILOGUE_OPS, fused_input_index, walk_epilogue
from ..kernel import Binding, Kernel
from ..layout import elem_strides, layout_params
from .soft_max import row_grid

TEMPLATES = {"wgsl": "wgsl/rope.wgsl.j2", "cuda": "cuda/rope.cu.j2", "msl": "msl/rope.metal.j2"}
WORKGROUP = 64
NORM_OPS = ("RMS_NORM", "NORM")


def rope_params(node: Tensor) -> list[tuple[str, str, int | float]]:
    """Scalar parameters of a ROPE node, precomputed as ggml_compute_forward_rope_flt does before its
    loops: ``n_dims`` (u32), ``theta_scale = freq_base^(-2/n_dims)``, ``freq_scale``, ``ext_factor``,
    ``corr_low``/``corr_high`` (YaRN ramp ends in pair indices, ggml_rope_yarn_corr_dims; ``corr_high``
    may be ``-inf`` when ``n_ctx_orig <= 0``) and ``mscale`` (``attn_factor``, times
    ``1 + 0.1 ln(1/freq_scale)`` when ``ext_factor != 0``), all f32 but ``n_dims``."""
    pr = node.params
    n_dims = int(pr["n_dims"])
    freq_base, freq_scale, ext_factor = float(pr["freq_base"]), float(pr["freq_scale"]), float(pr["ext_factor"])
    low, high = yarn_corr_dims(n_dims, int(pr["n_ctx_orig"]), freq_base, float(pr["beta_fast"]),
                               float(pr["beta_slow"]))
    mscale = float(pr["attn_factor"])
    if ext_factor != 0.0:
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    return [("n_dims", "u32", n_dims), ("theta_scale", "f32", freq_base ** (-2.0 / n_dims)),
            ("freq_scale", "f32", freq_scale), ("ext_factor", "f32", ext_factor), ("corr_low", "f32", low),
            ("corr_high", "f32", high), ("mscale", "f32", mscale)]


@dataclass(frozen=True)
class RopePlan:
    """What a rope-family kernel computes, as indices into the node's ``src``.

    Attributes:
        x: the row data (ROPE's input, or the norm's input when there is a prologue).
        pos: i32 positions.
        ff: f32 frequency factors, or ``None``.
        rope: the ROPE tensor whose params apply (the node itself, or its decomposition's ROPE).
        norm: ``RMS_NORM`` | ``NORM`` | ``None`` (no prologue).
        eps: the norm's eps.
        steps: the prologue's epilogue chain ``[(op, operand src index)]`` after the norm.
        rows: the SET_ROWS rows tensor (a decomposition view of the rope result whose ``ne`` gives
            the scatter's row shape), or ``None`` when the kernel writes the rope result itself.
        idx: the SET_ROWS index source, or ``None``.
    """

    x: int
    pos: int
    ff: int | None
    rope: Tensor
    norm: str | None = None
    eps: float = 0.0
    steps: tuple[tuple[str, int], ...] = ()
    rows: Tensor | None = None
    idx: int | None = None

    @property
    def neox(self) -> bool:
        return bool(int(self.rope.params["mode"]) & ROPE_MODE_NEOX)

    @property
    def operands(self) -> list[int]:
        """Distinct prologue operand sources, ascending."""
        return sorted({i for _, i in self.steps})

    def describe(self) -> str:
        parts = []
        if self.norm:
            parts.append(f"{self.norm}(src{self.x})")
            parts += [f"{op}(src{i})" for op, i in self.steps]
        parts.append(f"ROPE {'neox' if self.neox else 'normal'}{' + freq factors' if self.ff is not None else ''}")
        if self.rows is not None:
            parts.append(f"SET_ROWS(src{self.idx})")
        return " -> ".join(parts)


def _fail(node: Tensor, msg: str) -> CodegenError:
    return CodegenError(f"node {node.name!r}: rope family cannot render it: {msg}")


def _placeholder(node: Tensor, t: Tensor | None, what: str) -> int:
    i = fused_input_index(t)
    if i is None:
        raise _fail(node, f"{what} {t!r} is not a fused input")
    return i


def plan(node: Tensor) -> RopePlan:
    """The :class:`RopePlan` of a ROPE node or of a FUSED ``rope`` node.

    A FUSED node's decomposition must be, in order: optionally RMS_NORM / NORM of a fused input
    followed by MUL/ADD/SUB/DIV steps each combining the running value with one fused input broadcast
    to it (:func:`fusec.codegen.epilogue.walk_epilogue`); then ROPE of the running value (or of a fused
    input when there is no norm) with fused-input positions and optional freq factors; then
    optionally VIEW/RESHAPE ops, each a contiguous reinterpretation of all of the rope result (offset
    0, same element count), and a SET_ROWS of the last view with fused-input indices into a fused
    input (the node's destination). The ROPE result must be f32 when it feeds SET_ROWS (ggml's rows
    are f32). Raises :class:`CodegenError` naming the node otherwise.
    """
    if node.op == "ROPE":
        return RopePlan(0, 1, 2 if len(node.src) > 2 and node.src[2] is not None else None, node)
    if node.op != "FUSED" or node.decomposition is None:
        raise CodegenError(f"node {node.name!r}: rope family renders ROPE, not {node.op}")
    sub = node.decomposition
    ops = list(sub.ops)
    k = next((i for i, t in enumerate(ops) if t.op == "ROPE"), None)
    if k is None:
        raise _fail(node, "the decomposition has no ROPE")
    rope = ops[k]
    norm, eps, steps = None, 0.0, ()
    if k == 0:
        x = _placeholder(node, rope.src[0], "ROPE input")
    else:
        head = ops[0]
        if head.op not in NORM_OPS:
            raise _fail(node, f"ops before ROPE must start with RMS_NORM or NORM, not {head.op}")
        x = _placeholder(node, head.src[0], f"{head.op} input")
        walked, running = walk_epilogue(ops[1:k], head, lambda msg: _fail(node, msg))
        if rope.src[0] is not running:
            raise _fail(node, "ROPE does not read the end of the norm chain")
        norm, eps = head.op, float(head.params.get("eps", 0.0))
        steps = tuple((op, _placeholder(node, other, f"{op} operand")) for op, other in walked)
    pos = _placeholder(node, rope.src[1], "ROPE positions")
    ff = _placeholder(node, rope.src[2], "ROPE freq factors") if len(rope.src) > 2 and rope.src[2] is not None else None
    tail = ops[k + 1:]
    rows = idx = None
    if tail:
        *views, sr = tail
        if sr.op != "SET_ROWS":
            raise _fail(node, f"after ROPE only VIEW/RESHAPE ops then SET_ROWS may follow, not {sr.op}")
        prev = rope
        for v in views:
            if (v.op not in VIEW_OPS or v.src[0] is not prev or not v.is_contiguous
                    or v.view_offs != prev.view_offs or v.nelements != rope.nelements):
                raise _fail(node, f"{v.op} ({v.name!r}) is not a contiguous reinterpretation of the whole rope result")
            prev = v
        if sr.src[0] is not prev or rope.dtype != F32:
            raise _fail(node, "SET_ROWS must write the (viewed) f32 rope result")
        if not rope.is_contiguous:
            raise _fail(node, "the rope result must be contiguous")
        rows, idx = prev, _placeholder(node, sr.src[1], "SET_ROWS indices")
        if fused_input_index(sr.src[2]) is None:
            raise _fail(node, "SET_ROWS must write into a fused input")
    elif sub.outputs[0] is not rope:
        raise _fail(node, "the decomposition's output is not its ROPE")
    if tail and sub.outputs[0] is not tail[-1]:
        raise _fail(node, "the decomposition's output is not its SET_ROWS")
    return RopePlan(x, pos, ff, rope, norm, eps, steps, rows, idx)


def _entry(p: RopePlan, x: Tensor, node: Tensor) -> str:
    parts = []
    if p.norm:  # the chain with each operand's dtype (the source depends on them)
        parts.append("_".join([p.norm.lower()] + [f"{op.lower()}_{node.src[i].dtype}" for op, i in p.steps]))
    parts.append(f"rope_{'neox' if p.neox else 'norm'}_{x.dtype}")
    if p.ff is not None:
        parts.append("ff")
    if p.rows is not None:
        parts.append(f"set_rows_{node.dtype}")
    return "_".join(parts)


@family("rope", ops=("ROPE",))
def emit_rope(node: Tensor, backend: str) -> Kernel:
    """Kernel for ROPE with ggml_rope_ext semantics (ggml_compute_forward_rope_flt / rope_yarn), or for
    a FUSED rope chain (:func:`plan`: norm prologue and/or SET_ROWS writer).

    Row data ``x`` (``src[0]`` of ROPE; the norm's input in a chain): f32 or f16 ``ne = [head_dim,
    n_head, n_tokens, ne3]``, any strides (rope runs on views of Q/K); positions: i32,
    ``ne[0] == n_tokens`` (row ``(i1, i2, i3)`` uses ``pos[i2]``); optional freq factors: f32
    (``ne[0] >= n_dims/2``; pair ``i``'s angle is divided by ``ff[i]``). Prologue: ``y = x /
    sqrt(mean(x^2) + eps)`` (RMS_NORM) or ``(x - mean) / sqrt(var + eps)`` (NORM) over the whole
    row (``ne[0]``), then each step ``y = y op w[i % ne]`` (ggml_can_repeat broadcast). Mode 0 rotates
    adjacent pairs ``(y[2i], y[2i+1])``, mode 2 (neox) the halves ``(y[i], y[i + n_dims/2])``; dims
    ``>= n_dims`` are copied. Pair ``i`` at position ``p``: ``theta_extrap = p * theta_scale^i / ff[i]``
    (``pow`` in f32, radians), ``theta = freq_scale * theta_extrap`` mixed with ``theta_extrap`` by
    the YaRN ramp (see :func:`rope_params`), then ``(y0 cos - y1 sin, y0 sin + y1 cos) * mscale``.
    Arithmetic in f32. Without a writer the result has ``x``'s dtype and ``ne`` at ``dst``'s strides;
    with one, element ``e`` of row ``(i1, i2, i3)`` has the flat index ``f = e + ne0 (i1 + ne1 (i2 +
    ne2 i3))`` in the rope result, ``f`` unravelled over the rows view's ``ne`` gives ``(j0, j1, j2,
    j3)``, and the value goes to ``dst[j3][j2][idx[j3 % c2][j2 % c1][j1]][j0]`` converted to the
    destination dtype (ggml_set_rows; ``dst`` binds the destination's root buffer, written in place).

    Launch: one workgroup of 64 threads per row (rows folded into a 2-D grid); with a norm the row's
    sum is reduced in workgroup memory first; then each thread loops over the row's
    ``n_dims/2 + ne0 - n_dims`` units. Bindings: ``src0`` (x), ``pos``, [``freq_factors``],
    ``src<i>`` (prologue operands), [``idx``], ``dst`` (written). Raises :class:`CodegenError` for a
    node :func:`plan` rejects.
    """
    p = plan(node)
    x, pos = node.src[p.x], node.src[p.pos]
    ff = node.src[p.ff] if p.ff is not None else None
    bindings = [Binding("src0", x, x.dtype), Binding("pos", pos, pos.dtype)]
    params = layout_params("src0", x) + layout_params("pos", pos, ne=False, nb=False)
    params.append(("pos_nb0", "u32", elem_strides(pos)[0]))
    if ff is not None:
        bindings.append(Binding("freq_factors", ff, ff.dtype))
        params += layout_params("ff", ff, ne=False, nb=False)
        params.append(("ff_nb0", "u32", elem_strides(ff)[0]))
    for i in p.operands:
        w = node.src[i]
        bindings.append(Binding(f"src{i + 1}", w, w.dtype))  # src0 is x: operand names are offset by one
        params += layout_params(f"src{i + 1}", w)
    if p.rows is not None:
        idx = node.src[p.idx]
        bindings.append(Binding("idx", idx, idx.dtype))
        params += layout_params("idx", idx)
        params += [(f"rows_ne{i}", "u32", int(p.rows.ne[i])) for i in range(3)]
    bindings.append(Binding("dst", node, node.dtype, write=True))
    params += layout_params("dst", node, ne=False)
    params += rope_params(p.rope)
    if p.norm:
        params.append(("eps", "f32", p.eps))
    entry = _entry(p, x, node)
    names = [node.name]
    if node.decomposition is not None:
        names += [f"{t.name} ({t.op})" for t in node.decomposition.ops]
    types = TYPE_NAMES[backend]
    source = render(TEMPLATES[backend], backend=backend, entry=entry, node_name=", ".join(names), wg=WORKGROUP,
                    threads=WORKGROUP, neox=p.neox, has_ff=ff is not None, bindings=bindings,
                    elem_types=[types[b.dtype] for b in bindings], params=params, what=p.describe(),
                    t=types[x.dtype], t_dst=types[node.dtype], norm=p.norm,
                    steps=[{"sym": EPILOGUE_OPS[op], "src": f"src{i + 1}"} for op, i in p.steps],
                    set_rows=p.rows is not None)
    nrows = x.ne[1] * x.ne[2] * x.ne[3]
    return Kernel(backend, "rope", entry, source, bindings, params, (WORKGROUP, 1, 1), row_grid(nrows), node,
                  meta={"plan": p})


__all__ = ["RopePlan", "emit_rope", "plan", "rope_params"]
