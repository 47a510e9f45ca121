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


def binding_key(b) -> tuple[str, str]:
    """The buffer a binding uses: ``("s", scratch name)`` or ``("t", root tensor name)``."""
    return ("s", b.scratch) if b.scratch else ("t", b.tensor.root.name)


def sequence_buffers(seq, values: dict[str, np.ndarray], *, scratch_fill: float = np.nan, xp=np):
    """One flat array (module ``xp``: numpy, or cupy on a GPU) per buffer of ``seq``, in first-use order:
    inputs from ``values`` (by root leaf name, converted to the binding's dtype), written tensors filled
    with NaN (f32 words), f32 scratch with ``scratch_fill``, i32 scratch with -7 (a read of something
    never written shows). Returns ``(bufs: key -> array, written keys in order)``; keys as
    :func:`binding_key`; the last written key is the sequence's output."""
    scratch_bytes = {s.name: s.nbytes for s in seq.scratch}
    bufs: dict[tuple[str, str], object] = {}
    written: list = []
    for k in seq.kernels:
        for b in k.bindings:
            key = binding_key(b)
            if key in bufs:
                continue
            if b.scratch:
                n = scratch_bytes[b.scratch] // 4
                bufs[key] = xp.full(n, -7, xp.int32) if str(b.dtype) == "i32" else xp.full(n, scratch_fill, xp.float32)
            elif b.write:
                bufs[key] = xp.full(b.tensor.root.span_bytes // 4, np.nan, xp.float32)
                written.append(key)
            else:
                bufs[key] = xp.asarray(np.ascontiguousarray(values[b.tensor.root.name], dtype=b.dtype.np).reshape(-1))
    return bufs, written


def run_sequence(seq, values: dict[str, np.ndarray], *, scratch_fill: float = np.nan) -> dict[str, np.ndarray]:
    """Run ``seq`` (CUDA kernels) on ``values`` (root leaf name -> array). The output is poisoned with
    NaN, f32 scratch with ``scratch_fill`` bits (i32 scratch with -7). Returns ``{"dst": flat f32
    output (the last written tensor), <scratch name>: raw bytes as i32/f32, "root:<name>": every
    written tensor's root memory as raw f32 words}``."""
    ctype = {"f32": "float", "f16": "half", "i32": "int"}
    arrays, written = sequence_buffers(seq, values, scratch_fill=scratch_fill)
    out_key = written[-1] if written else None
    # the C type of each buffer's first use (a later use overwritten by an earlier one)
    types = {binding_key(b): ctype[str(b.dtype)] for k in reversed(seq.kernels) for b in reversed(k.bindings)}
    bufs = {key: (a, types[key]) for key, a in arrays.items()}  # key -> (array, C type of its first use)
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
            key = binding_key(b)
            j = keys.index(key)
            ct = bufs[key][1]
            args.append(f"emu_any_ptr{{({'' if b.write else 'const '}{ct}*)b{j}.data()}}")
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
            if key in written:
                out[f"root:{key[1]}"] = raw.copy()
    return out
