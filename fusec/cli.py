"""The ``fusec`` command line.

Commands: ``check`` (validate pattern files), ``compile`` (rewrite a model or JSON graph and emit
kernels), ``run`` (decode tokens on a backend, optionally verified against the unfused numpy
interpreter), ``test`` (property-based equivalence suite for any pattern files), ``bench``.

User errors (:class:`fusec.errors.FusecError`) print one line ``fusec: error: ...`` and exit 2,
without a traceback. Outputs are written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import __version__
from .errors import FusecError


class UsageError(FusecError):
    """Bad command-line arguments."""


# -- helpers -------------------------------------------------------------------------------------


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _patterns(args):
    from .dsl import default_patterns, load_patterns

    if getattr(args, "patterns", None):
        return load_patterns(args.patterns)
    return default_patterns()


def _model_config(args):
    """The shipped or ``config.json`` model ``args.model``, shrunk by ``--layers`` / ``--vocab`` /
    ``--experts`` when given (``ConfigError`` for a value the model cannot take)."""
    from .models import load_config

    cfg = load_config(args.model)
    if args.layers:
        cfg = cfg.with_layers(args.layers)
    if args.vocab:
        cfg = cfg.with_vocab(args.vocab)
    if args.experts:
        cfg = cfg.with_experts(args.experts)
    return cfg


def _load_graph(args):
    """The graph named by ``--model`` or ``--graph`` (decode graph for models)."""
    from .ir import loads

    if args.graph:
        path = Path(args.graph)
        if not path.is_file():
            raise UsageError(f"no such graph file: {path}")
        return loads(path.read_text(encoding="utf-8"), str(path)), path.stem
    from .models import build_llama_decode

    cfg = _model_config(args)
    n_kv = min(args.n_ctx, args.n_kv)
    return build_llama_decode(cfg, args.n_tokens, n_kv, args.n_ctx), cfg.name


class AtomicDir:
    """Write into a temporary sibling folder; on success replace ``path`` with it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# -- check ---------------------------------------------------------------------------------------


def cmd_check(args) -> int:
    from .dsl import load_patterns

    pats = load_patterns(args.files)
    for p in pats:
        ops = " -> ".join(p.ops)
        outs = f" outputs({', '.join(p.outputs)})" if p.outputs else ""
        print(f"{p.file}:{p.line}: {p.name}: {ops} => {p.fused_op}{outs} [kernel {p.kernel}] benefit {p.benefit}: ok")
    print(f"{len(pats)} pattern(s) ok")
    return 0


# -- compile -------------------------------------------------------------------------------------


def print_report(console, report) -> None:
    from rich.table import Table

    d = report.to_dict()
    table = Table(title="fusion report")
    for col in ("pattern", "matches", "nodes removed", "bytes saved"):
        table.add_column(col, justify="left" if col == "pattern" else "right")
    for row in d["patterns"]:
        table.add_row(row["name"], str(row["matches"]), str(row["nodes_removed"]), f"{row['bytes_saved']:,}")
    console.print(table)
    nf = d.get("not_fused", [])
    if nf:
        console.print(f"not fused ({len(nf)}):")
        for item in nf[:20]:
            console.print(f"  {item['pattern']} at '{item['root']}': {item['message']}")
        if len(nf) > 20:
            console.print(f"  ... {len(nf) - 20} more in report.json")


