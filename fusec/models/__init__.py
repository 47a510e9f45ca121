"""Llama-family models (Llama, Mistral, Qwen2, Gemma-2, Qwen3, Qwen3-MoE): HF configs, llama.cpp-equivalent
decode graphs, weights, KV caches, and checkpoint loaders (GGUF, HF safetensors; ``loaders.load_model``)."""

from .config import ConfigError, LlamaConfig, ModelError, RopeScaling, config_from_dict, load_config, shipped_configs
from .llama import build_llama_decode
from .loaders import hf_to_gguf_name, is_checkpoint_path, load_model, permute_rope_rows
from .tokenizer import Tokenizer
from .weights import TensorSpec, empty_kv_cache, kv_cache_specs, random_weights, weight_specs

__all__ = [
    "ConfigError", "LlamaConfig", "ModelError", "RopeScaling", "TensorSpec", "Tokenizer", "build_llama_decode",
    "hf_to_gguf_name", "is_checkpoint_path", "load_model", "permute_rope_rows",
    "config_from_dict", "empty_kv_cache", "kv_cache_specs", "load_config", "random_weights", "shipped_configs",
    "weight_specs",
]
