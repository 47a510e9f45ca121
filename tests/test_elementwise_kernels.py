"""Element-wise and row-gather kernel families (binary, unary, glu, copy, get_rows, set_rows).

Every kernel is run on random inputs and compared with the numpy reference interpreter
(:func:`fusec.interp.interpret`). Outputs the kernel computes are poisoned with NaN first, so an
unwritten element fails. Destinations written in place (CPY, SET_ROWS) start with random contents
and are compared *whole*, so writes outside the destination view fail too.

Tolerances (normalized MSE, ``sum((out - ref)^2) / sum(ref^2)``): ``1e-7`` for f32 results (ggml's
test-backend-ops bound); ``5e-4`` for f16 results (both sides round the f32 result to f16 once, so a
few elements may differ by one f16 ulp, ~1e-3 relative). Moves (copies, gathers, scatters) must be
bit-exact, f32 -> f16 conversion included (round to nearest even).

Execution runs on WGSL (lavapipe here) and, with the ``cuda`` marker, on CUDA through CuPy. Every
emitted variant is also compiled with ``nvcc -arch=sm_90`` and parsed with the MSL shim.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.codegen import emit, with_nodes_header
from fusec.codegen.check import check_cuda, check_msl
from fusec.codegen.families.elementwise import MAX_GRID_DIM, WORKGROUP_SIZE, grid_for
from fusec.errors import CodegenError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.ir.graph import Graph
from fusec.ir.tensor import Tensor
from tests.gpu import requires_cuda, requires_wgpu

NMSE_BOUND = {"f32": 1e-7, "f16": 5e-4}
BACKENDS = [pytest.param("wgsl", marks=requires_wgpu.mark), pytest.param("cuda", marks=requires_cuda.mark)]
DIMS = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 12, 16, 33])
DTYPES = st.sampled_from(["f32", "f16"])


# ---------------------------------------------------------------------------------------------
# helpers


def _runtime(backend: str):
    if backend == "wgsl":
        from fusec.backends import wgpu_runtime  # noqa: PLC0415

        return wgpu_runtime
    from fusec.backends import cuda_runtime  # noqa: PLC0415

    return cuda_runtime


def _random(rng: np.random.Generator, dtype: str, n: int) -> np.ndarray:
    return rng.uniform(-3.0, 3.0, size=n).astype(np.float16 if dtype == "f16" else np.float32)


def nmse(out: np.ndarray, ref: np.ndarray) -> float:
    """Normalized MSE; the denominator has a floor of (1e-5)^2 per element, so an output whose
    reference is all (near) zero -- e.g. GELU far in its negative tail, where the f32 reference's
    1 + tanh(z) cancels to exactly 0 while the kernel keeps ~1e-9 -- is judged by an absolute error."""
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    return float(np.sum((out - ref) ** 2) / max(np.sum(ref**2), ref.size * 1e-10))


def ne_strategy(max_dims: int = 4, max_elems: int = 6000):
    """A ggml ``ne`` of 1..max_dims dims (padded to 4) with at most ``max_elems`` elements."""
    return st.lists(DIMS, min_size=1, max_size=max_dims).map(lambda v: tuple(v) + (1,) * (4 - len(v))).filter(
        lambda ne: int(np.prod(ne)) <= max_elems)


@st.composite
def layouts(draw):
    """How an operand is laid out in memory: ``("contig",)``, ``("permute", axes)`` or
    ``("view", pad, offset)`` (a window into a wider tensor at an element offset)."""
    kind = draw(st.sampled_from(["contig", "permute", "view"]))
    if kind == "permute":
        return ("permute", tuple(draw(st.permutations([0, 1, 2, 3]))))
    if kind == "view":
        pad = draw(st.integers(0, 5))
        return ("view", pad, draw(st.integers(0, pad)))
    return ("contig",)


def operand(b: GraphBuilder, name: str, dtype: str, ne, layout) -> Tensor:
    """A tensor of shape ``ne`` laid out as ``layout`` (see :func:`layouts`), built on a leaf ``name``."""
    if layout[0] == "permute":
        axes = layout[1]
        leaf = b.input(name, dtype, [ne[axes[i]] for i in range(4)])
        return b.permute(leaf, *axes)
    if layout[0] == "view":
        _, pad, off = layout
        leaf = b.input(name, dtype, (ne[0] + pad, *ne[1:]))
        return b.view(leaf, ne, leaf.nb, offset=off * leaf.dtype.size)
    return b.input(name, dtype, ne)


def leaf_values(graph, rng: np.random.Generator, ints: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Random flat values for every leaf (i32 leaves from ``ints``)."""
    ints = ints or {}
    return {t.name: ints[t.name] if t.name in ints else _random(rng, str(t.dtype), t.nelements)
            for t in graph.leaves}