def cmd_compile(args) -> int:
    from .codegen import check as cgcheck
    from .codegen import emit, needs_kernel, with_nodes_header
    from .ir import dumps
    from .rewrite import rewrite

    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    bad = [t for t in targets if t not in ("wgsl", "cuda", "msl")]
    if bad or not targets:
        raise UsageError(f"--target takes a comma list of wgsl, cuda, msl; got {args.target!r}")
    console = _console()
    graph, label = _load_graph(args)
    pats = _patterns(args)
    t0 = time.perf_counter()
    fused, report = rewrite(graph, pats)
    t_rewrite = time.perf_counter() - t0
    out = Path(args.output)
    summary = {}
    with AtomicDir(out) as tmp:
        _write(tmp / "graph.json", dumps(fused))
        _write(tmp / "report.json", json.dumps(report.to_dict(), indent=1))
        manifest = []
        for target in targets:
            kernels: dict[str, object] = {}  # source -> first Kernel; nodes sharing it are collected
            users: dict[str, list[str]] = {}
            files: dict[str, str] = {}
            for node in fused.nodes:
                if not needs_kernel(node):
                    continue
                k = emit(node, target)
                if k.source not in files:
                    fname = f"{k.entry}.{k.suffix}"
                    n = 1
                    while fname in files.values():
                        n += 1
                        fname = f"{k.entry}_{n}.{k.suffix}"
                    files[k.source], kernels[k.source], users[k.source] = fname, k, []
                users[k.source].append(node.name)
                manifest.append({"target": target, "node": node.name, "op": node.op, "family": k.family,
                                 "file": f"kernels/{target}/{files[k.source]}", "entry": k.entry,
                                 "workgroup_size": list(k.workgroup_size), "grid": list(k.grid),
                                 "params": [[n_, t_, v_] for n_, t_, v_ in k.params]})
            for src, fname in files.items():
                _write(tmp / "kernels" / target / fname, with_nodes_header(src, users[src]))
            checked = "not checked (--no-check)"
            if not args.no_check:
                check = {"wgsl": cgcheck.check_wgsl, "cuda": cgcheck.check_cuda, "msl": cgcheck.check_msl}[target]
                check(list(kernels.values()))
                checked = {"wgsl": "all validate in wgpu (naga)", "cuda": "all compile with nvcc -arch=sm_90",
                           "msl": "all pass the MSL syntax check (g++ + shim)"}[target]
            summary[target] = (len(kernels), checked)
        _write(tmp / "kernels.json", json.dumps(manifest, indent=1))
    print_report(console, report)
    n_ops = len(graph.ops)
    console.print(f"{label}: {n_ops} ops -> {len(fused.ops)} after fusion "
                  f"({report.total_matches} fusions, rewrite {t_rewrite * 1e3:.1f} ms)")
    for target, (n, checked) in summary.items():
        console.print(f"{target}: {n} unique kernels; {checked}")
    console.print(f"wrote {out}/ (graph.json, report.json, kernels.json, kernels/)")
    return 0


# -- run -----------------------------------------------------------------------------------------


def nmse(out, ref) -> float:
    """Normalized mean squared error ``sum((out-ref)^2) / sum(ref^2)`` (ggml test-backend-ops)."""
    import numpy as np

    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = float(np.sum(ref * ref)) or 1.0
    return float(np.sum((out - ref) ** 2)) / den


def _print_cache_stats(console, sess) -> None:
    """``fusec run --stats``: graph-cache hits/misses/time saved and mean host ms per token by phase."""
    st = sess.graph_cache.stats
    n = max(st.steps, 1)
    state = "on" if sess.graph_cache.enabled else "off (FUSEC_DISABLE_GRAPH_CACHE=1 or disabled)"
    console.print(f"graph cache {state}: {st.hits} hits ({st.reused_without_build} without building), "
                  f"{st.misses} misses, {len(sess.graph_cache)} entries, ~{st.saved_s * 1e3:.1f} ms saved "
                  "(cold cost of each hit's entry minus the hit's own cost)")
    names = [("build_s", "build"), ("rewrite_s", "match+rewrite"), ("codegen_s", "codegen"),
             ("compile_s", "compile"), ("lookup_s", "cache lookup+validate"), ("run_s", "encode+launch+wait")]
    parts = "  ".join(f"{label} {st.totals[k] / n * 1e3:.2f}" for k, label in names)
    console.print(f"host ms per token (mean of {st.steps} steps): {parts}")


