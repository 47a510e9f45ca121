"""The benchmark harness behind ``fusec bench`` (issue 3).

For a case list (:mod:`.cases`) it checks fusec's fused RMS_NORM->MUL(->ADD) kernel and its
unfused kernel sequence against the numpy interpreter, then times them with their peers on each
backend: :mod:`.measure_cuda` (CuPy, torch, torch.compile), :mod:`.measure_wgpu` (WGSL through
wgpu-py) and :mod:`.measure_numpy` (host-only dry mode for CI). :mod:`.runner` is the loop,
:mod:`.metrics` the derived numbers, :mod:`.goals` the pass/miss verdicts, :mod:`.table` the
tables and :mod:`.report` the generated BENCHMARKS.md; :mod:`.norm_variants` lists the candidate
kernels that ``--variants`` times next to the shipped one.

    fusec bench --backend cuda|wgpu|numpy|all [--quick] [--dry] [--variants] [-o results.json]
                [--markdown BENCHMARKS.md]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import BackendError, FusecError

BACKEND_CHOICES = ("cuda", "wgpu", "numpy", "all")


def make_measurer(name: str, use_torch: bool = True, variants: bool = False):
    """A new :class:`~fusec.bench.runner.Measurer` for ``name`` (``cuda`` | ``wgpu`` | ``numpy``);
    ``variants``: the cuda and wgpu measurers also time the candidate kernels (:mod:`.norm_variants`)."""
    if name == "cuda":
        from .measure_cuda import CudaMeasurer  # noqa: PLC0415

        return CudaMeasurer(use_torch=use_torch, variants=variants)
    if name == "wgpu":
        from .measure_wgpu import WgpuMeasurer  # noqa: PLC0415

        return WgpuMeasurer(variants=variants)
    if name == "numpy":
        from .measure_numpy import NumpyMeasurer  # noqa: PLC0415

        return NumpyMeasurer()
    raise BackendError(f"unknown bench backend {name!r} (expected one of {', '.join(BACKEND_CHOICES)})")


def _jsonable(o):
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    return str(o)


def write_json(doc: dict, path: str | Path) -> None:
    """Write ``doc`` to ``path`` atomically (a temporary file renamed into place)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable), encoding="utf-8")
    os.replace(tmp, out)


