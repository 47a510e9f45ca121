"""Llama-family models: HF configs, llama.cpp-equivalent decode graphs, weights and KV caches."""

from .config import ConfigError, LlamaConfig, ModelError, RopeScaling, config_from_dict, load_config, shipped_configs
from .llama import build_llama_decode
from .weights import TensorSpec, empty_kv_cache, kv_cache_specs, random_weights, weight_specs

__all__ = [
    "ConfigError", "LlamaConfig", "ModelError", "RopeScaling", "TensorSpec", "build_llama_decode",
    "config_from_dict", "empty_kv_cache", "kv_cache_specs", "load_config", "random_weights", "shipped_configs",
    "weight_specs",
]
