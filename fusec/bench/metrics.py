"""Derived numbers of a result row: GB/s, % of the copy ceiling, ratios against each peer.

A row holds times in microseconds under ``t_<name>_us`` (``name`` in ``fused`` and :data:`PEERS`;
back-to-back per-launch times under ``t_<name>_b2b_us``) and ``bytes`` (:func:`fusec.bench.cases.min_bytes`).
"""

from __future__ import annotations

PEERS = ("copy", "unfused", "torch_naive", "torch_rms_norm", "torch_compile")
"""What the fused kernel is compared with: ``copy`` (a device copy of the same number of bytes:
half read, half written), ``unfused`` (fusec's kernel sequence of the unfused graph), torch eager
(the naive formula, ``F.rms_norm``) and ``torch.compile`` of the naive formula."""


def gbs(nbytes: int, t_us: float) -> float:
    """Throughput in GB/s (1e9 bytes per second) of ``nbytes`` moved in ``t_us`` microseconds."""
    return nbytes / (t_us * 1e-6) / 1e9


def small_bound_us(nbytes: int, empty_us: float, ceiling_gbs: float) -> float:
    """The small-size target in microseconds: an empty launch plus ``nbytes`` at the copy ceiling."""
    return empty_us + nbytes / (ceiling_gbs * 1e9) * 1e6


def derive(row: dict, ceiling_gbs: float | None, empty_us: float | None = None,
           empty_b2b_us: float | None = None) -> dict:
    """Add derived fields to ``row`` (in place; also returned).

    * ``gbs_<name>`` for ``fused`` and every peer with a time;
    * ``pct_ceiling_fused``: fused GB/s as % of ``ceiling_gbs`` (the large-copy GB/s of the device);
    * ``pct_copy_fused``: fused GB/s as % of the same-size copy;
    * ``speedup_vs_<peer>`` = ``t_<peer>_us / t_fused_us`` (> 1: fused is faster), also ``_b2b``;
    * ``small_bound_us`` / ``small_ratio``: target of small cases (empty launch + bytes at the
      ceiling) and ``t_fused / bound``, from back-to-back times when both exist, else single-launch.
      The empty launch is the row's own empty kernel with the fused kernel's signature and
      arguments or bindings (``t_empty_sig_b2b_us`` / ``t_empty_sig_us``, cuda and wgpu) when measured, else the
      backend-wide ``empty_b2b_us`` / ``empty_us``.
    """
    nb = row["bytes"]
    empty_us = row.get("t_empty_sig_us") or empty_us
    empty_b2b_us = row.get("t_empty_sig_b2b_us") or empty_b2b_us
    tf = row.get("t_fused_us")
    if tf is None:
        return row
    for name in ("fused", *PEERS):
        t = row.get(f"t_{name}_us")
        if t:
            row[f"gbs_{name}"] = gbs(nb, t)
    if ceiling_gbs:
        row["pct_ceiling_fused"] = 100.0 * row["gbs_fused"] / ceiling_gbs
    if row.get("gbs_copy"):
        row["pct_copy_fused"] = 100.0 * row["gbs_fused"] / row["gbs_copy"]
    for peer in PEERS[1:]:
        t = row.get(f"t_{peer}_us")
        if t:
            row[f"speedup_vs_{peer}"] = t / tf
        tb, tfb = row.get(f"t_{peer}_b2b_us"), row.get("t_fused_b2b_us")
        if tb and tfb:
            row[f"speedup_vs_{peer}_b2b"] = tb / tfb
    if ceiling_gbs:
        if row.get("t_fused_b2b_us") and empty_b2b_us:
            bound, t, how = small_bound_us(nb, empty_b2b_us, ceiling_gbs), row["t_fused_b2b_us"], "b2b"
        elif empty_us:
            bound, t, how = small_bound_us(nb, empty_us, ceiling_gbs), tf, "single"
        else:
            return row
        row.update(small_bound_us=bound, small_ratio=t / bound, small_timing=how)
    return row


__all__ = ["PEERS", "derive", "gbs", "small_bound_us"]
