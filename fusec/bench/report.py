"""BENCHMARKS.md: a generated report from one or more harness results files.

:func:`load_results` reads the harness document (``{"schema": "fusec-bench/1", "meta",
"backends": {name: {"meta", "notes", "overhead", "results"}}}``) and also the earlier
format of the removed prototype ``bench/bench_norm.py`` (``{"meta", "results"}``, CUDA rows: the
2026-11-21 ``-h200-norm*.json`` files; its variants are now ``fusec bench --variants``). :func:`write_benchmarks_md`
renders, per file, the metadata (GPU, driver, versions, date), the method, the goal verdicts of
issue 3 (:mod:`fusec.bench.goals`) and the result tables per backend.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import FusecError
from .cases import LARGE_ROWS_MIN, SMALL_ROWS_MAX, TOL
from .goals import evaluate_all
from .table import markdown_table, variant_lines


class ResultsError(FusecError):
    """A results file that cannot be read as harness output."""


def load_results(path: str | Path) -> dict:
    """The results document in ``path``, normalized to the harness schema (see the module docstring).

    Raises :class:`ResultsError` when the file is missing, not JSON, or neither format.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"no such results file: {p}") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{p}: not JSON ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("backends"), dict):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("results"), list):
        meta = dict(doc.get("meta", {}))
        if "driver" in meta:  # the prototype stored cudaDriverGetVersion() under "driver"
            meta["cuda_driver_api"] = meta.pop("driver")
        rows = [{"backend": "cuda", **r, "timed": "t_fused_us" in r} for r in doc["results"]]
        ov = {"copy_ceiling_gbs": meta.get("copy_ceiling_gbs")}
        notes = ["prototype format (bench/bench_norm.py): 1 GiB cupy copy ceiling, no back-to-back, empty-launch "
                 "or host-dispatch numbers"]
        return {"schema": "bench_norm", "meta": meta,
                "backends": {"cuda": {"meta": meta, "notes": notes, "overhead": ov, "results": rows}}}
    raise ResultsError(f"{p}: not a fusec bench results file (expected 'backends' or 'results')")


METHOD = f"""\
* **Cases**: `RMS_NORM → MUL` (y = rms_norm(x)·w) and `RMS_NORM → MUL → ADD` (y = rms_norm(x)·w + b), f32 and
  f16, rows ∈ {{1, 32, 512, 8192, 65536}} × n ∈ {{4096, 8192}} (`--quick`: rows 32, 8192 × n 4096). Each graph is
  built unfused with `fusec.ir.GraphBuilder`, rewritten with the shipped patterns, and fusec's fused kernel and
  its unfused kernel sequence are emitted.
* **Correctness first**: outputs (and intermediates) are filled with NaN, both kernel paths run once and are
  compared with `fusec.interp.interpret` of the unfused graph: normalized MSE ≤ {TOL['f32']:g} (f32),
  ≤ {TOL['f16']:g} (f16). A failing case is reported and not timed.
* **Bytes** (minimum traffic): read x (rows·n), read w (n), read b (rows·n, ADD only), write y (rows·n), times the
  element size. GB/s = bytes / median time (1 GB = 1e9 B).
* **CUDA timing**: `triton.testing.do_bench` (L2 flushed between repetitions, median) when Triton and torch are
  present, else CUDA events around single launches after a 256 MiB clear. Copy ceiling: the faster of a 1 GiB
  device-to-device `cudaMemcpy` and `cupy.copyto` (bytes read + written). Peers timed in the same process: a
  device copy of the same bytes, fusec's unfused sequence, torch eager (naive formula, `F.rms_norm`),
  `torch.compile` of the naive formula (fresh `torch._dynamo.reset()` per case).
* **WGSL timing** (wgpu, Vulkan): timestamp queries at the beginning and end of the compute pass (ticks × the
  queue's timestamp period = ns) with a 256 MiB `clear_buffer` before each repetition, median; without
  `timestamp-query`, CPU wall time around submit + wait. Ceiling: a WGSL vec4 storage-to-storage copy kernel.
* **Small sizes** (rows ≤ {SMALL_ROWS_MAX}): also timed back to back (many launches between two events, or many
  dispatches in one pass: per-launch time, no flush); an empty kernel is timed the same way, and the host time
  of the launch call (CUDA) or of recording / submitting one pass (wgpu) is measured. The small-size goal
  compares back-to-back times when present: fused ≤ 1.1 × (empty launch + bytes at the copy ceiling); on CUDA
  the empty kernel has the fused kernel's signature and is launched with its grid, block and arguments
  (column `empty b2b µs`), so both pay the same host-side argument packing; on wgpu it binds the fused
  kernel's buffers with the same access modes and is dispatched with its grid, so both pay the barriers wgpu
  puts between dispatches that write a buffer.
* **WGSL warm-up**: before each timing, 0.4 s of flushed passes of the timed dispatches submitted without host
  waits (a Vulkan GPU waiting for the host between submissions runs at low SM clocks); each large case times
  the same-size copy before and after its kernels and is flagged when either is slow.
* **Ratios** `× peer` = peer time / fused time (> 1: fused is faster). "Large" = rows ≥ {LARGE_ROWS_MIN}."""

META_KEYS = [("gpu", "GPU"), ("driver", "driver"), ("cuda_driver_api", "CUDA driver API"),
             ("cuda_runtime", "CUDA runtime"), ("cupy", "CuPy"), ("torch", "torch"), ("torch_cuda", "torch CUDA"),
             ("triton", "Triton"), ("wgpu", "wgpu-py"), ("timestamp_period_ns", "timestamp period (ns)"),
             ("timing", "timing"), ("copy_ceiling", "copy ceiling")]