class _PlainProgress:
    """Stand-in for ``rich.progress.Progress`` when rich is not installed (the device machine)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self, row: dict) -> None:
        self.done += 1
        t = row.get("t_fused_us")
        extra = f"{t:9.2f} us" if t is not None else ""
        print(f"[{self.done}/{self.total}] {row['backend']:5s} {row['pattern']:17s} {row['dtype']} "
              f"rows {row['rows']:6d} n {row['n']:5d} {_status(row):5s} {extra}", flush=True)


def _status(row: dict) -> str:
    return {None: "skip", True: "ok", False: "FAIL"}[row.get("correct")]


def _progress(total: int):
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415
    except ImportError:
        return _PlainProgress(total)

    class _Rich:
        def __enter__(self):
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn()).__enter__()
            self.task = self.p.add_task("bench", total=total)
            return self

        def __exit__(self, *exc):
            return self.p.__exit__(*exc)

        def step(self, row: dict) -> None:
            desc = f"{row['backend']} {row['pattern']} {row['dtype']} rows {row['rows']} n {row['n']}: {_status(row)}"
            self.p.update(self.task, advance=1, description=desc)

    return _Rich()


def _print_summary(doc: dict) -> None:
    from .goals import evaluate_all  # noqa: PLC0415
    from .table import cells  # noqa: PLC0415

    try:
        from rich.console import Console  # noqa: PLC0415

        from .table import rich_table  # noqa: PLC0415

        console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
        show, say = console.print, console.print
    except ImportError:
        console = None
        say = print

        def show(rows_title):
            title, rows = rows_title
            heads, body = cells(rows)
            print(title)
            print("  ".join(heads))
            for line in body:
                print("  ".join(line))

    for name, run in doc["backends"].items():
        ov = run["overhead"]
        title = f"{name}: {run['meta'].get('gpu') or run['meta'].get('device', '')}"
        if ov.get("copy_ceiling_gbs"):
            title += f" (copy ceiling {ov['copy_ceiling_gbs']:.0f} GB/s)"
        show(rich_table(title, run["results"]) if console else (title, run["results"]))
        for n in run["notes"]:
            say(f"  note: {n}")
    for name, why in doc.get("skipped_backends", {}).items():
        say(f"{name}: not run ({why})")
    from .table import variant_lines  # noqa: PLC0415

    for name, run in doc["backends"].items():
        lines = variant_lines(run["results"])
        if lines:
            print(f"{name}: variant sweep (% of the copy ceiling from do_bench; small cases also b2b us)")
            for line in lines:
                print(line)
    if doc["meta"].get("timing"):
        for g in evaluate_all(doc):
            say(f"{g.goal.id} ({g.backend}) {g.status}: {g.goal.text} -- {g.detail}")


def run_bench(args) -> int:
    """``fusec bench``: run the harness; returns the exit status (0: every case run was correct).

    ``args`` fields: ``backend`` (cuda | wgpu | numpy | all), ``quick``, ``dry`` (correctness only, tiny
    cases, no timing), ``output`` (JSON path or None), ``markdown`` (BENCHMARKS.md path or None),
    ``no_torch``, ``budget_s`` (after this many seconds the remaining cases are skipped), ``rows``
    (comma list overriding the case rows), ``variants`` (the candidate-kernel sweep: cuda every case,
    wgpu the large ones).
    Raises :class:`BackendError` when the one backend asked for is not available; with ``all``
    unavailable backends are listed under ``skipped_backends``.
    """
    from ..dsl import default_patterns  # noqa: PLC0415
    from .cases import case_list  # noqa: PLC0415
    from .report import write_benchmarks_md  # noqa: PLC0415
    from .runner import run_cases  # noqa: PLC0415

    dry = bool(getattr(args, "dry", False))
    mode = "dry" if dry else ("quick" if getattr(args, "quick", False) else "full")
    timing = not dry
    names = ["cuda", "wgpu"] if args.backend == "all" else [args.backend]
    measurers, skipped = [], {}
    for name in names:
        m = make_measurer(name, use_torch=not getattr(args, "no_torch", False),
                          variants=bool(getattr(args, "variants", False)))
        try:
            m.setup(timing)
        except FusecError as e:
            if args.backend != "all":
                raise
            skipped[name] = str(e)
            continue
        measurers.append(m)
    if not measurers:
        raise BackendError("no bench backend is available here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    cases = case_list(mode)
    if getattr(args, "rows", None):
        try:
            keep = {int(r) for r in args.rows.split(",") if r.strip()}
        except ValueError:
            raise FusecError(f"--rows takes a comma list of integers, got {args.rows!r}") from None
        cases = [c for c in cases if c.rows in keep]
    output = getattr(args, "output", None)

    with _progress(len(cases) * len(measurers)) as prog:
        def on_row(row: dict, doc: dict) -> None:
            prog.step(row)
            if output:
                doc["skipped_backends"] = skipped
                write_json(doc, output)

        doc = run_cases(measurers, cases, default_patterns(), mode=mode, timing=timing,
                        budget_s=getattr(args, "budget_s", None), on_row=on_row)
    doc["skipped_backends"] = skipped
    for m in measurers:
        m.close()
    if output:
        write_json(doc, output)
    _print_summary(doc)
    md = getattr(args, "markdown", None)
    if md:
        if not output:
            raise FusecError("--markdown needs -o/--output (the report is generated from the results file)")
        write_benchmarks_md([output], md)
        print(f"wrote {md}")
    rows = [r for run in doc["backends"].values() for r in run["results"]]
    bad = [r for r in rows if r.get("correct") is False]
    print(f"{len(rows)} rows: {sum(1 for r in rows if r.get('correct'))} correct, {len(bad)} incorrect, "
          f"{sum(1 for r in rows if r.get('correct') is None)} skipped, {sum(1 for r in rows if r.get('timed'))} timed")
    return 1 if bad else 0


__all__ = ["BACKEND_CHOICES", "make_measurer", "run_bench", "write_json"]
