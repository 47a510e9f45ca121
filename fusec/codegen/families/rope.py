"""ROPE kernels (ggml_rope_ext): one workgroup per row of ``ne[0]``, one thread per rotated pair or
copied element."""

from __future__ import annotations

import math

from ...errors import CodegenError
from ...interp.rope import ROPE_MODE_NEOX, yarn_corr_dims
from ...ir.tensor import Tensor
from .. import family
from ..env import TYPE_NAMES, render
from ..kernel import Binding, Kernel
from ..layout import elem_strides, layout_params
from .soft_max import row_grid

TEMPLATES = {"wgsl": "wgsl/rope.wgsl.j2", "cuda": "cuda/rope.cu.j2", "msl": "msl/rope.metal.j2"}
WORKGROUP = 64


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


@family("rope", ops=("ROPE",))
def emit_rope(node: Tensor, backend: str) -> Kernel:
    """Kernel for ROPE with ggml_rope_ext semantics (ggml_compute_forward_rope_flt / rope_yarn).

    ``src[0]``: f32 or f16 ``ne = [head_dim, n_head, n_tokens, ne3]``, any strides (rope runs on views
    of Q/K); ``src[1]``: i32 positions, ``ne[0] == n_tokens`` (row ``(i1, i2, i3)`` uses ``pos[i2]``);
    optional ``src[2]``: f32 frequency factors (``ne[0] >= n_dims/2``; pair ``i``'s angle is divided
    by ``ff[i]``). Mode 0 rotates adjacent pairs ``(x[2i], x[2i+1])``, mode 2 (neox) the halves
    ``(x[i], x[i + n_dims/2])``; dims ``>= n_dims`` are copied. Pair ``i`` at position ``p``:
    ``theta_extrap = p * theta_scale^i / ff[i]`` (``pow`` in f32, radians), ``theta = freq_scale *
    theta_extrap`` mixed with ``theta_extrap`` by the YaRN ramp (see :func:`rope_params`), then
    ``(x0 cos - x1 sin, x0 sin + x1 cos) * mscale``. Arithmetic in f32; result has ``src[0]``'s dtype
    and ``ne``.

    Launch: one workgroup of 64 threads per row (rows folded into a 2-D grid), each thread looping
    over the row's ``n_dims/2 + ne0 - n_dims`` units. Raises :class:`CodegenError` for a node that
    is not ROPE.
    """
    if node.op != "ROPE":
        raise CodegenError(f"node {node.name!r}: rope family renders ROPE, not {node.op}")
    x, pos = node.src[0], node.src[1]
    ff = node.src[2] if len(node.src) > 2 else None
    neox = bool(int(node.params["mode"]) & ROPE_MODE_NEOX)
    bindings = [Binding("src0", x, x.dtype), Binding("pos", pos, pos.dtype)]
    params = layout_params("src0", x) + layout_params("pos", pos, ne=False, nb=False)
    params.append(("pos_nb0", "u32", elem_strides(pos)[0]))
    if ff is not None:
        bindings.append(Binding("freq_factors", ff, ff.dtype))
        params += layout_params("ff", ff, ne=False, nb=False)
        params.append(("ff_nb0", "u32", elem_strides(ff)[0]))
    bindings.append(Binding("dst", node, node.dtype, write=True))
    params += layout_params("dst", node, ne=False)
    params += rope_params(node)
    entry = f"rope_{'neox' if neox else 'norm'}_{x.dtype}{'_ff' if ff is not None else ''}"
    source = render(TEMPLATES[backend], backend=backend, entry=entry, node_name=node.name, wg=WORKGROUP,
                    threads=WORKGROUP,
                    neox=neox, has_ff=ff is not None, bindings=bindings,
                    elem_types=[TYPE_NAMES[backend][b.dtype] for b in bindings], params=params,
                    t=TYPE_NAMES[backend][x.dtype])
    nrows = x.ne[1] * x.ne[2] * x.ne[3]
    return Kernel(backend, "rope", entry, source, bindings, params, (WORKGROUP, 1, 1), row_grid(nrows), node)
