"""The Llama decode graph, op by op as llama.cpp builds it.

Mirrors ``llama_model_llama::graph`` (``src/models/llama.cpp``) with ``llm_graph_context``'s
``build_inp_embd``, ``build_norm`` (LLM_NORM_RMS), ``build_qkv``, ``build_attn`` /
``build_attn_mha`` with or without flash attention, ``build_ffn`` (LLM_FFN_SILU, LLM_FFN_PAR) and
the KV cache's ``cpy_k`` / ``cpy_v`` / ``get_k`` / ``get_v`` (``llama-kv-cache.cpp``, one unified
stream: tokens of several sequences share the cells, the ``kq_mask`` input keeps them apart;
transposed V cache without flash attention, row-major V cache with it). Tensor names are
llama.cpp's (``cb(cur, "attn_norm", il)`` -> ``attn_norm-0``); like llama.cpp, a few names repeat
(``Qcur-0`` names both the projection and the roped result).

The same builder serves, selected by the config:

* llama.cpp's ``LLM_ARCH_QWEN2`` graph (``src/models/qwen2.cpp``), which differs only by the q/k/v
  biases (MUL_MAT then ADD ``bq``/``bk``/``bv``) and rope type NEOX;
* Mistral (``LLM_ARCH_LLAMA`` with a sliding window, which lives in the ``kq_mask`` input only);
* Gemma-2 (``llm_build_gemma2_iswa``, ``src/models/gemma2-iswa.cpp``): embeddings scaled by
  ``sqrt(n_embd)`` (``inp_scaled``), rope NEOX, Q scaled by ``1/sqrt(query_pre_attn_scalar)`` with kq
  scale 1, attention logit softcap (SCALE(1/c) -> TANH -> SCALE(c) before SOFT_MAX, or
  FLASH_ATTN_EXT's ``logit_softcap``), ``attn_post_norm`` / ``ffn_post_norm`` before the residual
  adds, GEGLU FFN, final logit softcap, and interleaved sliding-window attention: even layers read
  the ``kq_mask_swa`` input, odd layers the full causal ``kq_mask`` (``build_attn_inp_kv_iswa``);
* Qwen3 / Qwen3-MoE (``src/models/qwen3.cpp``, ``qwen3moe.cpp``): RMS norm of each Q and K head
  (``attn_q_norm`` / ``attn_k_norm``, ne = [head_dim]) before rope NEOX; for MoE the FFN is
  :func:`fusec.models.moe.build_moe_ffn` (``ffn_moe_out-{il}``).
"""

from __future__ import annotations

import math

import numpy as np

from ..ir.builder import GraphBuilder
from ..ir.dtypes import F16, I32, DType
from ..ir.graph import Graph
from ..ir.tensor import Tensor
from .config import LlamaConfig, ModelError
from .weights import kv_cache_specs, parse_float_dtype, weight_specs

GRAPH_ARCHS = ("llama", "qwen2", "gemma2", "qwen3", "qwen3moe")

LLAMA_ROPE_TYPE_NORM = 0  # llama.cpp's rope type for LLM_ARCH_LLAMA (adjacent pairs)


