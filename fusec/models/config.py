"""Llama-family model hyper-parameters read from a Hugging Face ``config.json``.

The fields mirror llama.cpp's ``llama_hparams`` as filled by ``convert_hf_to_gguf.py``
(``LlamaModel``, ``Gemma2Model``, ``Qwen3Model``, ``Qwen3MoeModel``): ``n_embd`` = ``hidden_size``,
``n_head`` = ``num_attention_heads`` and so on. Supported: Llama, Mistral, Qwen2, Gemma-2 (GEGLU,
logit softcaps, post-norms, alternating sliding-window layers), Qwen3 and Qwen3-MoE (q/k RMS norms;
MoE FFN with a softmax top-k router).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FusecError

CONFIGS_DIR = Path(__file__).parent / "configs"
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma2", "qwen3", "qwen3_moe"})
SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                     "Gemma2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"})
# HF model_type -> llama.cpp architecture (``general.architecture``) of the graph built for it.
# ``convert_hf_to_gguf.py`` converts MistralForCausalLM with LlamaModel (LLM_ARCH_LLAMA).
LLAMA_CPP_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "qwen3": "qwen3",
                  "qwen3_moe": "qwen3moe"}
ROPE_MODE_NORM = 0  # ggml rope mode 0: adjacent pairs (llama.cpp LLAMA_ROPE_TYPE_NORM: llama, mistral)
ROPE_MODE_NEOX = 2  # ggml rope mode 2: halves (LLAMA_ROPE_TYPE_NEOX: qwen2, gemma2, qwen3(moe); HF rotate_half)
NEOX_ARCHS = frozenset({"qwen2", "gemma2", "qwen3", "qwen3moe"})
# HF activation names -> the ggml unary of the gated FFN (GELU is ggml's tanh approximation)
FFN_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu"}


class ModelError(FusecError):
    """A model request that cannot be served: unknown or unsupported config, bad graph sizes, bad weights."""


class ConfigError(ModelError):
    """A model configuration that cannot be found, parsed or supported."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (``rope_scaling`` with ``rope_type == "llama3"``).

    Attributes:
        factor: divisor applied to low frequencies (dimensionless).
        low_freq_factor, high_freq_factor: wavelength band limits as divisors of
            ``original_max_position_embeddings`` (dimensionless).
        original_max_position_embeddings: pre-training context length, in tokens.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a ``LlamaForCausalLM`` model.

    Attributes:
        name: display name (shipped config stem or the file's parent folder name).
        hidden_size: ``n_embd``, elements per token embedding.
        intermediate_size: ``n_ff``, elements of the FFN hidden layer.
        num_attention_heads: ``n_head``.
        num_key_value_heads: ``n_head_kv`` (GQA: ``n_head % n_head_kv == 0``).
        head_dim: ``n_embd_head`` (= ``n_rot``), default ``hidden_size // num_attention_heads``.
        num_hidden_layers: ``n_layer``.
        rms_norm_eps: ``f_norm_rms_eps``.
        rope_theta: ``rope_freq_base``.
        rope_scaling: llama3 scaling or ``None``.
        vocab_size: ``n_vocab``.
        tie_word_embeddings: the output projection reuses ``token_embd.weight``.
        max_position_embeddings: ``n_ctx_train``, in tokens.
        arch: llama.cpp architecture of the graph: ``"llama"`` (Llama, Mistral), ``"qwen2"``,
            ``"gemma2"``, ``"qwen3"`` or ``"qwen3moe"``.
        attn_bias: q/k/v projections have biases (``blk.N.attn_{q,k,v}.bias``; Qwen2).
        sliding_window: ``n_swa`` in tokens (Mistral, Gemma-2): token at position ``p1`` does not
            attend a cell at position ``p0`` when ``p1 - p0 >= sliding_window``; ``None`` = full causal.
        rope_freqs_tensor: the weights carry ``rope_freqs.weight`` although ``rope_scaling`` is
            unknown (a GGUF file stores llama3 factors as that tensor, not as metadata).
        swa_pattern: ``None``: the sliding window (if any) applies to every layer through the one
            ``kq_mask`` (Mistral). ``n >= 1``: llama.cpp's ``set_swa_pattern(n)`` -- layer ``il``
            is a sliding-window layer iff ``il % n < n - 1`` (Gemma-2: ``n = 2``, even layers) and
            reads the ``kq_mask_swa`` input, the others the full causal ``kq_mask`` (iSWA graph).
        hidden_act: FFN gate activation: ``"silu"`` (SWIGLU) or ``"gelu_pytorch_tanh"`` (GEGLU,
            ggml's tanh-approximated GELU; Gemma-2's ``hidden_activation``).
        attn_logit_softcapping: ``c`` of Gemma-2's attention softcap ``c*tanh(kq/c)``; ``None`` = off.
        final_logit_softcapping: ``c`` of Gemma-2's output softcap ``c*tanh(logits/c)``; ``None`` = off.
        query_pre_attn_scalar: Gemma-2 scales Q by ``1/sqrt(query_pre_attn_scalar)`` before the
            attention (llama.cpp ``f_attention_scale``) and uses kq scale 1; ``None`` = the usual
            ``1/sqrt(head_dim)`` kq scale.
        embd_scale: the token embeddings are multiplied by ``sqrt(hidden_size)`` (Gemma).
        post_norms: RMS norms after the attention and after the FFN, before each residual add
            (Gemma-2 ``attn_post_norm`` / ``ffn_post_norm``; GGUF ``post_attention_norm`` / ``post_ffw_norm``).
        qk_norm: RMS norm over ``head_dim`` of each Q and K head, times ``attn_q_norm`` /
            ``attn_k_norm`` (ne = [head_dim]), before RoPE (Qwen3, Qwen3-MoE).
        n_expert: experts per MoE layer (``num_experts``, transformers 5: ``num_local_experts``); 0 = dense.
        n_expert_used: experts chosen per token (``num_experts_per_tok``, top-k of the router).
        n_ff_exp: FFN width of one expert (``moe_intermediate_size``).
        norm_topk_prob: the top-k router weights are renormalized to sum 1 (Qwen3-MoE).
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    arch: str = "llama"
    attn_bias: bool = False
    sliding_window: int | None = None
    rope_freqs_tensor: bool = False
    swa_pattern: int | None = None
    hidden_act: str = "silu"
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    embd_scale: bool = False
    post_norms: bool = False
    qk_norm: bool = False
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    norm_topk_prob: bool = False

    # -- derived sizes (llama_hparams vocabulary) -------------------------------------------------
    @property
    def n_embd_k_gqa(self) -> int:
        """Elements of one token's K row in the cache (``head_dim * n_head_kv``)."""
        return self.head_dim * self.num_key_value_heads

    @property
    def n_embd_v_gqa(self) -> int:
        """Elements of one token's V row in the cache (``head_dim * n_head_kv``)."""
        return self.head_dim * self.num_key_value_heads

    @property
    def rope_mode(self) -> int:
        """ggml rope mode of Q/K: 0 (normal, llama.cpp LLM_ARCH_LLAMA) or 2 (neox: qwen2, gemma2, qwen3(moe))."""
        return ROPE_MODE_NEOX if self.arch in NEOX_ARCHS else ROPE_MODE_NORM

    @property
    def iswa(self) -> bool:
        """Interleaved sliding-window attention: two mask inputs, ``kq_mask`` and ``kq_mask_swa``
        (llama.cpp ``build_attn_inp_kv_iswa``); see ``swa_pattern``."""
        return self.swa_pattern is not None and self.sliding_window is not None

    def is_swa(self, il: int) -> bool:
        """Whether layer ``il`` attends through the sliding window (llama.cpp ``hparams.is_swa(il)``)."""
        if self.sliding_window is None:
            return False
        if self.swa_pattern is None:
            return True
        n = self.swa_pattern
        return il % n < n - 1

    @property
    def is_moe(self) -> bool:
        """Whether the FFN of every layer is a mixture of experts (``n_expert > 0``)."""
        return self.n_expert > 0

    @property
    def has_rope_freqs(self) -> bool:
        """Whether ``rope_freqs.weight`` (ne = [head_dim/2]) is a model weight."""
        return self.rope_scaling is not None or self.rope_freqs_tensor

    def with_layers(self, n: int) -> LlamaConfig:
        """A copy truncated (or extended) to ``n`` layers; raises :class:`ConfigError` for ``n < 1``."""
        if int(n) < 1:
            raise ConfigError(f"a model needs at least 1 layer, got {n}")
        return dataclasses.replace(self, num_hidden_layers=int(n), name=f"{self.name}-L{int(n)}")

    def with_vocab(self, n: int) -> LlamaConfig:
        """A copy keeping only the first ``n`` token ids (``vocab_size = n``; ``token_embd`` /
        ``output`` get ``n`` rows): real widths with a vocabulary small enough for a device's
        buffer-binding limit (lavapipe: 128 MiB, less than Gemma-2's 2.4 GB f32 ``token_embd``).
        Raises :class:`ConfigError` for ``n < 2`` or more tokens than the model has."""
        if int(n) < 2:
            raise ConfigError(f"a vocabulary needs at least 2 tokens, got {n}")
        if int(n) > self.vocab_size:
            raise ConfigError(f"model {self.name!r} has {self.vocab_size} tokens; cannot keep the first {n}")
        return dataclasses.replace(self, vocab_size=int(n), name=f"{self.name}-V{int(n)}")

    def with_experts(self, n: int) -> LlamaConfig:
        """A MoE copy keeping only the first ``n`` experts (the router still picks
        ``min(n_expert_used, n)``): real widths with expert tensors small enough for a device's
        buffer-binding limit (Qwen3-30B-A3B's f32 ``ffn_*_exps`` are 805 MB each). Raises
        :class:`ConfigError` for a dense config, ``n < 1`` or more experts than the model has."""
        if not self.is_moe:
            raise ConfigError(f"model {self.name!r} has no experts to truncate")
        if int(n) < 1:
            raise ConfigError(f"a MoE layer needs at least 1 expert, got {n}")
        if int(n) > self.n_expert:
            raise ConfigError(f"model {self.name!r} has {self.n_expert} experts; cannot keep the first {n}")
        return dataclasses.replace(self, n_expert=int(n), n_expert_used=min(self.n_expert_used, int(n)),
                                   name=f"{self.name}-E{int(n)}")

    def rope_freq_factors(self) -> np.ndarray | None:
        """Llama 3 RoPE frequency factors (f32, ne = [head_dim/2]) or ``None`` without scaling.

        Computed as llama.cpp's converter does (``convert_hf_to_gguf.py``
        ``LlamaModel.generate_extra_tensors``, stored as ``rope_freqs.weight``): for each base
        frequency ``f_i = rope_theta ** (-2i/head_dim)`` with wavelength ``w = 2*pi/f_i`` (tokens),
        the factor is 1 when ``w < L/high_freq_factor``, ``factor`` when ``w > L/low_freq_factor``
        and ``1 / ((1 - s)/factor + s)`` with ``s = (L/w - low_freq_factor) / (high_freq_factor -
        low_freq_factor)`` in between (``L = original_max_position_embeddings``). ggml_rope_ext
        divides each rotation angle by its factor.
        """
        rs = self.rope_scaling
        if rs is None:
            return None
        dim = self.head_dim
        freqs = 1.0 / (float(self.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        out = []
        for f in freqs:
            wavelen = 2.0 * math.pi / f
            if wavelen < high_wavelen:
                out.append(1.0)
            elif wavelen > low_wavelen:
                out.append(rs.factor)
            else:
                smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
                          / (rs.high_freq_factor - rs.low_freq_factor))
                out.append(1.0 / ((1.0 - smooth) / rs.factor + smooth))
        return np.asarray(out, dtype=np.float32)


def shipped_configs() -> list[str]:
    """Names of the shipped configs (stems of ``fusec/models/configs/*.json``), sorted."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> LlamaConfig:
    """Load a :class:`LlamaConfig` from a shipped name (``"llama-3.2-1b"``, ``"smollm2-135m"``) or
    from a path to a Hugging Face ``config.json``.

    Raises :class:`ConfigError` (a ``FusecError``) for an unknown name (listing the shipped ones),
    an unreadable file, or an unsupported ``model_type``/architecture or RoPE scaling type.
    """
    s = str(name_or_path)
    shipped = CONFIGS_DIR / f"{s}.json"
    if "/" not in s and "\\" not in s and not s.endswith(".json") and shipped.is_file():
        path, name = shipped, s
    else:
        path = Path(s)
        if not path.is_file():
            raise ConfigError(f"unknown model config {s!r}: not a shipped config and not a file; "
                              f"shipped configs: {', '.join(shipped_configs())}")
        name = path.stem if path.stem != "config" else path.resolve().parent.name
    return config_from_dict(read_config_json(path), name=name)


def read_config_json(path: Path) -> dict[str, Any]:
    """The parsed HF ``config.json`` at ``path``; raises :class:`ConfigError` when it cannot be read
    or is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read model config {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config {str(path)!r} is not a JSON object")
    return data


def config_from_dict(data: dict[str, Any], name: str = "model") -> LlamaConfig:
    """Build a :class:`LlamaConfig` from a parsed HF ``config.json``; raises :class:`ConfigError`."""
    mt = data.get("model_type")
    archs = data.get("architectures") or []
    if mt not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & SUPPORTED_ARCHITECTURES):
        raise ConfigError(f"model {name!r}: unsupported model_type={mt!r} architectures={archs}; "
                          f"supported: model_type {sorted(SUPPORTED_MODEL_TYPES)} with "
                          f"architectures {sorted(SUPPORTED_ARCHITECTURES)}")
    # Gemma-2 names its activation ``hidden_activation`` (``hidden_act`` is a legacy field there)
    act = data.get("hidden_activation") if mt == "gemma2" else data.get("hidden_act", "silu")
    act = act or ("gelu_pytorch_tanh" if mt == "gemma2" else "silu")
    if act not in FFN_ACTIVATIONS or (mt == "gemma2") != (act != "silu"):
        want, field = ("'gelu_pytorch_tanh'", "hidden_activation") if mt == "gemma2" else ("'silu'", "hidden_act")
        raise ConfigError(f"model {name!r}: unsupported {field}={act!r} for model_type {mt!r} (supported: {want})")
    for flag in ("attention_bias", "mlp_bias"):
        if mt != "qwen2" and data.get(flag):
            raise ConfigError(f"model {name!r}: {flag}=true is not supported (no o_proj/MLP bias in the graph)")
    sliding = data.get("sliding_window") if mt in ("mistral", "gemma2") else None
    if mt in ("qwen2", "qwen3", "qwen3_moe") and data.get("use_sliding_window"):
        raise ConfigError(f"model {name!r}: use_sliding_window=true is not supported for {mt} "
                          f"(llama.cpp's {LLAMA_CPP_ARCH[mt]} graph has no sliding window)")
    moe = _moe_fields(data, name) if mt == "qwen3_moe" else {}
    # transformers >= 5 writes ``rope_parameters`` ({"rope_theta", "rope_type", scaling fields})
    # instead of top-level ``rope_theta`` / ``rope_scaling``.
    rope_params = data.get("rope_parameters") if isinstance(data.get("rope_parameters"), dict) else {}
    gemma = mt == "gemma2"
    try:
        sliding = None if sliding is None else int(sliding)
        hidden = int(data["hidden_size"])
        n_head = int(data["num_attention_heads"])
        n_head_kv = int(data.get("num_key_value_heads") or n_head)
        head_dim = int(data.get("head_dim") or hidden // n_head)
        rope_scaling = _rope_scaling(data.get("rope_scaling") or rope_params or None, name)
        cfg = LlamaConfig(
            name=name,
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_attention_heads=n_head,
            num_key_value_heads=n_head_kv,
            head_dim=head_dim,
            num_hidden_layers=int(data["num_hidden_layers"]),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=float(data["rope_theta"] if data.get("rope_theta") is not None
                             else rope_params.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            vocab_size=int(data["vocab_size"]),
            # Gemma-2 always ties (llama.cpp's gemma2 has no output.weight); HF's default is true there
            tie_word_embeddings=bool(data.get("tie_word_embeddings", gemma)),
            max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
            arch=LLAMA_CPP_ARCH[mt],
            attn_bias=mt == "qwen2",
            sliding_window=sliding,
            swa_pattern=2 if gemma and sliding is not None else None,
            hidden_act=act,
            attn_logit_softcapping=_opt_float(data.get("attn_logit_softcapping")) if gemma else None,
            final_logit_softcapping=_opt_float(data.get("final_logit_softcapping")) if gemma else None,
            query_pre_attn_scalar=float(data.get("query_pre_attn_scalar") or head_dim) if gemma else None,
            embd_scale=gemma,
            post_norms=gemma,
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            **moe,
        )
    except KeyError as e:
        raise ConfigError(f"model {name!r}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {name!r}: bad config value: {e}") from None
    if n_head % n_head_kv != 0:
        raise ConfigError(f"model {name!r}: num_attention_heads={n_head} is not a multiple of "
                          f"num_key_value_heads={n_head_kv}")
    if sliding is not None and sliding < 1:
        raise ConfigError(f"model {name!r}: sliding_window must be >= 1, got {sliding}")
    if head_dim % 2 != 0:
        raise ConfigError(f"model {name!r}: head_dim={head_dim} must be even for RoPE")
    if gemma:
        _check_gemma2_layer_types(data, cfg, name)
    if gemma and not cfg.tie_word_embeddings:
        raise ConfigError(f"model {name!r}: gemma2 with tie_word_embeddings=false is not supported "
                          "(llama.cpp's gemma2 graph reuses token_embd.weight as the output projection)")
    for field in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
        v = getattr(cfg, field)
        if v is not None and not v > 0:
            raise ConfigError(f"model {name!r}: {field} must be > 0 or null, got {v}")
    return cfg


def _check_gemma2_layer_types(data: dict[str, Any], cfg: LlamaConfig, name: str) -> None:
    """transformers >= 4.53 writes ``layer_types``; fusec builds llama.cpp's fixed pattern (sliding on
    even layers, ``set_swa_pattern(2)``), so any other list -- or bidirectional attention -- raises."""
    if data.get("use_bidirectional_attention"):
        raise ConfigError(f"model {name!r}: use_bidirectional_attention=true is not supported (causal decoding only)")
    types = data.get("layer_types")
    if types is None:
        return
    want = ["sliding_attention" if cfg.is_swa(il) else "full_attention" for il in range(cfg.num_hidden_layers)]
    if list(types) != want:
        raise ConfigError(f"model {name!r}: layer_types {list(types)} differ from gemma2's alternating pattern "
                          f"{want} (llama.cpp set_swa_pattern(2)); other patterns are not supported")


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _moe_fields(data: dict[str, Any], name: str) -> dict[str, Any]:
    """``n_expert`` / ``n_expert_used`` / ``n_ff_exp`` / ``norm_topk_prob`` of a ``qwen3_moe`` config.

    llama.cpp's qwen3moe graph makes every layer a MoE layer and always renormalizes the top-k
    weights (``build_moe_ffn(..., norm_w = true, ...)``): ``decoder_sparse_step != 1``, a non-empty
    ``mlp_only_layers`` or ``norm_topk_prob = false`` raise :class:`ConfigError`, as do missing or
    inconsistent expert counts.
    """
    try:
        # transformers >= 5 writes num_local_experts for Qwen3-MoE
        n_expert = int(data["num_experts"] if "num_experts" in data or "num_local_experts" not in data
                       else data["num_local_experts"])
        n_used = int(data["num_experts_per_tok"])
        n_ff_exp = int(data["moe_intermediate_size"])
    except KeyError as e:
        raise ConfigError(f"model {name!r}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {name!r}: bad config value: {e}") from None
    if not 1 <= n_used <= n_expert:
        raise ConfigError(f"model {name!r}: num_experts_per_tok={n_used} must be in 1..num_experts={n_expert}")
    if n_ff_exp < 1:
        raise ConfigError(f"model {name!r}: moe_intermediate_size must be >= 1, got {n_ff_exp}")
    if int(data.get("decoder_sparse_step", 1)) != 1 or data.get("mlp_only_layers"):
        raise ConfigError(f"model {name!r}: only all-MoE layers are supported (decoder_sparse_step 1, "
                          "mlp_only_layers []), as llama.cpp's qwen3moe graph")
    if not data.get("norm_topk_prob", True):
        raise ConfigError(f"model {name!r}: norm_topk_prob=false is not supported (llama.cpp's qwen3moe graph "
                          "always renormalizes the top-k expert weights)")
    return dict(n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp, norm_topk_prob=True)


def _rope_scaling(rs: Any, name: str) -> RopeScaling | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"model {name!r}: rope_scaling must be an object or null")
    kind = str(rs.get("rope_type", rs.get("type", ""))).lower()
    if kind in ("", "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"model {name!r}: unsupported rope_scaling type {kind!r} (supported: llama3)")
    return RopeScaling(
        factor=float(rs.get("factor", 8.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )
