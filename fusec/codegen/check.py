"""Compile / syntax checks for generated kernel sources, one per dialect.

* :func:`check_cuda` compiles every CUDA source with ``nvcc -arch=sm_90 -c`` (one nvcc process per
  source, run in parallel, in a temporary directory). It catches everything nvcc catches: syntax,
  types, overloads, missing helpers, invalid intrinsics for sm_90.
* :func:`check_msl` parses every Metal source as C++17 with ``g++ -fsyntax-only -Wno-attributes``
  after ``fusec/codegen/msl_shim.h`` (Metal address spaces as empty macros, scalar/vector types with
  their operators, the ``metal::`` functions compute kernels use). It catches syntax errors,
  undeclared names, type and overload errors. It **cannot** catch: Metal address-space rules
  (``device``/``constant``/``threadgroup`` pointer mismatches), invalid or missing attributes such as
  ``[[buffer(i)]]`` (g++ ignores unknown attributes), Metal-only semantics (simdgroup behaviour,
  barrier placement, resource limits), real ``half`` arithmetic (the shim stores half as float), the
  ``h`` literal suffix, swizzles beyond ``.x .y .z .w``.
* :func:`check_wgsl` compiles every WGSL source through naga (``wgpu_runtime.validate``), which is the
  real compiler: it also checks uniformity, bindings and address spaces.

Each takes :class:`~fusec.codegen.kernel.Kernel` objects or ``(name, source)`` pairs and raises
:class:`~fusec.errors.CodegenError` naming the kernel (with the compiler's diagnostics) on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import CodegenError
from .kernel import Kernel

SHIM = Path(__file__).resolve().parent / "msl_shim.h"
NVCC_ARCH = "sm_90"

Source = Kernel | tuple[str, str]


def _named(items: Kernel | Source | Iterable[Source]) -> list[tuple[str, str]]:
    if isinstance(items, Kernel) or (isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], str)):
        items = [items]  # type: ignore[list-item]
    out = []
    for it in items:  # type: ignore[union-attr]
        if isinstance(it, Kernel):
            out.append((it.entry, it.source))
        else:
            name, src = it
            out.append((str(name), str(src)))
    return out


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CodegenError(f"'{name}' not found on PATH: {hint}")
    return path


def _run_all(jobs: list[tuple[str, list[str]]], what: str) -> None:
    """Run ``(kernel name, argv)`` jobs in parallel; raise for the first failing one (in order)."""

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(run, [argv for _, argv in jobs]))
    failures = [(name, r) for (name, _), r in zip(jobs, results, strict=True) if r.returncode != 0]
    if failures:
        name, r = failures[0]
        more = f" (and {len(failures) - 1} more failing kernel(s): {', '.join(n for n, _ in failures[1:])})" \
            if len(failures) > 1 else ""
        raise CodegenError(f"{what} failed for kernel '{name}'{more}:\n{(r.stdout + r.stderr).strip()}")


def _safe(name: str, i: int) -> str:
    return f"{i:03d}_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)[:80]


def check_cuda(items: Kernel | Source | Iterable[Source]) -> None:
    """Compile every CUDA source with ``nvcc -arch=sm_90 -c``.

    Raises :class:`CodegenError` naming the kernel with nvcc's output when one fails to compile, or
    when ``nvcc`` is not on ``PATH``.
    """
    named = _named(items)
    if not named:
        return
    nvcc = _tool("nvcc", "the CUDA toolkit is needed to compile-check CUDA kernels")
    with tempfile.TemporaryDirectory(prefix="fusec_nvcc_") as tmp:
        jobs = []
        for i, (name, src) in enumerate(named):
            f = Path(tmp) / f"{_safe(name, i)}.cu"
            f.write_text(src)
            jobs.append((name, [nvcc, f"-arch={NVCC_ARCH}", "-std=c++17", "-c", str(f), "-o",
                                str(f.with_suffix(".o"))]))
        _run_all(jobs, f"nvcc -arch={NVCC_ARCH}")


def check_msl(items: Kernel | Source | Iterable[Source]) -> None:
    """Syntax-check every Metal source with ``g++ -std=c++17 -fsyntax-only`` and the MSL shim.

    Raises :class:`CodegenError` naming the kernel with g++'s output when one fails (see the module
    docstring for what this check cannot catch), or when ``g++`` is not on ``PATH``.
    """
    named = _named(items)
    if not named:
        return
    gxx = _tool("g++", "a C++17 compiler is needed to syntax-check MSL kernels")
    with tempfile.TemporaryDirectory(prefix="fusec_msl_") as tmp:
        (Path(tmp) / "metal_stdlib").write_text("// provided by fusec/codegen/msl_shim.h\n")
        jobs = []
        for i, (name, src) in enumerate(named):
            f = Path(tmp) / f"{_safe(name, i)}.metal"
            f.write_text(src)
            jobs.append((name, [gxx, "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-x", "c++",
                                "-I", tmp, "-include", str(SHIM), str(f)]))
        _run_all(jobs, "MSL syntax check (g++ + msl_shim.h)")


def check_wgsl(items: Kernel | Source | Iterable[Source]) -> None:
    """Compile every WGSL source with naga through :func:`fusec.backends.wgpu_runtime.validate`.

    Kernel objects are compiled at their ``entry``; for ``(name, source)`` pairs ``name`` is the
    entry point. Raises :class:`CodegenError` naming the kernel with naga's diagnostics.
    """
    from ..backends import wgpu_runtime  # noqa: PLC0415  (wgpu is optional)
    from ..errors import BackendError  # noqa: PLC0415

    for name, src in _named(items):
        try:
            wgpu_runtime.validate(src, name)
        except BackendError as e:
            raise CodegenError(f"WGSL compile failed for kernel '{name}':\n{e}") from None


__all__ = ["SHIM", "check_cuda", "check_msl", "check_wgsl"]
