"""The persistent tensors of a Llama model: GGUF names, layouts, random values, empty KV caches.

Names and ``ne`` follow llama.cpp's ``llama_model_llama::load_arch_tensors`` (GGUF tensor names:
``token_embd.weight`` ne = [n_embd, n_vocab], ``blk.{il}.attn_q.weight`` ne = [n_embd,
n_head*head_dim], ...). As in GGUF files, 1-D tensors (norms, ``rope_freqs.weight``) are always
f32; only matrices take ``weight_dtype``. numpy arrays use shape ``ne[::-1]`` (4-D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.dtypes import F16, F32, DType
from .config import LlamaConfig, ModelError


@dataclass(frozen=True)
class TensorSpec:
    """A persistent tensor: GGUF name, element type and ``ne`` (ggml order, 4 entries)."""

    name: str
    dtype: DType
    ne: tuple[int, int, int, int]

    @property
    def np_shape(self) -> tuple[int, ...]:
        """numpy shape of the tensor's array: ``ne[::-1]``."""
        return tuple(reversed(self.ne))


def _ne(*dims: int) -> tuple[int, int, int, int]:
    return tuple(list(dims) + [1] * (4 - len(dims)))  # type: ignore[return-value]


def parse_float_dtype(dtype: DType | str, what: str) -> DType:
    """``"f32"``/``"f16"`` -> :class:`DType`; raises :class:`ModelError` for anything else."""
    try:
        dt = dtype if isinstance(dtype, DType) else DType.parse(dtype)
    except ValueError:
        dt = None
    if dt not in (F32, F16):
        raise ModelError(f"{what} must be 'f32' or 'f16', got {dtype!r}")
    return dt


