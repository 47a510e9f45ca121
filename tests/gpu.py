"""Shared pytest markers for tests that need an accelerator runtime.

* ``requires_cuda``: ``pytest.mark.cuda`` + skip unless CuPy imports and a CUDA device exists.
* ``requires_wgpu``: ``pytest.mark.wgpu`` + skip unless wgpu-py finds an adapter (lavapipe in CI).

Use as decorators (``@requires_cuda``) or in ``pytestmark``.
"""

from __future__ import annotations

import pytest

from fusec.backends import cuda_runtime, wgpu_runtime

cuda_available = cuda_runtime.available()
wgpu_available = wgpu_runtime.available()


def _both(marker, skip):
    def deco(obj):
        return marker(skip(obj))

    deco.mark = [marker, skip]  # for pytestmark lists
    return deco


requires_cuda = _both(pytest.mark.cuda,
                      pytest.mark.skipif(not cuda_available, reason="needs CuPy and a CUDA device"))
requires_wgpu = _both(pytest.mark.wgpu,
                      pytest.mark.skipif(not wgpu_available, reason="needs wgpu-py and a WebGPU adapter"))


def compile_check_tests(variants):
    """The three compile-check tests of a kernel family, for a test module to bind at top level:
    ``variants(backend)`` returns the :class:`~fusec.codegen.Kernel` variants to check; CUDA with
    ``nvcc -arch=sm_90``, MSL through the g++ shim, WGSL with naga (skipped without the tool)."""
    import shutil  # noqa: PLC0415

    from fusec.codegen.check import check_cuda, check_msl, check_wgsl  # noqa: PLC0415

    @pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
    def test_every_cuda_variant_compiles_with_nvcc():
        check_cuda(variants("cuda"))

    @pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
    def test_every_msl_variant_passes_the_shim():
        check_msl(variants("msl"))

    @requires_wgpu
    def test_every_wgsl_variant_compiles_with_naga():
        check_wgsl(variants("wgsl"))

    return test_every_cuda_variant_compiles_with_nvcc, test_every_msl_variant_passes_the_shim, \
        test_every_wgsl_variant_compiles_with_naga


def kernel_arrays(k, values) -> dict:
    """Host arrays for ``k``'s bindings, by binding name: a written binding NaN-poisoned over its
    root's elements, a read one flattened from ``values`` (by the bound root's name)."""
    import numpy as np  # noqa: PLC0415

    return {b.name: (np.full(b.tensor.root.nelements, np.nan, b.dtype.np) if b.write
                     else values[b.tensor.root.name].reshape(-1)) for b in k.bindings}
