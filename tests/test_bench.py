"""The benchmark harness (fusec.bench): dry runs, the check gate before timing, byte counts, goals, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.bench import cases as bc
from fusec.bench import goals, measure_numpy, metrics, report
from fusec.bench.cases import Case
from fusec.bench.runner import check_and_time
from fusec.cli import main
from fusec.dsl import default_patterns
from tests.gpu import requires_wgpu


def _run_dry(backend, tmp_path):
    out = tmp_path / f"{backend}.json"
    rc = main(["bench", "--backend", backend, "--dry", "-o", str(out)])
    return rc, json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["numpy", pytest.param("wgpu", marks=requires_wgpu.mark)])
def test_dry_mode_reports_every_case_correct(backend, tmp_path):
    rc, doc = _run_dry(backend, tmp_path)
    rows = doc["backends"][backend]["results"]
    assert rc == 0
    assert len(rows) == len(bc.case_list("dry")) == 16
    assert all(r["correct"] is True for r in rows), [r for r in rows if not r["correct"]]
    assert all(r["nmse_fused"] <= bc.TOL[r["dtype"]] for r in rows)
    assert all(r["n_fused_kernels"] == 1 and r["n_unfused_kernels"] >= 2 for r in rows)
    assert not any(r["timed"] for r in rows)  # --dry: correctness only


def test_markdown_needs_output(tmp_path, capsys):
    assert main(["bench", "--backend", "numpy", "--dry", "--markdown", str(tmp_path / "B.md")]) == 2
    assert "--markdown needs" in capsys.readouterr().err


# -- the check gate ---------------------------------------------------------------------------------


def _numpy_measurer():
    m = measure_numpy.NumpyMeasurer()
    m.setup(timing=True)
    return m


def test_correct_case_is_timed_on_numpy():
    prep = bc.prepare(Case("rms_norm_mul_add", "f32", 3, 64), default_patterns())
    row = check_and_time(_numpy_measurer(), prep, timing=True)
    assert row["correct"] is True and row["timed"] is True
    assert row["t_fused_us"] > 0 and row["speedup_vs_unfused"] > 0


def test_poisoned_result_is_incorrect_and_not_timed(monkeypatch):
    real = measure_numpy.run_fused
    monkeypatch.setattr(measure_numpy, "run_fused", lambda g, v: real(g, v) * np.float32(1.01))
    prep = bc.prepare(Case("rms_norm_mul", "f32", 3, 64), default_patterns())
    row = check_and_time(_numpy_measurer(), prep, timing=True)
    assert row["correct"] is False and row["correct_fused"] is False and row["correct_unfused"] is True
    assert row["timed"] is False and row["not_timed"] == "incorrect output"
    assert not any(k.startswith("t_") for k in row)


def test_unwritten_output_is_incorrect(monkeypatch):
    monkeypatch.setattr(measure_numpy, "run_fused", lambda g, v: np.full((3, 64), np.nan, np.float32))
    prep = bc.prepare(Case("rms_norm_mul", "f32", 3, 64), default_patterns())
    row = check_and_time(_numpy_measurer(), prep, timing=True)
    assert np.isnan(row["nmse_fused"]) and row["correct"] is False and not row["timed"]


@requires_wgpu
def test_broken_wgsl_kernel_is_incorrect_and_not_timed(monkeypatch):
    from fusec.bench import measure_wgpu

    m = measure_wgpu.WgpuMeasurer()
    m.setup(timing=True)
    good = bc.prepare(Case("rms_norm_mul", "f32", 2, 256), default_patterns())
    row = check_and_time(m, good, timing=True)
    m.release()
    assert row["correct"] is True and row["timed"] is True and row["t_fused_us"] > 0
    # the G6 floor: an empty kernel with the fused kernel's bindings, timed the same way
    assert row["t_empty_sig_us"] > 0 and row["t_empty_sig_b2b_us"] > 0

    real_emit = measure_wgpu.emit

    def broken_emit(node, backend):  # the fused kernel reads eps = 1 instead of 1e-6
        k = real_emit(node, backend)
        if node.op == "FUSED":
            k.params = [(n, t, 1.0 if n == "eps" else v) for n, t, v in k.params]
        return k

    monkeypatch.setattr(measure_wgpu, "emit", broken_emit)
    row = check_and_time(m, good, timing=True)
    m.release()
    assert row["correct"] is False and row["correct_fused"] is False and row["correct_unfused"] is True
    assert row["nmse_fused"] > 1e-3
    assert row["timed"] is False and "t_fused_us" not in row


@requires_wgpu
@pytest.mark.parametrize("pattern", bc.PATTERNS)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_empty_twin_keeps_the_bindings(pattern, dtype):
    """The empty kernel of the wgpu G6 floor declares the fused kernel's bindings with the same
    access modes, compiles in naga and does nothing."""
    from fusec.backends import wgpu_runtime as rt
    from fusec.bench import measure_wgpu
    from fusec.codegen import emit

    prep = bc.prepare(Case(pattern, dtype, 3, 256), default_patterns())
    k = emit(next(t for t in prep.fused.nodes if t.op == "FUSED"), "wgsl")
    e = measure_wgpu.empty_like(k)
    decl = [ln for ln in k.source.splitlines() if ln.startswith("@group(0) @binding(")]
    assert decl and all(ln in e.source.splitlines() for ln in decl)
    assert e.grid == k.grid and e.bindings == k.bindings and e.entry == "empty_sig"
    rt.validate(e.source, e.entry)
    arrays = {b.name: (np.full(b.tensor.root.nelements, 7, b.dtype.np) if b.write
                       else prep.values[b.tensor.root.name].reshape(-1)) for b in k.bindings}
    out = rt.run_kernel(e, arrays)
    assert out["dst"].size == 3 * 256 and np.all(out["dst"] == 7)  # ran, wrote nothing


# -- bytes -------------------------------------------------------------------------------------------


def test_min_bytes_hand_checked():
    # rms_norm_mul f32: read x 32*4096*4 + read w 4096*4 + write y 32*4096*4
    assert Case("rms_norm_mul", "f32", 32, 4096).bytes == 524288 + 16384 + 524288 == 1064960
    # rms_norm_mul_add f16: x, b, y of 8192*8192*2 bytes each, w 8192*2
    assert Case("rms_norm_mul_add", "f16", 8192, 8192).bytes == 3 * 134217728 + 16384 == 402669568
    assert Case("rms_norm_mul", "f16", 1, 4096).bytes == 8192 + 8192 + 8192


@given(pattern=st.sampled_from(bc.PATTERNS), dtype=st.sampled_from(bc.DTYPES),
       rows=st.integers(1, 300), n=st.integers(1, 600))
def test_min_bytes_matches_graph_leaves_and_output(pattern, dtype, rows, n):
    case = Case(pattern, dtype, rows, n)
    assert bc.graph_bytes(bc.build_graph(case)) == case.bytes


def test_nmse_and_tolerance():
    ref = np.ones(10)
    assert bc.nmse(ref, ref) == 0.0
    assert bc.nmse(ref * 1.001, ref, chunk=3) == pytest.approx(1e-6, rel=1e-6)
    assert not bc.within_tol(float("nan"), "f32")
    assert bc.within_tol(1e-7, "f32") and not bc.within_tol(2e-7, "f32") and bc.within_tol(1e-5, "f16")


def test_derive_hand_checked():
    row = {"bytes": 2_000_000, "t_fused_us": 1000.0, "t_unfused_us": 2500.0, "t_copy_us": 800.0,
           "t_fused_b2b_us": 900.0, "t_unfused_b2b_us": 1800.0}
    metrics.derive(row, ceiling_gbs=4.0, empty_us=10.0, empty_b2b_us=5.0)
    assert row["gbs_fused"] == pytest.approx(2.0)  # 2e6 B in 1 ms
    assert row["pct_ceiling_fused"] == pytest.approx(50.0)
    assert row["pct_copy_fused"] == pytest.approx(80.0)  # copy: 2.5 GB/s
    assert row["speedup_vs_unfused"] == pytest.approx(2.5)
    assert row["speedup_vs_unfused_b2b"] == pytest.approx(2.0)
    assert row["small_bound_us"] == pytest.approx(5.0 + 500.0)  # empty b2b + 2e6 B at 4 GB/s
    assert row["small_ratio"] == pytest.approx(900.0 / 505.0) and row["small_timing"] == "b2b"


# -- goals and BENCHMARKS.md -------------------------------------------------------------------------


def _row(backend, pattern, dtype, rows, correct=True, **kw):
    return {"backend": backend, "pattern": pattern, "dtype": dtype, "rows": rows, "n": 4096,
            "bytes": Case(pattern, dtype, rows, 4096).bytes, "correct": correct, "timed": correct, **kw}


def _synthetic_doc():
    cuda = [
        _row("cuda", "rms_norm_mul", "f32", 8192, t_fused_us=1.0, pct_ceiling_fused=96.0, speedup_vs_unfused=2.0,
             speedup_vs_torch_compile=1.2),
        _row("cuda", "rms_norm_mul", "f32", 65536, t_fused_us=1.0, pct_ceiling_fused=94.0, speedup_vs_unfused=1.95,
             speedup_vs_torch_compile=1.0),
        _row("cuda", "rms_norm_mul", "f16", 8192, correct=False, nmse_fused=1.0, nmse_unfused=0.0),
        _row("cuda", "rms_norm_mul", "f16", 65536, t_fused_us=1.0, pct_ceiling_fused=91.0, speedup_vs_unfused=1.9,
             speedup_vs_torch_compile=1.1),
        _row("cuda", "rms_norm_mul", "f32", 32, t_fused_us=1.0, small_ratio=1.05, speedup_vs_torch_compile=1.3),
        _row("cuda", "rms_norm_mul", "f32", 1, t_fused_us=1.0, small_ratio=1.09),
    ]
    wgpu = [_row("wgpu", "rms_norm_mul_add", "f32", 8192, t_fused_us=1.0, pct_ceiling_fused=86.0,
                 speedup_vs_unfused=1.5),
            _row("wgpu", "rms_norm_mul_add", "f32", 32, correct=None, skipped="no shader-f16")]
    run = {"meta": {"gpu": "Test GPU", "driver": "1.0"}, "notes": [], "overhead": {"copy_ceiling_gbs": 100.0}}
    return {"schema": "fusec-bench/1", "meta": {"date": "2026-01-01", "timing": True},
            "backends": {"cuda": {**run, "results": cuda}, "wgpu": {**run, "results": wgpu}}}


def test_goals_computed_from_numbers():
    res = {(g.goal.id, g.backend): g for g in goals.evaluate_all(_synthetic_doc())}
    g1 = res[("G1", "cuda")]
    assert g1.status == "miss" and g1.failing == ["rms_norm_mul f32 rows=65536 n=4096"] and g1.worst == 94.0
    g2 = res[("G2", "cuda")]  # 1.0 meets ">= 1.0"; the incorrect f16 row is a miss; rows=1 has no number
    assert g2.status == "miss" and g2.failing == ["rms_norm_mul f16 rows=8192 n=4096 (incorrect)"]
    assert g2.missing == 1 and g2.worst == 1.0
    assert res[("G3", "cuda")].status == "miss"  # the incorrect f16 row
    assert res[("G3", "wgpu")].status == "miss" and res[("G3", "wgpu")].worst == 1.5
    assert res[("G4", "cuda")].status == "miss" and res[("G4", "cuda")].worst == 91.0
    assert res[("G5", "wgpu")].status == "pass" and res[("G5", "wgpu")].measured == 1
    assert res[("G6", "cuda")].status == "pass" and res[("G6", "cuda")].worst == 1.09
    assert res[("G6", "wgpu")].status == "no data"  # the only small wgpu row was skipped
    assert ("G1", "wgpu") not in res and ("G5", "cuda") not in res


def test_goal_passes_when_every_case_meets_it():
    doc = _synthetic_doc()
    doc["backends"]["cuda"]["results"][1]["pct_ceiling_fused"] = 95.0
    g1 = next(g for g in goals.evaluate_all(doc) if g.goal.id == "G1")
    assert g1.status == "pass" and g1.failing == [] and g1.worst == 95.0


def test_benchmarks_md_from_harness_and_prototype_json(tmp_path):
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_synthetic_doc()))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"meta": {"date": "2026-11-21", "gpu": "NVIDIA H200", "driver": 13000,
                                        "copy_ceiling_gbs": 4000.0},
                               "results": [{"pattern": "rms_norm_mul", "dtype": "f32", "rows": 8192, "n": 4096,
                                            "bytes": 1, "correct": True, "t_fused_us": 70.0,
                                            "pct_ceiling_fused": 97.0, "speedup_vs_unfused": 2.1,
                                            "speedup_vs_torch_compile": 0.9}]}))
    out = tmp_path / "BENCHMARKS.md"
    text = report.write_benchmarks_md([new, old], out)
    assert out.read_text() == text
    lines = text.splitlines()

    def verdict(gid, backend, label):
        hits = [ln for ln in lines if ln.startswith(f"| {gid}:") and f"| {backend} |" in ln and f"`{label}`" in ln]
        assert len(hits) == 1, hits
        return hits[0].split(" | ")[2]

    assert verdict("G1", "cuda", "new.json") == "**miss**"
    assert verdict("G5", "wgpu", "new.json") == "**pass**"
    assert verdict("G6", "wgpu", "new.json") == "no data"
    assert verdict("G1", "cuda", "old.json") == "**pass**"
    assert verdict("G2", "cuda", "old.json") == "**miss**"
    assert "| GPU | Test GPU |" in text and "| GPU | NVIDIA H200 |" in text
    assert "| CUDA driver API | 13000 |" in text  # the prototype's "driver" was cudaDriverGetVersion()
    assert "FAIL rms_norm_mul f16 rows=8192 n=4096" in text


def test_flagged_rows_are_listed_and_count_as_missing():
    doc = _synthetic_doc()
    run = doc["backends"]["cuda"]
    r = run["results"][0]
    r["flag"] = "slow GPU: this case's copy ran at 2000 GB/s"
    text = report.render([("flagged.json", doc)])
    assert f"FLAGGED {r['pattern']} {r['dtype']} rows={r['rows']} n={r['n']}: slow GPU" in text
    g = goals.Goal("Gx", "test", ("cuda",), lambda row: row is r, "t_fused_us", "<=", 1e9)
    res = goals.evaluate(g, "cuda", run["results"])
    assert res.status == "no data" and res.missing == 1
    del r["flag"]
    assert goals.evaluate(g, "cuda", run["results"]).status == "pass"


def test_load_results_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(report.ResultsError):
        report.load_results(p)
    with pytest.raises(report.ResultsError):
        report.load_results(tmp_path / "missing.json")


def test_small_bound_uses_the_same_signature_empty_kernel():
    row = {"bytes": 4000, "t_fused_us": 6.0, "t_fused_b2b_us": 4.4, "t_empty_sig_b2b_us": 4.0, "t_empty_sig_us": 3.5}
    metrics.derive(row, 4000.0, empty_us=3.0, empty_b2b_us=3.6)
    assert row["small_timing"] == "b2b"
    assert row["small_bound_us"] == pytest.approx(4.0 + 0.001)
    assert row["small_ratio"] == pytest.approx(4.4 / 4.001)


def test_variant_sweep_table():
    from fusec.bench.table import variant_lines  # noqa: PLC0415

    rows = [{"pattern": "rms_norm_mul", "dtype": "f32", "rows": 8192, "n": 4096, "variants": {
                "tuned": {"kernel": "k_p2n", "t_us": 66.0, "pct_ceiling": 95.0},
                "base": {"kernel": "k", "t_us": 70.0, "pct_ceiling": 90.5},
                "cs": {"kernel": "k_cs", "error": "incorrect output", "nmse": float("nan")}}},
            {"pattern": "rms_norm_mul", "dtype": "f32", "rows": 1, "n": 4096, "variants": {
                "tuned": {"kernel": "k1", "t_us": 5.0, "pct_ceiling": 0.2, "t_b2b_us": 4.2},
                "t128": {"kernel": "k2", "t_us": 4.8, "pct_ceiling": 0.2, "t_b2b_us": 4.1}}},
            {"pattern": "rms_norm_mul", "dtype": "f32", "rows": 32, "n": 4096}]
    lines = variant_lines(rows)
    assert lines[0].split()[:5] == ["case", "tuned", "base", "cs", "t128"]
    big, small = lines[1].split(), lines[2].split()
    assert big[3:] == ["95.0", "90.5", "x", "tuned", "1.000"]
    assert small[3:] == ["0.2/4.20", "0.2/4.10", "t128", "1.042"]
    assert len(lines) == 4 and lines[3].startswith("kernels: tuned: k1, k_p2n")
    assert variant_lines(rows[2:]) == []
