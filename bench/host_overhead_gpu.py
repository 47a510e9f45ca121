"""Host overhead per decoded token on an NVIDIA GPU: graph cache and CUDA graphs (issue 5 parts 4, 7).

Llama-3.2-1B shapes (16 layers, full 128256 vocabulary unless ``--vocab``), random f16 weights,
``DecodeSession`` with the shipped fusion patterns, ``kv_pad`` 256 (one cache entry in the steady
state), one token per step. Sections:

1. ``cublas_capture_probe``: does ``cupy.matmul`` run on a capturing stream? (CuPy 14 refuses.)
2. ``cuda``: configurations of the cuda backend, each a fresh session over the same token ids:
   ``no_cache`` (build + rewrite + codegen + compile every token; generated kernels),
   ``cache_eager`` (graph cache, eager launches, generated kernels), ``cache_graphs`` (graph cache +
   CUDA graph replay), ``cache_eager_cublas`` (graph cache, eager, MUL_MAT through cuBLAS: the path
   before CUDA graphs). Per-token host seconds (medians over the steady tokens: all but the first)
   split into build / match+rewrite / codegen / compile / lookup / run, ``run`` split by the
   executable into upload / launch / wait (synchronize + logits read-back); tokens/s =
   steady tokens / their summed host time (the host waits for the logits every token, so this
   is end-to-end). ``cache_graphs`` logits are compared with ``cache_eager`` (bit-identical expected).
3. ``launch_overhead`` (on the ``cache_graphs`` executable, inputs already uploaded, no read-back):
   ``graph_launch_host_us``: host time of the one ``cudaGraphLaunch`` call; ``graph_wall_us``: one
   replay from an idle GPU, launch + ``cudaStreamSynchronize``; ``gpu_us``: GPU time of one
   replay, CUDA events around 20 back-to-back replays / 20; **``replay_overhead_us`` =
   graph_wall_us - gpu_us** (the goal: <= 50 us); the same for eager launches of the same kernels
   (``eager_launch_host_us``, ``eager_wall_us``, ``eager_overhead_us`` = eager_wall_us - gpu_us).
4. ``wgpu``: the same model on wgpu (Vulkan on the NVIDIA adapter when found), no cache vs cache.

Run: ``python bench/host_overhead_gpu.py [--layers 16] [--vocab N] [--tokens 40] [--no-wgpu]
[-o FILE]``; writes ``bench/results/<date>-h200-host-overhead.json`` by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASE_KEYS = ("build_s", "rewrite_s", "codegen_s", "compile_s", "lookup_s", "run_s")
EXEC_KEYS = ("upload_s", "launch_s", "wait_s")


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def probe_cublas_capture() -> dict:
    """Try ``cupy.matmul`` inside a stream capture; report what happens."""
    import cupy as cp

    s = cp.cuda.Stream(non_blocking=True)
    with s:
        a = cp.ones((64, 64), cp.float32)
        b = cp.ones((64, 64), cp.float32)
        cp.matmul(a, b)  # warm-up outside the capture
        s.synchronize()
        s.begin_capture()
        err = None
        try:
            cp.matmul(a, b)
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"
        try:
            s.end_capture()
        except Exception as e:  # noqa: BLE001
            err = err or f"end_capture {type(e).__name__}: {e}"
    return {"captured": err is None, "error": err}


def _config(layers: int, vocab: int | None):
    from fusec.models import load_config

    cfg = load_config("llama-3.2-1b").with_layers(layers)
    if vocab is not None and vocab < cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab)
    return cfg


def _entry_exec(sess):
    e = sess.graph_cache.can_reuse((1, sess.timings[-1]["n_kv"]))
    return None if e is None else e.executable


def decode(name: str, backend, cfg, weights, tokens: list[int], cache: bool, kv_size: int, kv_pad: int) -> tuple:
    """One configuration: returns (result dict, per-step logits, session)."""
    from fusec.dsl import default_patterns
    from fusec.runtime import DecodeSession

    compiled = []
    compile_ = backend.compile
    backend.compile = lambda g: compiled.append(compile_(g)) or compiled[-1]
    t0 = time.perf_counter()
    sess = DecodeSession(cfg, backend, weights, kv_size=kv_size, patterns=default_patterns(), kv_pad=kv_pad,
                         cache_graphs=cache)
    setup_s = time.perf_counter() - t0
    logits, exec_t = [], []
    t0 = time.perf_counter()
    for t in tokens:
        logits.append(sess.step([int(t)]))
        ex = _entry_exec(sess) if cache else compiled[-1]
        exec_t.append(dict(getattr(ex, "last_timing", {}) or {}))
    wall = time.perf_counter() - t0
    steady = sess.timings[1:]
    steady_x = exec_t[1:]
    per = {k: _med([t.get(k, 0.0) for t in steady]) for k in PHASE_KEYS}
    host_total = [sum(t.get(k, 0.0) for k in PHASE_KEYS) for t in steady]
    res = {
        "config": name, "backend": backend.name, "cache": cache,
        "use_graphs": getattr(backend, "use_graphs", None), "matmul": getattr(backend, "matmul", None),
        "layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
        "tokens": len(tokens), "setup_s": setup_s,
        "hits": sess.graph_cache.stats.hits, "misses": sess.graph_cache.stats.misses,
        "median_per_token_s": per,
        "graph_host_per_token_s": sum(per[k] for k in ("build_s", "rewrite_s", "codegen_s", "compile_s", "lookup_s")),
        "median_run_split_s": {k: _med([t.get(k) for t in steady_x]) for k in EXEC_KEYS},
        "run_modes": sorted({t.get("mode", "?") for t in steady_x}),
        "first_token_s": {k: sess.timings[0].get(k, 0.0) for k in PHASE_KEYS} | {
            "capture_s": exec_t[0].get("capture_s", 0.0)},
        "median_token_host_s": _med(host_total),
        "tokens_per_s_steady": len(steady) / sum(host_total) if steady else None,
        "tokens_per_s_wall": len(tokens) / wall,
    }
    if compiled:
        ex = compiled[-1]
        res["kernels"] = len(getattr(ex, "kernels", []) or [])
        res["steps"] = len(getattr(ex, "steps", []) or getattr(ex, "kernels", []) or [])
    backend.compile = compile_
    return res, logits, sess


def launch_overhead(sess, reps: int = 100, batch: int = 20) -> dict:
    """Launch overhead of one token's kernel sequence: graph replay vs eager (see the module doc)."""
    import cupy as cp

    from fusec.backends.wgpu_backend import check_inputs

    entry = sess.graph_cache.can_reuse((1, sess.timings[-1]["n_kv"]))
    ex, state = entry.executable, entry.backend_state
    g = state.get("graph")
    if g is None:
        return {"error": f"no captured graph (state: {sorted(state)}; fallback: {state.get('fallback')})"}
    be = ex.backend
    s = be.stream
    inputs = sess.make_inputs([1])  # replays rewrite the same KV cell: idempotent
    vals = check_inputs("cuda", ex._inputs, inputs)
    out = {"kernels": len(ex.kernels), "steps": len(ex.steps)}
    with s:
        ex._upload(vals)
        s.synchronize()
        for _ in range(5):  # warm
            g.launch(s)
            ex._launch_all()
        s.synchronize()
        host, wall = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            g.launch(s)
            t1 = time.perf_counter()
            s.synchronize()
            t2 = time.perf_counter()
            host.append(t1 - t0)
            wall.append(t2 - t0)
        gpu = []
        for _ in range(10):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(s)
            for _ in range(batch):
                g.launch(s)
            e1.record(s)
            e1.synchronize()
            gpu.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3 / batch)
        ehost, ewall, espan = [], [], []
        for _ in range(max(10, reps // 4)):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            t0 = time.perf_counter()
            e0.record(s)
            ex._launch_all()
            e1.record(s)
            t1 = time.perf_counter()
            s.synchronize()
            t2 = time.perf_counter()
            ehost.append(t1 - t0)
            ewall.append(t2 - t0)
            espan.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
    us = 1e6
    gpu_s = _med(gpu)
    out.update({
        "graph_launch_host_us": _med(host) * us, "graph_launch_host_min_us": min(host) * us,
        "graph_wall_us": _med(wall) * us, "gpu_us": gpu_s * us, "gpu_min_us": min(gpu) * us,
        "replay_overhead_us": (_med(wall) - gpu_s) * us,
        "eager_launch_host_us": _med(ehost) * us, "eager_wall_us": _med(ewall) * us,
        "eager_gpu_span_us": _med(espan) * us, "eager_overhead_us": (_med(ewall) - gpu_s) * us,
        "reps": reps, "batch": batch,
    })
    out["replay_overhead_le_50us"] = out["replay_overhead_us"] <= 50.0
    return out


def _free(*objs) -> None:
    del objs
    gc.collect()
    try:
        import cupy as cp

        cp.get_default_memory_pool().free_all_blocks()
    except Exception:  # noqa: BLE001
        pass


def bench_cuda(cfg, weights, tokens, nocache_tokens, kv_size, kv_pad) -> dict:
    from fusec.backends.cuda_backend import CudaBackend

    out: dict = {"configs": []}
    runs = [("no_cache", dict(use_graphs=False, matmul="kernel"), False, nocache_tokens),
            ("cache_eager", dict(use_graphs=False, matmul="kernel"), True, tokens),
            ("cache_graphs", dict(use_graphs=True), True, tokens),
            ("cache_eager_cublas", dict(use_graphs=False, matmul="cublas"), True, tokens)]
    logits_by = {}
    for name, kw, cache, toks in runs:
        print(f"cuda {name} ...", flush=True)
        try:
            be = CudaBackend(**kw)
            res, logits, sess = decode(name, be, cfg, weights, toks, cache, kv_size, kv_pad)
            logits_by[name] = logits
            if name == "cache_graphs":
                st = [e.backend_state for e in sess.graph_cache.entries()]
                res["captured_entries"] = sum("graph" in s for s in st)
                res["fallbacks"] = [s["fallback"] for s in st if "fallback" in s]
                out["launch_overhead"] = launch_overhead(sess)
                print(json.dumps(out["launch_overhead"], indent=1), flush=True)
            print(json.dumps(res, indent=1), flush=True)
            out["configs"].append(res)
            _free(sess, be)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out["configs"].append({"config": name, "error": f"{type(e).__name__}: {e}"})
    if "cache_graphs" in logits_by and "cache_eager" in logits_by:
        a, b = logits_by["cache_graphs"], logits_by["cache_eager"]
        out["graphs_vs_eager_bit_identical"] = all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        out["graphs_vs_eager_max_abs_diff"] = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))
    if "cache_eager_cublas" in logits_by and "cache_eager" in logits_by:
        a, b = logits_by["cache_eager"], logits_by["cache_eager_cublas"]
        out["kernel_vs_cublas_max_abs_diff"] = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))
    return out


