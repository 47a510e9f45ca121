"""The Jinja2 environment for kernel templates (``StrictUndefined``: a missing variable is an error).

Templates live in ``templates/<backend>/`` (``wgsl``, ``cuda``, ``msl``) and ``templates/common/``
(skeletons shared by the C-family dialects). Template errors are re-raised as
:class:`fusec.errors.CodegenError` with the template name and line.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2

from ..errors import CodegenError
from ..ir.dtypes import DType
from ..resources import templates_dir

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


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Jinja's own on-disk cache of compiled templates (in ``$FUSEC_CACHE_DIR/jinja``; keyed by
    Jinja on the template's name and source checksum), so a new process does not recompile them."""
    from . import diskcache  # noqa: PLC0415

    if not diskcache.disk_enabled():
        return None
    try:
        d = diskcache.cache_dir() / "jinja"
        d.mkdir(parents=True, exist_ok=True)
        return jinja2.FileSystemBytecodeCache(str(d))
    except OSError:
        return None


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        bytecode_cache=_bytecode_cache(),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env


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
