"""The numpy measurer: the rewrite checked on the host, for CI (no device needed).

"Fused" is :func:`fusec.interp.interpret` of the rewritten graph (the FUSED node evaluated from its
decomposition); "unfused" is the unfused graph evaluated node by node with
:func:`fusec.interp.eval_node` (one call per would-be kernel). Times, when asked for, are host wall
times of those numpy evaluations (medians of a few runs, ``time.perf_counter``): they exercise the
harness, they say nothing about a GPU.
"""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np

from ..interp import eval_node, interpret
from ..ir.graph import Graph
from .cases import OUTPUT, Prepared, nmse
from .runner import Measurer


def run_node_by_node(graph: Graph, values: dict[str, np.ndarray]) -> np.ndarray:
    """The output of ``graph`` computed one node at a time (leaves from ``values`` by name)."""
    vals = {}
    for t in graph.nodes:
        if t.op == "NONE":
            vals[t] = np.asarray(values[t.name]).reshape(t.ne[::-1])
        else:
            vals[t] = eval_node(t, [None if s is None else vals[s] for s in t.src])
    return vals[graph.outputs[0]]


def run_fused(graph: Graph, values: dict[str, np.ndarray]) -> np.ndarray:
    """The output of the rewritten ``graph`` through the interpreter."""
    return interpret(graph, values)[OUTPUT]


def _host_time_us(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


class NumpyMeasurer(Measurer):
    name = "numpy"

    def setup(self, timing: bool) -> None:
        self.meta.update(device=f"host CPU ({platform.processor() or platform.machine()})", numpy=np.__version__,
                         timing="host wall time (time.perf_counter), median of 5" if timing else None)
        self.notes.append("numpy backend: the rewrite checked on the host (interpreter of the fused graph vs "
                          "node-by-node evaluation of the unfused graph vs the interpreter); no device")
        if timing:
            src = np.ones(1 << 24, np.float32)
            dst = np.empty_like(src)
            t = _host_time_us(lambda: np.copyto(dst, src))
            self.overhead["copy_ceiling_gbs"] = 2 * src.nbytes / (t * 1e-6) / 1e9
            self.overhead["copy_ceiling_bytes"] = 2 * src.nbytes

    def check(self, prep: Prepared) -> dict:
        yf = run_fused(prep.fused, prep.values)
        yu = run_node_by_node(prep.graph, prep.values)
        n_unfused = sum(1 for t in prep.graph.nodes if t.op != "NONE")
        return {"nmse_fused": nmse(yf, prep.ref), "nmse_unfused": nmse(yu, prep.ref),
                "fused_kernel": "interpret(FUSED)", "n_fused_kernels": 1, "n_unfused_kernels": n_unfused}

    def time(self, prep: Prepared, row: dict) -> None:
        vals = prep.values
        half = max(prep.case.bytes // 2 // 4, 1)
        src, dst = np.ones(half, np.float32), np.empty(half, np.float32)
        row["t_copy_us"] = _host_time_us(lambda: np.copyto(dst, src))
        row["t_fused_us"] = _host_time_us(lambda: run_fused(prep.fused, vals))
        row["t_unfused_us"] = _host_time_us(lambda: run_node_by_node(prep.graph, vals))


__all__ = ["NumpyMeasurer", "run_fused", "run_node_by_node"]
