"""Result tables: one column spec rendered as a rich table (console) or a Markdown table.

Times in microseconds, throughput in GB/s (1e9 B/s), ratios ``×`` = peer time / fused time (> 1:
fused faster), ``b2b`` = back-to-back per-launch time, ``small`` = fused / (empty launch + bytes
at the copy ceiling).
"""

from __future__ import annotations

from collections.abc import Callable


def _f(key: str, fmt: str) -> Callable[[dict], str]:
    def get(r: dict) -> str:
        v = r.get(key)
        return "" if v is None else fmt.format(v)

    return get


def _ok(r: dict) -> str:
    if r.get("correct") is None:
        return "skip"
    if r.get("correct"):
        return "ok"
    return "FAIL"


def _bytes(r: dict) -> str:
    b = r["bytes"]
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("pattern", lambda r: r["pattern"]),
    ("dtype", lambda r: r["dtype"]),
    ("rows", lambda r: str(r["rows"])),
    ("n", lambda r: str(r["n"])),
    ("bytes", _bytes),
    ("check", _ok),
    ("nmse", _f("nmse_fused", "{:.1e}")),
    ("fused µs", _f("t_fused_us", "{:.1f}")),
    ("GB/s", _f("gbs_fused", "{:.0f}")),
    ("% ceiling", _f("pct_ceiling_fused", "{:.1f}")),
    ("× unfused", _f("speedup_vs_unfused", "{:.2f}")),
    ("× torch", _f("speedup_vs_torch_naive", "{:.2f}")),
    ("× F.rms_norm", _f("speedup_vs_torch_rms_norm", "{:.2f}")),
    ("× compile", _f("speedup_vs_torch_compile", "{:.2f}")),
    ("b2b µs", _f("t_fused_b2b_us", "{:.2f}")),
    ("empty b2b µs", _f("t_empty_sig_b2b_us", "{:.2f}")),
    ("small", _f("small_ratio", "{:.2f}")),
]
"""(header, cell function) of every table column."""

LEFT = {"pattern", "dtype", "check"}


def used_columns(rows: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
    """The columns with at least one non-empty cell (torch columns vanish without torch, ...)."""
    return [(h, fn) for h, fn in COLUMNS if h in LEFT or any(fn(r) for r in rows)]


def cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells of ``rows``."""
    cols = used_columns(rows)
    return [h for h, _ in cols], [[fn(r) for _, fn in cols] for r in rows]


def rich_table(title: str, rows: list[dict]):
    """A ``rich.table.Table`` of ``rows``."""
    from rich.table import Table  # noqa: PLC0415

    heads, body = cells(rows)
    t = Table(title=title)
    for h in heads:
        t.add_column(h, justify="left" if h in LEFT else "right")
    for line, r in zip(body, rows, strict=True):
        style = "red" if r.get("correct") is False else None
        t.add_row(*line, style=style)
    return t


def markdown_table(rows: list[dict]) -> str:
    """A GitHub Markdown table of ``rows`` (numbers right-aligned)."""
    heads, body = cells(rows)
    align = ["---" if h in LEFT else "---:" for h in heads]
    lines = ["| " + " | ".join(heads) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c or " " for c in line) + " |" for line in body]
    return "\n".join(lines)


def variant_lines(rows: list[dict]) -> list[str]:
    """Plain-text table of the variant sweep (rows with a ``variants`` field): per case and candidate
    the % of the copy ceiling (do_bench, L2 flushed) and, for small cases, ``/`` the back-to-back
    µs; ``x`` = wrong output, ``!`` = error; then the best candidate by do_bench time and tuned's
    time over the best. Empty when no row has variants."""
    rows = [r for r in rows if r.get("variants")]
    if not rows:
        return []
    names: list[str] = []
    for r in rows:
        names += [n for n in r["variants"] if n not in names]
    head = f"{'case':36s}" + "".join(f"{n:>13s}" for n in names) + f"  {'best':>8s} {'tuned/best':>10s}"
    lines = [head]
    for r in rows:
        cells_ = []
        for n in names:
            v = r["variants"].get(n)
            if v is None:
                c = ""
            elif "t_us" not in v:
                c = "x" if v.get("error") == "incorrect output" else "!"
            else:
                c = f"{v.get('pct_ceiling', 0):.1f}"
                if v.get("t_b2b_us"):
                    c += f"/{v['t_b2b_us']:.2f}"
            cells_.append(f"{c:>13s}")
        timed = {n: v["t_us"] for n, v in r["variants"].items() if v.get("t_us")}
        best = min(timed, key=timed.get) if timed else ""
        ratio = f"{timed['tuned'] / timed[best]:.3f}" if best and "tuned" in timed else ""
        case = f"{r['pattern']} {r['dtype']} {r['rows']}x{r['n']}"
        lines.append(f"{case:36s}" + "".join(cells_) + f"  {best:>8s} {ratio:>10s}")
    kernels = {}
    for r in rows:
        for n, v in r["variants"].items():
            kernels.setdefault(n, set()).add(v.get("kernel", "?"))
    lines.append("kernels: " + "; ".join(f"{n}: {', '.join(sorted(k))}" for n, k in kernels.items()))
    return lines


__all__ = ["COLUMNS", "cells", "markdown_table", "rich_table", "used_columns", "variant_lines"]
