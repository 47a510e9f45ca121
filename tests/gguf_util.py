"""Test helper: a GGUF writer with the llama.cpp metadata every test checkpoint carries."""

from __future__ import annotations


def llama_gguf_writer(path, arch: str, cfg, rope_freq_base: float):
    """A ``gguf.GGUFWriter`` for ``path`` with the hyper-parameters ``convert_hf_to_gguf.py`` writes
    for every Llama-family model (block count, context, embedding and FFN lengths, head counts,
    ``rope_freq_base``, RMS eps) from ``cfg`` (a transformers or fusec config with HF field names).
    The caller adds architecture-specific keys and tensors and writes the file."""
    import gguf  # noqa: PLC0415  (tests that use this skip without gguf)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return w