def run_and_compare(node: Tensor, values: dict[str, np.ndarray], backend: str, exact: bool = False) -> str:
    """Emit ``node`` for ``backend``, run it on ``values`` (flat leaf arrays), compare with the
    interpreter; return the kernel entry. The written root is NaN-poisoned unless it is a leaf (an
    in-place destination), in which case the whole root is compared."""
    g = Graph([node], [node])
    k = emit(node, backend)
    arrays = {}
    for bnd in k.bindings:
        root = bnd.tensor.root
        if root.is_leaf:
            arrays[bnd.name] = values[root.name].copy()
        else:
            arrays[bnd.name] = np.full(root.span_bytes // root.dtype.size, np.nan, dtype=root.dtype.np)
    ref_values = {n: v.copy() for n, v in values.items()}
    ref = interpret(g, ref_values)[node.name]
    out = _runtime(backend).run_kernel(k, arrays)
    for bnd in k.bindings:
        if not bnd.write:
            continue
        got = out[bnd.name]
        root = bnd.tensor.root
        if root.is_leaf:  # in place: the interpreter updated its copy of the root
            np.testing.assert_array_equal(got, ref_values[root.name], err_msg=k.entry)
        else:
            assert not np.isnan(got).any(), f"{k.entry}: unwritten (NaN) elements"
            want = ref.reshape(-1)
            if exact:
                np.testing.assert_array_equal(got, want, err_msg=k.entry)
            else:
                assert nmse(got, want) <= NMSE_BOUND[str(node.dtype)], (k.entry, nmse(got, want))
    return k.entry


# ---------------------------------------------------------------------------------------------
# binary


@st.composite
def bcast_ne(draw, ne):
    """A shape that ``ggml_can_repeat`` broadcasts to ``ne``: each dim 1, a divisor, or the full size."""
    return tuple(draw(st.sampled_from(sorted({1, n} | {d for d in range(1, n + 1) if n % d == 0}))) for n in ne)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), op=st.sampled_from(["ADD", "SUB", "MUL", "DIV"]), dt0=DTYPES, dt1=DTYPES, ne=ne_strategy(),
       seed=st.integers(0, 2**32 - 1))
def test_binary_matches_interpreter(backend, data, op, dt0, dt1, ne, seed):
    ne1 = data.draw(bcast_ne(ne))
    b = GraphBuilder()
    a = operand(b, "a", dt0, ne, data.draw(layouts()))
    c = operand(b, "c", dt1, ne1, data.draw(layouts()))
    node = b.op(op, [a, c], name="y")
    rng = np.random.default_rng(seed)
    values = leaf_values(b.build([node]), rng)
    if op == "DIV":  # keep divisors away from 0
        values["c"] = (np.sign(values["c"]) + (values["c"] == 0) + values["c"]).astype(values["c"].dtype)
    run_and_compare(node, values, backend)


def test_binary_uses_four_elements_per_thread_when_rows_are_aligned():
    b = GraphBuilder()
    node = b.add(b.input("a", "f32", (8, 3)), b.input("c", "f32", (8, 1)), name="y")
    assert emit(node, "wgsl").entry == "add_f32_f32_f32_v4"


def test_binary_falls_back_to_one_element_per_thread_for_unaligned_views():
    b = GraphBuilder()
    a = b.input("a", "f32", (9, 3))
    node = b.add(b.view(a, (8, 3), a.nb, offset=4), b.input("c", "f32", (8,)), name="y")
    assert emit(node, "wgsl").entry == "add_f32_f32_f32_v1"