def build_llama_decode(cfg: LlamaConfig, n_tokens: int, n_kv: int, kv_size: int, *,
                       kv_dtype: DType | str = "f32", weight_dtype: DType | str = "f32",
                       flash_attn: bool = False, mask_dtype: DType | str = "f32") -> Graph:
    """Graph of one llama.cpp decode step (``llm_build_llama`` and the variants of the module doc:
    ``cfg.arch`` llama, qwen2, gemma2, qwen3, qwen3moe) over ``n_tokens`` new tokens.

    The tokens may belong to different sequences sharing one unified KV cache (llama.cpp's
    ``kv_unified``): the graph does not know sequences at all; each token writes its K/V to its own
    cell (``k_idxs`` / ``v_idxs``) and the ``kq_mask`` input decides which cells each token sees
    (:func:`fusec.runtime.session.unified_kq_mask`). S sequences decoding one token each are a
    step with ``n_tokens = S``.

    Inputs (flag ``input``):
        ``inp_tokens`` i32 ne = [n_tokens]: token ids.
        ``inp_pos`` i32 ne = [n_tokens]: positions of the tokens in their own sequences.
        ``k_idxs`` i32 ne = [n_tokens]: KV cells written by each token (``set_input_k_idxs``).
        ``v_idxs`` i32: without flash attention ne = [n_embd_v_gqa * n_tokens], flat indices into
            the transposed V cache, entry ``i*n_embd_v_gqa + c`` = ``c*kv_size + k_idxs[i]``; with
            flash attention ne = [n_tokens], equal to ``k_idxs`` (``set_input_v_idxs``).
        ``kq_mask`` ``mask_dtype`` ne = [n_kv, n_tokens]: 0 where token ``i`` may attend cell
            ``j``, -inf elsewhere (``set_input_kq_mask``: same sequence, causal, and sliding-window
            for ``cfg.sliding_window`` unless ``cfg.iswa``).
        ``kq_mask_swa`` (only when ``cfg.iswa``, Gemma-2) ``mask_dtype`` ne = [n_kv, n_tokens]:
            the same mask with the sliding window, read by the layers with ``cfg.is_swa(il)``;
            ``kq_mask`` is then the full causal mask of the other layers.

    Persistent leaves (flag ``weight``): the GGUF-named weights of
    :func:`fusec.models.weights.weight_specs` and the caches ``cache_k_l{il}`` / ``cache_v_l{il}``
    (ne = [n_embd_{k,v}_gqa, kv_size], ``kv_dtype``), updated in place by SET_ROWS. The V cache
    is transposed (element (cell ``t``, channel ``c``) at flat index ``c*kv_size + t``) without
    flash attention and row-major like K (``t*n_embd_v_gqa + c``) with it, as llama.cpp's
    ``v_trans = !flash_attn``: a session must not switch ``flash_attn`` over a filled cache.

    ``flash_attn=False`` builds llama.cpp's unfused ``build_attn_mha`` (MUL_MAT, SOFT_MAX, MUL_MAT,
    PERMUTE, CONT; what ``patterns/attention.fuse`` rewrites); ``flash_attn=True`` builds
    ``FLASH_ATTN_EXT(q, k, v, kq_mask)`` directly (``__fattn__-{il}``, result ne = [head_dim,
    n_head, n_tokens, 1] reshaped to ``kqv_out-{il}`` [head_dim*n_head, n_tokens]). ``mask_dtype``
    "f16" (llama.cpp casts the mask to f16 for flash attention) needs ``flash_attn``.

    Output: ``result_output`` f32 ne = [n_vocab, n_tokens] (logits; Gemma-2: soft-capped).

    The attention reads ``n_kv`` cells (``n_kv <= kv_size``) through views of the SET_ROWS results,
    so the cache write is an explicit dependency of the read. Raises :class:`ModelError` for bad
    sizes or dtypes (an f16 mask without flash attention included) or an architecture it cannot
    build (a MoE config without :mod:`fusec.models.moe`: "MoE FFN not yet supported");
    :class:`fusec.errors.GraphError` would signal an internal shape bug.
    """
    n_tokens, n_kv, kv_size = int(n_tokens), int(n_kv), int(kv_size)
    if n_tokens < 1:
        raise ModelError(f"n_tokens must be >= 1, got {n_tokens}")
    if not 1 <= n_kv <= kv_size:
        raise ModelError(f"n_kv must be in 1..kv_size={kv_size}, got {n_kv}")
    if n_tokens > kv_size:
        raise ModelError(f"n_tokens={n_tokens} does not fit a KV cache of {kv_size} cells")
    mtype = parse_float_dtype(mask_dtype, "mask_dtype")
    if mtype == F16 and not flash_attn:
        raise ModelError("mask_dtype f16 needs flash_attn=True (SOFT_MAX takes the f32 mask, as llama.cpp)")
    if cfg.arch not in GRAPH_ARCHS:
        raise ModelError(f"model {cfg.name!r}: no decode graph for architecture {cfg.arch!r} "
                         f"(supported: {', '.join(GRAPH_ARCHS)})")
    build_moe_ffn = _moe_builder(cfg) if cfg.is_moe else None
    wspecs = weight_specs(cfg, weight_dtype)
    cspecs = kv_cache_specs(cfg, kv_size, kv_dtype)

    b = GraphBuilder()
    w = {n: b.weight(n, s.dtype, s.ne) for n, s in wspecs.items()}
    caches = {n: b.weight(n, s.dtype, s.ne) for n, s in cspecs.items()}

    inp_tokens = b.input("inp_tokens", I32, (n_tokens,))
    inp_pos = b.input("inp_pos", I32, (n_tokens,))
    k_idxs = b.input("k_idxs", I32, (n_tokens,))
    v_idxs = b.input("v_idxs", I32, (n_tokens,) if flash_attn else (cfg.n_embd_v_gqa * n_tokens,))
    kq_mask = b.input("kq_mask", mtype, (n_kv, n_tokens))
    kq_mask_swa = b.input("kq_mask_swa", mtype, (n_kv, n_tokens)) if cfg.iswa else None
    rope_factors = w.get("rope_freqs.weight")

    inp_l = b.get_rows(w["token_embd.weight"], inp_tokens, name="inp_embd")
    if cfg.embd_scale:  # gemma: ggml_scale(inpL, sqrtf(n_embd))
        inp_l = b.scale(inp_l, float(np.float32(math.sqrt(cfg.hidden_size))), name="inp_scaled")
    if cfg.query_pre_attn_scalar is not None:  # gemma2: Q is pre-scaled (f_attention_scale), kq scale 1
        q_scale, kq_scale = 1.0 / math.sqrt(cfg.query_pre_attn_scalar), 1.0
    else:
        q_scale, kq_scale = None, 1.0 / math.sqrt(cfg.head_dim)
    eps = cfg.rms_norm_eps
    for il in range(cfg.num_hidden_layers):
        p = f"blk.{il}."
        inp_sa = inp_l
        cur = _rms_norm(b, inp_l, w[p + "attn_norm.weight"], eps, f"norm-{il}", f"attn_norm-{il}")
        q, k, v = _qkv(b, cfg, w, cur, inp_pos, rope_factors, il)
        if q_scale is not None:
            q = b.scale(q, q_scale, name=f"Qcur_scaled-{il}")
        mask = kq_mask_swa if kq_mask_swa is not None and cfg.is_swa(il) else kq_mask
        cur = _attn(b, cfg, w[p + "attn_output.weight"], caches[f"cache_k_l{il}"], caches[f"cache_v_l{il}"],
                    q, k, v, k_idxs, v_idxs, mask, kq_scale, n_kv, kv_size, il, flash_attn)
        if cfg.post_norms:
            cur = _rms_norm(b, cur, w[p + "post_attention_norm.weight"], eps, f"norm-{il}", f"attn_post_norm-{il}")
        ffn_inp = b.add(cur, inp_sa, name=f"sa_out-{il}" if cfg.post_norms else f"ffn_inp-{il}")
        cur = _rms_norm(b, ffn_inp, w[p + "ffn_norm.weight"], eps, f"norm-{il}", f"ffn_norm-{il}")
        if build_moe_ffn is not None:
            cur = build_moe_ffn(b, cur, il, cfg, w)
        else:
            cur = _ffn(b, w[p + "ffn_up.weight"], w[p + "ffn_gate.weight"], w[p + "ffn_down.weight"], cur, il,
                       cfg.hidden_act)
        if cfg.post_norms:  # build_norm(..., il = -1): unsuffixed names, as llama.cpp
            cur = _rms_norm(b, cur, w[p + "post_ffw_norm.weight"], eps, "norm", "ffn_post_norm")
        inp_l = b.add(cur, ffn_inp, name=f"l_out-{il}")

    cur = _rms_norm(b, inp_l, w["output_norm.weight"], eps, "norm", "result_norm")
    out_w = w["token_embd.weight"] if cfg.tie_word_embeddings else w["output.weight"]
    c = cfg.final_logit_softcapping
    logits = b.mul_mat(out_w, cur, name="result_output" if c is None else "result_output_raw")
    if c is not None:  # gemma2 final logit soft-capping: c * tanh(logits / c)
        logits = b.scale(b.tanh(b.scale(logits, 1.0 / c, name="result_output_scaled_1"),
                                name="result_output_tanh"), c, name="result_output")
    return b.build([logits])


