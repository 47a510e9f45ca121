"""A render cache for kernel sources: in memory, and on disk so that a second process does not
re-render what a first one rendered.

Kernel families render Jinja templates (:func:`fusec.codegen.env.render`); rendering is most of
the cost of codegen (about 0.3 ms a kernel here, against tens of µs for computing the parameters).
:func:`cached_render` replaces ``render`` inside the family modules (installed by
:func:`install`, called by ``fusec.codegen._load_families``) and memoizes the text by a key made of:

* the fusec version, a hash of every template file under ``templates/`` (any template edit
  invalidates everything) and the template path (which names the backend dialect: ``wgsl/``,
  ``cuda/``, ``msl/``);
* the *render context* with the values that do not shape the text taken out: node names
  (``node_name``, ``src_names``, ``nodes``; they only appear in the ``// nodes:`` header line), the
  values of the kernel parameters (``params`` entries ``(name, type, value)`` keep name and type:
  values are runtime parameters, see ``docs/ARCHITECTURE.md``) and the tensors of
  :class:`~fusec.codegen.kernel.Binding` records (name, dtype and write flag stay).

That the left-out values really do not shape the text is *checked* for every entry before it is
served: the template is rendered a second time with sentinel names, perturbed parameter values and
bindings without tensors; the text is cached only when substituting the real names back gives
exactly the real render. A template that uses one of them is simply never cached. So a cached
(memory or disk) render is always byte-identical to an uncached one.

Write-behind: a miss renders once, with the real context, and returns that text (an uncached render,
correct by construction); the verification render and the disk write are *pending* until
:func:`flush` (called at interpreter exit through :mod:`atexit`, and at the end of the ``fusec``
CLI commands), so that a process's first codegen does not pay them. The in-memory memo holds only
verified entries: the first later call with the same key (another node of the same kernel) verifies
the pending entry before it is served (the verification render costs what rendering that call
would), and a failed verification renders the call itself. No thread is started. A process killed
abruptly (``SIGKILL``, ``os._exit``, e.g. a ``fork``-started :mod:`multiprocessing` worker) loses
its pending entries: they are rendered again by a later process, nothing wrong is ever cached.

On disk (``$FUSEC_CACHE_DIR``, default ``~/.cache/fusec``) each entry is one JSON file
``kernels/<digest[:2]>/<digest>.json`` holding the key text (fusec version, template hash, template
path and a SHA-256 of the canonical context, serialized with ``marshal`` format 0) and the source; it is written to
a temporary file in the same folder and renamed into place (``os.replace``), so concurrent writers
(two processes rendering the same kernel) never leave a partial file and readers never see one; a
file whose key text differs or that does not parse is ignored and rewritten. A pending entry is
written under the cache folder of the time it was rendered. Environment:
``FUSEC_DISABLE_DISK_CACHE=1`` turns the disk off (memory memo only), ``FUSEC_DISABLE_RENDER_CACHE=1``
turns both off.

Compiled binaries are not stored here: wgpu compiles WGSL when pipelines are created (kept per
process by ``fusec.backends.wgpu_runtime``), and for CUDA, CuPy keeps its own on-disk cache of
NVRTC-compiled cubins keyed by source text, options and architecture (``CUPY_CACHE_DIR``, default
``~/.cupy/kernel_cache``), so a rendered source that hits here also hits there.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import marshal
import os
import sys
import threading
import time
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..ir.dtypes import DType
from ..resources import templates_dir
from . import env
from .jinja_bytecode import atomic_write
from .kernel import Binding

NAME_KEYS = ("node_name", "src_names")
"""Render-context entries holding one node-name string (only in header comments)."""
NAMES_LIST_KEYS = ("nodes",)
"""Render-context entries holding a list of node names."""
_SENT = "\x01fusec:{}\x02"


@dataclass
class RenderStats:
    """Counters of this process (reset with :func:`reset`).

    Attributes:
        memory_hits, disk_hits, misses: renders served from memory, from disk, rendered.
        uncacheable: renders whose template uses a left-out value (rendered every time).
        disk_writes: files written.
        render_s: seconds spent in Jinja (misses, and verification renders done before a memory hit).
        emit_s: seconds spent in ``fusec.codegen.emit`` (all of codegen; updated by ``emit``).
        verified: pending entries verified (before a memory hit or by :func:`flush`).
        flush_s: seconds spent in :func:`flush` (verification renders and disk writes left behind).
    """

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    uncacheable: int = 0
    disk_writes: int = 0
    render_s: float = 0.0
    emit_s: float = 0.0
    verified: int = 0
    flush_s: float = 0.0


@dataclass
class _Pending:
    """A miss's entry waiting for its verification render (``generic is None``) and/or its disk
    write (``disk`` is the cache folder of the time of the render, ``None``: memory only)."""

    template: str
    key_text: str
    real: str
    sctx: dict[str, Any] | None
    subs: list[tuple[str, str]]
    disk: Path | None
    generic: str | None = None


STATS = RenderStats()
_memory: dict[str, str] = {}
"""Verified entries only: digest -> text with sentinel names."""
_pending: dict[str, _Pending] = {}
"""Entries rendered but not yet verified and/or not yet written to disk (see :func:`flush`)."""
_uncacheable: set[str] = set()
_lock = threading.Lock()
_template_hash: str | None = None
_atexit_registered = False


def cache_dir() -> Path:
    """``$FUSEC_CACHE_DIR`` or ``~/.cache/fusec`` (not created here)."""
    d = os.environ.get("FUSEC_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "fusec"


def disk_enabled() -> bool:
    env_ = os.environ
    return not (env_.get("FUSEC_DISABLE_DISK_CACHE") == "1" or env_.get("FUSEC_DISABLE_RENDER_CACHE") == "1")


def enabled() -> bool:
    return os.environ.get("FUSEC_DISABLE_RENDER_CACHE") != "1"


def reset(memory: bool = True) -> None:
    """Forget the in-memory state (as a fresh process would; pending entries are dropped, not
    written: call :func:`flush` first to keep them) and zero :data:`STATS`."""
    global _template_hash
    with _lock:
        if memory:
            _memory.clear()
            _pending.clear()
            _uncacheable.clear()
            _template_hash = None
        for f in fields(RenderStats):
            setattr(STATS, f.name, f.default)


def template_hash() -> str:
    """SHA-256 over the relative paths and bytes of every file under ``templates/`` (once per process)."""
    global _template_hash
    if _template_hash is None:
        files: list[tuple[tuple[str, ...], str]] = []
        _list_files(str(templates_dir()), (), files)
        h = hashlib.sha256()
        for parts, path in sorted(files):  # the order of sorted(Path.rglob()): by path components
            with open(path, "rb") as f:
                h.update("/".join(parts).encode() + b"\0" + f.read() + b"\0")
        _template_hash = h.hexdigest()
    return _template_hash


def _list_files(folder: str, rel: tuple[str, ...], out: list[tuple[tuple[str, ...], str]]) -> None:
    """Append ``(relative path components, path)`` of every file below ``folder`` (``os.scandir``:
    about 3x faster than ``Path.rglob`` + ``is_file`` on the ~80 template files)."""
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir():
                _list_files(e.path, (*rel, e.name), out)
            elif e.is_file():
                out.append(((*rel, e.name), e.path))


# -- keys ----------------------------------------------------------------------------------------


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _canon(v: Any) -> Any:
    """A repr-stable stand-in for a context value (``repr`` tells ``1``, ``1.0``, ``True``, ``'1'`` apart)."""
    t = type(v)
    if t in _PLAIN:
        return v
    if t is list or t is tuple:
        return [_canon(x) for x in v]
    if t is dict:
        return {str(k): _canon(x) for k, x in v.items()}
    if t is Binding:
        return ("B", v.name, v.dtype.value, v.write)
    if t is DType:
        return ("T", v.value)
    if is_dataclass(v) and not isinstance(v, type):
        names = _FIELDS.get(t)
        if names is None:
            names = _FIELDS[t] = tuple(f.name for f in fields(v))
        return ("D", t.__name__, [(n, _canon(getattr(v, n))) for n in names])
    raise TypeError(t.__name__)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _params_shape(params: Any) -> Any:
    """``params`` without values: ``(name, type)`` of each entry."""
    return [p[:2] for p in params]


def render_key(template: str, ctx: dict[str, Any]) -> tuple[str, str] | None:
    """``(digest, key_text)`` of a render, or ``None`` when the context holds a value this module
    cannot canonicalize (that render is not cached)."""
    items = []
    try:
        for k in sorted(ctx):
            if k in NAME_KEYS:
                continue
            v = ctx[k]
            if k in NAMES_LIST_KEYS:
                items.append((k, len(v)))
            elif k == "params":
                items.append((k, _params_shape(v)))
            else:
                items.append((k, _canon(v)))
    except (TypeError, IndexError):
        return None
    try:
        # marshal format 0: no reference or interning flags, so equal values give equal bytes in any
        # process; distinct type codes keep 1, 1.0, True, '1' and None apart (6x faster than repr)
        payload = marshal.dumps(items, 0)
    except ValueError:
        return None
    text = f"{_prefix()}|{template}|sha256:{hashlib.sha256(payload).hexdigest()}"
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest(), text


def _prefix() -> str:
    return f"fusec {__version__}|templates {template_hash()}"


def _sentinels(ctx: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The context with names replaced by sentinels, parameter values perturbed and binding
    tensors dropped; and the ``(sentinel, real)`` pairs to substitute back."""
    out = dict(ctx)
    subs: list[tuple[str, str]] = []
    for k in NAME_KEYS:
        if k in ctx:
            s = _SENT.format(k)
            out[k] = s
            subs.append((s, str(ctx[k])))
    for k in NAMES_LIST_KEYS:
        if k in ctx:
            vals = []
            for i, real in enumerate(ctx[k]):
                s = _SENT.format(f"{k}{i}")
                vals.append(s)
                subs.append((s, str(real)))
            out[k] = vals
    if "params" in ctx:
        out["params"] = [(*p[:2], _perturb(p[2]), *p[3:]) if len(p) > 2 else p for p in ctx["params"]]
    if "bindings" in ctx:
        out["bindings"] = [Binding(b.name, None, b.dtype, b.write) if isinstance(b, Binding) else b  # type: ignore[arg-type]
                           for b in ctx["bindings"]]
    return out, subs


