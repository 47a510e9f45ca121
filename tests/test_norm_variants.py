"""The CUDA norm_epilogue candidates of the bench sweep (``fusec.bench.norm_variants``) and the
row-count-aware tuning: every candidate compiles (nvcc; the shipped MSL/WGSL kernels of the same
nodes through their checks) and computes the interpreter's result on the CPU (``tests/cuda_emu``:
persistent grid-stride loops with few blocks, next-row prefetch, streaming hints, dense and
strided row offsets, broadcast operands); the GPU runs them in the ``cuda``-marked test."""

from __future__ import annotations

import numpy as np
import pytest

from fusec.backends import cuda_runtime, wgpu_runtime
from fusec.bench.cases import Case, build_graph
from fusec.bench.norm_variants import cuda_variants
from fusec.codegen import emit
from fusec.codegen.families import norm_epilogue as ne
from fusec.codegen.kernel import KernelSequence
from fusec.dsl import default_patterns
from fusec.interp import interpret
from fusec.rewrite import rewrite
from tests import cuda_emu
from tests.gpu import compile_check_tests, kernel_arrays, requires_cuda, requires_wgpu
from tests.test_norm_kernels import build, nmse


def _node(case: Case):
    return rewrite(build_graph(case), default_patterns())[0].outputs[0]


# every variant name and both dtypes / patterns, both row lengths
COMPILE_CASES = [Case(p, d, r, n) for p in ("rms_norm_mul", "rms_norm_mul_add") for d in ("f32", "f16")
                 for n in (4096, 8192) for r in (65536,)]  # rows 65536: every candidate kind (one-row, persistent)


def _variant_kernels(backend: str):
    if backend != "cuda":
        return [emit(_node(c), backend) for c in COMPILE_CASES[::4]]
    seen, out = set(), []
    for c in COMPILE_CASES:
        for k in (f() for f in cuda_variants(_node(c)).values()):
            if k.source not in seen:
                seen.add(k.source)
                out.append(k)
    return out


test_every_cuda_variant_compiles_with_nvcc, test_every_msl_variant_passes_the_shim, \
    test_every_wgsl_variant_compiles_with_naga = compile_check_tests(_variant_kernels)


