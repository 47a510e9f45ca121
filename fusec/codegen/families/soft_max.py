"""SOFT_MAX kernels (ggml_soft_max_ext): one workgroup per row, max and sum by workgroup reduction."""

from __future__ import annotations

import math

from ...errors import CodegenError
from ...ir.dtypes import F16
from ...ir.tensor import Tensor
from .. import family
from ..env import TYPE_NAMES, render
from ..kernel import Binding, Kernel
from ..layout import layout_params

TEMPLATES = {"wgsl": "wgsl/soft_max.wgsl.j2", "cuda": "cuda/soft_max.cu.j2", "msl": "msl/soft_max.metal.j2"}
MAX_GRID = 65535


def alibi_params(n_head: int, max_bias: float) -> list[tuple[str, str, int | float]]:
    """ALiBi parameters of ggml_compute_forward_soft_max_f32: ``n_head_log2`` (u32, the largest
    power of two <= ``n_head``), ``m0 = 2^(-max_bias/n_head_log2)`` and ``m1 =
    2^(-max_bias/2/n_head_log2)`` (f32). The kernel's slope of head ``h`` is ``m0^(h+1)`` for
    ``h < n_head_log2`` else ``m1^(2(h - n_head_log2) + 1)``; ``max_bias <= 0`` gives
    ``m0 = m1 = 1`` (every slope 1)."""
    n_head_log2 = 1 << int(math.floor(math.log2(n_head)))
    if max_bias <= 0.0:
        return [("n_head_log2", "u32", n_head_log2), ("m0", "f32", 1.0), ("m1", "f32", 1.0)]
    return [("n_head_log2", "u32", n_head_log2), ("m0", "f32", 2.0 ** (-max_bias / n_head_log2)),
            ("m1", "f32", 2.0 ** (-(max_bias / 2.0) / n_head_log2))]


def row_grid(nrows: int) -> tuple[int, int, int]:
    """One workgroup per row, folded into (x, y) so that each dimension stays <= 65535; a kernel
    recovers the row as ``wg.x + wg.y * num_workgroups.x`` and skips rows past ``nrows``."""
    gx = min(nrows, MAX_GRID)
    return (gx, -(-nrows // gx), 1)


@family("soft_max", ops=("SOFT_MAX",))
def emit_soft_max(node: Tensor, backend: str) -> Kernel:
    """Kernel for SOFT_MAX with ggml_soft_max_ext semantics: per row over ``ne[0]``,
    ``softmax(x*scale + slope*mask)``.

    ``src[0]``: f32 ``ne = [n, rows, heads, ne3]``, any strides; optional ``src[1]`` mask (f32 or
    f16, ``ne = [n, >= rows, m2, m3]`` with ``m2 | heads``, ``m3 | ne3``; row ``i1`` of mask batch
    ``(i2 % m2, i3 % m3)`` is added); ``slope`` is head ``i2``'s ALiBi slope (:func:`alibi_params`,
    1 when ``max_bias <= 0``). Result f32, same ``ne``. Arithmetic in f32 registers; a row whose
    every logit is ``-inf`` yields NaN (as ggml-cpu and :func:`fusec.interp.eval_node` do).

    Launch: one workgroup of 64 threads per row when ``n <= 1024``, else 256; rows folded into a
    2-D grid. Raises :class:`CodegenError` for a node that is not SOFT_MAX.
    """
    if node.op != "SOFT_MAX":
        raise CodegenError(f"node {node.name!r}: soft_max family renders SOFT_MAX, not {node.op}")
    x = node.src[0]
    mask = node.src[1] if len(node.src) > 1 else None
    wg = 64 if x.ne[0] <= 1024 else 256
    bindings = [Binding("src0", x, x.dtype)]
    params = layout_params("src0", x)
    if mask is not None:
        bindings.append(Binding("mask", mask, mask.dtype))
        params += layout_params("mask", mask, ne=False)
        params += [("mask_ne2", "u32", int(mask.ne[2])), ("mask_ne3", "u32", int(mask.ne[3]))]
        params += alibi_params(int(x.ne[2]), float(node.params.get("max_bias", 0.0)))
    bindings.append(Binding("dst", node, node.dtype, write=True))
    params += layout_params("dst", node, ne=False)
    params += [("scale", "f32", float(node.params.get("scale", 1.0)))]
    mask_t = None if mask is None else mask.dtype
    entry = f"soft_max_f32{'' if mask_t is None else f'_mask_{mask_t}'}_wg{wg}"
    source = render(TEMPLATES[backend], backend=backend, entry=entry, node_name=node.name, wg=wg, threads=wg,
                    has_mask=mask is not None, mask_f16=mask_t == F16,
                    mask_t=TYPE_NAMES[backend][mask_t] if mask_t else None,
                    bindings=bindings, elem_types=[TYPE_NAMES[backend][b.dtype] for b in bindings], params=params)
    nrows = x.ne[1] * x.ne[2] * x.ne[3]
    return Kernel(backend, "soft_max", entry, source, bindings, params, (wg, 1, 1), row_grid(nrows), node)
