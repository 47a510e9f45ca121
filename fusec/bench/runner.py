"""The harness loop: for every case, check each backend against the interpreter, then time it.

A backend is a :class:`Measurer`. :func:`run_cases` prepares each case once (graph, rewrite,
inputs, interpreter reference: :func:`fusec.bench.cases.prepare`) and hands it to every measurer:
:meth:`Measurer.check` runs fusec's fused kernel and its unfused kernel sequence on outputs
poisoned with NaN and returns their normalized MSE; only a case whose fused *and* unfused outputs
are within :data:`fusec.bench.cases.TOL` is passed to :meth:`Measurer.time`. A case that fails is
reported (``correct: false``) and never timed; one a backend cannot run is reported as skipped.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import __version__
from ..errors import FusecError
from .cases import Case, Prepared, prepare, within_tol
from .metrics import derive

SCHEMA = "fusec-bench/1"


class SkipCase(FusecError):
    """A case this backend cannot run here (missing feature, buffer over the device limit...)."""


class Measurer:
    """One backend of the harness. Subclasses fill :attr:`meta`, :attr:`notes`, :attr:`overhead`.

    Attributes:
        name: backend name in the results (``"cuda"``, ``"wgpu"``, ``"numpy"``).
        meta: versions and device description (JSON scalars).
        notes: human-readable remarks (degraded timing, missing peers...).
        overhead: case-independent numbers: ``copy_ceiling_gbs``, ``empty_launch_us``,
            ``empty_launch_b2b_us``, host dispatch times in microseconds.
    """

    name = "?"

    def __init__(self) -> None:
        self.meta: dict = {}
        self.notes: list[str] = []
        self.overhead: dict = {}

    def setup(self, timing: bool) -> None:
        """Collect metadata; when ``timing``, measure the copy ceiling and launch overheads."""

    def check(self, prep: Prepared) -> dict:
        """Run the fused kernel and the unfused sequence once on NaN-poisoned outputs.

        Returns ``{"nmse_fused", "nmse_unfused", "fused_kernel", "n_fused_kernels",
        "n_unfused_kernels"}``. Raises :class:`SkipCase` for a case this backend cannot run.
        """
        raise NotImplementedError

    def time(self, prep: Prepared, row: dict) -> None:
        """Add ``t_<name>_us`` (and back-to-back / host dispatch) fields to ``row``."""
        raise NotImplementedError

    def release(self) -> None:
        """Free the per-case device memory."""

    def close(self) -> None:
        """Free everything (end of the run)."""


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta(mode: str, timing: bool) -> dict:
    """Run-wide metadata: date (UTC), host, Python, fusec version and commit, case mode."""
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
            "python": platform.python_version(), "platform": platform.platform(), "fusec": __version__,
            "git": _git_commit(), "mode": mode, "timing": timing}


def check_and_time(m: Measurer, prep: Prepared, timing: bool, may_time: bool = True) -> dict:
    """One result row of measurer ``m`` for ``prep``: checked first, timed only when correct."""
    case = prep.case
    row = {"backend": m.name, **case.row(), "correct": False, "timed": False}
    if not prep.fused_ok:
        row["error"] = f"the patterns did not fuse the graph ({prep.n_fused} FUSED nodes)"
        return row
    try:
        row.update(m.check(prep))
    except SkipCase as e:
        row.update(correct=None, skipped=str(e))
        return row
    except FusecError as e:
        row["error"] = str(e)
        return row
    except Exception as e:  # noqa: BLE001 - a device error (OOM, driver) must not end the whole run
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    ok_f = within_tol(row["nmse_fused"], case.dtype)
    ok_u = within_tol(row["nmse_unfused"], case.dtype)
    row.update(correct=ok_f and ok_u, correct_fused=ok_f, correct_unfused=ok_u)
    if not row["correct"]:
        row["not_timed"] = "incorrect output"
        return row
    if not timing:
        return row
    if not may_time:
        row["not_timed"] = "time budget spent"
        return row
    try:
        m.time(prep, row)
        row["timed"] = "t_fused_us" in row
    except Exception as e:  # noqa: BLE001 - report and go on with the next case
        row["timing_error"] = f"{type(e).__name__}: {e}"
    derive(row, m.overhead.get("copy_ceiling_gbs"), m.overhead.get("empty_launch_us"),
           m.overhead.get("empty_launch_b2b_us"))
    return row


def run_cases(measurers: Sequence[Measurer], cases: Sequence[Case], patterns, *, mode: str, timing: bool,
              budget_s: float | None = None, on_row: Callable[[dict, dict], None] | None = None,
              seed: int = 0) -> dict:
    """Run every case on every measurer; returns the results document (schema :data:`SCHEMA`).

    ``measurers`` must be set up (:meth:`Measurer.setup`). ``budget_s``: after this many seconds
    the remaining cases are not run (reported as skipped; a note says so). ``on_row(row, doc)`` is called
    after each row (progress, incremental writes). Document::

        {"schema", "meta": run_meta, "backends": {name: {"meta", "notes", "overhead", "results": [row]}}}
    """
    t0 = time.monotonic()
    doc = {"schema": SCHEMA, "meta": run_meta(mode, timing),
           "backends": {m.name: {"meta": m.meta, "notes": m.notes, "overhead": m.overhead, "results": []}
                        for m in measurers}}
    budget_noted = False
    for case in cases:
        if budget_s is not None and time.monotonic() - t0 >= budget_s:
            if not budget_noted:
                for m in measurers:
                    m.notes.append(f"time budget of {budget_s:g} s spent: later cases not run")
                budget_noted = True
            for m in measurers:
                row = {"backend": m.name, **case.row(), "correct": None, "timed": False,
                       "skipped": "time budget spent"}
                doc["backends"][m.name]["results"].append(row)
                if on_row is not None:
                    on_row(row, doc)
            continue
        prep = prepare(case, patterns, seed)
        for m in measurers:
            try:
                row = check_and_time(m, prep, timing)
            finally:
                m.release()
            doc["backends"][m.name]["results"].append(row)
            if on_row is not None:
                on_row(row, doc)
        del prep
    doc["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    return doc


__all__ = ["Measurer", "SCHEMA", "SkipCase", "check_and_time", "run_cases", "run_meta"]