def weight_specs(cfg: LlamaConfig, weight_dtype: DType | str = "f32") -> dict[str, TensorSpec]:
    """The model weights by GGUF name, in llama.cpp's load order.

    Matrices (``token_embd``, ``attn_q/k/v/output``, ``ffn_gate/up/down``, ``output``) have
    ``weight_dtype`` ("f32" or "f16"); norms and ``rope_freqs.weight`` (present only with llama3
    RoPE scaling, ne = [head_dim/2]) are f32. ``output.weight`` is absent when
    ``cfg.tie_word_embeddings``. With ``cfg.attn_bias`` (Qwen2) each layer also has f32 biases
    ``blk.{il}.attn_{q,k,v}.bias`` (ne = [n_head*head_dim] / [n_embd_k_gqa] / [n_embd_v_gqa], as
    llama.cpp's ``LLM_ARCH_QWEN2`` tensors ``bq``/``bk``/``bv``). With ``cfg.qk_norm`` (Qwen3) each
    layer has ``blk.{il}.attn_q_norm.weight`` / ``attn_k_norm.weight`` (f32, ne = [head_dim]); with
    ``cfg.post_norms`` (Gemma-2) ``blk.{il}.post_attention_norm.weight`` and
    ``blk.{il}.post_ffw_norm.weight`` (f32, ne = [n_embd]; llama.cpp ``attn_post_norm`` /
    ``ffn_post_norm``). Gemma norm weights are stored as GGUF stores them, ``1 + w_hf``. With
    ``cfg.is_moe`` (Qwen3-MoE) the dense ``ffn_gate/up/down`` are replaced by the router and expert
    tensors of :func:`fusec.models.moe.moe_weight_specs`. Raises :class:`ModelError` for a bad
    ``weight_dtype``.
    """
    wt = parse_float_dtype(weight_dtype, "weight_dtype")
    n_embd, n_vocab, n_ff = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    n_q = cfg.num_attention_heads * cfg.head_dim
    specs = [TensorSpec("token_embd.weight", wt, _ne(n_embd, n_vocab)),
             TensorSpec("output_norm.weight", F32, _ne(n_embd))]
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("output.weight", wt, _ne(n_embd, n_vocab)))
    if cfg.has_rope_freqs:
        specs.append(TensorSpec("rope_freqs.weight", F32, _ne(cfg.head_dim // 2)))
    for il in range(cfg.num_hidden_layers):
        p = f"blk.{il}."
        specs += [
            TensorSpec(p + "attn_norm.weight", F32, _ne(n_embd)),
            TensorSpec(p + "attn_q.weight", wt, _ne(n_embd, n_q)),
            TensorSpec(p + "attn_k.weight", wt, _ne(n_embd, cfg.n_embd_k_gqa)),
            TensorSpec(p + "attn_v.weight", wt, _ne(n_embd, cfg.n_embd_v_gqa)),
            TensorSpec(p + "attn_output.weight", wt, _ne(n_q, n_embd)),
            *([TensorSpec(p + "attn_q.bias", F32, _ne(n_q)),
               TensorSpec(p + "attn_k.bias", F32, _ne(cfg.n_embd_k_gqa)),
               TensorSpec(p + "attn_v.bias", F32, _ne(cfg.n_embd_v_gqa))] if cfg.attn_bias else []),
            *([TensorSpec(p + "attn_k_norm.weight", F32, _ne(cfg.head_dim)),
               TensorSpec(p + "attn_q_norm.weight", F32, _ne(cfg.head_dim))] if cfg.qk_norm else []),
            *([TensorSpec(p + "post_attention_norm.weight", F32, _ne(n_embd))] if cfg.post_norms else []),
            TensorSpec(p + "ffn_norm.weight", F32, _ne(n_embd)),
        ]
        if cfg.is_moe:
            specs += list(_moe_specs(cfg, il, wt).values())
        else:
            specs += [
                TensorSpec(p + "ffn_gate.weight", wt, _ne(n_embd, n_ff)),
                TensorSpec(p + "ffn_down.weight", wt, _ne(n_ff, n_embd)),
                TensorSpec(p + "ffn_up.weight", wt, _ne(n_embd, n_ff)),
            ]
        if cfg.post_norms:
            specs.append(TensorSpec(p + "post_ffw_norm.weight", F32, _ne(n_embd)))
    return {s.name: s for s in specs}


def _moe_specs(cfg: LlamaConfig, il: int, wt: DType) -> dict[str, TensorSpec]:
    """The MoE tensors of layer ``il`` from :mod:`fusec.models.moe`; :class:`ModelError` without it."""
    try:
        from .moe import moe_weight_specs
    except ImportError:
        raise ModelError(f"model {cfg.name!r}: MoE FFN not yet supported (n_expert={cfg.n_expert}; "
                         "fusec.models.moe is not available)") from None
    return moe_weight_specs(cfg, il, wt)


def kv_cache_specs(cfg: LlamaConfig, kv_size: int, kv_dtype: DType | str = "f32") -> dict[str, TensorSpec]:
    """Per-layer KV caches ``cache_k_l{il}`` / ``cache_v_l{il}``, ne = [n_embd_{k,v}_gqa, kv_size].

    As llama.cpp's ``llama_kv_cache`` without flash attention, the V cache is stored transposed:
    element (cell ``t``, channel ``c``) lives at flat index ``c*kv_size + t``. ``kv_size`` is in
    cells (tokens). Raises :class:`ModelError` for ``kv_size < 1`` or a bad ``kv_dtype``.
    """
    kt = parse_float_dtype(kv_dtype, "kv_dtype")
    if int(kv_size) < 1:
        raise ModelError(f"kv_size must be >= 1, got {kv_size}")
    out: dict[str, TensorSpec] = {}
    for il in range(cfg.num_hidden_layers):
        out[f"cache_k_l{il}"] = TensorSpec(f"cache_k_l{il}", kt, _ne(cfg.n_embd_k_gqa, int(kv_size)))
        out[f"cache_v_l{il}"] = TensorSpec(f"cache_v_l{il}", kt, _ne(cfg.n_embd_v_gqa, int(kv_size)))
    return out


def random_weights(cfg: LlamaConfig, seed: int = 0, weight_dtype: DType | str = "f32") -> dict[str, np.ndarray]:
    """Deterministic random weights for ``cfg`` (numpy ``Generator`` seeded with ``seed``).

    Matrices are ``N(0, 1) / sqrt(fan_in)`` (fan_in = ``ne[0]``) so every projection keeps O(1)
    activations; ``token_embd`` uses the same scale so tied logits stay O(1); norm weights are
    ``1 + 0.1*N(0, 1)``, biases ``0.1*N(0, 1)``; ``rope_freqs.weight`` holds the llama3 factors (not
    random; ones without ``rope_scaling``). Arrays have
    numpy shape ``ne[::-1]`` and dtype float32, or float16 for matrices when ``weight_dtype`` is
    "f16". Raises :class:`ModelError` for a bad ``weight_dtype``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, spec in weight_specs(cfg, weight_dtype).items():
        if name == "rope_freqs.weight":
            factors = cfg.rope_freq_factors()
            arr = (np.ones(spec.np_shape, np.float32) if factors is None else factors.reshape(spec.np_shape))
        elif name.endswith(".bias"):
            arr = rng.standard_normal(spec.np_shape, dtype=np.float32)
            arr *= np.float32(0.1)
        elif spec.ne[1] == 1:  # norm weight
            arr = rng.standard_normal(spec.np_shape, dtype=np.float32)
            arr *= np.float32(0.1)
            arr += np.float32(1.0)
        else:
            arr = rng.standard_normal(spec.np_shape, dtype=np.float32)
            arr *= np.float32(1.0 / np.sqrt(spec.ne[0]))
        out[name] = arr.astype(spec.dtype.np, copy=False)
    return out


def empty_kv_cache(cfg: LlamaConfig, kv_size: int, kv_dtype: DType | str = "f32") -> dict[str, np.ndarray]:
    """Zero-filled KV caches by name (see :func:`kv_cache_specs`), numpy shape ``ne[::-1]``."""
    return {n: np.zeros(s.np_shape, dtype=s.dtype.np) for n, s in kv_cache_specs(cfg, kv_size, kv_dtype).items()}
