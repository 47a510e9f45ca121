"""Token-by-token decoding of a Llama model on a backend, with the KV cache kept on the device.

One or several sequences share one unified KV cache (llama.cpp's ``llama_kv_cache`` with
``kv_unified``, no shifts, no removal): cells are taken in order from a head (a step's tokens get
the cells ``[used, used + n_tokens)`` in batch order) and each cell remembers its sequence and
position; the ``kq_mask`` input (:func:`unified_kq_mask`) lets a token see only the cells of its
own sequence at positions ``<=`` its own (and within the sliding window). With one sequence cell
``i`` holds position ``i``; with S sequences each decoding one token per step the layout is
interleaved (cell ``p*S + s`` holds position ``p`` of sequence ``s`` when all prompts have the
same length). Each :meth:`DecodeSession.step` builds (or reuses) the decode graph for its
``(n_tokens, n_kv)``, optionally fuses it, compiles it and runs it.
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


def unified_kq_mask(cell_seq: Sequence[int] | np.ndarray, cell_pos: Sequence[int] | np.ndarray,
                    seq_ids: Sequence[int] | np.ndarray, positions: Sequence[int] | np.ndarray,
                    sliding_window: int | None = None) -> np.ndarray:
    """``kq_mask`` of a batch over a unified KV cache, as llama.cpp's ``set_input_kq_mask``.

    ``cell_seq`` / ``cell_pos`` (length ``n_kv``): sequence id and position held by each cell the
    attention reads, sequence ``-1`` for an empty cell; they must already include the batch's own
    cells (llama.cpp fills them before building the mask). ``seq_ids`` / ``positions`` (length
    ``n_tokens``): each token's sequence and position. Entry ``[i, j]`` is 0 when cell ``j`` is not
    empty, belongs to sequence ``seq_ids[i]`` and ``cell_pos[j] <= positions[i]`` and, with
    ``sliding_window`` (``n_swa``), ``positions[i] - cell_pos[j] < sliding_window``
    (``is_masked_swa``, ``LLAMA_SWA_TYPE_STANDARD``); ``-inf`` otherwise. Returns float32 of numpy
    shape ``(1, 1, n_tokens, n_kv)`` (ne = [n_kv, n_tokens]). Raises :class:`SessionError` when the
    cell arrays (or the token arrays) differ in length or ``sliding_window < 1``.
    """
    cseq, cpos = np.asarray(cell_seq, dtype=np.int64), np.asarray(cell_pos, dtype=np.int64)
    tseq, tpos = np.asarray(seq_ids, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    if cseq.ndim != 1 or cseq.shape != cpos.shape:
        raise SessionError(f"cell_seq and cell_pos must be 1-D of one length, got {cseq.shape} and {cpos.shape}")
    if tseq.ndim != 1 or tseq.shape != tpos.shape:
        raise SessionError(f"seq_ids and positions must be 1-D of one length, got {tseq.shape} and {tpos.shape}")
    allowed = (cseq[None, :] >= 0) & (cseq[None, :] == tseq[:, None]) & (cpos[None, :] <= tpos[:, None])
    if sliding_window is not None:
        if int(sliding_window) < 1:
            raise SessionError(f"sliding_window must be >= 1, got {sliding_window}")
        allowed &= (tpos[:, None] - cpos[None, :]) < int(sliding_window)
    mask = np.where(allowed, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
    return mask.reshape(1, 1, tseq.size, cseq.size)


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
        n_seq: sequences sharing the ``kv_size`` cells (see the module docstring for the layout).
        flash_attn: build FLASH_ATTN_EXT directly (row-major V cache) instead of the unfused
            attention (see :func:`fusec.models.llama.build_llama_decode`).
        mask_dtype: "f32" or "f16" (f16 needs ``flash_attn``) for the ``kq_mask`` input.

    Attributes:
        pos: number of KV cells already used (all sequences; with one sequence, its position).
        seq_pos: per sequence, the number of its positions in the cache (its next position).
        cell_seq, cell_pos: int64 ``(kv_size,)``: sequence (-1 = empty) and position of each cell.
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
                 kv_dtype: DType | str = "f32", cache_graphs: bool = True, n_seq: int = 1,
                 flash_attn: bool = False, mask_dtype: DType | str = "f32") -> None:
        if int(kv_pad) < 1:
            raise SessionError(f"kv_pad must be >= 1, got {kv_pad}")
        if int(n_seq) < 1:
            raise SessionError(f"n_seq must be >= 1, got {n_seq}")
        self.n_seq = int(n_seq)
        self.flash_attn = bool(flash_attn)
        self.mask_dtype = parse_float_dtype(mask_dtype, "mask_dtype")
        if self.mask_dtype == F16 and not self.flash_attn:
            raise SessionError("mask_dtype f16 needs flash_attn=True")
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
        """Empty the KV cache (zeros, every cell free) and put every sequence back at position 0."""
        self.backend.set_weights(empty_kv_cache(self.cfg, self.kv_size, self.kv_dtype))
        self.pos = 0
        self.seq_pos = [0] * self.n_seq
        self.cell_seq = np.full(self.kv_size, -1, dtype=np.int64)
        self.cell_pos = np.zeros(self.kv_size, dtype=np.int64)

    def n_kv_for(self, n_tokens: int) -> int:
        """Cells the attention reads when ``n_tokens`` tokens follow the current position."""
        return min(self.kv_size, round_up(self.pos + n_tokens, self.kv_pad))

    def _batch(self, tokens: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids, sequence ids and positions (int64, batch order) of a step; see :meth:`step`."""
        if self.n_seq == 1:
            per_seq = [list(tokens)]
        else:
            per_seq = list(tokens)
            if len(per_seq) != self.n_seq:
                raise SessionError(f"a step of a {self.n_seq}-sequence session takes one entry per sequence, "
                                   f"got {len(per_seq)}")
            per_seq = [[t] if isinstance(t, (int, np.integer)) else list(t) for t in per_seq]
        for s, toks in enumerate(per_seq):
            if not all(isinstance(t, (int, np.integer)) for t in toks):
                raise SessionError(f"token ids of sequence {s} must be integers, got {toks!r}")
        ids = np.asarray([t for toks in per_seq for t in toks], dtype=np.int64)
        seqs = np.asarray([s for s, toks in enumerate(per_seq) for _ in toks], dtype=np.int64)
        pos = np.asarray([self.seq_pos[s] + k for s, toks in enumerate(per_seq) for k in range(len(toks))],
                         dtype=np.int64)
        if ids.size == 0:
            raise SessionError("a decode step needs at least one token")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise SessionError(f"token ids must be in [0, {self.cfg.vocab_size}), got {ids.tolist()}")
        if self.pos + ids.size > self.kv_size:
            raise SessionError(f"KV cache full: {self.pos} cells used + {ids.size} new tokens > kv_size={self.kv_size}")
        return ids, seqs, pos

    def make_inputs(self, token_ids: Sequence[Any]) -> dict[str, np.ndarray]:
        """The graph inputs of a step over ``token_ids`` (see :meth:`step`) by leaf name; pure.

        The step's tokens take the cells ``[pos, pos + n_tokens)`` in batch order.
        ``inp_tokens``/``inp_pos``/``k_idxs`` int32 ``(n_tokens,)`` (``inp_pos``: positions within
        each token's sequence); ``v_idxs`` int32, without flash attention ``(n_tokens*n_embd_v_gqa,)``
        with entry ``i*n_embd_v_gqa + c = c*kv_size + cell_i`` (llama.cpp ``set_input_v_idxs``,
        transposed V cache), with it ``k_idxs``; ``kq_mask`` (``mask_dtype``) from
        :func:`unified_kq_mask` over the first ``n_kv`` cells including the new ones (with
        ``cfg.sliding_window``, except for an iSWA model). An iSWA model (``cfg.iswa``, Gemma-2)
        gets two masks as llama.cpp's ``llm_graph_input_attn_kv_iswa``: ``kq_mask`` full causal
        for its global layers and ``kq_mask_swa`` with the sliding window. Raises
        :class:`SessionError` for an empty step, a token id outside
        ``[0, vocab_size)``, a step that overflows the KV cache or a malformed multi-sequence step.
        """
        ids, seqs, pos = self._batch(token_ids)
        n = int(ids.size)
        cells = np.arange(self.pos, self.pos + n, dtype=np.int32)
        if self.flash_attn:
            v_idxs = cells.copy()
        else:
            chan = np.arange(self.cfg.n_embd_v_gqa, dtype=np.int32)
            v_idxs = (chan[None, :] * self.kv_size + cells[:, None]).astype(np.int32).reshape(-1)
        n_kv = self.n_kv_for(n)
        cseq, cpos = self.cell_seq[:n_kv].copy(), self.cell_pos[:n_kv].copy()
        cseq[self.pos:self.pos + n], cpos[self.pos:self.pos + n] = seqs, pos
        mdt = np.float16 if self.mask_dtype == F16 else np.float32
        inputs = {
            "inp_tokens": ids.astype(np.int32),
            "inp_pos": pos.astype(np.int32),
            "k_idxs": cells.copy(),
            "v_idxs": v_idxs,
        }
        if self.cfg.iswa:
            inputs["kq_mask"] = unified_kq_mask(cseq, cpos, seqs, pos).astype(mdt, copy=False)
            inputs["kq_mask_swa"] = unified_kq_mask(cseq, cpos, seqs, pos, self.cfg.sliding_window).astype(
                mdt, copy=False)
        else:
            inputs["kq_mask"] = unified_kq_mask(cseq, cpos, seqs, pos, self.cfg.sliding_window).astype(mdt, copy=False)
        return inputs

    # -- graphs ----------------------------------------------------------------------------------
    def _build(self, n_tokens: int, n_kv: int) -> Graph:
        return build_llama_decode(self.cfg, n_tokens, n_kv, self.kv_size, kv_dtype=self.kv_dtype,
                                  weight_dtype=self.weight_dtype, flash_attn=self.flash_attn,
                                  mask_dtype=self.mask_dtype)

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
    def step(self, token_ids: Sequence[Any]) -> np.ndarray:
        """Decode new tokens in one graph and append them to the KV cache.

        With ``n_seq == 1`` ``token_ids`` are the new tokens (one or more) of the sequence. With
        ``n_seq = S > 1`` it has S entries, entry ``s`` one token id of sequence ``s`` or a list of
        its new ids (a prompt; may be empty to leave the sequence out of this step); the batch is
        sequence 0's tokens, then sequence 1's, and so on.

        Returns float32 logits of numpy shape ``(n_tokens, n_vocab)`` in batch order (row ``i``
        predicts the token after the batch's token ``i``): ``(S, n_vocab)`` for one token per
        sequence. Raises :class:`SessionError` (see :meth:`make_inputs`) and the backend's errors;
        positions and cells only advance when the run succeeds.
        """
        ids, seqs, pos = self._batch(token_ids)
        inputs = self.make_inputs(token_ids)
        n = int(inputs["inp_tokens"].size)
        n_kv = int(inputs["kq_mask"].shape[-1])
        timing: dict[str, Any] = {"pos": self.pos, "n_tokens": n, "n_kv": n_kv}
        outs, graph, report = self._run_graph(n, n_kv, inputs, timing)
        self.timings.append(timing)
        self.last_graph, self.last_report, self.last_inputs = graph, report, inputs
        self.cell_seq[self.pos:self.pos + n], self.cell_pos[self.pos:self.pos + n] = seqs, pos
        for s in range(self.n_seq):
            self.seq_pos[s] += int(np.count_nonzero(seqs == s))
        self.pos += n
        logits = outs["result_output"]
        return np.asarray(logits, dtype=np.float32).reshape(n, self.cfg.vocab_size)

    def greedy(self, prompt_ids: Sequence[int], n_tokens: int) -> list[int]:
        """Greedy decoding: one step over the whole prompt, then ``n_tokens - 1`` single-token steps
        feeding back the argmax. Returns the ``n_tokens`` generated ids (``[]`` for 0)."""
        if self.n_seq != 1:
            raise SessionError("greedy() decodes one sequence; use greedy_seqs() with n_seq > 1")
        if n_tokens <= 0:
            return []
        logits = self.step(prompt_ids)
        out = [int(np.argmax(logits[-1]))]
        while len(out) < n_tokens:
            logits = self.step([out[-1]])
            out.append(int(np.argmax(logits[-1])))
        return out

    def greedy_seqs(self, prompts: Sequence[Sequence[int]], n_tokens: int) -> list[list[int]]:
        """Greedy decoding of all ``n_seq`` sequences together: one step over every prompt, then
        ``n_tokens - 1`` steps of one token per sequence. ``prompts`` has one non-empty list of ids
        per sequence. Returns the ``n_tokens`` generated ids of each sequence."""
        if len(prompts) != self.n_seq or any(len(p) == 0 for p in prompts):
            raise SessionError(f"greedy_seqs needs {self.n_seq} non-empty prompts, got {[len(p) for p in prompts]}")
        if n_tokens <= 0:
            return [[] for _ in prompts]
        logits = self.step([list(p) for p in prompts])
        last = np.cumsum([len(p) for p in prompts]) - 1
        out = [[int(np.argmax(logits[r]))] for r in last]
        while len(out[0]) < n_tokens:
            logits = self.step([o[-1] for o in out])
            for s, o in enumerate(out):
                o.append(int(np.argmax(logits[s])))
        return out
