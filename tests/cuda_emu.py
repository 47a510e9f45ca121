"""Run generated CUDA kernel sequences on the CPU (``tests/cuda_emu/cuda_fp16.h``): every kernel of a
:class:`~fusec.codegen.KernelSequence` is compiled with g++ in one C++20 program (each source in its own
namespace) and launched block after block, each block as ``blockDim`` OS threads (warp shuffles and
votes are barriers of the warp's threads). Slow (threads, barriers): small shapes only. Checks the
index arithmetic, the lane/warp hand-offs and the numerics of the CUDA source text itself where no GPU
exists; it cannot find races that the emulation's barriers hide, performance problems, or CUDA-only
compile errors (nvcc checks those: ``fusec.codegen.check.check_cuda``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "cuda_emu"
_CT = {"u32": "u", "i32": "", "f32": ""}


def available() -> bool:
    return shutil.which("g++") is not None


def _lit(t: str, v) -> str:
    if t == "f32":
        return f"(float){float(np.float32(v)).hex()}"
    if t == "u32":
        return f"{int(v)}u"
    return f"(int){int(v)}"


def run_sequence(seq, values: dict[str, np.ndarray], *, scratch_fill: float = np.nan) -> dict[str, np.ndarray]:
    """Run ``seq`` (CUDA kernels) on ``values`` (root leaf name -> array). The output is poisoned with
    NaN, f32 scratch with ``scratch_fill`` bits (i32 scratch with -7). Returns ``{"dst": flat f32
    output, <scratch name>: raw bytes as i32/f32}``."""
    bufs: dict[tuple[str, str], tuple[np.ndarray, str]] = {}  # key -> (array, C type)
    scratch_bytes = {s.name: s.nbytes for s in seq.scratch}
    out_key = None
    ctype = {"f32": "float", "f16": "half", "i32": "int"}
    for k in seq.kernels:
        for b in k.bindings:
            key = ("s", b.scratch) if b.scratch else ("t", b.tensor.root.name)
            if key in bufs:
                continue
            if b.scratch:
                n = scratch_bytes[b.scratch] // 4
                a = np.full(n, -7, np.int32) if str(b.dtype) == "i32" else np.full(n, scratch_fill, np.float32)
            elif b.write:
                a = np.full(b.tensor.root.span_bytes // 4, np.nan, np.float32)
                out_key = key
            else:
                a = np.ascontiguousarray(values[b.tensor.root.name], dtype=b.dtype.np).reshape(-1)
            bufs[key] = (a, ctype[str(b.dtype)])
    keys = list(bufs)
    src = ["#include <cuda_fp16.h>\n#include <fstream>\n#include <string>\n"]
    for i, k in enumerate(seq.kernels):
        src.append(f"namespace k{i} {{\n{k.source}\n}}\n")
    src.append("""
static std::vector<unsigned char> rd(const std::string& f, size_t n) {
    std::vector<unsigned char> v(n + 64);
    std::ifstream(f, std::ios::binary).read(reinterpret_cast<char*>(v.data()), n);
    return v;
}
static void wr(const std::string& f, const std::vector<unsigned char>& v, size_t n) {
    std::ofstream(f, std::ios::binary).write(reinterpret_cast<const char*>(v.data()), n);
}
int main() {
""")
    for i, key in enumerate(keys):
        src.append(f'    auto b{i} = rd("b{i}.bin", {bufs[key][0].nbytes});\n')
    for i, k in enumerate(seq.kernels):
        vals = ", ".join(_lit(t, v) for _, t, v in k.params) or "0u"
        src.append(f"    k{i}::Params p{i} = {{{vals}}};\n")
        args = []
        for b in k.bindings:
            key = ("s", b.scratch) if b.scratch else ("t", b.tensor.root.name)
            j = keys.index(key)
            args.append(f"EmuPtr{{b{j}.data()}}")  # converts to the parameter's type (vector loads)
        g, w = k.grid, k.workgroup_size
        src.append(f"    emu_launch(k{i}::{k.entry}, make_uint3({g[0]}, {g[1]}, {g[2]}), "
                   f"make_uint3({w[0]}, {w[1]}, {w[2]}), {', '.join(args)}, p{i});\n")
    for i, key in enumerate(keys):
        src.append(f'    wr("o{i}.bin", b{i}, {bufs[key][0].nbytes});\n')
    src.append("    return 0;\n}\n")
    with tempfile.TemporaryDirectory(prefix="fusec_cuda_emu_") as tmp:
        d = Path(tmp)
        (d / "main.cpp").write_text("".join(src))
        for i, key in enumerate(keys):
            (d / f"b{i}.bin").write_bytes(bufs[key][0].tobytes())
        r = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-w", "-I", str(HERE), "main.cpp", "-o", "emu"],
                           cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda_emu: g++ failed:\n{r.stderr[-6000:]}")
        r = subprocess.run(["./emu"], cwd=d, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"cuda_emu: run failed ({r.returncode}):\n{r.stderr[-3000:]}")
        out: dict[str, np.ndarray] = {}
        for i, key in enumerate(keys):
            a, _ = bufs[key]
            raw = np.frombuffer((d / f"o{i}.bin").read_bytes(), dtype=a.dtype)
            if key == out_key:
                out["dst"] = raw.copy()
            elif key[0] == "s":
                out[key[1]] = raw.copy()
    return out
