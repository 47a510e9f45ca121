"""Hatchling build hook: compile the Jinja kernel templates into bytecode at build time.

Like pip byte-compiling ``.py`` files at install, so that the first process after an install does
not spend ~100 ms compiling templates (see ``fusec/codegen/jinja_bytecode.py``):

* a regular wheel gets the entries in ``fusec/_data/jinja-bytecode/`` (compiled into a temporary
  folder, added with ``force_include``);
* an editable install (``pip install -e .``; hatchling calls the hook with version ``"editable"``)
  imports ``fusec`` from the source tree, so the entries are written to ``fusec/_jinja_bytecode/``
  there (git-ignored; ``python -m fusec.codegen.jinja_bytecode`` regenerates it).

The entries are Python-version specific (marshal); a wheel installed under another Python simply
recompiles (Jinja checks the header), so the wheel stays ``py3-none-any``. Only ``jinja2`` and
hatchling are needed: ``fusec/codegen/jinja_bytecode.py`` is loaded by file path, without importing
the ``fusec`` package.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _jinja_bytecode_module(root: Path):
    path = root / "fusec" / "codegen" / "jinja_bytecode.py"
    spec = importlib.util.spec_from_file_location("_fusec_jinja_bytecode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class JinjaBytecodeHook(BuildHookInterface):
    """Precompiles ``templates/**/*.j2`` for the wheel target (regular and editable)."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        jb = _jinja_bytecode_module(root)
        if version == "editable":
            out = root / "fusec" / "_jinja_bytecode"
        else:
            self._tmp = tempfile.mkdtemp(prefix="fusec-jinja-bytecode-")
            out = Path(self._tmp)
            build_data["force_include"][str(out)] = "fusec/_data/jinja-bytecode"
        n = jb.precompile(root / "templates", out)
        self.app.display_info(f"fusec: compiled {n} Jinja templates into {out}")

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None