def _moe_builder(cfg: LlamaConfig):
    """:func:`fusec.models.moe.build_moe_ffn`, or :class:`ModelError` when that module is absent."""
    try:
        from .moe import build_moe_ffn
    except ImportError:
        raise ModelError(f"model {cfg.name!r}: MoE FFN not yet supported (n_expert={cfg.n_expert}; "
                         "fusec.models.moe is not available)") from None
    return build_moe_ffn


# ---------------------------------------------------------------------------------------------
# building blocks (llm_graph_context methods)


def _rms_norm(b: GraphBuilder, x: Tensor, weight: Tensor, eps: float, norm_name: str, name: str) -> Tensor:
    """build_norm(LLM_NORM_RMS): RMS_NORM named ``norm_name`` then MUL by ``weight`` named ``name``."""
    return b.mul(b.rms_norm(x, eps, name=norm_name), weight, name=name)


def _qkv(b: GraphBuilder, cfg: LlamaConfig, w: dict[str, Tensor], cur: Tensor, inp_pos: Tensor,
         rope_factors: Tensor | None, il: int) -> tuple[Tensor, Tensor, Tensor]:
    """build_qkv + ggml_rope_ext: Q/K ne = [head_dim, n_head(_kv), n_tokens] roped, V unroped.

    With ``cfg.qk_norm`` (Qwen3) each Q/K head is RMS-normed over ``head_dim`` and multiplied by
    ``attn_{q,k}_norm.weight`` (``Qcur_normed-{il}``) before RoPE, as ``llm_build_qwen3``.
    """
    p = f"blk.{il}."
    n_tokens = cur.ne[1]
    out = []
    for tag, wname, n_head in (("Qcur", "attn_q", cfg.num_attention_heads),
                               ("Kcur", "attn_k", cfg.num_key_value_heads),
                               ("Vcur", "attn_v", cfg.num_key_value_heads)):
        t = b.mul_mat(w[p + wname + ".weight"], cur, name=f"{tag}-{il}")
        if cfg.attn_bias:  # qwen2: ggml_add(Qcur, bq), named Qcur-il again
            t = b.add(t, w[p + wname + ".bias"], name=f"{tag}-{il}")
        # cb(Vcur, "Vcur", il) renames the reshaped V in llama.cpp; Q and K keep "(reshaped)" until roped
        t = b.reshape(t, (cfg.head_dim, n_head, n_tokens),
                      name=f"{tag}-{il}" if tag == "Vcur" else f"{tag}-{il} (reshaped)")
        if cfg.qk_norm and tag != "Vcur":  # qwen3: build_norm(Qcur, attn_q_norm, LLM_NORM_RMS) over head_dim
            t = _rms_norm(b, t, w[p + wname + "_norm.weight"], cfg.rms_norm_eps, f"norm-{il}", f"{tag}_normed-{il}")
        if tag != "Vcur":
            t = b.rope(t, inp_pos, cfg.head_dim, mode=cfg.rope_mode, freq_factors=rope_factors,
                       n_ctx_orig=cfg.max_position_embeddings, freq_base=cfg.rope_theta, freq_scale=1.0,
                       ext_factor=0.0, attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, name=f"{tag}-{il}")
        out.append(t)
    return out[0], out[1], out[2]


