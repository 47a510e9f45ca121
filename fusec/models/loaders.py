"""Real checkpoints in: GGUF files (``gguf``) and Hugging Face directories (``safetensors``).

:func:`load_model` returns ``(cfg, weights, tokenizer)`` where ``weights`` holds every tensor of
:func:`fusec.models.weights.weight_specs` by GGUF name, as a numpy array of shape ``ne[::-1]``
(4-D; numpy order), float32 (matrices float16 with ``weight_dtype="f16"``), in the layout of a
llama.cpp GGUF file, so the same decode graph serves both sources.

Supported architectures (HF ``architectures`` / GGUF ``general.architecture``):

* ``LlamaForCausalLM`` / ``llama`` and ``MistralForCausalLM`` (converted by llama.cpp as
  ``llama``; its ``sliding_window`` is kept in ``cfg.sliding_window``, and read back from a GGUF's
  ``llama.attention.sliding_window``): rope mode 0 (normal, adjacent pairs).
* ``Qwen2ForCausalLM`` / ``qwen2``: q/k/v biases, rope mode 2 (NEOX).
* ``Gemma2ForCausalLM`` / ``gemma2``: rope NEOX, tied output, four norms per layer. HF's
  ``post_attention_layernorm`` is Gemma-2's post-attention norm (GGUF ``post_attention_norm``), not
  the FFN pre-norm (``pre_feedforward_layernorm`` -> ``ffn_norm``). Gemma's ``RMSNorm`` computes
  ``x_normed * (1 + w)`` while llama.cpp multiplies by the stored weight, so ``convert_hf_to_gguf.py``
  (``Gemma2Model.modify_tensors``) stores ``w + 1`` for every ``*norm.weight``; the HF loader adds 1
  the same way.
* ``Qwen3ForCausalLM`` / ``qwen3``: rope NEOX, ``self_attn.{q,k}_norm`` -> ``attn_{q,k}_norm``.
* ``Qwen3MoeForCausalLM`` / ``qwen3moe``: as Qwen3, plus the router ``mlp.gate.weight`` ->
  ``ffn_gate_inp.weight`` and the per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` stacked
  along a third axis into ``ffn_{gate,up,down}_exps.weight`` (ne = [in, out, n_expert]), as
  ``convert_hf_to_gguf.py`` (``Qwen2MoeModel.modify_tensors``) does.

**RoPE layout.** HF Llama/Mistral rotate the two *halves* of each head (``rotate_half``), while
llama.cpp's ``llama`` graph rotates *adjacent pairs*; ``convert_hf_to_gguf.py``
(``LlamaModel.permute``) therefore reorders the rows of ``q_proj``/``k_proj`` within each head so
that row ``2i`` is HF row ``i`` and row ``2i+1`` is HF row ``i + head_dim/2``. fusec builds the
graph in mode 0 for these architectures and applies the same permutation when it loads an HF
checkpoint (:func:`permute_rope_rows`), so an HF directory and its GGUF conversion produce the same
weights and logits. Qwen2 is NEOX in llama.cpp (halves, like HF): no permutation.

Tensor types: GGUF F32, F16, BF16, Q8_0 and Q4_0 (dequantized on load with ``gguf.quants``);
safetensors F32, F16 and BF16. Everything is validated (architecture, metadata, every tensor's
presence, shape and type, unexpected tensors) before any data is converted, and errors are
:class:`fusec.models.config.ModelError` naming the tensor or field.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..ir.dtypes import DType
from .config import LlamaConfig, ModelError, config_from_dict, read_config_json
from .tokenizer import Tokenizer
from .weights import TensorSpec, parse_float_dtype, weight_specs

GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma2", "qwen3", "qwen3moe")
GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
SAFETENSORS_DTYPES = ("F32", "F16", "BF16")

# HF (transformers LlamaModel/MistralModel/Qwen2Model) -> GGUF (llama.cpp tensor names).
_HF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# Gemma-2's four norms per layer (HF Gemma2DecoderLayer -> llama.cpp gemma2 tensors)
_HF_LAYER_GEMMA2 = {**_HF_LAYER,
                    "post_attention_layernorm.weight": "post_attention_norm.weight",
                    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                    "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
# Qwen3's per-head q/k norms
_HF_LAYER_QWEN3 = {**_HF_LAYER,
                   "self_attn.q_norm.weight": "attn_q_norm.weight",
                   "self_attn.k_norm.weight": "attn_k_norm.weight"}
# Qwen3-MoE: the router; the experts (one HF tensor per expert) are stacked, see _HF_EXPERT_RE
_HF_LAYER_QWEN3MOE = {**_HF_LAYER_QWEN3, "mlp.gate.weight": "ffn_gate_inp.weight"}
_HF_LAYER_BY_ARCH = {"gemma2": _HF_LAYER_GEMMA2, "qwen3": _HF_LAYER_QWEN3, "qwen3moe": _HF_LAYER_QWEN3MOE}
# model.layers.{il}.mlp.experts.{e}.{gate,up,down}_proj.weight -> expert e of blk.{il}.ffn_{gate,up,down}_exps.weight
_HF_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some older checkpoints saved


def hf_to_gguf_name(name: str, arch: str = "llama") -> str | None:
    """GGUF name of an HF tensor name (``model.layers.3.self_attn.q_proj.weight`` ->
    ``blk.3.attn_q.weight``), or ``None`` when the name has no counterpart. ``arch`` is the
    llama.cpp architecture (``cfg.arch``): Gemma-2 and Qwen3 map extra norms (see the module doc)."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    table = _HF_LAYER_BY_ARCH.get(arch, _HF_LAYER)
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in table:
        return f"blk.{m.group(1)}.{table[m.group(2)]}"
    return None


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of an HF q/k projection from rotate-half to adjacent-pair RoPE layout.

    ``w`` has numpy shape ``(n_head * head_dim, n_embd)`` (HF ``(out, in)``; a 1-D bias works too).
    Within each head, output row ``2i`` is input row ``i`` and row ``2i+1`` is input row
    ``i + head_dim/2`` -- the permutation of llama.cpp's ``convert_hf_to_gguf.py``
    (``LlamaModel.permute``, with ``n_head_kv`` for ``k_proj``). Returns a new array.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelError(f"cannot permute {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def gemma_norm_weight(w: np.ndarray) -> np.ndarray:
    """Gemma's HF RMSNorm weight ``w`` (the model computes ``x_normed * (1 + w)``) as llama.cpp
    stores it: ``w + 1`` in float32 (``convert_hf_to_gguf.py`` ``Gemma2Model.modify_tensors``).
    Returns a new array of ``w``'s shape."""
    return np.asarray(w, dtype=np.float32) + np.float32(1.0)


def load_model(path: str | Path, *, weight_dtype: DType | str = "f32"
               ) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer | None]:
    """Load a GGUF file or an HF checkpoint directory.

    Args:
        path: a ``.gguf`` file, or a directory holding ``config.json`` and ``*.safetensors``
            (optionally ``tokenizer.json``).
        weight_dtype: "f32" (default) or "f16" for the matrices; norms and biases stay f32.

    Returns:
        ``(cfg, weights, tokenizer)``: the config, the GGUF-named weights (see the module doc) and
        a :class:`Tokenizer` (``tokenizer.json``, or a GGUF's byte-level BPE vocabulary) or
        ``None`` when the checkpoint has no usable vocabulary.

    Raises:
        ModelError: unreadable file, unsupported architecture / tensor type, missing or misshaped
            tensor, unexpected tensor; the message names the file and the tensor or field.
    """
    p = Path(path)
    wt = parse_float_dtype(weight_dtype, "weight_dtype")
    if p.is_dir():
        return load_hf(p, weight_dtype=wt)
    if p.is_file():
        return load_gguf(p, weight_dtype=wt)
    raise ModelError(f"model path {str(p)!r} does not exist")


