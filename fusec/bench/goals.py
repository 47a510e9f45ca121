"""The performance goals of issue 3, judged from result rows.

Each :class:`Goal` selects the rows it is about (backend, dtype, size class), reads one metric per
row and compares it with a threshold. A goal *passes* when at least one selected case has the
metric and none misses; an incorrect selected case is a miss; cases without the metric (not timed,
a peer missing) are counted and named in the detail; no measured case at all is ``no data``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .cases import LARGE_ROWS_MIN, SMALL_ROWS_MAX


@dataclass(frozen=True)
class Goal:
    """One goal: ``metric`` of every selected row must be ``op`` (``">="`` | ``"<="``) ``threshold``."""

    id: str
    text: str
    backends: tuple[str, ...]
    select: Callable[[dict], bool]
    metric: str
    op: str
    threshold: float
    unit: str = ""

    def meets(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


def _large(r: dict) -> bool:
    return r["rows"] >= LARGE_ROWS_MIN


GOALS: tuple[Goal, ...] = (
    Goal("G1", f"f32: fused ≥ 95 % of the copy ceiling at rows ≥ {LARGE_ROWS_MIN}", ("cuda",),
         lambda r: r["dtype"] == "f32" and _large(r), "pct_ceiling_fused", ">=", 95.0, " %"),
    Goal("G2", "fused ≥ 1.0× torch.compile at every case", ("cuda",), lambda r: True,
         "speedup_vs_torch_compile", ">=", 1.0, "×"),
    Goal("G3", f"fused ≥ 1.9× fusec's unfused sequence at rows ≥ {LARGE_ROWS_MIN}", ("cuda", "wgpu"), _large,
         "speedup_vs_unfused", ">=", 1.9, "×"),
    Goal("G4", f"f16: fused ≥ 90 % of the copy ceiling at rows ≥ {LARGE_ROWS_MIN}", ("cuda",),
         lambda r: r["dtype"] == "f16" and _large(r), "pct_ceiling_fused", ">=", 90.0, " %"),
    Goal("G5", f"WGSL: fused ≥ 85 % of the WGSL copy kernel at rows ≥ {LARGE_ROWS_MIN}", ("wgpu",), _large,
         "pct_ceiling_fused", ">=", 85.0, " %"),
    Goal("G6", f"small sizes (rows ≤ {SMALL_ROWS_MAX}): fused ≤ 1.1× (empty launch + bytes at the copy ceiling)",
         ("cuda", "wgpu"), lambda r: r["rows"] <= SMALL_ROWS_MAX, "small_ratio", "<=", 1.1, "×"),
)


@dataclass
class GoalResult:
    """The verdict of one goal on one backend's rows.

    Attributes:
        goal: the goal.
        backend: the backend judged.
        status: ``"pass"``, ``"miss"`` or ``"no data"``.
        measured: selected cases with the metric.
        failing: keys of the selected cases that miss (or are incorrect).
        missing: selected cases without the metric.
        worst: the worst metric value among measured cases (``None`` without data).
        worst_case: that case's key.
    """

    goal: Goal
    backend: str
    status: str
    measured: int
    failing: list[str]
    missing: int
    worst: float | None
    worst_case: str | None

    @property
    def detail(self) -> str:
        parts = []
        if self.worst is not None:
            parts.append(f"worst {self.worst:.2f}{self.goal.unit} ({self.worst_case})")
        parts.append(f"{self.measured - len(self.failing)}/{self.measured} measured cases meet it")
        if self.missing:
            parts.append(f"{self.missing} without data")
        return "; ".join(parts)


def case_key(r: dict) -> str:
    return f"{r['pattern']} {r['dtype']} rows={r['rows']} n={r['n']}"


def evaluate(goal: Goal, backend: str, rows: list[dict]) -> GoalResult:
    """Judge ``goal`` on ``rows`` (result rows of ``backend``); skipped rows are ignored, flagged rows
    (``"flag"``: the GPU ran slow during the case) count as missing."""
    sel = [r for r in rows if r.get("correct") is not None and goal.select(r)]
    failing, values = [], []
    missing = 0
    for r in sel:
        v = r.get(goal.metric)
        if r.get("correct") is False:
            failing.append(case_key(r) + " (incorrect)")
            continue
        if v is None or r.get("flag"):  # a flagged row (GPU not at full speed) is no evidence either way
            missing += 1
            continue
        values.append((float(v), case_key(r)))
        if not goal.meets(float(v)):
            failing.append(case_key(r))
    measured = len(values) + sum(1 for f in failing if f.endswith("(incorrect)"))
    worst = worst_case = None
    if values:
        pick = min if goal.op == ">=" else max
        worst, worst_case = pick(values, key=lambda vc: vc[0])
    if failing:
        status = "miss"
    elif values:
        status = "pass"
    else:
        status = "no data"
    return GoalResult(goal, backend, status, measured, failing, missing, worst, worst_case)


def evaluate_all(doc: dict) -> list[GoalResult]:
    """Every goal on every backend of a results document that the goal concerns."""
    out = []
    for goal in GOALS:
        for be in goal.backends:
            if be in doc.get("backends", {}):
                out.append(evaluate(goal, be, doc["backends"][be]["results"]))
    return out


__all__ = ["GOALS", "Goal", "GoalResult", "case_key", "evaluate", "evaluate_all"]
