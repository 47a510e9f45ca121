"""Runtime: decode sessions that drive a backend step by step."""

from .session import DecodeSession, SessionError, causal_kq_mask, round_up

__all__ = ["DecodeSession", "SessionError", "causal_kq_mask", "round_up"]
