"""Token-by-token decoding of a Llama model on a backend, with the KV cache kept on the device.

One sequence, KV cells used in order (cell ``i`` holds position ``i``), as llama.cpp's
``llama_kv_cache`` for a single sequence without shifts. Each :meth:`DecodeSession.step` builds
(or reuses) the decode graph for its ``(n_tokens, n_kv)``, optionally fuses it, compiles it and
runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..backends import Backend, get_backend
from ..errors import FusecError
from ..ir.dtypes import F16, F32, DType
from ..ir.graph import Graph
from ..models.config import LlamaConfig
from ..models.llama import build_llama_decode
from ..models.weights import empty_kv_cache, parse_float_dtype
from .cache import PHASES, GraphCache


class SessionError(FusecError):
    """A decode request the session cannot serve (KV cache full, token id out of range...)."""


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (as ``GGML_PAD``)."""
    return (n + multiple - 1) // multiple * multiple


def causal_kq_mask(pos: int, n_tokens: int, n_kv: int, sliding_window: int | None = None) -> np.ndarray:
    """``kq_mask`` for one sequence whose token ``i`` sits at position (= KV cell) ``pos + i``.

    As llama.cpp's ``set_input_kq_mask`` with causal attention: entry ``[i, j]`` is 0 when cell
    ``j`` holds a position ``<= pos + i`` and ``-inf`` otherwise (later tokens and empty cells).
    With ``sliding_window`` (``n_swa``, tokens) a cell is also masked when ``(pos + i) - j >=
    sliding_window`` (llama.cpp ``is_masked_swa`` for ``LLAMA_SWA_TYPE_STANDARD``; the same rule
    as transformers' sliding-window causal mask). Returns float32 of numpy shape
    ``(1, 1, n_tokens, n_kv)`` (ne = [n_kv, n_tokens]).
    """
    cells = np.arange(n_kv)[None, :]
    limit = (pos + np.arange(n_tokens))[:, None]
    allowed = cells <= limit
    if sliding_window is not None:
        allowed &= (limit - cells) < int(sliding_window)
    mask = np.where(allowed, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
    return mask.reshape(1, 1, n_tokens, n_kv)


class DecodeSession:
    """Greedy-capable decoding state: weights and KV cache in ``backend``, current position.

    Args:
        cfg: model hyper-parameters.
        backend: a :class:`Backend` instance or a name for :func:`fusec.backends.get_backend`.
        weights: GGUF-named weights (``fusec.models.weights.random_weights`` layout); matrices of
            float16 select an f16-weight graph.
        kv_size: KV cache size in cells (tokens); the session can decode that many positions.
        patterns: ``None`` for no fusion, else the patterns handed to ``fusec.rewrite.rewrite``.
        kv_pad: ``n_kv`` is ``min(kv_size, round_up(pos + n_tokens, kv_pad))`` (llama.cpp pads to
            256); larger pads mean fewer distinct graphs, smaller ones less attention work.
        kv_dtype: "f32" or "f16" cache elements.
        cache_graphs: reuse compiled graphs through :attr:`graph_cache` (a
            :class:`~fusec.runtime.cache.GraphCache`; ``FUSEC_DISABLE_GRAPH_CACHE=1`` also turns it
            off): a step with an ``(n_tokens, n_kv)`` seen before neither builds nor compiles.

    Attributes:
        pos: number of positions already in the KV cache.
        timings: one dict per step: ``pos``, ``n_tokens``, ``n_kv``, ``cached`` (graph-cache hit),
            ``reused`` (hit without building) and host seconds ``build_s``, ``rewrite_s``,
            ``codegen_s``, ``compile_s`` (backend compile without codegen), ``lookup_s`` (key,
            lookup, input validation), ``run_s`` (encode+launch, waiting for the logits).
        graph_cache: the :class:`~fusec.runtime.cache.GraphCache` (statistics in ``.stats``).
        last_report: the FusionReport of the graph run by the last step (``None`` without fusion).
        last_graph: the (rewritten) graph run by the last step.
        last_inputs: the inputs of the last step by leaf name (to replay it elsewhere).

    Raises :class:`fusec.errors.FusecError` subclasses: ``ModelError`` for bad sizes or dtypes,
    ``BackendError`` from the backend, :class:`SessionError` for bad steps.
    """

    def __init__(self, cfg: LlamaConfig, backend: Backend | str, weights: Mapping[str, np.ndarray], *,
                 kv_size: int, patterns: Sequence[Any] | None = None, kv_pad: int = 32,
                 kv_dtype: DType | str = "f32", cache_graphs: bool = True) -> None:
        if int(kv_pad) < 1:
            raise SessionError(f"kv_pad must be >= 1, got {kv_pad}")
        self.cfg = cfg
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.kv_size = int(kv_size)
        self.kv_dtype = parse_float_dtype(kv_dtype, "kv_dtype")
        self.patterns = None if patterns is None else list(patterns)
        self.kv_pad = int(kv_pad)
        self.cache_graphs = cache_graphs
        emb = weights.get("token_embd.weight")
        if emb is None:
            raise SessionError("weights lack 'token_embd.weight'")
        self.weight_dtype = F16 if np.asarray(emb).dtype == np.float16 else F32
        self.backend.set_weights(weights)
        self.pos = 0
        self.timings: list[dict[str, Any]] = []
        self.last_report: Any = None
        self.last_graph: Graph | None = None
        self.last_inputs: dict[str, np.ndarray] = {}
        self.graph_cache = GraphCache(self.backend, self.patterns, enabled=None if cache_graphs else False)
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the KV cache (zeros) and go back to position 0."""
        self.backend.set_weights(empty_kv_cache(self.cfg, self.kv_size, self.kv_dtype))
        self.pos = 0

    def n_kv_for(self, n_tokens: int) -> int:
        """Cells the attention reads when ``n_tokens`` tokens follow the current position."""
        return min(self.kv_size, round_up(self.pos + n_tokens, self.kv_pad))

    def make_inputs(self, token_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The graph inputs of a step over ``token_ids`` at the current position (by leaf name).

        ``inp_tokens``/``inp_pos``/``k_idxs`` int32 ``(n_tokens,)``; ``v_idxs`` int32
        ``(n_tokens*n_embd_v_gqa,)`` with entry ``i*n_embd_v_gqa + c = c*kv_size + pos + i``
        (llama.cpp ``set_input_v_idxs``, transposed V cache); ``kq_mask`` from
        :func:`causal_kq_mask` (with ``cfg.sliding_window``). Raises :class:`SessionError` for an
        empty step, a token id outside ``[0, vocab_size)`` or a step that overflows the KV cache.
        """
        ids = np.asarray(list(token_ids), dtype=np.int64)
        n = int(ids.size)
        if n == 0:
            raise SessionError("a decode step needs at least one token")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise SessionError(f"token ids must be in [0, {self.cfg.vocab_size}), got {ids.tolist()}")
        if self.pos + n > self.kv_size:
            raise SessionError(f"KV cache full: {self.pos} cells used + {n} new tokens > kv_size={self.kv_size}")
        cells = np.arange(self.pos, self.pos + n, dtype=np.int32)
        chan = np.arange(self.cfg.n_embd_v_gqa, dtype=np.int32)
        v_idxs = (chan[None, :] * self.kv_size + cells[:, None]).astype(np.int32).reshape(-1)
        return {
            "inp_tokens": ids.astype(np.int32),
            "inp_pos": cells.copy(),
            "k_idxs": cells.copy(),
            "v_idxs": v_idxs,
            "kq_mask": causal_kq_mask(self.pos, n, self.n_kv_for(n), self.cfg.sliding_window),
        }

    # -- graphs ----------------------------------------------------------------------------------
    def _build(self, n_tokens: int, n_kv: int) -> Graph:
        return build_llama_decode(self.cfg, n_tokens, n_kv, self.kv_size, kv_dtype=self.kv_dtype,
                                  weight_dtype=self.weight_dtype)

    def _run_graph(self, n_tokens: int, n_kv: int, inputs: dict[str, np.ndarray],
                   timing: dict[str, Any]) -> tuple[dict[str, np.ndarray], Graph, Any]:
        """Run one step through :attr:`graph_cache`: ``(n_tokens, n_kv)`` is everything the decode
        graph depends on besides the session's fixed settings, so a step with a known pair reuses
        its entry without building (``can_reuse``); otherwise build, then hit or miss by structure."""
        outs, entry = self.graph_cache.step((n_tokens, n_kv), lambda: self._build(n_tokens, n_kv), inputs)
        lt = self.graph_cache.last_timing
        timing.update(cached=bool(lt["hit"]), reused=bool(lt["reused"]),
                      **{k: float(lt.get(k, 0.0)) for k in (*PHASES, "lookup_s")})
        return outs, entry.graph, entry.report

    # -- decoding --------------------------------------------------------------------------------
    def step(self, token_ids: Sequence[int]) -> np.ndarray:
        """Decode ``token_ids`` (one or more new tokens) and append them to the KV cache.

        Returns float32 logits of numpy shape ``(n_tokens, n_vocab)`` (row ``i`` predicts the token
        after ``token_ids[i]``). Raises :class:`SessionError` (see :meth:`make_inputs`) and the
        backend's errors; the position only advances when the run succeeds.
        """
        inputs = self.make_inputs(token_ids)
        n = int(inputs["inp_tokens"].size)
        n_kv = int(inputs["kq_mask"].shape[-1])
        timing: dict[str, Any] = {"pos": self.pos, "n_tokens": n, "n_kv": n_kv}
        outs, graph, report = self._run_graph(n, n_kv, inputs, timing)
        self.timings.append(timing)
        self.last_graph, self.last_report, self.last_inputs = graph, report, inputs
        self.pos += n
        logits = outs["result_output"]
        return np.asarray(logits, dtype=np.float32).reshape(n, self.cfg.vocab_size)

    def greedy(self, prompt_ids: Sequence[int], n_tokens: int) -> list[int]:
        """Greedy decoding: one step over the whole prompt, then ``n_tokens - 1`` single-token steps
        feeding back the argmax. Returns the ``n_tokens`` generated ids (``[]`` for 0)."""
        if n_tokens <= 0:
            return []
        logits = self.step(prompt_ids)
        out = [int(np.argmax(logits[-1]))]
        while len(out) < n_tokens:
            logits = self.step([out[-1]])
            out.append(int(np.argmax(logits[-1])))
        return out