# ---------------------------------------------------------------------------------------------
# unary


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), op=st.sampled_from(["SCALE", "SILU", "GELU", "TANH", "SIGMOID"]), dt=DTYPES,
       ne=ne_strategy(), s=st.floats(-4, 4, width=32), bias=st.floats(-4, 4, width=32), seed=st.integers(0, 2**32 - 1))
def test_unary_matches_interpreter(backend, data, op, dt, ne, s, bias, seed):
    b = GraphBuilder()
    a = operand(b, "a", dt, ne, data.draw(layouts()))
    node = b.op(op, [a], {"s": s, "b": bias} if op == "SCALE" else None, name="y")
    values = leaf_values(b.build([node]), np.random.default_rng(seed))
    values["a"] = (values["a"] * 4).astype(values["a"].dtype)  # reach the saturated tails (|x| up to 12)
    run_and_compare(node, values, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["SILU", "GELU", "TANH", "SIGMOID"])
def test_activations_saturate_for_large_inputs(backend, op):
    b = GraphBuilder()
    node = b.op(op, [b.input("a", "f32", (6,))], name="y")
    values = {"a": np.array([-1e4, -90.0, -20.0, 20.0, 90.0, 1e4], dtype=np.float32)}
    run_and_compare(node, values, backend)


# ---------------------------------------------------------------------------------------------
# glu


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), op=st.sampled_from(["SWIGLU", "GEGLU"]), dt=DTYPES, ne=ne_strategy(),
       seed=st.integers(0, 2**32 - 1))
def test_glu_split_matches_interpreter(backend, data, op, dt, ne, seed):
    b = GraphBuilder()
    gate = operand(b, "g", dt, ne, data.draw(layouts()))
    lin = operand(b, "l", dt, ne, data.draw(layouts()))
    node = b.op(op, [gate, lin], name="y")
    run_and_compare(node, leaf_values(b.build([node]), np.random.default_rng(seed)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), op=st.sampled_from(["SWIGLU", "GEGLU"]), dt=DTYPES, ne=ne_strategy(max_elems=3000),
       seed=st.integers(0, 2**32 - 1))
def test_glu_single_tensor_gates_first_half(backend, data, op, dt, ne, seed):
    b = GraphBuilder()
    x = operand(b, "x", dt, (2 * ne[0], *ne[1:]), data.draw(layouts()))
    node = b.op(op, [x], name="y")
    run_and_compare(node, leaf_values(b.build([node]), np.random.default_rng(seed)), backend)


def test_swapped_glu_is_refused():
    b = GraphBuilder()
    node = b.op("SWIGLU", [b.input("x", "f32", (8, 2))], {"swapped": True}, name="y")
    with pytest.raises(CodegenError, match="swapped"):
        emit(node, "wgsl")


# ---------------------------------------------------------------------------------------------
# copy