def bench_wgpu(layers, vocab, tokens, nocache_tokens, kv_size, kv_pad, seed_tokens) -> dict:
    from fusec.backends import wgpu_runtime
    from fusec.backends.wgpu_backend import WgpuBackend
    from fusec.models import random_weights

    if not wgpu_runtime.available():
        return {"error": "no wgpu adapter"}
    out: dict = {"adapter": {k: str(v) for k, v in wgpu_runtime.adapter_info().items()}, "configs": []}
    wdt = "f16" if wgpu_runtime.has_feature("shader-f16") else "f32"
    attempts = [(vocab, wdt), (8192, wdt), (8192, "f32")] if (vocab is None or vocab > 8192) else [(vocab, wdt)]
    for v, dt in dict.fromkeys(attempts):  # the full model first, then a cut vocabulary, then f32 weights
        cfg = _config(layers, v)
        out["weight_dtype"] = dt
        try:
            weights = random_weights(cfg, seed=0, weight_dtype=dt)
            toks = [t % cfg.vocab_size for t in seed_tokens]
            for cache, n in ((False, nocache_tokens), (True, tokens)):
                name = "cache" if cache else "no_cache"
                print(f"wgpu {name} vocab={cfg.vocab_size} ...", flush=True)
                res, _, sess = decode(name, WgpuBackend(), cfg, weights, toks[:n], cache, kv_size, kv_pad)
                print(json.dumps(res, indent=1), flush=True)
                out["configs"].append(res)
                _free(sess)
            return out
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out.setdefault("errors", []).append(f"vocab {cfg.vocab_size} {dt}: {type(e).__name__}: {e}")
            out["configs"] = []
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=None, help="cut the vocabulary (default: the model's 128256)")
    ap.add_argument("--tokens", type=int, default=40, help="tokens of the cached runs")
    ap.add_argument("--nocache-tokens", type=int, default=6)
    ap.add_argument("--kv-size", type=int, default=512)
    ap.add_argument("--kv-pad", type=int, default=256)
    ap.add_argument("--no-wgpu", action="store_true")
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)

    import cupy as cp

    from fusec.models import random_weights

    props = cp.cuda.runtime.getDeviceProperties(0)
    res: dict = {
        "date": datetime.date.today().isoformat(), "args": vars(args),
        "machine": {"gpu": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
                    "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                    "driver": cp.cuda.runtime.driverGetVersion(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "definitions": {
            "tokens_per_s_steady": "steady tokens (all but the first) / their summed host time (build + rewrite + "
                                   "codegen + compile + lookup + run; run waits for the logits)",
            "run_split": "upload_s: input copies to the device; launch_s: host time issuing every kernel (eager) "
                         "or the one cudaGraphLaunch (replay); wait_s: synchronize + logits read-back",
            "replay_overhead_us": "median wall time of one replay from an idle GPU (cudaGraphLaunch + "
                                  "cudaStreamSynchronize) minus the GPU time of one replay (CUDA events around 20 "
                                  "back-to-back replays / 20); inputs already on the device, no read-back",
            "eager_overhead_us": "the same for eager launches of the same kernels: wall(launch all + synchronize) "
                                 "- gpu_us",
        },
    }
    print(json.dumps(res["machine"]), flush=True)
    res["cublas_capture_probe"] = probe_cublas_capture()
    print("cublas capture probe:", res["cublas_capture_probe"], flush=True)
    cfg = _config(args.layers, args.vocab)
    t0 = time.perf_counter()
    weights = random_weights(cfg, seed=0, weight_dtype="f16")
    res["weights"] = {"dtype": "f16", "bytes": int(sum(a.nbytes for a in weights.values())),
                      "gen_s": time.perf_counter() - t0, "layers": args.layers, "vocab_size": cfg.vocab_size}
    print(res["weights"], flush=True)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=max(args.tokens, args.nocache_tokens)).tolist()
    res["cuda"] = bench_cuda(cfg, weights, tokens[:args.tokens], tokens[:args.nocache_tokens], args.kv_size,
                             args.kv_pad)
    del weights
    gc.collect()
    if not args.no_wgpu:
        try:
            res["wgpu"] = bench_wgpu(args.layers, args.vocab, args.tokens, args.nocache_tokens, args.kv_size,
                                     args.kv_pad, tokens)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["wgpu"] = {"error": f"{type(e).__name__}: {e}"}

    by = {c["config"]: c for c in res["cuda"]["configs"] if "error" not in c}
    goals: dict = {}
    lo = res["cuda"].get("launch_overhead", {})
    if "replay_overhead_us" in lo:
        goals["replay_overhead_us"] = lo["replay_overhead_us"]
        goals["replay_overhead_le_50us"] = lo["replay_overhead_us"] <= 50.0
        goals["graph_launch_host_us"] = lo["graph_launch_host_us"]
    for k in ("no_cache", "cache_eager", "cache_graphs", "cache_eager_cublas"):
        if k in by:
            goals[f"cuda_tokens_per_s_{k}"] = by[k]["tokens_per_s_steady"]
    if "no_cache" in by and "cache_eager" in by:
        goals["cuda_hit_host_fraction_of_cold"] = (by["cache_eager"]["graph_host_per_token_s"]
                                                   / by["no_cache"]["graph_host_per_token_s"])
    goals["graphs_bit_identical_to_eager"] = res["cuda"].get("graphs_vs_eager_bit_identical")
    wc = {c["config"]: c for c in res.get("wgpu", {}).get("configs", [])}
    if wc:
        goals["wgpu_tokens_per_s_no_cache_vs_cache"] = [wc.get("no_cache", {}).get("tokens_per_s_steady"),
                                                       wc.get("cache", {}).get("tokens_per_s_steady")]
    res["goals"] = goals
    print(json.dumps(goals, indent=1))
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / f"{res['date']}-h200-host-overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
