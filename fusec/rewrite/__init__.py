"""Structural matching, preconditions, the rewrite driver and the fusion report.

Public API::

    rewrite(graph, patterns, max_iters=16) -> (Graph, FusionReport)
    match_at(pattern, graph, node) -> MatchResult | NoMatch
    find_matches(graph, patterns) -> (list[MatchResult], list[NoMatch])
"""

from .match import GraphIndex, MatchResult, NoMatch, find_matches, match_at
from .report import AppliedMatch, FusionReport, NotFused, PatternStats
from .rewrite import rewrite

__all__ = ["AppliedMatch", "FusionReport", "GraphIndex", "MatchResult", "NoMatch", "NotFused", "PatternStats",
           "find_matches", "match_at", "rewrite"]