@st.composite
def same_count_ne(draw, ne):
    """A shape with as many elements as ``ne``: ``ne`` itself or its elements regrouped."""
    n = int(np.prod(ne))
    if draw(st.booleans()):
        return tuple(ne)
    d0 = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    return (d0, n // d0, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), st_=DTYPES, dt=DTYPES, ne=ne_strategy(), seed=st.integers(0, 2**32 - 1))
def test_cpy_writes_into_destination_view(backend, data, st_, dt, ne, seed):
    dne = data.draw(same_count_ne(ne))
    b = GraphBuilder()
    src = operand(b, "s", st_, ne, data.draw(layouts()))
    dst = operand(b, "d", dt, dne, data.draw(layouts()))
    node = b.cpy(src, dst, name="y")
    run_and_compare(node, leaf_values(b.build([node]), np.random.default_rng(seed)), backend, exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dt=DTYPES, ne=ne_strategy(), seed=st.integers(0, 2**32 - 1))
def test_cont_makes_strided_source_contiguous(backend, data, dt, ne, seed):
    b = GraphBuilder()
    src = operand(b, "s", dt, ne, data.draw(layouts()))
    node = b.cont(src, data.draw(same_count_ne(ne)), name="y")
    run_and_compare(node, leaf_values(b.build([node]), np.random.default_rng(seed)), backend, exact=True)


# ---------------------------------------------------------------------------------------------
# get_rows / set_rows


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dt=DTYPES, n=DIMS, rows=DIMS, k=DIMS, a2=st.sampled_from([1, 2, 3]),
       a3=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_get_rows_gathers_indexed_rows(backend, data, dt, n, rows, k, a2, a3, seed):
    b = GraphBuilder()
    a = operand(b, "a", dt, (n, rows, a2, a3), data.draw(layouts()))
    idx = b.input("i", "i32", (k, a2, a3))
    node = b.get_rows(a, idx, name="y")
    rng = np.random.default_rng(seed)
    ints = {"i": rng.integers(0, rows, size=k * a2 * a3).astype(np.int32)}
    run_and_compare(node, leaf_values(b.build([node]), rng, ints), backend, exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dt=DTYPES, n=DIMS, rows=st.integers(1, 40), b2=st.sampled_from([1, 2, 4]),
       b3=st.sampled_from([1, 3]), seed=st.integers(0, 2**32 - 1))
def test_set_rows_scatters_into_destination(backend, data, dt, n, rows, b2, b3, seed):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, rows))
    c1 = data.draw(st.sampled_from([d for d in (1, 2, 4) if b2 % d == 0]))
    c2 = data.draw(st.sampled_from([d for d in (1, 3) if b3 % d == 0]))
    b = GraphBuilder()
    dest = operand(b, "kv", dt, (n, rows, b2, b3), data.draw(layouts().filter(lambda lay: lay[0] != "permute")))
    src = operand(b, "r", "f32", (n, k, b2, b3), data.draw(layouts()))
    idx = b.input("i", "i32", (k, c1, c2))
    node = b.set_rows(dest, src, idx, name="y")
    # distinct rows within each slice: repeated indices race on a GPU (ggml-cpu: last write wins)
    ints = {"i": np.stack([rng.permutation(rows)[:k] for _ in range(c1 * c2)]).astype(np.int32).reshape(-1)}
    run_and_compare(node, leaf_values(b.build([node]), rng, ints), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_rows_one_element_rows_of_transposed_v_cache(backend):
    """llama.cpp's transposed V cache: rows of one element, one per (token, channel)."""
    n_ctx, n_embd, n_tok = 64, 48, 5
    b = GraphBuilder()
    v_cache = b.input("v", "f16", (n_ctx * n_embd,))
    dest = b.view(v_cache, (1, n_ctx * n_embd), (2, 2))
    rows = b.reshape(b.input("vcur", "f32", (n_embd, n_tok)), (1, n_embd * n_tok))
    idx = b.input("i", "i32", (n_embd * n_tok,))
    node = b.set_rows(dest, rows, idx, name="y")
    rng = np.random.default_rng(0)
    pos = rng.permutation(n_ctx)[:n_tok]
    ints = {"i": (np.arange(n_embd)[None, :] * n_ctx + pos[:, None]).astype(np.int32).reshape(-1)}
    assert emit(node, "wgsl").grid[0] * WORKGROUP_SIZE >= n_embd * n_tok  # one thread per element
    run_and_compare(node, leaf_values(b.build([node]), rng, ints), backend)


# ---------------------------------------------------------------------------------------------
# launch geometry, headers


def test_grid_folds_into_two_dimensions_past_the_limit():
    b = GraphBuilder()
    node = b.input("x", "f32", (1,))
    assert grid_for((MAX_GRID_DIM + 10) * WORKGROUP_SIZE, node) == (MAX_GRID_DIM, 2, 1)


@requires_wgpu
def test_kernel_linearizes_a_folded_grid():
    b = GraphBuilder()
    node = b.silu(b.input("x", "f32", (1000, 3)), name="y")
    k = emit(node, "wgsl")
    groups = k.grid[0]
    k = dataclasses.replace(k, grid=(-(-groups // 3), 3, 1))  # same threads, spread over y
    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    from fusec.backends.wgpu_runtime import run_kernel  # noqa: PLC0415

    got = run_kernel(k, {"src0": x, "dst": np.full(3000, np.nan, np.float32)})["dst"]
    assert nmse(got, x / (1 + np.exp(-x))) <= 1e-7


@pytest.mark.parametrize("backend", ["wgsl", "cuda", "msl"])
def test_source_header_names_family_op_and_nodes(backend):
    b = GraphBuilder()
    node = b.mul(b.input("h", "f32", (8,)), b.weight("w", "f32", (8,)), name="ffn_out")
    k = emit(node, backend)
    first = k.source.splitlines()[0]
    assert first.startswith("// fusec binary kernel") and "MUL" in first
    assert k.meta["nodes"] == ["ffn_out"]  # node names travel beside the text (shared sources)
    assert with_nodes_header(k.source, k.meta["nodes"]).splitlines()[1] == "// nodes: ffn_out"


def test_source_does_not_depend_on_shape():
    def body(ne):
        b = GraphBuilder()
        node = b.add(b.input("a", "f32", ne), b.input("c", "f32", ne[:1]), name="y")
        return emit(node, "cuda").source.split("\n", 1)[1]

    assert body((16, 3)) == body((4096, 7, 2))


# ---------------------------------------------------------------------------------------------
# every variant compiles for CUDA (nvcc -arch=sm_90) and parses with the MSL shim


def all_variants() -> list[Tensor]:
    """One node per distinct kernel variant: every op, dtype mix and vector width."""
    b = GraphBuilder()
    out = []
    for d0 in ("f32", "f16"):
        x = b.input(f"x{d0}", d0, (8, 3))
        odd = b.view(x, (7, 3), x.nb)
        for d1 in ("f32", "f16"):
            w = b.input(f"w{d0}{d1}", d1, (8,))
            for op in ("ADD", "SUB", "MUL", "DIV"):
                out += [b.op(op, [x, w]), b.op(op, [odd, b.view(w, (7,), w.nb)])]
            d = b.input(f"d{d0}{d1}", d1, (8, 3))
            out.append(b.cpy(x, d))
        for op in ("SCALE", "SILU", "GELU", "TANH", "SIGMOID"):
            out += [b.op(op, [x]), b.op(op, [odd])]
        for op in ("SWIGLU", "GEGLU"):
            out += [b.op(op, [x]), b.op(op, [x, x]), b.op(op, [b.view(x, (6, 3), x.nb)])]
        out += [b.cont(b.transpose(x)), b.get_rows(x, b.input(f"i{d0}", "i32", (2,)))]
        out.append(b.set_rows(b.input(f"kv{d0}", d0, (8, 10)), b.input(f"r{d0}", "f32", (8, 2)),
                              b.input(f"ri{d0}", "i32", (2,))))
    return out


def bundle(kernels, prologue: str) -> str:
    """One translation unit holding every distinct kernel, each in its own namespace (its own
    ``Params``); the per-kernel prologue lines (includes, typedefs) are hoisted to the top once."""
    seen, parts = set(), [prologue]
    for k in kernels:
        if k.entry in seen:
            continue
        seen.add(k.entry)
        body = "\n".join(line for line in k.source.splitlines()
                         if not re.match(r"\s*(#include|typedef unsigned int uint;|using namespace metal;)", line))
        parts.append(f"namespace k_{k.entry} {{\n{body}\n}}")
    return "\n".join(parts)


def test_every_variant_compiles_with_nvcc():
    kernels = [emit(n, "cuda") for n in all_variants()]
    check_cuda([kernels[0], kernels[-1]])  # two unmodified sources, prologue included
    check_cuda(("elementwise_bundle", bundle(kernels, "#include <cuda_fp16.h>\ntypedef unsigned int uint;")))


def test_every_variant_passes_the_msl_shim():
    kernels = [emit(n, "msl") for n in all_variants()]
    check_msl([kernels[0], kernels[-1]])
    check_msl(("elementwise_bundle", bundle(kernels, "#include <metal_stdlib>\nusing namespace metal;")))


@requires_wgpu
def test_every_variant_compiles_with_naga():
    from fusec.codegen.check import check_wgsl  # noqa: PLC0415

    check_wgsl({k.entry: k for k in (emit(n, "wgsl") for n in all_variants())}.values())