# -- tune -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, entry", [
    (Case("rms_norm_mul", "f32", 1, 4096), "rms_norm_mul_f32_v4_t512_k2"),
    (Case("rms_norm_mul", "f16", 512, 4096), "rms_norm_mul_f16_v8_t256_k2"),
    (Case("rms_norm_mul", "f32", 512, 4096), "rms_norm_mul_f32_v4_t256_k4"),
    (Case("rms_norm_mul", "f32", 8192, 4096), "rms_norm_mul_f32_v4_t256_k4"),  # persistent grid off (H200 sweep)
    (Case("rms_norm_mul", "f32", 8192, 4096), "rms_norm_mul_f32_v4_t256_k4_p2n"),
    (Case("rms_norm_mul_add", "f32", 65536, 8192), "rms_norm_mul_add_f32_v4_t512_k4_p1n"),
    (Case("rms_norm_mul_add", "f16", 8192, 4096), "rms_norm_mul_add_f16_v8_t128_k4_p4n"),
])
def test_cuda_tuning_follows_the_row_count(case, entry, monkeypatch):
    """The default (one block per row for many rows) and, with ``CUDA_OPTS["persist"]`` on (an entry with
    ``_p``), the persistent grid: an even share of the rows per block, no idle block."""
    monkeypatch.setitem(ne.CUDA_OPTS, "persist", "_p" in entry)
    k = emit(_node(case), "cuda")
    assert k.entry == entry
    if k.meta["tuning"].persist:
        per_sm = k.meta["tuning"].persist
        assert k.grid[1:] == (1, 1) and k.grid[0] <= per_sm * ne.CUDA_OPTS["sms"]
        rpb = -(-case.rows // k.grid[0])
        assert rpb * (k.grid[0] - 1) < case.rows <= rpb * k.grid[0]  # an even share, no idle block


def test_persistent_grid_shares_rows_evenly():
    assert ne.persistent_grid(8192, 2, 132) == 256  # 32 rows each, not 31/32 over 264 blocks
    assert ne.persistent_grid(65536, 2, 132) == 264
    assert ne.persistent_grid(5, 4, 132) == 5


def test_base_variant_is_the_previous_kernel():
    ks = cuda_variants(_node(Case("rms_norm_mul", "f32", 8192, 4096)))
    base = ks["base"]()
    assert base.entry == "rms_norm_mul_f32_v4_t256_k4" and base.grid == (8192, 1, 1)
    assert " % ne1" in base.source and "row * p.src0_nb1" not in base.source
    # the dense-addressing kernel of the same launch shape (tune()'s choice now that the persistent grid is off)
    assert "row * p.src0_nb1" in ks.get("t256", ks["tuned"])().source


def test_persistent_needs_cuda_and_a_resident_row():
    node = _node(Case("rms_norm_mul", "f32", 64, 256))
    p = ne.plan(node)
    with pytest.raises(ne.CodegenError):
        ne.build(node, "wgsl", ne.Tuning(4, 64, 1, 1, persist=1))
    with pytest.raises(ne.CodegenError):
        ne.build(node, "cuda", ne.Tuning(4, 64, 1, 0, persist=1))
    assert ne.tune(node, p, "wgsl").persist == 0


# -- CPU emulation ----------------------------------------------------------------------------------------

EMU_TUNINGS = {  # name -> (tuning from (vec, nvec), sms used to size the persistent grid)
    "p1n": (lambda v, nv: ne.Tuning(v, 32, 1, max(1, -(-nv // 32)), 1, True), 2),
    "p1": (lambda v, nv: ne.Tuning(v, 32, 1, max(1, -(-nv // 32)), 1, False), 3),
    "p2n_cs": (lambda v, nv: ne.Tuning(v, 64, 1, max(1, -(-nv // 64)), 2, True, True), 1),
    "t64_cs": (lambda v, nv: ne.Tuning(v, 64, 1, max(1, -(-nv // 64)), cs=True), None),
}


def _emu(k, values):
    """``k``'s output (flat, the node's dtype) run on the emulator with leaf ``values`` by root name."""
    out = cuda_emu.run_sequence(KernelSequence(k.node, [k]), values)["dst"]
    return out.view(k.node.dtype.np) if k.node.dtype.size == 2 else out


@pytest.mark.skipif(not cuda_emu.available(), reason="needs g++ (C++20)")
@pytest.mark.parametrize("variant", sorted(EMU_TUNINGS))
@pytest.mark.parametrize("chain, dtype, ne_, w_ne, pad", [
    ("rms_norm_mul", "f32", (256, 37, 1, 1), (256, 1, 1, 1), 0),
    ("rms_norm_mul_add", "f32", (256, 37, 1, 1), (256, 37, 1, 1), 0),  # per-row operands with dense rows
    ("rms_norm_mul_add", "f16", (512, 5, 3, 1), (512, 1, 3, 1), 0),  # operand b per (dim 2) row: not invariant
    ("norm_mul_add", "f32", (200, 7, 2, 1), (200, 1, 1, 1), 4),  # strided x (no dense rows), vec 4
    ("rms_norm_mul", "f32", (67, 9, 1, 1), (67, 1, 1, 1), 0),  # odd row: vec 1
])
def test_variants_match_the_interpreter_on_the_emulator(monkeypatch, variant, chain, dtype, ne_, w_ne, pad):
    g, out = build(chain, dtype, ne_, w_ne, 1e-5, pad, pad // 2 * 0)
    rng = np.random.default_rng(3)
    values = {t.name: (rng.uniform(0.5, 2.0, t.ne[::-1]) * rng.choice([-1.0, 1.0], t.ne[::-1])).astype(t.dtype.np)
              for t in g.leaves}
    ref = interpret(g, values)[out]
    node = rewrite(g, default_patterns())[0].outputs[0]
    p = ne.plan(node)
    base = ne.tune(node, p, "cuda")
    make, sms = EMU_TUNINGS[variant]
    tu = make(base.vec, -(-node.src[p.x].ne[0] // base.vec))
    if sms is not None:
        monkeypatch.setitem(ne.CUDA_OPTS, "sms", sms)
    k = ne.build(node, "cuda", tu)
    if tu.persist:
        assert k.grid[0] < node.src[p.x].ne[1] * node.src[p.x].ne[2]  # blocks loop over rows
    got = _emu(k, values)[:ref.size].reshape(ref.shape)
    bound = 1e-7 if dtype == "f32" else 1e-5
    assert nmse(got, ref) <= bound, k.entry


@pytest.mark.skipif(not cuda_emu.available(), reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", [Case("rms_norm_mul_add", "f32", 3, 1024), Case("rms_norm_mul", "f16", 2, 2048)])
def test_every_sweep_variant_runs_on_the_emulator(case):
    """Each candidate of a small case (one-row blocks only: persistent ones need many rows, and are
    covered above with a small grid)."""
    from fusec.bench.cases import make_inputs, prepare  # noqa: PLC0415

    prep = prepare(case, default_patterns())
    node = prep.fused.outputs[0]
    vals = make_inputs(case)
    for name, mk in cuda_variants(node).items():
        k = mk()
        got = _emu(k, vals)[:prep.ref.size].reshape(prep.ref.shape)
        assert nmse(got, prep.ref) <= (1e-7 if case.dtype == "f32" else 1e-5), (name, k.entry)


@requires_cuda
@pytest.mark.parametrize("case", [Case("rms_norm_mul", "f32", 8192, 4096), Case("rms_norm_mul_add", "f16", 8192, 4096),
                                  Case("rms_norm_mul_add", "f32", 3000, 8192)])
def test_every_sweep_variant_is_correct_on_the_gpu(case):
    from fusec.bench.cases import prepare  # noqa: PLC0415

    prep = prepare(case, default_patterns())
    node = prep.fused.outputs[0]
    for name, mk in cuda_variants(node).items():
        k = mk()
        got = cuda_runtime.run_kernel(k, kernel_arrays(k, prep.values))["dst"].reshape(prep.ref.shape)
        assert nmse(got, prep.ref) <= (1e-7 if case.dtype == "f32" else 1e-5), (name, k.entry)


@pytest.mark.skipif(not cuda_emu.available(), reason="needs g++ (C++20)")
@pytest.mark.parametrize("chain, dtype, ne_, w_ne, pad, offs", [
    ("rms_norm_mul_add", "f32", (64, 3, 2, 2), (64, 1, 2, 1), 0, 0),  # 4-D rows, operand broadcast on dim 2
    ("rms_norm_mul", "f16", (40, 3, 2, 1), (40, 3, 2, 1), 0, 0),  # per-row weight, dense
    ("norm_mul_add", "f32", (33, 4, 1, 1), (33, 1, 1, 1), 3, 2),  # strided, offset x view: vec 1, no dense rows
    ("rms_norm", "f16", (24, 5, 1, 1), (24, 1, 1, 1), 0, 0),
])
def test_shipped_cuda_kernels_match_the_interpreter_on_the_emulator(chain, dtype, ne_, w_ne, pad, offs):
    """The kernel ``emit`` ships (layout specializations on) for layouts the bench cases never have."""
    g, out = build(chain, dtype, ne_, w_ne, 1e-5, pad, offs)
    rng = np.random.default_rng(5)
    values = {t.name: (rng.uniform(0.5, 2.0, t.ne[::-1]) * rng.choice([-1.0, 1.0], t.ne[::-1])).astype(t.dtype.np)
              for t in g.leaves}
    ref = interpret(g, values)[out]
    node = rewrite(g, default_patterns())[0].outputs[0]
    k = emit(node, "cuda")
    got = _emu(k, values)[:ref.size].reshape(ref.shape)
    assert nmse(got, ref) <= (1e-7 if dtype == "f32" else 1e-5), k.entry


# -- WGSL: rows one after another (seq) -------------------------------------------------------------------


@requires_wgpu
@pytest.mark.parametrize("seq, pn", [(4, True), (3, False), (8, True)])
@pytest.mark.parametrize("chain, dtype, ne_, w_ne, pad", [
    ("rms_norm_mul", "f32", (256, 37, 1, 1), (256, 1, 1, 1), 0),
    ("rms_norm_mul_add", "f16", (512, 5, 3, 1), (512, 1, 3, 1), 0),
    ("norm_mul_add", "f32", (200, 7, 2, 1), (200, 1, 1, 1), 4),
    ("rms_norm_mul_add", "f32", (4096, 10, 1, 1), (4096, 10, 1, 1), 0),
])
def test_wgsl_rows_one_after_another_match_the_interpreter(seq, pn, chain, dtype, ne_, w_ne, pad):
    g, out = build(chain, dtype, ne_, w_ne, 1e-5, pad, 0)
    rng = np.random.default_rng(7)
    values = {t.name: (rng.uniform(0.5, 2.0, t.ne[::-1]) * rng.choice([-1.0, 1.0], t.ne[::-1])).astype(t.dtype.np)
              for t in g.leaves}
    ref = interpret(g, values)[out]
    node = rewrite(g, default_patterns())[0].outputs[0]
    tu = ne.tune(node, ne.plan(node), "wgsl")
    k = ne.build(node, "wgsl", ne.Tuning(tu.vec, tu.tpr, 1, tu.slots, pn=pn, seq=seq))
    nrows = int(np.prod(ne_[1:]))
    assert k.grid[0] * k.grid[1] == -(-nrows // seq)
    got = wgpu_runtime.run_kernel(k, kernel_arrays(k, values))["dst"][:ref.size].reshape(ref.shape)
    assert nmse(got, ref) <= (1e-7 if dtype == "f32" else 1e-5), k.entry


def test_seq_is_wgsl_only():
    node = _node(Case("rms_norm_mul", "f32", 64, 256))
    with pytest.raises(ne.CodegenError):
        ne.build(node, "cuda", ne.Tuning(4, 64, 1, 1, seq=4))
    with pytest.raises(ne.CodegenError):
        ne.build(node, "wgsl", ne.Tuning(4, 64, 1, 1, pn=True))


def _emu_run_kernel(k, arrays):
    """``cuda_runtime.run_kernel``'s contract on the emulator: written bindings by name, their dtype."""
    values = {b.tensor.root.name: arrays[b.name] for b in k.bindings if not b.write}
    raw = cuda_emu.run_sequence(KernelSequence(k.node, [k]), values)
    return {b.name: raw[f"root:{b.tensor.root.name}"].view(b.dtype.np)[:b.tensor.root.nelements]
            for b in k.bindings if b.write}


@pytest.mark.skipif(not cuda_emu.available(), reason="needs g++ (C++20)")
@pytest.mark.parametrize("pattern, dtype, ne0, bcast", [("add_rms_norm_mul", "f32", 64, True),
                                                        ("add_rms_norm_mul_add", "f16", 64, False),
                                                        ("add_rms_norm", "f32", 63, False)])
def test_multi_output_cuda_kernel_on_the_emulator(pattern, dtype, ne0, bcast):
    """The ADD prologue and its sum output (dense-row offsets of ``out1``) through the shipped tuning."""
    from tests.test_multi_output import run_and_compare  # noqa: PLC0415

    run_and_compare(_emu_run_kernel, "cuda", pattern, dtype, ne0, bcast)


@pytest.mark.skipif(not cuda_emu.available(), reason="needs g++ (C++20)")
def test_cuda_sweep_checks_then_times_every_candidate(monkeypatch):
    """``CudaMeasurer._sweep`` end to end without a GPU: numpy stands in for CuPy, the emulator for the
    device, a counter for the timer; a candidate writing wrong values is reported and not timed."""
    import types  # noqa: PLC0415

    from fusec.bench import measure_cuda as mc  # noqa: PLC0415
    from fusec.bench.cases import prepare  # noqa: PLC0415

    case = Case("rms_norm_mul_add", "f32", 3, 2048)
    prep = prepare(case, default_patterns())
    node = prep.fused.outputs[0]
    k0 = emit(node, "cuda")
    bufs = {id(b.tensor.root): (np.full(b.tensor.root.nelements, np.nan, np.float32) if b.write
                                else prep.values[b.tensor.root.name].reshape(-1).copy()) for b in k0.bindings}
    out = bufs[id(node.root)]

    def module(k):
        def fn(grid, block, args):
            vals = {b.tensor.root.name: a for b, a in zip(k.bindings, args, strict=False) if not b.write}
            got = cuda_emu.run_sequence(KernelSequence(k.node, [k]), vals)["dst"][:out.size]
            # one candidate (t256, the row in registers) computes the wrong thing
            out[:] = got * (2.0 if "_t256_" in k.entry and "_stream" not in k.entry else 1.0)
        return fn

    monkeypatch.setattr(mc.cr, "module", module)
    fake_cp = types.SimpleNamespace(asarray=np.asarray, nan=np.nan, float64=np.float64, sum=np.sum,
                                    cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(
                                        synchronize=lambda: None)))
    m = mc.CudaMeasurer(variants=True)
    m.cp = fake_cp
    m.overhead["copy_ceiling_gbs"] = 1000.0
    calls = []

    class Timer:
        def __call__(self, fn, quick=False):
            calls.append(quick)
            return 10.0

        def b2b(self, fn):
            return 4.0

    m.timer = Timer()
    rf = types.SimpleNamespace(kernels=[k0], bufs=bufs, output=node)
    row = {}
    m._sweep(prep, rf, row)
    v = row["variants"]
    assert set(v) == set(cuda_variants(node)) and {"tuned", "base", "cs", "t128", "t256"} <= set(v)
    assert v["t256"]["error"] == "incorrect output" and "t_us" not in v["t256"]
    for name, r in v.items():
        if name != "t256":
            assert r["nmse"] <= 1e-7 and r["t_us"] == 10.0 and r["t_b2b_us"] == 4.0, (name, r)
            assert r["pct_ceiling"] == pytest.approx(100 * case.bytes / 10e-6 / 1e9 / 1000.0)
    assert calls and all(calls)  # the sweep times with the quick do_bench settings


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc")
def test_same_signature_empty_kernel_compiles(monkeypatch):
    """The G6 floor kernel of ``measure_cuda.empty_like``: the fused kernel's pointers and Params struct."""
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    from fusec.bench import measure_cuda as mc  # noqa: PLC0415
    from fusec.codegen.check import check_cuda  # noqa: PLC0415

    seen = {}
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        RawKernel=lambda src, name, options=(): seen.update(src=src, name=name)))
    k = emit(_node(Case("rms_norm_mul_add", "f16", 1, 4096)), "cuda")
    mc.empty_like(k)
    assert seen["name"] == "fusec_empty" and seen["src"].count("const void* __restrict__") == len(k.bindings)
    assert all(f" {n};" in seen["src"] for n, _, _ in k.params)
    check_cuda([("fusec_empty", seen["src"])])