def is_checkpoint_path(s: str) -> bool:
    """Whether ``s`` names a checkpoint for :func:`load_model` (a directory or a ``.gguf`` file)
    rather than a config name or ``config.json`` path."""
    p = Path(s)
    return p.is_dir() or (p.is_file() and p.suffix.lower() == ".gguf")


# ---------------------------------------------------------------------------------------------
# common validation


def _check_names(where: str, cfg: LlamaConfig, specs: Mapping[str, TensorSpec], present: Mapping[str, Any],
                 extra: list[str]) -> None:
    missing = [n for n in specs if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"{where}: missing tensor {missing[0]!r}{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ModelError(f"{where}: unexpected tensor {extra[0]!r}{more}: not used by the {cfg.arch!r} graph "
                         f"of this config ({cfg.num_hidden_layers} layers)")


def _check_shape(where: str, spec: TensorSpec, ne: tuple[int, ...], src_name: str) -> None:
    ne4 = tuple(int(x) for x in ne) + (1,) * (4 - len(ne))
    if len(ne) > 4 or ne4 != spec.ne:
        label = spec.name if src_name == spec.name else f"{src_name} ({spec.name})"
        raise ModelError(f"{where}: tensor {label!r} has ne={list(ne)} (ggml order), expected "
                         f"{[d for d in spec.ne]} from the config")


