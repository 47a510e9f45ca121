"""ROPE with ggml's semantics (ggml_compute_forward_rope_flt, ``rope_yarn``,
``ggml_rope_yarn_corr_dims`` in ``ggml/src/ggml-cpu/ops.cpp`` and ``ggml.c``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from ..ir.tensor import Tensor

ROPE_MODE_NORMAL = 0
ROPE_MODE_NEOX = 2


@functools.lru_cache(maxsize=256, typed=True)
def yarn_corr_dims(n_dims: int, n_ctx_orig: int, freq_base: float, beta_fast: float,
                   beta_slow: float) -> tuple[float, float]:
    """The YaRN ramp's ``[low, high]`` pair indices (ggml_rope_yarn_corr_dims): with
    ``corr_dim(r) = n_dims * ln(n_ctx_orig / (r * 2π)) / (2 ln(freq_base))``,
    ``low = max(0, floor(corr_dim(beta_fast)))``, ``high = min(n_dims - 1, ceil(corr_dim(beta_slow)))``.
    ``n_ctx_orig <= 0`` gives ``-inf`` corr dims, as ``logf(0)`` does in ggml. Memoized (a pure
    function of its scalars; every rope kernel of a model asks for the same pair)."""

    def corr_dim(n_rot: float) -> float:
        with np.errstate(divide="ignore"):
            return float(n_dims * np.log(np.float64(max(n_ctx_orig, 0)) / (n_rot * 2 * np.pi))
                         / (2 * np.log(freq_base)))

    low = np.floor(corr_dim(beta_fast))
    high = np.ceil(corr_dim(beta_slow))
    return float(max(0.0, low)), float(min(n_dims - 1.0, high))


def rope_cos_sin(pos: np.ndarray, n_dims: int, params: dict, freq_factors: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``cos``/``sin`` of every (position, pair) as ggml's ``rope_cache_init`` + ``rope_yarn``.

    Pair ``i`` (``0 <= i < n_dims/2``, cache index ``i0 = 2i``) at position ``p`` has
    ``theta_extrap = p * freq_base^(-2i/n_dims) / freq_factors[i]``, ``theta_interp =
    freq_scale * theta_extrap``; with ``ext_factor != 0`` the YaRN ramp mixes them
    (``mix = ext_factor * (1 - clamp((i - low) / max(0.001, high - low), 0, 1))``,
    ``theta = theta_interp*(1 - mix) + theta_extrap*mix``) and the magnitude scale
    ``attn_factor`` is multiplied by ``1 + 0.1*ln(1/freq_scale)``. Returns ``mscale*cos(theta)``
    and ``mscale*sin(theta)``, float64, shape ``[len(pos), n_dims/2]`` (computed directly in
    float64 rather than by ggml's running float32 product ``theta *= theta_scale``).
    """
    half = n_dims // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = float(params["freq_base"]) ** (-2.0 * i / n_dims)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64).reshape(-1)[:half]
    theta_extrap = np.asarray(pos, dtype=np.float64).reshape(-1, 1) * inv_freq[None, :]
    freq_scale = float(params["freq_scale"])
    ext_factor = float(params["ext_factor"])
    mscale = float(params["attn_factor"])
    theta = freq_scale * theta_extrap
    if ext_factor != 0.0:
        low, high = yarn_corr_dims(n_dims, int(params["n_ctx_orig"]), float(params["freq_base"]),
                                   float(params["beta_fast"]), float(params["beta_slow"]))
        ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
        mix = ramp * ext_factor
        theta = theta * (1.0 - mix) + theta_extrap * mix
        mscale *= 1.0 + 0.1 * np.log(1.0 / freq_scale)
    return np.cos(theta) * mscale, np.sin(theta) * mscale


def rope(node: Tensor, srcs: Sequence[np.ndarray | None]) -> np.ndarray:
    """Rotary position embedding (ggml_rope_ext; ggml_compute_forward_rope_flt).

    ``src[0]``: f32/f16 ``ne = [head_dim, n_head, n_tokens, ne3]``; ``src[1]``: i32 positions, one
    per token (``ne[0] == n_tokens``); optional ``src[2]``: f32 frequency factors (``ne[0] >=
    n_dims/2``, llama3/longrope scaling). Params: ``n_dims`` (rotated dims, even), ``mode`` (0
    normal: pair ``i`` is ``(x[2i], x[2i+1])``; 2 neox: ``(x[i], x[i + n_dims/2])``),
    ``freq_base``, ``freq_scale``, ``ext_factor``, ``attn_factor``, ``beta_fast``, ``beta_slow``,
    ``n_ctx_orig`` (see :func:`rope_cos_sin`). Each pair ``(x0, x1)`` becomes
    ``(x0*cos - x1*sin, x0*sin + x1*cos)`` in float32; dims ``>= n_dims`` pass through unchanged.
    Returns float32 ``ne[::-1]``.
    """
    x = np.asarray(srcs[0], dtype=np.float32)
    n_dims = int(node.params["n_dims"])
    half = n_dims // 2
    pos = np.asarray(srcs[1]).reshape(-1)[: x.shape[1]]
    ff = srcs[2] if len(srcs) > 2 else None
    cos, sin = rope_cos_sin(pos, n_dims, node.params, ff)
    cos = cos.astype(np.float32)[None, :, None, :]  # [1, n_tokens, 1, half]
    sin = sin.astype(np.float32)[None, :, None, :]
    out = x.copy()
    if int(node.params["mode"]) & ROPE_MODE_NEOX:
        first, second = slice(0, half), slice(half, n_dims)
    else:
        first, second = slice(0, n_dims, 2), slice(1, n_dims, 2)
    x0, x1 = x[..., first], x[..., second]
    out[..., first] = x0 * cos - x1 * sin
    out[..., second] = x0 * sin + x1 * cos
    return out