def cmd_run(args) -> int:
    import numpy as np

    from .backends import get_backend
    from .models import is_checkpoint_path, load_model, random_weights
    from .runtime import DecodeSession

    console = _console()
    if args.tokens < 1:
        raise UsageError("--tokens must be >= 1")
    if args.prompt is not None and args.prompt_ids:
        raise UsageError("give --prompt or --prompt-ids, not both")
    if args.n_seq < 1:
        raise UsageError("--n-seq must be >= 1")
    if args.n_seq > 1 and args.prompt is not None:
        raise UsageError("--prompt streams one sequence; use --prompt-ids with --n-seq > 1")
    backend = get_backend(args.backend)
    pats = None if args.no_fuse else _patterns(args)
    t0 = time.perf_counter()
    tokenizer = None
    if is_checkpoint_path(args.model):  # a GGUF file or an HF directory: every tensor is validated here
        if args.layers or args.vocab or args.experts:
            raise UsageError("--layers / --vocab / --experts apply to random-weight configs only, not to a checkpoint")
        cfg, weights, tokenizer = load_model(args.model, weight_dtype=args.weight_dtype)
        source = f"weights from {args.model} ({args.weight_dtype})"
    else:
        cfg = _model_config(args)
        weights = random_weights(cfg, seed=args.seed, weight_dtype=args.weight_dtype)
        source = f"random weights (seed {args.seed}, {args.weight_dtype})"
    if args.prompt is not None:
        if tokenizer is None:
            raise UsageError(f"--prompt: model {args.model!r} has no usable vocabulary (an HF directory needs "
                             "tokenizer.json; a GGUF needs a byte-level BPE vocabulary, tokenizer.ggml.model "
                             "'gpt2'); pass token ids with --prompt-ids")
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise UsageError("--prompt: the text encodes to no tokens")
    else:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else [1]
        except ValueError:
            raise UsageError(f"--prompt-ids takes comma-separated integers, got {args.prompt_ids!r}") from None
    if args.n_seq > 1:
        return _run_multi_seq(args, console, cfg, weights, backend, pats, prompt, source, t0)
    kv_size = max(args.n_ctx, len(prompt) + args.tokens)
    console.print(f"{cfg.name}: {cfg.num_hidden_layers} layers, {source} in {time.perf_counter() - t0:.1f} s; "
                  f"backend {backend.name}; fusion {'off' if pats is None else 'on'}"
                  f"{'; flash attention' if args.flash_attn else ''}")
    sess = DecodeSession(cfg, backend, weights, kv_size=kv_size, patterns=pats, flash_attn=args.flash_attn)
    ref = None
    if args.verify:
        ref = DecodeSession(cfg, get_backend("numpy"), weights, kv_size=kv_size, patterns=None)
    stream = tokenizer.stream() if tokenizer is not None else None
    if stream is not None:  # the prompt, then each token's text as soon as it is decoded
        sys.stdout.write(args.prompt if args.prompt is not None else tokenizer.decode(prompt))
        sys.stdout.flush()
    tokens = list(prompt)
    worst = 0.0
    step_in = prompt
    t_start = time.perf_counter()
    t_prompt = 0.0
    for i in range(args.tokens):
        logits = sess.step(step_in)
        if i == 0:
            t_prompt = time.perf_counter() - t_start
        tm = sess.timings[-1]
        line = (f"step {i}: pos {tm['pos']:>4} n_kv {tm['n_kv']:>4} "
                f"build {tm['build_s'] * 1e3:7.1f} ms  rewrite {tm['rewrite_s'] * 1e3:6.1f} ms  "
                f"compile {tm['compile_s'] * 1e3:7.1f} ms  run {tm['run_s'] * 1e3:8.1f} ms")
        nxt = int(np.argmax(logits[-1]))
        if ref is not None:
            rlog = ref.step(step_in)
            err = nmse(logits, rlog)
            worst = max(worst, err)
            rnxt = int(np.argmax(rlog[-1]))
            line += f"  nmse {err:.2e}"
            if err > args.tol or nxt != rnxt:
                if stream is not None:
                    sys.stdout.write("\n")
                console.print(line)
                console.print(f"[red]verify FAILED at step {i}: nmse {err:.3e} (tol {args.tol:g}), "
                              f"argmax {nxt} vs reference {rnxt}[/red]")
                return 1
        tokens.append(nxt)
        step_in = [nxt]
        if stream is None:
            console.print(line + f"  -> token {nxt}")
            continue
        sys.stdout.write(stream.push(nxt))
        sys.stdout.flush()
        if nxt in tokenizer.eos_ids:
            break
    elapsed = time.perf_counter() - t_start
    n_gen = len(tokens) - len(prompt)
    if stream is not None:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if sess.last_report is not None:
        console.print(f"fusions per step: {sess.last_report.total_matches}")
    console.print(f"tokens: {tokens}")
    console.print(f"{n_gen} tokens in {elapsed:.2f} s: {n_gen / max(elapsed, 1e-9):.1f} tokens/s "
                  f"(prompt of {len(prompt)} tokens: {t_prompt:.2f} s; decode: "
                  f"{max(n_gen - 1, 0) / max(elapsed - t_prompt, 1e-9):.1f} tokens/s)")
    if args.stats:
        _print_cache_stats(console, sess)
    if ref is not None:
        console.print(f"verify: ok ({n_gen} steps, worst nmse {worst:.2e} <= {args.tol:g}, "
                      "same greedy tokens as the unfused numpy interpreter)")
    return 0


