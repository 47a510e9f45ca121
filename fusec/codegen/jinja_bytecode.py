"""Jinja environment options and compiled-template (bytecode) caching for the kernel templates.

Compiling a template (parse + Jinja codegen + Python ``compile``) costs 1–40 ms each; a machine's
first process used to spend ~85 ms compiling the templates of one Llama graph. So the templates are
compiled once at package build time (``hatch_build.py``, like pip byte-compiling ``.py`` files at
install) and shipped as Jinja bytecode; :class:`TemplateBytecodeCache` serves those entries, then
the user's ``$FUSEC_CACHE_DIR/jinja``.

This module depends on :mod:`jinja2` and the standard library only (no ``fusec`` imports): the
build hook loads it by file path in an isolated build environment that has just hatchling and
jinja2. Regenerate the shipped bytecode of a checkout (``fusec/_jinja_bytecode/``) after editing
templates with ``python -m fusec.codegen.jinja_bytecode`` (stale entries are never served anyway:
see below).

Correctness of a cached entry rests on Jinja's :class:`jinja2.bccache.Bucket`: an entry holds a
magic header (Jinja's bytecode format version and the Python major/minor version) and the SHA-1 of
the template source it was compiled from; a mismatch of either is a miss (the template is
recompiled). Entries are keyed by the template *name* (path relative to ``templates/``) and
:data:`OPTIONS_HASH` (the options below and the Jinja version), not by the absolute file name
(Jinja's default), which differs between the build folder and the installed package.
"""

from __future__ import annotations

import hashlib
import io
import marshal
import os
import pickle
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import jinja2
import jinja2.bccache

ENV_OPTIONS: dict[str, Any] = {
    "trim_blocks": True,
    "lstrip_blocks": True,
    "keep_trailing_newline": True,
    "autoescape": False,
}
"""Keyword arguments of the kernel templates' :class:`jinja2.Environment` (with ``undefined=StrictUndefined``:
a missing variable is an error)."""

OPTIONS_HASH = hashlib.sha256(
    f"jinja2 {jinja2.__version__}|{sorted(ENV_OPTIONS.items())!r}|undefined=StrictUndefined".encode()
).hexdigest()[:16]
"""Part of every bytecode key: compiled code depends on the lexer options and the Jinja version."""

SHIPPED_DIRS = ("_data/jinja-bytecode", "_jinja_bytecode")
"""Folders (relative to the ``fusec`` package) of bytecode shipped with the package: the wheel's
(``fusec/_data/jinja-bytecode``, written by the build hook) and a checkout's or editable install's
(``fusec/_jinja_bytecode``, git-ignored)."""


def make_environment(
    templates: str | os.PathLike, bytecode_cache: jinja2.BytecodeCache | None = None
) -> jinja2.Environment:
    """The kernel templates' environment over the folder ``templates``."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        bytecode_cache=bytecode_cache,
        undefined=jinja2.StrictUndefined,
        **ENV_OPTIONS,
    )


def _retarget(code: types.CodeType, filename: str) -> types.CodeType:
    """``code`` (and the functions it defines) with ``co_filename`` = ``filename``, so that template
    tracebacks name the installed file rather than the build folder the entry was compiled in."""
    consts = tuple(_retarget(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


class TemplateBytecodeCache(jinja2.BytecodeCache):
    """Jinja bytecode from read-only shipped folders first, then a writable user folder.

    Args:
        shipped: folders read in order (missing ones are skipped); never written.
        user_dir: a callable returning the writable folder (``None``: no user cache), called at each
            load and dump so that environment changes (``FUSEC_CACHE_DIR``, ``FUSEC_DISABLE_DISK_CACHE``)
            apply to a long-lived environment.

    Entries are ``<key>.cache`` files, ``key`` = SHA-1 of ``name|OPTIONS_HASH``. Writes go to a
    temporary file in the same folder renamed into place (``os.replace``): concurrent processes never
    see a partial entry. I/O errors are misses (loading) or ignored (dumping): caching never fails
    a render.
    """

    def __init__(self, shipped: list[Path], user_dir: Callable[[], Path | None]):
        self.shipped = [Path(p) for p in shipped]
        self.user_dir = user_dir

    def get_cache_key(self, name: str, filename: str | None = None) -> str:
        return hashlib.sha1(f"{name}|{OPTIONS_HASH}".encode()).hexdigest()

    def get_bucket(self, environment, name, filename, source):
        bucket = super().get_bucket(environment, name, filename, source)
        if bucket.code is not None and filename and bucket.code.co_filename != filename:
            bucket.code = _retarget(bucket.code, filename)
        return bucket

    @staticmethod
    def _load(bucket: jinja2.bccache.Bucket, path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                data = f.read()
            load_bucket(bucket, data)
        except Exception:  # unreadable or corrupt file (marshal/pickle errors): a miss
            bucket.reset()
        return bucket.code is not None

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        fname = f"{bucket.key}.cache"
        for d in self.shipped:
            if self._load(bucket, d / fname):
                return
        d = self.user_dir()
        if d is not None:
            self._load(bucket, d / fname)

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        d = self.user_dir()
        if d is not None:
            write_bucket(bucket, d)

    def clear(self) -> None:
        """Remove the user folder's entries (shipped ones are read-only)."""
        d = self.user_dir()
        if d is not None and d.is_dir():
            for p in d.glob("*.cache"):
                p.unlink(missing_ok=True)


