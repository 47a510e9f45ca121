"""The Mixture-of-Experts FFN of Qwen3-MoE, op by op as llama.cpp builds it.

Mirrors ``llm_graph_context::build_moe_ffn`` (``src/llama-graph.cpp``) as ``llm_build_qwen3moe``
calls it: gating ``LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX``, ``LLM_FFN_SILU`` with separate gate and
up experts (``ggml_swiglu_split``), ``norm_w = true`` (weights renormalized over the selected
experts, HF ``norm_topk_prob``), no expert-selection bias, no weight scale (``expert_weights_scale``
0). Tensor names are llama.cpp's ``cb`` names (``ffn_moe_logits-0``, ``ffn_moe_topk-0``, ...).

Config fields (HF ``Qwen3MoeForCausalLM`` -> llama_hparams), read with ``getattr`` so any config
object carrying them works: ``n_expert`` (``num_experts``), ``n_expert_used``
(``num_experts_per_tok``), ``n_ff_exp`` (``moe_intermediate_size``), ``norm_topk_prob`` (default
True, as llama.cpp's qwen3moe always normalizes), ``expert_weights_scale`` (default 0: no scaling),
and ``hidden_size`` (``n_embd``).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..ir.builder import GraphBuilder
from ..ir.dtypes import F32, DType
from ..ir.tensor import Tensor
from .config import ModelError
from .weights import TensorSpec, parse_float_dtype

WEIGHTS_SUM_MIN = 6.103515625e-5
"""Lower clamp of the selected weights' sum before the division (llama.cpp: the smallest normal f16)."""


def _ne(*dims: int) -> tuple[int, int, int, int]:
    return tuple(list(dims) + [1] * (4 - len(dims)))  # type: ignore[return-value]


def moe_sizes(cfg: object) -> tuple[int, int, int, int]:
    """``(n_embd, n_expert, n_expert_used, n_ff_exp)`` of ``cfg``.

    Raises :class:`ModelError` when a field is missing or ``n_expert_used`` is not in
    ``1..n_expert``."""
    try:
        sizes = (int(cfg.hidden_size), int(cfg.n_expert), int(cfg.n_expert_used), int(cfg.n_ff_exp))
    except (AttributeError, TypeError) as e:
        raise ModelError(f"config {getattr(cfg, 'name', cfg)!r} lacks a MoE field "
                         f"(n_expert, n_expert_used, n_ff_exp, hidden_size): {e}") from None
    n_embd, n_expert, n_used, n_ff = sizes
    if min(n_embd, n_expert, n_ff) < 1 or not 1 <= n_used <= n_expert:
        raise ModelError(f"bad MoE sizes n_embd={n_embd}, n_expert={n_expert}, n_expert_used={n_used}, "
                         f"n_ff_exp={n_ff} (need n_expert_used in 1..n_expert)")
    return sizes


def moe_weight_specs(cfg: object, il: int, weight_dtype: DType | str = "f32") -> dict[str, TensorSpec]:
    """The MoE FFN weights of layer ``il`` by GGUF name (llama.cpp ``LLM_TENSOR_FFN_*_EXPS``):

    * ``blk.{il}.ffn_gate_inp.weight`` f32 ne = [n_embd, n_expert] (the router; GGUF keeps it f32),
    * ``blk.{il}.ffn_gate_exps.weight`` and ``blk.{il}.ffn_up_exps.weight`` ``weight_dtype``
      ne = [n_embd, n_ff_exp, n_expert],
    * ``blk.{il}.ffn_down_exps.weight`` ``weight_dtype`` ne = [n_ff_exp, n_embd, n_expert].

    Raises :class:`ModelError` for missing MoE config fields or a ``weight_dtype`` other than
    ``"f32"``/``"f16"``.
    """
    wt = parse_float_dtype(weight_dtype, "weight_dtype")
    n_embd, n_expert, _, n_ff = moe_sizes(cfg)
    p = f"blk.{int(il)}."
    specs = [TensorSpec(p + "ffn_gate_inp.weight", F32, _ne(n_embd, n_expert)),
             TensorSpec(p + "ffn_gate_exps.weight", wt, _ne(n_embd, n_ff, n_expert)),
             TensorSpec(p + "ffn_down_exps.weight", wt, _ne(n_ff, n_embd, n_expert)),
             TensorSpec(p + "ffn_up_exps.weight", wt, _ne(n_embd, n_ff, n_expert))]
    return {s.name: s for s in specs}


