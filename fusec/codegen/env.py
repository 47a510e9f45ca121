"""The Jinja2 environment for kernel templates (``StrictUndefined``: a missing variable is an error).

Templates live in ``templates/<backend>/`` (``wgsl``, ``cuda``, ``msl``) and ``templates/common/``
(skeletons shared by the C-family dialects). Template errors are re-raised as
:class:`fusec.errors.CodegenError` with the template name and line.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jinja2

from ..errors import CodegenError
from ..ir.dtypes import DType
from ..resources import templates_dir
from .jinja_bytecode import SHIPPED_DIRS, TemplateBytecodeCache, make_environment

# per-backend dialect tables: element type names in storage and in registers
TYPE_NAMES = {
    "wgsl": {DType.F32: "f32", DType.F16: "f16", DType.I32: "i32"},
    "cuda": {DType.F32: "float", DType.F16: "half", DType.I32: "int"},
    "msl": {DType.F32: "float", DType.F16: "half", DType.I32: "int"},
}
CUDA_SMS = 132
"""SMs of the CUDA target GPU (H200) that launch-shape heuristics size their grids for (persistent
grids, KV splits, threads in flight); any value gives correct kernels."""

PARAM_TYPE_NAMES = {
    "wgsl": {"u32": "u32", "i32": "i32", "f32": "f32"},
    "cuda": {"u32": "unsigned int", "i32": "int", "f32": "float"},
    "msl": {"u32": "uint", "i32": "int", "f32": "float"},
}


def _user_bytecode_dir() -> Path | None:
    """``$FUSEC_CACHE_DIR/jinja``, or ``None`` when the disk cache is disabled."""
    from . import diskcache  # noqa: PLC0415

    return diskcache.cache_dir() / "jinja" if diskcache.disk_enabled() else None


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates from the bytecode shipped with the package (compiled at build time by
    ``hatch_build.py``; read-only), then from ``$FUSEC_CACHE_DIR/jinja`` (written on a miss), so a
    new process does not recompile templates. ``FUSEC_DISABLE_DISK_CACHE=1`` (or
    ``FUSEC_DISABLE_RENDER_CACHE=1``) turns the user folder off but keeps the shipped bytecode
    (like ``.pyc`` files of the package; every entry is checked against the template source);
    ``FUSEC_DISABLE_JINJA_BYTECODE=1`` turns both off (every process compiles its templates)."""
    if os.environ.get("FUSEC_DISABLE_JINJA_BYTECODE") == "1":
        return None
    pkg = Path(__file__).resolve().parents[1]
    return TemplateBytecodeCache([pkg / d for d in SHIPPED_DIRS if (pkg / d).is_dir()], _user_bytecode_dir)


@functools.cache
def environment() -> jinja2.Environment:
    """The process's template environment (created once; see :func:`_bytecode_cache`)."""
    return make_environment(templates_dir(), _bytecode_cache())


def render(template: str, **ctx: Any) -> str:
    """Render ``template`` (path relative to ``templates/``); raises :class:`CodegenError` with the
    template's name and line on any template error."""
    try:
        return environment().get_template(template).render(**ctx)
    except jinja2.TemplateSyntaxError as e:
        raise CodegenError(f"{e.filename or template}:{e.lineno}: template syntax error: {e.message}") from None
    except jinja2.UndefinedError as e:
        raise CodegenError(f"templates/{template}: {e.message}") from None
    except jinja2.TemplateNotFound as e:
        raise CodegenError(f"template not found: {e.name}") from None
