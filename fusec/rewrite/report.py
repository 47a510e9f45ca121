"""FusionReport: what the rewriter fused, what it saved, and why other candidates were not fused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AppliedMatch:
    """One fused match: pattern name, replaced root name, matched node names (sources before users,
    root last), rewrite round (1-based), intermediate bytes saved, and the names of the interior
    values kept as extra outputs (multi-output fusion; ``FUSED_OUTPUT`` nodes of the same names)."""

    pattern: str
    root: str
    nodes: tuple[str, ...]
    round: int
    bytes_saved: int
    outputs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.pattern, "root": self.root, "nodes": list(self.nodes),
                             "round": self.round, "bytes_saved": self.bytes_saved}
        if self.outputs:
            d["outputs"] = list(self.outputs)
        return d


@dataclass(frozen=True)
class NotFused:
    """A candidate whose structure matched but that was not fused.

    ``kind`` is ``escape``, ``where`` or ``overlap``; ``reason`` is one line; ``file:line`` is the
    pattern line responsible (where-clause, interior assignment, or the ``pattern`` line)."""

    pattern: str
    root: str
    kind: str
    reason: str
    file: str
    line: int
    round: int

    @property
    def message(self) -> str:
        """``<reason> at <file>:<line>`` (the "why not fused?" answer)."""
        return f"{self.reason} at {self.file}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "root": self.root, "kind": self.kind, "reason": self.reason,
                "file": self.file, "line": self.line, "round": self.round, "message": self.message}


@dataclass
class PatternStats:
    """Per-pattern totals: matches fused, op nodes removed (matched ops - 1 per match, minus the
    ``FUSED_OUTPUT`` nodes a multi-output match adds), intermediate
    bytes saved (each interior tensor's ``nbytes`` written once and read once per use)."""

    name: str
    file: str
    line: int
    matches: int = 0
    nodes_removed: int = 0
    bytes_saved: int = 0
    applied: list[AppliedMatch] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "line": self.line, "matches": self.matches,
                "nodes_removed": self.nodes_removed, "bytes_saved": self.bytes_saved,
                "applied": [a.to_dict() for a in self.applied]}


@dataclass
class FusionReport:
    """Result summary of :func:`fusec.rewrite.rewrite`.

    Attributes:
        patterns: pattern name -> :class:`PatternStats`, for every pattern given (sorted by name).
        not_fused: candidates that matched structurally but were not fused, ordered by (round,
            root's topological position, pattern name); a candidate fused in a later round is
            not listed.
        rounds: rewrite rounds that applied at least one match.
        max_iters: the round cap given to ``rewrite``.
        hit_max_iters: True when matches were still available after ``max_iters`` rounds.
    """

    patterns: dict[str, PatternStats] = field(default_factory=dict)
    not_fused: list[NotFused] = field(default_factory=list)
    rounds: int = 0
    max_iters: int = 0
    hit_max_iters: bool = False

    @property
    def applied(self) -> list[AppliedMatch]:
        """All fused matches, by (round, pattern name, order of application)."""
        out = [a for s in self.patterns.values() for a in s.applied]
        return sorted(out, key=lambda a: a.round)

    @property
    def total_matches(self) -> int:
        return sum(s.matches for s in self.patterns.values())

    @property
    def total_nodes_removed(self) -> int:
        return sum(s.nodes_removed for s in self.patterns.values())

    @property
    def total_bytes_saved(self) -> int:
        return sum(s.bytes_saved for s in self.patterns.values())

    def why_not(self, root: str) -> list[NotFused]:
        """The not-fused entries whose candidate root is named ``root``."""
        return [n for n in self.not_fused if n.root == root]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (deterministic ordering)."""
        return {
            "rounds": self.rounds, "max_iters": self.max_iters, "hit_max_iters": self.hit_max_iters,
            "total_matches": self.total_matches, "total_nodes_removed": self.total_nodes_removed,
            "total_bytes_saved": self.total_bytes_saved,
            "patterns": [s.to_dict() for s in self.patterns.values()],
            "not_fused": [n.to_dict() for n in self.not_fused],
        }

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"fused {self.total_matches} match(es) in {self.rounds} round(s): {self.total_nodes_removed} "
                 f"node(s) removed, {self.total_bytes_saved} intermediate byte(s) saved"]
        if self.hit_max_iters:
            lines.append(f"warning: stopped at max_iters={self.max_iters} with matches left")
        for s in self.patterns.values():
            lines.append(f"  {s.name}: {s.matches} match(es), -{s.nodes_removed} node(s), {s.bytes_saved} B")
        for n in self.not_fused:
            lines.append(f"  not fused: {n.pattern} at '{n.root}': {n.message}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
