"""Runtime: decode sessions that drive a backend step by step, and the graph cache behind them."""

from .cache import CacheEntry, CacheStats, GraphCache
from .key import CacheError, StructuralKey, structural_key
from .session import DecodeSession, SessionError, causal_kq_mask, round_up

__all__ = ["CacheEntry", "CacheError", "CacheStats", "DecodeSession", "GraphCache", "SessionError", "StructuralKey",
           "causal_kq_mask", "round_up", "structural_key"]
