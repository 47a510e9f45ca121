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
