"""``fusec test``: property-based equivalence suites derived from any pattern file.

Public API::

    run_pattern_tests(patterns, backend="numpy", examples=50, seed=0, console=None) -> bool
    positive_cases(pattern, analyze(pattern))     # Hypothesis strategy of Case
    near_miss_cases(pattern, analyze(pattern))    # Hypothesis strategy of Case
    realize(pattern, case) -> Realized            # the graph of a case

Modules: :mod:`.analysis` (facts read from where clauses), :mod:`.case` (the example record and
its graph), :mod:`.strategies` (generators), :mod:`.execute` (backends, tolerances, comparison),
:mod:`.runner` (properties and reporting). Reference: ``docs/testing.md``.
"""

from .analysis import PatternFacts, analyze
from .case import NEAR_MISS_KINDS, Case, LeafSpec, Realized, realize, values
from .execute import F16_TOL, F32_TOL, compare, make_runner
from .runner import PropertyFailure, check_near_miss, check_positive, run_pattern_tests, run_property
from .strategies import MAX_ELEMENTS, PARAM_VALUES, ROW_LENGTHS, near_miss_cases, positive_cases

__all__ = [
    "F16_TOL", "F32_TOL", "MAX_ELEMENTS", "NEAR_MISS_KINDS", "PARAM_VALUES", "ROW_LENGTHS", "Case", "LeafSpec",
    "PatternFacts", "PropertyFailure", "Realized", "analyze", "check_near_miss", "check_positive", "compare",
    "make_runner", "near_miss_cases", "positive_cases", "realize", "run_pattern_tests", "run_property", "values",
]
