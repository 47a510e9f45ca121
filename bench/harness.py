"""Run the fusec benchmark harness from a checkout, without installing fusec (the GPU machine).

    python3 bench/harness.py --backend all -o results.json --markdown BENCHMARKS.md [--quick] [--dry]

Same options as ``fusec bench`` (see ``fusec.bench``); needs numpy, lark and jinja2, plus CuPy for
``cuda`` (torch and Triton optional) and wgpu-py for ``wgpu``; rich is optional here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