def _cpy_k(b: GraphBuilder, cache_k: Tensor, k_cur: Tensor, k_idxs: Tensor, il: int) -> Tensor:
    """llama_kv_cache::cpy_k: SET_ROWS of the [n_embd_k_gqa, n_tokens] view of K into the cache."""
    n_embd_gqa = k_cur.ne[0] * k_cur.ne[1]
    k2 = b.view(k_cur, (n_embd_gqa, k_cur.ne[2]), nb=(k_cur.nb[0], k_cur.nb[2]), name=f"Kcur-{il} (view)")
    return b.set_rows(cache_k, k2, k_idxs, name=f"{cache_k.name} (view)")


def _cpy_v(b: GraphBuilder, cache_v: Tensor, v_cur: Tensor, v_idxs: Tensor, il: int) -> Tensor:
    """llama_kv_cache::cpy_v, transposed cache: one SET_ROWS row per element of V."""
    n_el = v_cur.nelements
    v_view = b.reshape(cache_v, (1, cache_v.nelements), name=f"{cache_v.name} (reshaped)")
    v2 = b.reshape(v_cur, (1, n_el), name=f"Vcur-{il} (reshaped 1)")
    return b.set_rows(v_view, v2, v_idxs, name=f"{cache_v.name} (reshaped) (view)")


