"""Every norm_epilogue variant compiles (nvcc sm_90, MSL shim, naga); each checker rejects a broken
source and names the kernel."""

from __future__ import annotations

import itertools
import shutil

import pytest

from fusec.codegen import emit
from fusec.codegen.check import check_cuda, check_msl, check_wgsl
from fusec.errors import CodegenError
from fusec.ir import GraphBuilder
from fusec.rewrite.fuse import make_fused_node
from tests.gpu import compile_check_tests, requires_wgpu

CHAINS = {  # name -> epilogue ops after the norm
    "rms_norm": ("RMS_NORM", ()),
    "norm": ("NORM", ()),
    "rms_norm_mul": ("RMS_NORM", ("MUL",)),
    "rms_norm_mul_add": ("RMS_NORM", ("MUL", "ADD")),
    "norm_mul_add": ("NORM", ("MUL", "ADD")),
    "norm_sub_div": ("NORM", ("SUB", "DIV")),
}
# row lengths picking each tuning: vec4 in registers, vec1 in registers, one warp per row, streamed
ROW_LENGTHS = (4096, 4095, 64, 40000)
DTYPES = ("f32", "f16")


def norm_node(chain: str, dtype: str, ne0: int, rows: int = 3):
    """The node computing ``chain`` on x ne=[ne0, rows] (a FUSED node when the chain has ops)."""
    norm, ops = CHAINS[chain]
    b = GraphBuilder()
    x = b.input("x", dtype, (ne0, rows))
    if not ops:
        return b.rms_norm(x, 1e-6) if norm == "RMS_NORM" else b.norm(x, 1e-5)
    sb = GraphBuilder()
    phs = [sb.leaf(f"in{i}", dtype, (ne0, rows) if i == 0 else (ne0,)) for i in range(len(ops) + 1)]
    for i, ph in enumerate(phs):
        ph.params["fused_input"] = i
    y = sb.op(norm, [phs[0]], {"eps": 1e-5})
    for i, op in enumerate(ops):
        y = sb.op(op, [y, phs[i + 1]])
    srcs = [x] + [b.weight(f"w{i}", dtype, (ne0,)) for i in range(len(ops))]
    return make_fused_node(b, sb.build([y]), srcs, {"pattern": chain, "kernel": "norm_epilogue"}, name="y")


def variants(backend: str):
    seen, out = set(), []
    for chain, dtype, ne0 in itertools.product(CHAINS, DTYPES, ROW_LENGTHS):
        k = emit(norm_node(chain, dtype, ne0), backend)
        if k.source not in seen:
            seen.add(k.source)
            out.append(k)
    return out


BROKEN_CUDA = ("broken_cuda_kernel", 'extern "C" __global__ void broken_cuda_kernel(float* x) { x[0] = y; }')
BROKEN_MSL = ("broken_msl_kernel",
              "#include <metal_stdlib>\nusing namespace metal;\n"
              "kernel void broken_msl_kernel(device float* x [[buffer(0)]]) { x[0] = simd_summ(1.0f); }")
BROKEN_WGSL = ("broken_wgsl_kernel",
               "@group(0) @binding(0) var<storage, read_write> x: array<f32>;\n"
               "@compute @workgroup_size(1) fn broken_wgsl_kernel() { x[0] = 1u; }")


def test_variants_cover_vector_widths_and_tunings():
    ks = variants("cuda")
    tunings = {(k.meta["tuning"].vec, k.meta["tuning"].rows > 1, k.meta["tuning"].slots == 0) for k in ks}
    assert {(4, False, False), (1, False, False), (4, True, False), (4, False, True)} <= tunings


(test_every_cuda_variant_compiles_with_nvcc, test_every_msl_variant_passes_the_shim,
 test_every_wgsl_variant_compiles_with_naga) = compile_check_tests(variants)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_check_cuda_names_the_broken_kernel():
    with pytest.raises(CodegenError, match="broken_cuda_kernel"):
        check_cuda([BROKEN_CUDA])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_check_msl_names_the_broken_kernel():
    with pytest.raises(CodegenError, match="broken_msl_kernel"):
        check_msl([BROKEN_MSL])


@requires_wgpu
def test_check_wgsl_names_the_broken_kernel():
    with pytest.raises(CodegenError, match="broken_wgsl_kernel"):
        check_wgsl([BROKEN_WGSL])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_check_msl_accepts_a_single_pair_and_reports_all_failures():
    good = ("good_msl_kernel", "#include <metal_stdlib>\nusing namespace metal;\n"
            "kernel void good_msl_kernel(device float4* x [[buffer(0)]]) { x[0] = rsqrt(max(x[1], float4(1.0f))); }")
    check_msl(good)
    with pytest.raises(CodegenError, match=r"broken_msl_kernel.*\(and 1 more failing kernel\(s\): other"):
        check_msl([BROKEN_MSL, good, ("other", BROKEN_MSL[1])])


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CodegenError, match="'nvcc' not found"):
        check_cuda([BROKEN_CUDA])