def _finish(arr: np.ndarray, spec: TensorSpec, wt: DType) -> np.ndarray:
    target = np.float16 if spec.ne[1] > 1 and wt.np == np.float16 else np.float32
    return np.asarray(arr).astype(target, copy=False).reshape(spec.np_shape)


# ---------------------------------------------------------------------------------------------
# GGUF


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - depends on the environment
        raise ModelError("reading GGUF files needs the 'gguf' package: pip install 'fusec[models]'") from None
    return gguf


def _field(reader, key: str, where: str, default: Any = ...) -> Any:
    f = reader.get_field(key)
    if f is None:
        if default is ...:
            raise ModelError(f"{where}: missing metadata key {key!r}")
        return default
    return f.contents()


def gguf_config(reader, name: str, where: str) -> LlamaConfig:
    """A :class:`LlamaConfig` from GGUF metadata (llama.cpp ``llm_load_hparams`` keys).

    Required: ``general.architecture``, ``<arch>.block_count``, ``.embedding_length``,
    ``.feed_forward_length``, ``.attention.head_count``, ``.attention.layer_norm_rms_epsilon``.
    Optional: ``.attention.head_count_kv`` (= head_count), ``.attention.key_length`` /
    ``.rope.dimension_count`` (= n_embd/n_head; must be equal), ``.rope.freq_base`` (10000),
    ``.context_length`` (2048), ``.vocab_size`` (rows of ``token_embd.weight``),
    ``.attention.sliding_window``. ``gemma2`` (as llama.cpp's hparams): ``.attention.sliding_window``
    (4096) on even layers, ``.attn_logit_softcapping`` (50), ``.final_logit_softcapping`` (30), Q scale
    ``1/sqrt(head_dim)`` (27B, 46 layers: ``1/sqrt(n_embd/n_head)``). ``qwen3moe``: ``.expert_count``,
    ``.expert_used_count`` (required), ``.expert_feed_forward_length`` (= feed_forward_length /
    expert_used_count). Raises :class:`ModelError` naming the key.
    """
    arch = _field(reader, "general.architecture", where)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(f"{where}: unsupported architecture general.architecture={arch!r} "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    try:
        n_embd = int(_field(reader, f"{arch}.embedding_length", where))
        n_head = int(_field(reader, f"{arch}.attention.head_count", where))
        n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", where, n_head))
        head_dim = int(_field(reader, f"{arch}.attention.key_length", where, n_embd // n_head))
        n_rot = int(_field(reader, f"{arch}.rope.dimension_count", where, head_dim))
        emb = tensors.get("token_embd.weight")
        n_vocab = _field(reader, f"{arch}.vocab_size", where, None)
        if n_vocab is None:
            if emb is None:
                raise ModelError(f"{where}: missing tensor 'token_embd.weight'")
            n_vocab = int(emb.shape[1])
        scaling = _field(reader, f"{arch}.rope.scaling.type", where, "none")
        if scaling not in ("none", ""):
            raise ModelError(f"{where}: unsupported {arch}.rope.scaling.type={scaling!r} (supported: none; "
                             "llama3 scaling comes as the rope_freqs.weight tensor)")
        swa = _field(reader, f"{arch}.attention.sliding_window", where, None)
        n_layer = int(_field(reader, f"{arch}.block_count", where))
        n_ff = int(_field(reader, f"{arch}.feed_forward_length", where, 0 if arch == "qwen3moe" else ...))
        extra: dict[str, Any] = {}
        if arch == "gemma2":  # llama_model_loader hparams for LLM_ARCH_GEMMA2
            swa = 4096 if swa is None else swa
            extra = dict(swa_pattern=2, hidden_act="gelu_pytorch_tanh", embd_scale=True, post_norms=True,
                         attn_logit_softcapping=float(_field(reader, f"{arch}.attn_logit_softcapping", where, 50.0)),
                         final_logit_softcapping=float(_field(reader, f"{arch}.final_logit_softcapping", where,
                                                              30.0)),
                         query_pre_attn_scalar=float(n_embd // n_head if n_layer == 46 else head_dim))
        elif arch == "qwen3moe":
            n_expert = int(_field(reader, f"{arch}.expert_count", where))
            n_used = int(_field(reader, f"{arch}.expert_used_count", where))
            if not 1 <= n_used <= n_expert:
                raise ModelError(f"{where}: {arch}.expert_used_count={n_used} must be in 1..expert_count={n_expert}")
            extra = dict(n_expert=n_expert, n_expert_used=n_used, norm_topk_prob=True,
                         n_ff_exp=int(_field(reader, f"{arch}.expert_feed_forward_length", where, n_ff // n_used)))
        cfg = LlamaConfig(
            name=name,
            hidden_size=n_embd,
            intermediate_size=n_ff,
            num_attention_heads=n_head,
            num_key_value_heads=n_head_kv,
            head_dim=head_dim,
            num_hidden_layers=n_layer,
            rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", where)),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", where, 10000.0)),
            rope_scaling=None,
            vocab_size=int(n_vocab),
            tie_word_embeddings="output.weight" not in tensors,
            max_position_embeddings=int(_field(reader, f"{arch}.context_length", where, 2048)),
            arch=arch,
            attn_bias=arch == "qwen2",
            sliding_window=None if swa is None or int(swa) == 0 else int(swa),
            rope_freqs_tensor="rope_freqs.weight" in tensors,
            qk_norm=arch in ("qwen3", "qwen3moe"),
            **extra,
        )
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: bad metadata value: {e}") from None
    if n_rot != head_dim:
        raise ModelError(f"{where}: {arch}.rope.dimension_count={n_rot} != head dim {head_dim} (partial RoPE "
                         "is not supported)")
    if n_head_kv < 1 or n_head % n_head_kv:
        raise ModelError(f"{where}: {arch}.attention.head_count={n_head} is not a multiple of "
                         f"{arch}.attention.head_count_kv={n_head_kv}")
    if head_dim % 2:
        raise ModelError(f"{where}: head dim {head_dim} must be even for RoPE")
    return cfg


def load_gguf(path: str | Path, *, weight_dtype: DType | str = "f32"
              ) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer | None]:
    """Load a llama.cpp GGUF file (see :func:`load_model`). F32 tensors are used straight from
    the file's memory map (no copy); F16/BF16/Q8_0/Q4_0 are converted once, with ``gguf.quants``."""
    gguf = _gguf()
    wt = parse_float_dtype(weight_dtype, "weight_dtype")
    path = Path(path)
    where = str(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError) as e:
        raise ModelError(f"{where}: not a readable GGUF file: {e}") from None
    cfg = gguf_config(reader, path.stem, where)
    specs = weight_specs(cfg)
    tensors = {t.name: t for t in reader.tensors}
    _check_names(where, cfg, specs, tensors, [n for n in tensors if n not in specs])
    for name, spec in specs.items():
        t = tensors[name]
        _check_shape(where, spec, tuple(int(x) for x in t.shape), name)
        tname = t.tensor_type.name
        if tname not in GGUF_TENSOR_TYPES:
            raise ModelError(f"{where}: tensor {name!r} has unsupported type {tname} "
                             f"(supported: {', '.join(GGUF_TENSOR_TYPES)})")
        if spec.ne[1] == 1 and tname not in ("F32", "F16", "BF16"):
            raise ModelError(f"{where}: 1-D tensor {name!r} has type {tname}; expected a float type")
    weights: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        t = tensors[name]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            arr = t.data
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            arr = t.data.astype(np.float32) if wt.np != np.float16 or spec.ne[1] == 1 else t.data
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        weights[name] = _finish(arr, spec, wt)
    return cfg, weights, gguf_tokenizer(reader)


def gguf_tokenizer(reader) -> Tokenizer | None:
    """The GGUF's embedded vocabulary as a :class:`Tokenizer` when it is a byte-level BPE
    (``tokenizer.ggml.model == "gpt2"`` with tokens and merges), else ``None``."""
    if _field(reader, "tokenizer.ggml.model", "", None) != "gpt2":
        return None
    tokens = _field(reader, "tokenizer.ggml.tokens", "", None)
    merges = _field(reader, "tokenizer.ggml.merges", "", None)
    if not tokens or merges is None:
        return None
    eos = _field(reader, "tokenizer.ggml.eos_token_id", "", None)
    eot = _field(reader, "tokenizer.ggml.eot_token_id", "", None)
    return Tokenizer.from_gguf_vocab(
        tokens, merges,
        token_types=_field(reader, "tokenizer.ggml.token_type", "", []) or [],
        pre=_field(reader, "tokenizer.ggml.pre", "", None),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id", "", None),
        eos_ids=[i for i in (eos, eot) if i is not None],
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", "", False)),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header) of a safetensors file: u64 little-endian header size, JSON."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def load_hf(path: str | Path, *, weight_dtype: DType | str = "f32"
            ) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer | None]:
    """Load an HF checkpoint directory (see :func:`load_model`): ``config.json``, every
    ``*.safetensors`` file (sharded checkpoints included), ``tokenizer.json`` if present.

    Tensors are read through safetensors' memory map (``safe_open``): F32/F16 once into numpy by
    ``get_tensor``; BF16 (which numpy lacks) as a read-only ``np.memmap`` of its bytes, widened once
    by ``gguf.quants`` (BF16). Llama/Mistral q/k projections are permuted to llama.cpp's layout
    (:func:`permute_rope_rows`); llama3 ``rope_freqs.weight`` is computed from ``rope_scaling``;
    Gemma-2 norm weights get ``+1`` (:func:`gemma_norm_weight`); Qwen3-MoE expert tensors are
    stacked per layer and projection (every expert ``0..n_expert-1`` must be present, all of one
    shape and dtype).
    """
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - depends on the environment
        raise ModelError("reading HF checkpoints needs the 'safetensors' package: "
                         "pip install 'fusec[models]'") from None
    wt = parse_float_dtype(weight_dtype, "weight_dtype")
    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{d}: not an HF checkpoint directory (no config.json)")
    data = read_config_json(cfg_path)
    cfg = config_from_dict(data, name=d.resolve().name)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{d}: no *.safetensors files (only safetensors checkpoints are supported)")
    specs = weight_specs(cfg)

    # pass 1: names, dtypes, shapes (no tensor data read)
    found: dict[str, tuple[Any, str, str, tuple[int, ...]]] = {}  # gguf name -> (file, hf name, dtype, shape)
    experts: dict[str, dict[int, tuple[Path, str, str, tuple[int, ...]]]] = {}  # stacked name -> expert -> entry
    extra: list[str] = []
    for f in files:
        try:
            with safe_open(str(f), framework="np") as st:
                for hf_name in st.keys():
                    sl = st.get_slice(hf_name)
                    em = _HF_EXPERT_RE.match(hf_name) if cfg.is_moe else None
                    if em:
                        gname = f"blk.{em.group(1)}.ffn_{em.group(3)}_exps.weight"
                        if gname in specs and int(em.group(2)) < cfg.n_expert:
                            experts.setdefault(gname, {})[int(em.group(2))] = (
                                f, hf_name, str(sl.get_dtype()), tuple(int(x) for x in sl.get_shape()))
                        else:
                            extra.append(hf_name)
                        continue
                    gname = hf_to_gguf_name(hf_name, cfg.arch)
                    if gname is None or gname not in specs:
                        if gname == "output.weight" and cfg.tie_word_embeddings:
                            continue  # a tied lm_head saved anyway: llama.cpp also ignores it
                        if not _HF_IGNORED_RE.search(hf_name):
                            extra.append(hf_name)
                        continue
                    found[gname] = (f, hf_name, str(sl.get_dtype()), tuple(int(x) for x in sl.get_shape()))
        except Exception as e:  # safetensors raises its own SafetensorError for a corrupt file
            raise ModelError(f"{f}: not a readable safetensors file: {e}") from None
    where = str(d)
    for gname, by_expert in experts.items():
        found[gname] = _stack_entry(where, gname, by_expert, cfg.n_expert)
    rope_freqs = cfg.rope_freq_factors()
    if rope_freqs is not None:
        found["rope_freqs.weight"] = (d, "rope_freqs.weight", "F32", tuple(rope_freqs.shape))
    missing_hf = {v: k for k, v in _HF_GLOBAL.items()}
    for name in specs:
        if name not in found:
            m = re.match(r"blk\.(\d+)\.(.+)$", name)
            em = re.match(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$", name)
            if em:
                raise ModelError(f"{where}: missing tensor 'model.layers.{em.group(1)}.mlp.experts.0."
                                 f"{em.group(2)}_proj.weight' ({name})")
            hf = missing_hf.get(name) or (m and next(
                (f"model.layers.{m.group(1)}.{k}" for k, v in _HF_LAYER_BY_ARCH.get(cfg.arch, _HF_LAYER).items()
                 if v == m.group(2)), None))
            raise ModelError(f"{where}: missing tensor {hf or name!r} ({name})")
    _check_names(where, cfg, specs, found, extra)
    for name, spec in specs.items():
        f, hf_name, dt, shape = found[name]
        _check_shape(where, spec, tuple(reversed(shape)), hf_name)
        if dt not in SAFETENSORS_DTYPES:
            raise ModelError(f"{where}: tensor {hf_name!r} has unsupported dtype {dt} "
                             f"(supported: {', '.join(SAFETENSORS_DTYPES)})")

    # pass 2: data
    gguf = None
    headers: dict[Path, tuple[int, dict[str, Any]]] = {}
    weights: dict[str, np.ndarray] = {}

    def read(st, f: Path, hf_name: str, dt: str, shape: tuple[int, ...]) -> np.ndarray:
        nonlocal gguf
        if dt != "BF16":
            return st.get_tensor(hf_name)
        gguf = gguf or _gguf()
        if f not in headers:
            headers[f] = _safetensors_header(f)
        start, header = headers[f]
        b, e = header[hf_name]["data_offsets"]
        raw = np.memmap(f, dtype=np.uint8, mode="r", offset=start + b, shape=(e - b,))
        byte_shape = (*shape[:-1], shape[-1] * 2) if shape else (2,)
        return gguf.quants.dequantize(raw.reshape(byte_shape), gguf.GGMLQuantizationType.BF16)

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(f: Path):
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(str(f), framework="np"))
            return handles[f]

        for name in specs:
            f, hf_name, dt, shape = found[name]
            if f == d:  # computed tensors
                weights[name] = _finish(rope_freqs, specs[name], wt)
                continue
            if f is None:  # stacked experts: hf_name is the label, the entries follow in order
                arr = np.stack([read(handle(ef), ef, en, edt, eshape)
                                for ef, en, edt, eshape in experts[name].values()])
            else:
                arr = read(handle(f), f, hf_name, dt, shape)
            if cfg.rope_mode == 0 and name.endswith((".attn_q.weight", ".attn_k.weight")):
                heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
                arr = permute_rope_rows(arr, heads)
            if cfg.arch == "gemma2" and name.endswith("norm.weight"):
                arr = gemma_norm_weight(arr)
            weights[name] = _finish(arr, specs[name], wt)
    return cfg, weights, hf_tokenizer(d, data)


def _stack_entry(where: str, gname: str, by_expert: dict[int, tuple[Path, str, str, tuple[int, ...]]],
                 n_expert: int) -> tuple[None, str, str, tuple[int, ...]]:
    """The ``found`` entry of a stacked expert tensor: ``(None, label, dtype, (n_expert, *shape))``;
    sorts ``by_expert`` in place by expert. Raises :class:`ModelError` for a missing expert or experts
    of different shapes or dtypes."""
    some_e, some = next(iter(by_expert.items()))
    missing = [e for e in range(n_expert) if e not in by_expert]
    if missing:
        hf = some[1].replace(f".experts.{some_e}.", f".experts.{missing[0]}.")
        raise ModelError(f"{where}: missing tensor {hf!r} ({gname}, expert {missing[0]} of {n_expert})")
    entries = [by_expert[e] for e in range(n_expert)]
    by_expert.clear()
    by_expert.update(enumerate(entries))
    first = entries[0]
    for _, hf_name, dt, shape in entries[1:]:
        if (dt, shape) != (first[2], first[3]):
            raise ModelError(f"{where}: tensor {hf_name!r} has dtype {dt} shape {list(shape)}, but expert 0 of "
                             f"{gname} has {first[2]} {list(first[3])}: experts must agree")
    return None, first[1].replace(".experts.0.", ".experts.*."), first[2], (n_expert, *first[3])


def hf_tokenizer(d: Path, config: Mapping[str, Any]) -> Tokenizer | None:
    """``d/tokenizer.json`` as a :class:`Tokenizer` (EOS ids from ``generation_config.json`` or
    ``config.json``), or ``None`` without that file."""
    tj = d / "tokenizer.json"
    if not tj.is_file():
        return None
    eos: Any = config.get("eos_token_id")
    gen = d / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        except (OSError, ValueError):
            pass
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return Tokenizer.from_file(tj, eos_ids=eos_ids)


__all__ = ["gemma_norm_weight", "gguf_config", "hf_to_gguf_name", "is_checkpoint_path", "load_gguf", "load_hf",
           "load_model", "permute_rope_rows"]