OVERHEAD_KEYS = [("copy_ceiling_gbs", "copy ceiling", "{:.0f} GB/s"), ("empty_launch_us", "empty launch", "{:.2f} µs"),
                 ("empty_launch_b2b_us", "empty launch, back to back", "{:.2f} µs"),
                 ("host_dispatch_empty_us", "host launch call (empty kernel)", "{:.2f} µs"),
                 ("host_encode_empty_us", "host: record one pass (empty kernel)", "{:.2f} µs"),
                 ("host_submit_empty_us", "host: finish + submit one pass", "{:.2f} µs")]


def _host_rows(rows: list[dict]) -> list[str]:
    keys = [("host_dispatch_fused_us", "launch call, fused"),
            ("host_dispatch_unfused_us", "launch calls, unfused seq."),
            ("host_encode_fused_us", "record pass, fused"), ("host_encode_unfused_us", "record pass, unfused seq."),
            ("host_submit_fused_us", "finish + submit, fused")]
    out = []
    for k, label in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            vals.sort()
            out.append(f"{label}: median {vals[len(vals) // 2]:.2f} µs over {len(vals)} small cases")
    return out


def _backend_section(name: str, run: dict) -> list[str]:
    meta, ov, rows = run.get("meta", {}), run.get("overhead", {}), run.get("results", [])
    lines = [f"### {name}", ""]
    kv = [(label, meta[k]) for k, label in META_KEYS if meta.get(k) not in (None, "")]
    if isinstance(meta.get("adapter"), dict):
        a = meta["adapter"]
        kv.insert(0, ("adapter", f"{a.get('device', '?')} ({a.get('adapter_type', '?')}, {a.get('backend_type', '?')}, "
                                 f"{a.get('description', '')})"))
    if kv:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in kv] + [""]
    ovl = [f"{label} {fmt.format(ov[k])}" for k, label, fmt in OVERHEAD_KEYS if ov.get(k) is not None]
    ovl += _host_rows(rows)
    if ovl:
        lines += ["Overheads: " + "; ".join(ovl) + ".", ""]
    for n in run.get("notes", []):
        lines.append(f"* note: {n}")
    if run.get("notes"):
        lines.append("")
    bad = [r for r in rows if r.get("correct") is False]
    lines += [f"{len(rows)} cases, {sum(1 for r in rows if r.get('correct'))} correct, {len(bad)} incorrect, "
              f"{sum(1 for r in rows if r.get('correct') is None)} skipped, "
              f"{sum(1 for r in rows if r.get('timed'))} timed.", ""]
    if rows:
        lines += [markdown_table(rows), ""]
    for r in bad:
        why = r.get("error") or f"nmse fused {r.get('nmse_fused')}, unfused {r.get('nmse_unfused')}"
        lines.append(f"* FAIL {r['pattern']} {r['dtype']} rows={r['rows']} n={r['n']}: {why}")
    if bad:
        lines.append("")
    flagged = [r for r in rows if r.get("flag")]
    for r in flagged:
        lines.append(f"* FLAGGED {r['pattern']} {r['dtype']} rows={r['rows']} n={r['n']}: {r['flag']}")
    if flagged:
        lines.append("")
    sweep = variant_lines(rows)
    if sweep:
        lines += ["Variant sweep (`--variants`): % of the copy ceiling per candidate kernel (do_bench, 10 ms warm-up, "
                  "40 ms of repetitions; small cases `%/b2b µs`; `x` wrong output, `!` error), the fastest and "
                  "tuned's time over it:", "", "```", *sweep, "```", ""]
    return lines


def render(docs: Sequence[tuple[str, dict]]) -> str:
    """The Markdown text for ``(label, document)`` pairs."""
    srcs = ", ".join(f"`{label}`" for label, _ in docs)
    lines = ["# fusec benchmarks", "",
             f"Generated by `fusec.bench.report.write_benchmarks_md` from {srcs}; do not edit by hand. Regenerate "
             "with `fusec bench --backend all -o results.json --markdown BENCHMARKS.md` on the GPU machine (or "
             "`python3 bench/harness.py ...`).", "", "## Goals of issue 3", "",
             "| goal | backend | status | detail | results |", "|---|---|---|---|---|"]
    for label, doc in docs:
        for g in evaluate_all(doc):
            status = {"pass": "**pass**", "miss": "**miss**"}.get(g.status, g.status)
            fails = ""
            if g.failing:
                shown = ", ".join(g.failing[:4]) + (f", … {len(g.failing) - 4} more" if len(g.failing) > 4 else "")
                fails = f"; missed by: {shown}"
            lines.append(f"| {g.goal.id}: {g.goal.text} | {g.backend} | {status} | {g.detail}{fails} | `{label}` |")
    lines += ["", "## Method", "", METHOD, ""]
    for label, doc in docs:
        meta = doc.get("meta", {})
        lines += [f"## Results: `{label}`", ""]
        head = [f"date {meta.get('date', '?')}"]
        for k in ("host", "python", "fusec", "git", "mode", "elapsed_s"):
            if meta.get(k) is not None:
                head.append(f"{k} {meta[k]}")
        lines += ["Run: " + ", ".join(head) + ".", ""]
        for name, run in doc.get("backends", {}).items():
            lines += _backend_section(name, run)
        for name, why in doc.get("skipped_backends", {}).items():
            lines += [f"### {name}", "", f"Not run: {why}", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_benchmarks_md(results_json_paths: Sequence[str | Path], out_path: str | Path) -> str:
    """Write BENCHMARKS.md at ``out_path`` from harness results files; returns the text.

    Raises :class:`ResultsError` for an unreadable results file.
    """
    docs = [(Path(p).name, load_results(p)) for p in results_json_paths]
    text = render(docs)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return text


__all__ = ["ResultsError", "load_results", "render", "write_benchmarks_md"]