def _run_multi_seq(args, console, cfg, weights, backend, pats, prompt, source, t0) -> int:
    """``fusec run --n-seq S``: S sequences in one unified KV cache of ``max(--n-ctx, S*(prompt +
    tokens))`` cells; sequence ``s`` starts from the prompt ids shifted by ``s`` (mod n_vocab); the
    first step decodes every prompt, each later step one token per sequence (``n_tokens = S``)."""
    import numpy as np

    from .backends import get_backend
    from .runtime import DecodeSession

    S = args.n_seq
    prompts = [[(t + s) % cfg.vocab_size for t in prompt] for s in range(S)]
    kv_size = max(args.n_ctx, S * (len(prompt) + args.tokens))
    console.print(f"{cfg.name}: {cfg.num_hidden_layers} layers, {source} in {time.perf_counter() - t0:.1f} s; "
                  f"backend {backend.name}; fusion {'off' if pats is None else 'on'}"
                  f"{'; flash attention' if args.flash_attn else ''}; {S} sequences in {kv_size} KV cells")
    sess = DecodeSession(cfg, backend, weights, kv_size=kv_size, patterns=pats, n_seq=S,
                         flash_attn=args.flash_attn)
    ref = None
    if args.verify:
        ref = DecodeSession(cfg, get_backend("numpy"), weights, kv_size=kv_size, patterns=None, n_seq=S)
    last_rows = np.cumsum([len(p) for p in prompts]) - 1
    gen: list[list[int]] = [[] for _ in range(S)]
    step_in: list = prompts
    worst = 0.0
    t_start = time.perf_counter()
    for i in range(args.tokens):
        logits = sess.step(step_in)
        rows = last_rows if i == 0 else np.arange(S)
        nxt = [int(np.argmax(logits[r])) for r in rows]
        tm = sess.timings[-1]
        line = (f"step {i}: cells {tm['pos']:>4} n_tokens {tm['n_tokens']:>3} n_kv {tm['n_kv']:>4} "
                f"build {tm['build_s'] * 1e3:7.1f} ms  compile {tm['compile_s'] * 1e3:7.1f} ms  "
                f"run {tm['run_s'] * 1e3:8.1f} ms")
        if ref is not None:
            rlog = ref.step(step_in)
            err = nmse(logits, rlog)
            worst = max(worst, err)
            rnxt = [int(np.argmax(rlog[r])) for r in rows]
            line += f"  nmse {err:.2e}"
            if err > args.tol or nxt != rnxt:
                console.print(line)
                console.print(f"[red]verify FAILED at step {i}: nmse {err:.3e} (tol {args.tol:g}), "
                              f"argmax {nxt} vs reference {rnxt}[/red]")
                return 1
        console.print(line + f"  -> tokens {nxt}")
        for s in range(S):
            gen[s].append(nxt[s])
        step_in = nxt
    elapsed = time.perf_counter() - t_start
    if sess.last_report is not None:
        console.print(f"fusions per step: {sess.last_report.total_matches}")
    for s in range(S):
        console.print(f"sequence {s}: {prompts[s] + gen[s]}")
    n_gen = S * args.tokens
    console.print(f"{n_gen} tokens ({S} sequences) in {elapsed:.2f} s: {n_gen / max(elapsed, 1e-9):.1f} tokens/s")
    if args.stats:
        _print_cache_stats(console, sess)
    if ref is not None:
        console.print(f"verify: ok ({args.tokens} steps x {S} sequences, worst nmse {worst:.2e} <= {args.tol:g}, "
                      "same greedy tokens as the unfused numpy interpreter)")
    return 0


