"""``run_pattern_tests``: the per-pattern properties, run programmatically with Hypothesis."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable
from hypothesis.reporting import with_reporter
from rich.markup import escape

from ..backends import Backend
from ..dsl.ast import Pattern
from ..errors import BackendError, CodegenError
from ..interp import interpret
from ..rewrite.rewrite import rewrite
from .analysis import analyze
from .case import POSITIVE, Case, realize, values
from .execute import F16_TOL, F32_TOL, compare, make_runner
from .strategies import near_miss_cases, near_miss_kinds, positive_cases


class PropertyFailure(AssertionError):
    """A generated example violates the pattern's equivalence property."""


def check_positive(p: Pattern, case: Case, runner) -> None:
    """The pattern fires exactly once, on the root, and the rewritten graph run by ``runner``
    equals the interpreter on the original graph. Raises :class:`PropertyFailure`."""
    r = realize(p, case)
    vals = values(case)
    ref = interpret(r.graph, vals)
    g2, report = rewrite(r.graph, [p])
    applied = report.patterns[p.name].applied
    if [a.root for a in applied] != [r.root.name]:
        why = "; ".join(n.message for n in report.why_not(r.root.name))
        raise PropertyFailure(f"expected exactly one fusion at root {r.root.name!r}, got "
                              f"{[a.root for a in applied]}" + (f" ({why})" if why else ""))
    fused = [t for t in g2.nodes if t.op == "FUSED"]
    if p.rewrite_kind == "op":  # `rewrite op`: the root became a plain registry op, no FUSED node
        root = g2.by_name(r.root.name)
        if fused or root.op != p.fused_op:
            raise PropertyFailure(f"rewritten root {r.root.name!r} is {root.op} with FUSED nodes "
                                  f"{[t.name for t in fused]}, expected a plain {p.fused_op}")
    elif len(fused) != 1 or fused[0].name != r.root.name:
        raise PropertyFailure(f"rewritten graph has FUSED nodes {[t.name for t in fused]}, expected "
                              f"[{r.root.name!r}]")
    else:
        extra = sorted(t.name for t in g2.nodes if t.op == "FUSED_OUTPUT")
        if extra != sorted(p.outputs):
            raise PropertyFailure(f"rewritten graph has FUSED_OUTPUT nodes {extra}, expected the declared outputs "
                                  f"{sorted(p.outputs)}")
    try:
        out = runner.run(g2, vals)
    except (CodegenError, BackendError) as e:
        # the kernel family refused the fused node (or the backend failed on it): the pattern let a
        # graph through that its kernel cannot compute -- a failure of this example, not a crash
        raise PropertyFailure(f"backend {runner.name} cannot run the rewritten graph: {type(e).__name__}: {e}") from e
    _compare_all(out, ref, F16_TOL if case.has_f16 else F32_TOL, _sensitivity(r.graph, vals, ref, case.has_f16))


def _sensitivity(graph, vals: dict, ref: dict, has_f16: bool) -> dict:
    """Per output, ``|interpret(inputs * (1 ± ulp)) - interpret(inputs)|``: how much the reference
    itself moves under one-ulp input perturbations (its conditioning), for :func:`compare`."""
    import numpy as np

    ulp = 2.0**-10 if has_f16 else 2.0**-23
    rng = np.random.default_rng(0)
    pert = {}
    for k, v in vals.items():
        a = np.asarray(v)
        if a.dtype.kind == "f":
            pert[k] = (a.astype(np.float64) * (1 + ulp * rng.choice([-1.0, 1.0], size=a.shape))).astype(a.dtype)
        else:
            pert[k] = a.copy()
    moved = interpret(graph, pert)
    return {n: np.abs(np.asarray(moved[n], np.float64) - np.asarray(ref[n], np.float64)) for n in ref}


def check_near_miss(p: Pattern, case: Case, runner) -> None:
    """The pattern does not fire at the root and the rewritten graph still interprets to the
    original's outputs. Raises :class:`PropertyFailure`."""
    r = realize(p, case)
    vals = values(case)
    ref = interpret(r.graph, vals)
    g2, report = rewrite(r.graph, [p])
    applied = [a.root for a in report.patterns[p.name].applied]
    if r.root.name in applied:
        raise PropertyFailure(f"near miss was fused at root {r.root.name!r} but must not be")
    _compare_all(interpret(g2, vals), ref, F16_TOL if case.has_f16 else F32_TOL)


def _compare_all(out: dict, ref: dict, tol: float, sens: dict | None = None) -> None:
    if set(out) != set(ref):
        raise PropertyFailure(f"outputs {sorted(out)} != reference outputs {sorted(ref)}")
    for name in ref:
        why = compare(out[name], ref[name], tol, None if sens is None else sens.get(name))
        if why:
            raise PropertyFailure(f"output {name!r}: {why}")