def _perturb(v: Any) -> Any:
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 7919
    if isinstance(v, float):
        return v * 3.0 + 0.5
    return v


def _substitute(text: str, subs: list[tuple[str, str]]) -> str:
    for s, real in subs:
        text = text.replace(s, real)
    return text


def _real_subs(ctx: dict[str, Any]) -> list[tuple[str, str]]:
    subs = [(_SENT.format(k), str(ctx[k])) for k in NAME_KEYS if k in ctx]
    for k in NAMES_LIST_KEYS:
        if k in ctx:
            subs += [(_SENT.format(f"{k}{i}"), str(real)) for i, real in enumerate(ctx[k])]
    return subs


# -- disk ------------------------------------------------------------------------------------------


def _path(digest: str, folder: Path | None = None) -> Path:
    return (cache_dir() if folder is None else folder) / "kernels" / digest[:2] / f"{digest}.json"


def disk_read(digest: str, key_text: str, folder: Path | None = None) -> str | None:
    """The cached template text (with sentinels) for ``digest`` under ``folder`` (default
    :func:`cache_dir`), or ``None`` (absent, unreadable, or written for another key)."""
    try:
        data = json.loads(_path(digest, folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key_text or not isinstance(data.get("source"), str):
        return None
    return data["source"]


def disk_write(digest: str, key_text: str, source: str, folder: Path | None = None) -> bool:
    """Store an entry atomically (temporary file in the same folder, then ``os.replace``) under
    ``folder`` (default :func:`cache_dir`).

    Returns False (and leaves no file behind) when the folder cannot be written; a read-only or
    full cache never fails a compile."""
    payload = json.dumps({"key": key_text, "source": source}).encode("utf-8")
    return atomic_write(_path(digest, folder), lambda f: f.write(payload))


# -- rendering ---------------------------------------------------------------------------------------


def cached_render(template: str, **ctx: Any) -> str:
    """Drop-in replacement of :func:`fusec.codegen.env.render` with the caches of this module.

    Returns exactly the text ``env.render(template, **ctx)`` returns; raises what it raises
    (:class:`fusec.errors.CodegenError`). A miss leaves its verification and disk write pending
    (see :func:`flush`).
    """
    if not enabled():
        return env.render(template, **ctx)
    rk = render_key(template, ctx)
    if rk is None:
        with _lock:
            STATS.uncacheable += 1
        return env.render(template, **ctx)
    digest, key_text = rk
    text = _memory.get(digest)
    if text is None and digest in _pending:
        text = _verify_pending(digest, count_render=True)
    if text is not None:
        with _lock:
            STATS.memory_hits += 1
        return _substitute(text, _real_subs(ctx))
    if digest in _uncacheable:
        with _lock:
            STATS.uncacheable += 1
        return env.render(template, **ctx)
    disk = cache_dir() if disk_enabled() else None
    if disk is not None:
        text = disk_read(digest, key_text, disk)
        if text is not None:
            with _lock:
                STATS.disk_hits += 1
                _memory[digest] = text
            return _substitute(text, _real_subs(ctx))
    t0 = time.perf_counter()
    real = env.render(template, **ctx)
    sctx, subs = _sentinels(ctx)  # taken now: the caller may reuse its lists after we return
    with _lock:
        STATS.render_s += time.perf_counter() - t0
        STATS.misses += 1
        _pending.setdefault(digest, _Pending(template, key_text, real, sctx, subs, disk))
    _register_atexit()
    return real


_STALE = object()


def _verify(p: _Pending, sctx: dict[str, Any]) -> Any:
    """Render ``p``'s sentinel context ``sctx``; the generic text when substituting the real names
    back gives exactly the real render, ``None`` when it does not (the template uses a left-out
    value), :data:`_STALE` when the context no longer has the entry's key (the caller changed a
    value it shares with the entry after the render: nothing can be concluded, the entry is dropped)."""
    rk = render_key(p.template, sctx)
    if rk is None or rk[1] != p.key_text:
        return _STALE
    try:
        generic = env.render(p.template, **sctx)
    except Exception:  # noqa: BLE001 - the template needs a left-out value: never cache it
        return None
    return generic if _substitute(generic, p.subs) == p.real else None


def _verify_pending(digest: str, count_render: bool = False) -> str | None:
    """Verify the pending entry ``digest`` and move it to the memo (its disk write stays pending)
    or to the uncacheable set; the verified text, or ``None`` (failed, or being verified by another
    thread: that caller renders its own call)."""
    with _lock:
        p = _pending.get(digest)
        if p is None:
            return _memory.get(digest)
        if p.generic is not None or p.sctx is None:
            return p.generic
        sctx, p.sctx = p.sctx, None  # claimed
    t0 = time.perf_counter()
    generic = _verify(p, sctx)
    with _lock:
        if count_render:
            STATS.render_s += time.perf_counter() - t0
        STATS.verified += 1
        if generic is None or generic is _STALE:
            if generic is None:
                _uncacheable.add(digest)
            if _pending.get(digest) is p:
                del _pending[digest]
            return None
        p.generic = generic
        _memory[digest] = generic
        if p.disk is None and _pending.get(digest) is p:
            del _pending[digest]
    return generic


def flush() -> int:
    """Verify every pending entry and write the verified ones to disk (see the module docstring);
    returns the number of files written. Never raises (a failure drops the entry: nothing is
    cached that was not verified). Called at interpreter exit; call it earlier to persist renders
    sooner (e.g. before handing the cache folder to another process)."""
    t0 = time.perf_counter()
    written = 0
    while True:
        with _lock:
            digest = next(iter(_pending), None)
        if digest is None:
            break
        try:
            generic = _verify_pending(digest)
        except Exception:  # noqa: BLE001 - a cache never fails the caller
            generic = None
        with _lock:
            p = _pending.pop(digest, None)
        if generic is None or p is None or p.disk is None or p.generic is None:
            continue
        try:
            ok = disk_write(digest, p.key_text, p.generic, p.disk)
        except Exception:  # noqa: BLE001
            ok = False
        if ok:
            written += 1
            with _lock:
                STATS.disk_writes += 1
    STATS.flush_s += time.perf_counter() - t0
    return written


def pending() -> int:
    """Entries waiting for :func:`flush`."""
    return len(_pending)


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(flush)


def install() -> None:
    """Make every loaded kernel-family module render through :func:`cached_render` (its module
    global ``render``, when that is :func:`fusec.codegen.env.render`). Idempotent."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("fusec.codegen.families.") and getattr(mod, "render", None) is env.render:
            mod.render = cached_render  # type: ignore[attr-defined]


__all__ = ["STATS", "RenderStats", "cache_dir", "cached_render", "disk_read", "disk_write", "flush", "install",
           "pending", "render_key", "reset", "template_hash"]