# -- test ----------------------------------------------------------------------------------------


def cmd_test(args) -> int:
    from .dsl import load_patterns
    from .proptest import run_pattern_tests

    pats = load_patterns(args.files)
    ok = run_pattern_tests(pats, backend=args.backend, examples=args.examples, seed=args.seed,
                           console=_console())
    return 0 if ok else 1


# -- import --------------------------------------------------------------------------------------


def cmd_import(args) -> int:
    """``fusec import model.pt2 -o graph.json``: a torch.export program -> a fusec JSON graph and its
    weights (``.npz``, keyed by leaf name; default: next to the graph, ``<stem>.weights.npz``)."""
    from collections import Counter

    import numpy as np

    from .frontends.torch import from_exported_program, load_exported_program
    from .ir import dumps

    src = Path(args.program)
    if not src.is_file():
        raise UsageError(f"no such file: {src}")
    graph, weights = from_exported_program(load_exported_program(str(src)))
    out = Path(args.output)
    wpath = Path(args.weights) if args.weights else out.with_name(f"{out.stem}.weights.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(dumps(graph), encoding="utf-8")
    os.replace(tmp, out)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    wtmp = wpath.with_name(f".{wpath.stem}.tmp-{os.getpid()}.npz")
    np.savez(wtmp, **weights)
    os.replace(wtmp, wpath)
    ops = Counter(t.op for t in graph.ops)
    inputs = [f"{t.name} {t.dtype} ne={list(t.ne)}" for t in graph.leaves if "input" in t.flags]
    console = _console()
    console.print(f"{src}: {len(graph.ops)} ops ({', '.join(f'{k} {v}' for k, v in ops.most_common())})")
    console.print(f"inputs: {'; '.join(inputs) or 'none'}; {len(weights)} weights "
                  f"({sum(a.nbytes for a in weights.values()):,} bytes)")
    console.print(f"wrote {out} and {wpath}")
    return 0


# -- bench ---------------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


# -- main ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fusec", description="op-fusion compiler for ML inference graphs")
    ap.add_argument("--version", action="version", version=f"fusec {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("check", help="validate pattern files")
    p.add_argument("files", nargs="+", help=".fuse files or folders")
    p.set_defaults(fn=cmd_check)

    def graph_args(p):
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--model", help="shipped model name (llama-3.2-1b, smollm2-135m, qwen2.5-0.5b, "
                                         "gemma-2-2b, ...) or a config.json path")
        src.add_argument("--graph", help="a fusec JSON graph")
        p.add_argument("--patterns", nargs="+", help="pattern files or folders (default: the shipped patterns/)")
        p.add_argument("--layers", type=int, default=0, help="keep only the first N layers (models)")
        p.add_argument("--vocab", type=int, default=0, help="keep only the first N token ids (models)")
        p.add_argument("--experts", type=int, default=0, help="keep only the first N experts (MoE models)")
        p.add_argument("--n-tokens", type=int, default=1, help="tokens per step of the model graph (default 1)")
        p.add_argument("--n-ctx", type=int, default=4096, help="KV cache cells (default 4096)")
        p.add_argument("--n-kv", type=int, default=256, help="visible KV cells of the graph (default 256)")

    p = sub.add_parser("compile", help="rewrite a graph and emit kernels")
    graph_args(p)
    p.add_argument("--target", default="wgsl,cuda,msl", help="comma list of wgsl, cuda, msl")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--no-check", action="store_true", help="skip naga / nvcc / MSL syntax checks")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", help="decode tokens: a checkpoint (GGUF file, HF directory) or random weights")
    p.add_argument("--model", required=True,
                   help="a .gguf file, an HF checkpoint directory, or a config name/config.json (random weights)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "wgpu", "cuda"])
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--verify", action="store_true", help="compare every step to the unfused numpy interpreter")
    p.add_argument("--tol", type=float, default=1e-6, help="max normalized MSE of the logits for --verify")
    p.add_argument("--patterns", nargs="+")
    p.add_argument("--no-fuse", action="store_true")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N layers (random-weight configs)")
    p.add_argument("--vocab", type=int, default=0,
                   help="keep only the first N token ids (random-weight configs; fits big vocabularies "
                        "under a device's buffer-binding limit, e.g. lavapipe's 128 MiB)")
    p.add_argument("--experts", type=int, default=0,
                   help="keep only the first N experts of a MoE random-weight config (same reason)")
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-dtype", default="f32", choices=["f32", "f16"])
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids (default: 1)")
    p.add_argument("--prompt", help="prompt text, tokenized with the checkpoint's vocabulary; streams the text")
    p.add_argument("--stats", action="store_true",
                   help="print graph-cache statistics and the per-token host time split at the end")
    p.add_argument("--n-seq", type=int, default=1,
                   help="decode this many sequences together in one unified KV cache of --n-ctx cells "
                        "(sequence s starts from the prompt ids + s)")
    p.add_argument("--flash-attn", action="store_true",
                   help="build FLASH_ATTN_EXT directly (row-major V cache) instead of the unfused attention")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("test", help="property-based equivalence tests for pattern files")
    p.add_argument("files", nargs="+")
    p.add_argument("--backend", default="numpy", choices=["numpy", "wgpu", "cuda"])
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_test)

    p = sub.add_parser("import", help="import a torch.export program (.pt2) as a fusec JSON graph + weights")
    p.add_argument("program", help="a file written by torch.export.save")
    p.add_argument("-o", "--output", required=True, help="the JSON graph to write (e.g. graph.json)")
    p.add_argument("--weights", help="the weights .npz to write (default: <output stem>.weights.npz)")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("bench", help="check and time the fused RMS_NORM kernels against their peers (issue 3)")
    p.add_argument("--backend", default="cuda", choices=["cuda", "wgpu", "numpy", "all"],
                   help="cuda (CuPy + torch peers), wgpu (WGSL), numpy (host check, CI) or all (cuda and wgpu)")
    p.add_argument("-o", "--output", help="JSON results file (rewritten after every case)")
    p.add_argument("--markdown", help="also write this BENCHMARKS.md from the results (needs -o)")
    p.add_argument("--quick", action="store_true", help="rows 32, 8192 x n 4096 only")
    p.add_argument("--dry", action="store_true", help="correctness only: tiny cases, no timing")
    p.add_argument("--no-torch", action="store_true", help="leave out the torch / torch.compile peers")
    p.add_argument("--budget-s", type=float, help="after this many seconds skip the remaining cases")
    p.add_argument("--rows", help="comma list: only the cases with these row counts (e.g. 1,32,512)")
    p.add_argument("--variants", action="store_true",
                   help="also check and time every candidate kernel of each case (fusec.bench.norm_variants; "
                        "wgpu: rows >= 8192 only) and print the sweep table")
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except FusecError as e:
        print(f"fusec: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # e.g. random weights of a model too large for this machine
        detail = f" ({e})" if str(e) else ""
        print(f"fusec: error: out of memory{detail}; try --layers, --vocab or --experts to shrink the model",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusec: interrupted", file=sys.stderr)
        return 130
    finally:
        _flush_render_cache()


def _flush_render_cache() -> None:
    """Verify and write the kernel renders a command left pending (``fusec.codegen.diskcache`` is
    write-behind; its ``atexit`` hook would do it too, but not when ``main`` is called in-process,
    e.g. by tests or another tool). Nothing to do when the command did no codegen."""
    dc = sys.modules.get("fusec.codegen.diskcache")
    if dc is not None:
        dc.flush()


if __name__ == "__main__":
    sys.exit(main())