def build_moe_ffn(b: GraphBuilder, cur: Tensor, il: int, cfg: object, weights: Mapping[str, Tensor]) -> Tensor:
    """Append layer ``il``'s MoE FFN to ``b`` (llama.cpp ``build_moe_ffn`` for Qwen3-MoE).

    Args:
        b: the graph builder.
        cur: f32 ne = [n_embd, n_tokens], contiguous (the ``ffn_norm`` output).
        il: layer index (tensor names and weight names).
        cfg: config with the fields listed in the module docstring.
        weights: GGUF name -> leaf tensor (as ``build_llama_decode`` creates them), holding
            :func:`moe_weight_specs` ``(cfg, il)``.

    Ops, with llama.cpp's names (``E`` = n_expert, ``k`` = n_expert_used, ``T`` = n_tokens)::

        ffn_moe_logits   = MUL_MAT(ffn_gate_inp, cur)                  [E, T]
        ffn_moe_probs    = SOFT_MAX(logits)                            [E, T]
        ffn_moe_argsort  = ARGSORT(probs, desc); ffn_moe_topk = VIEW   [k, T] i32 (ggml_argsort_top_k)
        ffn_moe_weights  = GET_ROWS(RESHAPE(probs, [1, E, T]), topk)   [1, k, T]
        if norm_topk_prob: ffn_moe_weights_sum = SUM_ROWS(RESHAPE(weights, [k, T])), CLAMP(sum,
            6.1035e-5, inf), ffn_moe_weights_norm = DIV(weights, sum), RESHAPE back to [1, k, T]
        if expert_weights_scale not in (0, 1): SCALE
        ffn_moe_up / ffn_moe_gate = MUL_MAT_ID(ffn_{up,gate}_exps, RESHAPE(cur, [n_embd, 1, T]), topk)
        ffn_moe_swiglu   = SWIGLU(gate, up)                            [n_ff_exp, k, T]
        ffn_moe_down     = MUL_MAT_ID(ffn_down_exps, swiglu, topk)     [n_embd, k, T]
        ffn_moe_weighted = MUL(down, weights)
        ffn_moe_out      = ADD of the k VIEWs [n_embd, T] of weighted (CONT when k == 1); llama.cpp
                           leaves the partial sums unnamed, fusec names them ffn_moe_add-{il}.{i}

    Returns ``ffn_moe_out-{il}``: f32 ne = [n_embd, n_tokens], contiguous.

    Raises :class:`ModelError` for missing config fields or weights, or ``cur`` of the wrong shape
    or dtype; :class:`fusec.errors.GraphError` (naming the node) for a non-contiguous ``cur``.
    """
    n_embd, n_expert, n_used, _ = moe_sizes(cfg)
    if cur.dtype != F32 or cur.ne[0] != n_embd or cur.ne[2] != 1 or cur.ne[3] != 1:
        raise ModelError(f"build_moe_ffn: cur must be f32 ne=[{n_embd}, n_tokens], got {cur.dtype} ne={list(cur.ne)}")
    p = f"blk.{int(il)}."
    missing = [n for n in moe_weight_specs(cfg, il) if n not in weights]
    if missing:
        raise ModelError(f"build_moe_ffn: layer {il} has no weight(s) {', '.join(missing)}")
    n_tokens = cur.ne[1]

    logits = b.mul_mat(weights[p + "ffn_gate_inp.weight"], cur, name=f"ffn_moe_logits-{il}")
    probs = b.soft_max(logits, name=f"ffn_moe_probs-{il}")
    selected = b.argsort_top_k(probs, n_used, name=f"ffn_moe_topk-{il}", argsort_name=f"ffn_moe_argsort-{il}")

    probs3 = b.reshape(probs, (1, n_expert, n_tokens), name=f"ffn_moe_probs-{il} (reshaped)")
    weights_t = b.get_rows(probs3, selected, name=f"ffn_moe_weights-{il}")  # [1, k, T]
    if bool(getattr(cfg, "norm_topk_prob", True)):
        w2 = b.reshape(weights_t, (n_used, n_tokens), name=f"ffn_moe_weights-{il} (reshaped)")
        wsum = b.sum_rows(w2, name=f"ffn_moe_weights_sum-{il}")
        wsum = b.clamp(wsum, WEIGHTS_SUM_MIN, float("inf"), name=f"ffn_moe_weights_sum_clamped-{il}")
        w2 = b.div(w2, wsum, name=f"ffn_moe_weights_norm-{il}")
        weights_t = b.reshape(w2, (1, n_used, n_tokens), name=f"ffn_moe_weights_norm-{il} (reshaped)")
    w_scale = float(getattr(cfg, "expert_weights_scale", 0.0) or 0.0)
    if w_scale not in (0.0, 1.0):
        weights_t = b.scale(weights_t, w_scale, name=f"ffn_moe_weights_scaled-{il}")

    x = b.reshape(cur, (n_embd, 1, n_tokens), name=f"{cur.name} (reshaped)")
    up = b.mul_mat_id(weights[p + "ffn_up_exps.weight"], x, selected, name=f"ffn_moe_up-{il}")
    gate = b.mul_mat_id(weights[p + "ffn_gate_exps.weight"], x, selected, name=f"ffn_moe_gate-{il}")
    act = b.swiglu(gate, up, name=f"ffn_moe_swiglu-{il}")
    experts = b.mul_mat_id(weights[p + "ffn_down_exps.weight"], act, selected, name=f"ffn_moe_down-{il}")
    experts = b.mul(experts, weights_t, name=f"ffn_moe_weighted-{il}")  # [n_embd, k, T]

    views = [b.view(experts, (n_embd, n_tokens), nb=(experts.nb[0], experts.nb[2]), offset=i * experts.nb[1],
                    name=f"ffn_moe_weighted-{il} (view {i})") for i in range(n_used)]
    if n_used == 1:
        return b.cont(views[0], name=f"ffn_moe_out-{il}")
    out = views[0]
    for i in range(1, n_used):
        out = b.add(out, views[i], name=f"ffn_moe_out-{il}" if i == n_used - 1 else f"ffn_moe_add-{il}.{i}")
    return out