def load_bucket(bucket: jinja2.bccache.Bucket, data: bytes) -> None:
    """:meth:`jinja2.bccache.Bucket.load_bytecode` over the bytes of a whole entry: the same checks
    (magic header, then the pickled source checksum; a mismatch resets the bucket, a miss), but the
    code is unmarshalled with ``marshal.loads`` from the bytes instead of ``marshal.load`` from a file
    object, which calls the file's ``readinto`` for every item it reads (~4x slower: ~2 ms of the 13
    templates of a Llama graph in a machine's first process). Raises what ``pickle``/``marshal``
    raise on a corrupt entry."""
    magic = jinja2.bccache.bc_magic
    if data[: len(magic)] != magic:
        bucket.reset()
        return
    f = io.BytesIO(data)
    f.seek(len(magic))
    if pickle.load(f) != bucket.checksum:
        bucket.reset()
        return
    try:
        bucket.code = marshal.loads(memoryview(data)[f.tell():])
    except (EOFError, ValueError, TypeError):
        bucket.reset()


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> bool:
    """Create ``path`` (and its folder) atomically: ``write`` fills a temporary file in the same
    folder, which is then renamed into place (``os.replace``), so concurrent writers never leave a
    partial file and readers never see one. ``False`` (and no file left behind) on an OS error: a
    read-only or full cache never fails a compile. Shared by both caches of kernel codegen (this
    module's bytecode and ``fusec.codegen.diskcache``'s rendered sources)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return False


def write_bucket(bucket: jinja2.bccache.Bucket, folder: Path) -> bool:
    """Write ``bucket`` to ``folder/<key>.cache`` atomically; ``False`` (nothing written) on an OS error."""
    return atomic_write(folder / f"{bucket.key}.cache", bucket.write_bytecode)


def precompile(templates: str | os.PathLike, out: str | os.PathLike) -> int:
    """Compile every ``*.j2`` template under ``templates`` into bytecode entries in ``out`` (old
    ``*.cache`` entries there are removed first); returns the number written.

    Raises :class:`jinja2.TemplateSyntaxError` for a template that does not compile (a bug to fix
    before shipping), ``OSError`` when ``out`` cannot be written.
    """
    templates, out = Path(templates), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob("*.cache"):
        p.unlink()
    cache = TemplateBytecodeCache([], lambda: None)
    env = make_environment(templates)
    n = 0
    for p in sorted(templates.rglob("*.j2")):
        name = p.relative_to(templates).as_posix()
        source, filename, _ = env.loader.get_source(env, name)  # exactly what a render reads
        bucket = cache.get_bucket(env, name, filename, source)
        bucket.code = env.compile(source, name, filename)
        if not write_bucket(bucket, out):
            raise OSError(f"cannot write Jinja bytecode into {out}")
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    """``python -m fusec.codegen.jinja_bytecode [TEMPLATES OUT]``: regenerate the shipped bytecode
    (default: the checkout's ``templates/`` into ``fusec/_jinja_bytecode``)."""
    argv = sys.argv[1:] if argv is None else argv
    pkg = Path(__file__).resolve().parents[1]
    templates, out = (argv[0], argv[1]) if len(argv) == 2 else (pkg.parent / "templates", pkg / SHIPPED_DIRS[1])
    n = precompile(templates, out)
    print(f"fusec: compiled {n} templates into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