def _cpy_v_rows(b: GraphBuilder, cache_v: Tensor, v_cur: Tensor, v_idxs: Tensor, il: int) -> Tensor:
    """llama_kv_cache::cpy_v, non-transposed cache (flash attention): SET_ROWS as for K."""
    n_embd_gqa = v_cur.ne[0] * v_cur.ne[1]
    v2 = b.view(v_cur, (n_embd_gqa, v_cur.ne[2]), nb=(v_cur.nb[0], v_cur.nb[2]), name=f"Vcur-{il} (view)")
    return b.set_rows(cache_v, v2, v_idxs, name=f"{cache_v.name} (view)")


def _attn(b: GraphBuilder, cfg: LlamaConfig, wo: Tensor, cache_k: Tensor, cache_v: Tensor, q_cur: Tensor,
          k_cur: Tensor, v_cur: Tensor, k_idxs: Tensor, v_idxs: Tensor, kq_mask: Tensor, kq_scale: float,
          n_kv: int, kv_size: int, il: int, flash_attn: bool = False) -> Tensor:
    """build_attn (KV cache) + build_attn_mha with or without flash attention; returns ``attn_out-{il}``.

    ``cfg.attn_logit_softcapping = c`` (Gemma-2) adds SCALE(1/c) -> TANH -> SCALE(c) between the
    KQ MUL_MAT and SOFT_MAX (``kq_scaled_1`` / ``kq_tanh`` / ``kq_scaled_2``), or sets
    FLASH_ATTN_EXT's ``logit_softcap``, as ``build_attn_mha``.
    """
    hd, n_head_kv, n_tokens = cfg.head_dim, cfg.num_key_value_heads, q_cur.ne[2]
    k_stored = _cpy_k(b, cache_k, k_cur, k_idxs, il)
    kes, ves = cache_k.dtype.size, cache_v.dtype.size
    # get_k, already permuted (0, 2, 1, 3): [head_dim, n_kv, n_head_kv]
    k = b.view(k_stored, (hd, n_kv, n_head_kv), nb=(kes, kes * cfg.n_embd_k_gqa, kes * hd), name=f"k-{il}")
    if flash_attn:
        v_stored = _cpy_v_rows(b, cache_v, v_cur, v_idxs, il)
        # get_v of the row-major cache, permuted (0, 2, 1, 3): [head_dim, n_kv, n_head_kv]
        v = b.view(v_stored, (hd, n_kv, n_head_kv), nb=(ves, ves * cfg.n_embd_v_gqa, ves * hd), name=f"v-{il}")
        q = b.permute(q_cur, 0, 2, 1, 3, name=f"q-{il}")  # [head_dim, n_tokens, n_head]
        cur = b.flash_attn_ext(q, k, v, kq_mask, scale=kq_scale, max_bias=0.0,
                               logit_softcap=cfg.attn_logit_softcapping or 0.0,
                               name=f"__fattn__-{il}")  # [head_dim, n_head, n_tokens, 1]
        cur = b.reshape(cur, (hd * cfg.num_attention_heads, n_tokens), name=f"kqv_out-{il}")
        return b.mul_mat(wo, cur, name=f"attn_out-{il}")
    v_stored = _cpy_v(b, cache_v, v_cur, v_idxs, il)
    # get_v of the transposed cache, permuted (0, 2, 1, 3): [n_kv, head_dim, n_head_kv]
    v = b.view(v_stored, (n_kv, hd, n_head_kv), nb=(ves, ves * kv_size, ves * kv_size * hd), name=f"v-{il}")
    q = b.permute(q_cur, 0, 2, 1, 3, name=f"q-{il}")  # [head_dim, n_tokens, n_head]
    kq = b.mul_mat(k, q, name=f"kq-{il}")  # [n_kv, n_tokens, n_head]
    c = cfg.attn_logit_softcapping
    if c is not None:  # gemma2 (hparams.attn_soft_cap): kq = c * tanh(kq / c) before the softmax
        kq = b.scale(kq, 1.0 / c, name=f"kq_scaled_1-{il}")
        kq = b.tanh(kq, name=f"kq_tanh-{il}")
        kq = b.scale(kq, c, name=f"kq_scaled_2-{il}")
    kq = b.soft_max_ext(kq, kq_mask, scale=kq_scale, max_bias=0.0, name=f"kq_soft_max-{il}")
    kqv = b.mul_mat(v, kq, name=f"kqv-{il}")  # [head_dim, n_tokens, n_head]
    cur = b.permute(kqv, 0, 2, 1, 3, name=f"kqv-{il} (permuted)")  # [head_dim, n_head, n_tokens]
    cur = b.cont(cur, (hd * cfg.num_attention_heads, n_tokens), name=f"kqv_out-{il}")
    return b.mul_mat(wo, cur, name=f"attn_out-{il}")


def _ffn(b: GraphBuilder, up_w: Tensor, gate_w: Tensor, down_w: Tensor, cur: Tensor, il: int,
         act: str = "silu") -> Tensor:
    """build_ffn(LLM_FFN_SILU or LLM_FFN_GELU, LLM_FFN_PAR): down(swiglu/geglu(gate(x), up(x)));
    ``act`` "silu" -> SWIGLU (``ffn_swiglu-{il}``), "gelu_pytorch_tanh" -> GEGLU (``ffn_geglu-{il}``,
    ggml's tanh GELU); returns ``ffn_out-{il}``."""
    up = b.mul_mat(up_w, cur, name=f"ffn_up-{il}")
    gate = b.mul_mat(gate_w, cur, name=f"ffn_gate-{il}")
    if act == "silu":
        h = b.swiglu(gate, up, name=f"ffn_swiglu-{il}")
    elif act == "gelu_pytorch_tanh":
        h = b.geglu(gate, up, name=f"ffn_geglu-{il}")
    else:
        raise ModelError(f"unsupported FFN activation {act!r} (supported: silu, gelu_pytorch_tanh)")
    return b.mul_mat(down_w, h, name=f"ffn_out-{il}")