@dataclass
class RunResult:
    """One property run: examples checked (per variant), and the shrunk failing case if any."""

    checked: Counter = field(default_factory=Counter)
    case: Case | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_property(strategy, check: Callable[[Case], None], examples: int, seed: int) -> RunResult:
    """Run ``check`` on ``examples`` cases drawn from ``strategy`` (Hypothesis, seeded, no database,
    no deadline); on failure keep the shrunk case (the last one that failed) and its error. ``checked``
    counts the examples that passed before the first failure."""
    res = RunResult()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, derandomize=False, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(strategy)
    def prop(case: Case) -> None:
        try:
            check(case)
        except Exception as e:
            res.case, res.error = case, e
            raise
        if res.error is None:  # examples passed before the first failure (not the shrinker's reruns)
            res.checked[case.variant] += 1

    try:
        with with_reporter(lambda _msg: None):
            prop()
    except Unsatisfiable:
        res.error = PropertyFailure("no example could be generated: the generator found no graph this pattern "
                                    "matches (see docs/testing.md for what it can build)")
        res.case = None
    except Exception as e:
        if res.error is None:
            res.error = e
    else:
        res.case, res.error = None, None
    return res


def run_pattern_tests(patterns: Sequence[Pattern], backend: str | Backend = "numpy", examples: int = 50,
                      seed: int = 0, console=None) -> bool:
    """Property-based equivalence tests of ``patterns`` on ``backend``; True when all pass.

    For each pattern, ``examples`` positive graphs (the pattern must fire once, at the root, and
    the backend's result of the rewritten graph must equal the interpreter on the original, within
    normalized MSE 1e-7 for f32 / 1e-5 when any f16 is involved) and about ``examples`` near misses,
    split evenly over the derivable kinds (the pattern must not fire; the rewritten graph must
    interpret to the same outputs). The near misses run only when the positives pass. Prints one line
    per pattern to ``console`` (a ``rich.console.Console``; a new one when ``None``) and, on
    failure, the shrunk counterexample (leaf dtypes and ``ne`` in ggml order, op params, seed,
    error) with the command that reproduces it.

    ``backend``: ``"numpy"`` (the FUSED node is interpreted through its decomposition: checks the
    rewrite's wiring), ``"wgpu"`` / ``"cuda"`` (generated kernels), or a :class:`Backend` instance.
    Raises :class:`fusec.errors.BackendError` when the backend is not available.
    """
    if console is None:
        from rich.console import Console  # noqa: PLC0415

        console = Console()
    runner = make_runner(backend)
    bname = backend if isinstance(backend, str) else backend.name
    all_ok = True
    for p in patterns:
        facts = analyze(p)
        pos = run_property(positive_cases(p, facts), lambda c, p=p: check_positive(p, c, runner), examples, seed)
        kinds = near_miss_kinds(p, facts)
        near = RunResult()
        for kind in kinds if pos.ok else []:  # one run per kind, so that every kind gets its share
            res = run_property(near_miss_cases(p, facts, kind), lambda c, p=p: check_near_miss(p, c, runner),
                               max(1, -(-examples // len(kinds))), seed)
            near.checked.update(res.checked)
            if not res.ok:
                near.case, near.error = res.case, res.error
                break
        ok = pos.ok and near.ok
        all_ok &= ok
        n_pos = pos.checked[POSITIVE]
        n_near = sum(near.checked.values())
        detail = escape(", ".join(f"{k} {near.checked[k]}" for k in kinds))
        mark = "[green]ok[/green]" if ok else "[red]FAIL[/red]"
        tail = f" \\[{detail}]" if detail else " (none derivable: no interior value or restricting where-clause)"
        console.print(f"{mark} {p.name} ({p.location}) on {runner.name}: {n_pos} positive example(s), "
                      f"{n_near} near miss(es){tail}", highlight=False, markup=True)
        for label, res in (("positive example", pos), ("near miss", near)):
            if not res.ok:
                _print_failure(console, p, label, res, bname, examples, seed)
    return all_ok


def _print_failure(console, p: Pattern, label: str, res: RunResult, backend: str, examples: int, seed: int) -> None:
    console.print(f"  [red]counterexample[/red] ({label}, shrunk) for pattern {p.name}:", highlight=False)
    if res.case is not None:
        for line in res.case.describe(p):
            console.print(f"    {line}", highlight=False, markup=False)
    err = res.error
    console.print(f"    error: {type(err).__name__}: {err}", highlight=False, markup=False)
    console.print(f"    reproduce: fusec test {p.file} --backend {backend} --examples {examples} --seed {seed}",
                  highlight=False, markup=False)
