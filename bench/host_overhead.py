"""Host overhead per decoded token, with and without the graph cache (issue 5).

Sections (all on this machine's CPU; timings are host wall-clock seconds, medians of repeats):

1. ``cold``: build + match/rewrite + codegen (WGSL kernels, no device compile) of the full
   16-layer Llama-3.2-1B decode graph (n_tokens 1, n_kv 256, kv 4096) in fresh processes: with an
   empty kernel disk cache (truly cold), with a warm disk cache (a second process), and repeated in
   one process (render memo warm).
2. ``decode``: ``DecodeSession`` steps on the Llama-3.2-1B shapes truncated to ``--layers`` layers
   (random weights of the full model would need ~5 GB f32; widths are real, and the vocabulary too on
   numpy; on wgpu it is cut to 8192 because lavapipe cannot bind the 1 GiB embedding), on
   numpy and wgpu (lavapipe), with the cache and with ``cache_graphs=False``: per-token host time
   split into build / match+rewrite / codegen / compile / lookup / encode+launch(+wait), and
   tokens/s. ``kv_pad`` is 256 as in llama.cpp, so the steady state is a hit on every token.
3. ``matcher``: ``find_matches`` (with its ``GraphIndex``) on synthetic graphs of 1k, 10k and 100k
   nodes (repeated RMS_NORM -> MUL -> ADD blocks); the 100k time against the linear extrapolation
   of the 1k time.

Run: ``python bench/host_overhead.py [--layers 2] [--tokens 12] [--quick] [--sections cold,decode,matcher]
[-o FILE]``; writes ``bench/results/<date>-cpu-host-overhead.json`` by default. Timings are wall clock
(``perf_counter``) and, for the cold and matcher sections, CPU time of the process (``process_time``),
which is less disturbed by other jobs on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WGPU_VOCAB = 8192
"""Vocabulary of the wgpu decode runs (8192 x 2048 f32 = 64 MiB fits lavapipe's 128 MiB binding limit)."""

COLD_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from fusec.models import build_llama_decode, load_config
from fusec.dsl import default_patterns
from fusec.rewrite import rewrite
import fusec.codegen as cg
cg._load_families()  # module imports (jinja2, families) are process start-up, reported as import_s
t_import = time.perf_counter() - t0
cfg = load_config("llama-3.2-1b")
t0 = time.perf_counter()
pats = default_patterns()  # Lark grammar analysis (cached on disk after the first process) + pattern files
t_patterns = time.perf_counter() - t0
out = []
w, c = time.perf_counter, time.process_time
for i in range(int(sys.argv[1])):
    t0, c0 = w(), c(); g = build_llama_decode(cfg, 1, 256, 4096)
    t1, c1 = w(), c(); f, _ = rewrite(g, pats)
    t2, c2 = w(), c(); ks = cg.emit_graph(f, "wgsl")
    t3, c3 = w(), c()
    out.append({"import_s": t_import, "patterns_s": t_patterns, "nodes": len(g), "fused_nodes": len(f),
                "kernels": len(ks), "build_s": t1 - t0, "rewrite_s": t2 - t1, "codegen_s": t3 - t2,
                "rewrite_cpu_s": c2 - c1, "codegen_cpu_s": c3 - c2})
from fusec.codegen import diskcache
print(json.dumps({"runs": out, "import_s": t_import, "render": diskcache.STATS.__dict__}))
"""


def _child(repeats: int, env: dict, python: str | None = None) -> dict:
    """Run :data:`COLD_CHILD` in a fresh process: this checkout's fusec, or with ``python`` (another
    interpreter, e.g. a venv with fusec installed from a wheel) the fusec that interpreter imports."""
    if python is None:
        cmd, cwd = [sys.executable, "-c", COLD_CHILD, str(repeats)], ROOT
    else:
        cmd, cwd = [python, "-c", COLD_CHILD, str(repeats)], env["FUSEC_CACHE_DIR"]
        env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _med(xs):
    return statistics.median(xs) if xs else None


def bench_cold(repeats: int, python: str | None = None) -> dict:
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    cold, warm_disk = [], []
    in_process = None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            env = {**base, "FUSEC_CACHE_DIR": d}
            cold.append(_child(1, env, python)["runs"][0])  # empty disk cache: every distinct kernel rendered
            warm_disk.append(_child(1, env, python)["runs"][0])  # second process: rendered sources from disk
            if in_process is None:
                in_process = _child(5, env, python)["runs"][1:]  # one process, render memo warm
    def summary(runs):
        keys = ("build_s", "rewrite_s", "codegen_s", "rewrite_cpu_s", "codegen_cpu_s", "patterns_s", "import_s")
        return {k: _med([r[k] for r in runs]) for k in keys} | {
            "rewrite_plus_codegen_s": _med([r["rewrite_s"] + r["codegen_s"] for r in runs]),
            "rewrite_plus_codegen_min_s": min(r["rewrite_s"] + r["codegen_s"] for r in runs),
            "rewrite_plus_codegen_cpu_s": _med([r["rewrite_cpu_s"] + r["codegen_cpu_s"] for r in runs]),
            "nodes": runs[0]["nodes"], "fused_nodes": runs[0]["fused_nodes"], "kernels": runs[0]["kernels"],
            "samples": len(runs)}
    return {"empty_disk_cache": summary(cold), "warm_disk_cache_new_process": summary(warm_disk),
            "same_process_repeat": summary(in_process)}


def bench_decode(backend_name: str, layers: int, tokens: int, cache: bool) -> dict:
    import numpy as np

    from fusec.backends import get_backend
    from fusec.dsl import default_patterns
    from fusec.models import load_config, random_weights
    from fusec.runtime import DecodeSession
    from fusec.runtime.cache import PHASES

    cfg = load_config("llama-3.2-1b").with_layers(layers)
    if backend_name == "wgpu" and cfg.vocab_size > WGPU_VOCAB:
        # lavapipe's max storage binding is 128 MiB: the 128256 x 2048 f32 embedding (1 GiB) cannot be bound
        cfg = dataclasses.replace(cfg, vocab_size=WGPU_VOCAB)
    weights = random_weights(cfg, seed=0)
    sess = DecodeSession(cfg, get_backend(backend_name), weights, kv_size=512, patterns=default_patterns(),
                         kv_pad=256, cache_graphs=cache)
    del weights
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for t in rng.integers(0, cfg.vocab_size, size=tokens).tolist():
        sess.step([int(t)])
    wall = time.perf_counter() - t0
    steady = sess.timings[1:]  # step 0 is the cold miss in both modes
    keys = (*PHASES, "lookup_s")
    per = {k: _med([t[k] for t in steady]) for k in keys}
    host_graph = {k: per[k] for k in ("build_s", "rewrite_s", "codegen_s", "compile_s", "lookup_s")}
    first = {k: sess.timings[0][k] for k in keys}
    return {"backend": backend_name, "layers": layers, "vocab_size": cfg.vocab_size, "tokens": tokens, "cache": cache,
            "hits": sess.graph_cache.stats.hits, "misses": sess.graph_cache.stats.misses,
            "median_per_token_s": per, "graph_host_per_token_s": sum(host_graph.values()),
            "first_token_s": first,
            "tokens_per_s_steady": len(steady) / sum(sum(t[k] for k in keys) for t in steady),
            "tokens_per_s_wall": tokens / wall}


def bench_matcher(sizes: list[int], repeats: int) -> dict:
    from fusec.dsl import default_patterns
    from fusec.ir import GraphBuilder
    from fusec.rewrite.match import GraphIndex, find_matches

    pats = default_patterns()
    out = {}
    for n in sizes:
        b = GraphBuilder()
        x = b.input("x", "f32", (64, 1))
        w = b.weight("w", "f32", (64,))
        blocks = max(1, (n - 2) // 3)
        for i in range(blocks):  # 3 nodes a block: RMS_NORM, MUL, ADD (residual)
            x = b.add(b.mul(b.rms_norm(x, 1e-5, name=f"n{i}"), w, name=f"m{i}"), x, name=f"a{i}")
        g = b.build([x])
        ts, cs = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            found, failed = find_matches(g, pats, GraphIndex.of(g))
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
            del found, failed
        out[str(len(g))] = {"nodes": len(g), "matches": len(find_matches(g, pats)[0]), "median_s": _med(ts),
                            "min_s": min(ts), "cpu_median_s": _med(cs), "cpu_min_s": min(cs),
                            "per_node_us": _med(ts) / len(g) * 1e6}
    ks = sorted(out, key=int)
    small, big = out[ks[0]], out[ks[-1]]
    scale = big["nodes"] / small["nodes"]

    def ratio(k):
        return big[k] / (small[k] * scale)

    return {"sizes": out, "largest_vs_linear_extrapolation_of_smallest": ratio("min_s"),
            "ratios_vs_linear": {k: ratio(k) for k in ("min_s", "median_s", "cpu_min_s", "cpu_median_s")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="layers of the Llama-3.2-1B decode runs (default 2)")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--cold-repeats", type=int, default=5)
    ap.add_argument("--backends", default="numpy,wgpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, matcher up to 10k nodes")
    ap.add_argument("--sections", default="cold,decode,matcher",
                    help="comma-separated subset of cold,decode,matcher (default: all)")
    ap.add_argument("--python", help="cold section only: run its processes with this interpreter (a venv with "
                    "fusec installed, e.g. from the wheel) instead of this checkout")
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    reps = 2 if args.quick else args.cold_repeats
    res: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version()},
                 "date": datetime.date.today().isoformat(), "args": vars(args)}
    res["machine"]["loadavg_start"] = os.getloadavg()
    if "cold" in sections:
        print("cold rewrite+codegen, Llama-3.2-1B 16 layers ...", flush=True)
        res["cold"] = bench_cold(reps, args.python)
        print(json.dumps(res["cold"], indent=1), flush=True)
    res["decode"] = []
    for be in [b for b in args.backends.split(",") if b and "decode" in sections]:
        for cache in (False, True):
            print(f"decode {be} cache={cache} ...", flush=True)
            r = bench_decode(be, args.layers, args.tokens, cache)
            print(json.dumps(r, indent=1), flush=True)
            res["decode"].append(r)
    goals: dict = {}
    if "matcher" in sections:
        print("matcher scaling ...", flush=True)
        res["matcher"] = bench_matcher([1000, 10000] if args.quick else [1000, 10000, 100000],
                                       3 if args.quick else 5)
        print(json.dumps(res["matcher"], indent=1), flush=True)
        goals["matcher_100k_vs_linear"] = res["matcher"]["largest_vs_linear_extrapolation_of_smallest"]
        goals["matcher_100k_vs_linear_cpu_median"] = res["matcher"]["ratios_vs_linear"]["cpu_median_s"]
        goals["matcher_within_1_2x"] = goals["matcher_100k_vs_linear"] <= 1.2
    if "cold" in sections:
        for case in ("empty_disk_cache", "warm_disk_cache_new_process", "same_process_repeat"):
            c = res["cold"][case]
            goals[f"{case}_rewrite_plus_codegen_ms"] = c["rewrite_plus_codegen_s"] * 1e3
            goals[f"{case}_rewrite_plus_codegen_cpu_ms"] = c["rewrite_plus_codegen_cpu_s"] * 1e3
        cold = res["cold"]["empty_disk_cache"]
        goals["cold_rewrite_plus_codegen_ms"] = cold["rewrite_plus_codegen_s"] * 1e3
        goals["cold_rewrite_plus_codegen_le_50ms"] = cold["rewrite_plus_codegen_s"] <= 0.050
    res["machine"]["loadavg_end"] = os.getloadavg()
    for be in {r["backend"] for r in res["decode"]}:
        nc = next(r for r in res["decode"] if r["backend"] == be and not r["cache"])
        c = next(r for r in res["decode"] if r["backend"] == be and r["cache"])
        frac = c["graph_host_per_token_s"] / nc["graph_host_per_token_s"]
        goals[f"{be}_hit_host_fraction_of_cold"] = frac
        goals[f"{be}_hit_le_5pct"] = frac <= 0.05
        goals[f"{be}_tokens_per_s_no_cache_vs_cache"] = [nc["tokens_per_s_steady"], c["tokens_per_s_steady"]]
    res["goals"] = goals
    print(json.dumps(goals, indent=1))
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / f"{res['date']}-cpu-host-overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
