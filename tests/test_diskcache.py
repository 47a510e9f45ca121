"""Kernel render cache (fusec.codegen.diskcache): identical sources, a second process hits the disk,
atomic writes, refusal to cache templates that use left-out values."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

import fusec.codegen as cg
from fusec.codegen import diskcache
from fusec.dsl import default_patterns
from fusec.ir import GraphBuilder
from fusec.models import build_llama_decode, config_from_dict
from fusec.rewrite import rewrite

TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "vocab_size": 61, "tie_word_embeddings": False, "max_position_embeddings": 512,
}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEC_DISABLE_DISK_CACHE", raising=False)
    monkeypatch.delenv("FUSEC_DISABLE_RENDER_CACHE", raising=False)
    diskcache.reset()
    yield tmp_path
    diskcache.reset()


def _graph(n_tokens=1, n_kv=32):
    cfg = config_from_dict(TINY, name="tiny-disk")
    return rewrite(build_llama_decode(cfg, n_tokens, n_kv, 64), default_patterns())[0]


def _sources(g, backend):
    return [(k.entry, k.source, k.params, k.grid) for k in cg.emit_graph(g, backend)]


@pytest.mark.parametrize("backend", ["wgsl", "cuda", "msl"])
def test_cached_render_is_identical_to_plain_render(cache_dir, backend, monkeypatch):
    for shape in [(1, 32), (3, 64)]:
        g = _graph(*shape)
        cached = _sources(g, backend)
        again = _sources(g, backend)  # memory hits
        monkeypatch.setenv("FUSEC_DISABLE_RENDER_CACHE", "1")
        plain = _sources(g, backend)
        monkeypatch.delenv("FUSEC_DISABLE_RENDER_CACHE")
        assert cached == plain == again
    assert diskcache.STATS.memory_hits > 0 and diskcache.STATS.uncacheable == 0


def test_second_process_hits_the_disk(cache_dir):
    g = _graph()
    first = _sources(g, "wgsl")
    assert diskcache.STATS.disk_writes == 0 and diskcache.pending() > 0  # write-behind
    assert not (cache_dir / "kernels").exists()
    written = diskcache.flush()
    assert written == diskcache.STATS.disk_writes > 0 and diskcache.STATS.disk_hits == 0
    assert diskcache.pending() == 0
    files = list((cache_dir / "kernels").rglob("*.json"))
    assert len(files) == written
    diskcache.reset()  # a fresh process: no in-memory state
    second = _sources(g, "wgsl")
    assert second == first
    assert diskcache.STATS.misses == 0 and diskcache.STATS.disk_hits == written


def _child(cache: str, q) -> None:
    os.environ["FUSEC_CACHE_DIR"] = cache
    diskcache.reset()
    src = _sources(_graph(), "wgsl")
    q.put((diskcache.STATS.misses, diskcache.STATS.disk_hits, len(src)))


def test_real_second_process_and_concurrent_writers(cache_dir):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(str(cache_dir), q)) for _ in range(3)]
    for p in procs:
        p.start()
    res = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({r[2] for r in res}) == 1
    for f in (cache_dir / "kernels").rglob("*"):  # every file complete, no temporary left
        if f.is_file():
            assert f.suffix == ".json" and not f.name.startswith(".")
            json.loads(f.read_text())
    p = ctx.Process(target=_child, args=(str(cache_dir), q))
    p.start()
    misses, hits, _ = q.get(timeout=120)
    p.join(timeout=60)
    assert misses == 0 and hits > 0


def test_corrupt_or_foreign_entries_are_ignored_and_rewritten(cache_dir):
    g = _graph()
    first = _sources(g, "wgsl")
    diskcache.flush()
    files = sorted((cache_dir / "kernels").rglob("*.json"))
    files[0].write_text("{not json")
    data = json.loads(files[1].read_text())
    files[1].write_text(json.dumps({"key": data["key"] + "x", "source": "garbage"}))
    diskcache.reset()
    assert _sources(g, "wgsl") == first
    assert diskcache.STATS.misses == 2
    assert diskcache.flush() == 2
    json.loads(files[0].read_text())
    assert json.loads(files[1].read_text())["key"] == data["key"]


def test_disk_can_be_turned_off(cache_dir, monkeypatch):
    monkeypatch.setenv("FUSEC_DISABLE_DISK_CACHE", "1")
    _sources(_graph(), "wgsl")
    diskcache.flush()
    assert not (cache_dir / "kernels").exists() and diskcache.STATS.memory_hits > 0


def test_unwritable_cache_dir_does_not_fail_codegen(cache_dir, monkeypatch):
    blocker = cache_dir / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(blocker))  # a file: mkdir below it fails
    assert _sources(_graph(), "wgsl")
    assert diskcache.flush() == 0 and diskcache.pending() == 0
    assert diskcache.STATS.disk_writes == 0


def test_template_using_a_left_out_value_is_never_cached(cache_dir, monkeypatch):
    """If a template put a node name or a parameter value into the code, the verification render
    differs and the text is rendered every time (never served to another node)."""
    calls = []

    def fake(template, **ctx):
        calls.append(template)
        return f"// nodes: {ctx['node_name']}\nconst P = {ctx['params'][0][2]};\n"

    monkeypatch.setattr(diskcache.env, "render", fake)
    a = diskcache.cached_render("wgsl/x.j2", node_name="a", params=[("n", "u32", 1)])
    b = diskcache.cached_render("wgsl/x.j2", node_name="b", params=[("n", "u32", 2)])
    assert a.endswith("P = 1;\n") and b.endswith("P = 2;\n")
    assert diskcache.STATS.memory_hits == 0 and diskcache.STATS.uncacheable == 1


def test_names_only_in_header_are_substituted_back(cache_dir, monkeypatch):
    def fake(template, **ctx):
        return f"// nodes: {', '.join(ctx['nodes'])}\nfn main() {{ }} // {ctx['params'][0][1]}\n"

    monkeypatch.setattr(diskcache.env, "render", fake)
    a = diskcache.cached_render("wgsl/y.j2", nodes=["a", "a2"], params=[("n", "u32", 1)])
    b = diskcache.cached_render("wgsl/y.j2", nodes=["b", "b2"], params=[("n", "u32", 7)])
    assert b == "// nodes: b, b2\nfn main() { } // u32\n" and a.startswith("// nodes: a, a2")
    assert diskcache.STATS.memory_hits == 1


def test_shareable_strips_only_header_lines():
    src = "// x\n// nodes: a, b\nfn f() { let s = \"// nodes: no\"; }\n// nodes: c"
    assert cg._strip_nodes_lines(src) == "// x\nfn f() { let s = \"// nodes: no\"; }\n"


def test_key_includes_version_template_hash_and_backend(cache_dir):
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 2))
    g = b.build([b.scale(x, 2.0, name="y")])
    k = cg.emit(g.by_name("y"), "wgsl")
    assert k.source
    d1, text = diskcache.render_key("wgsl/unary.wgsl.j2", {"a": 1, "node_name": "n1"})
    d2, _ = diskcache.render_key("cuda/unary.cu.j2", {"a": 1, "node_name": "n1"})
    d3, _ = diskcache.render_key("wgsl/unary.wgsl.j2", {"a": 1, "node_name": "other"})
    d4, _ = diskcache.render_key("wgsl/unary.wgsl.j2", {"a": 1.0, "node_name": "n1"})
    assert d1 != d2 and d1 == d3 and d1 != d4
    # the canonical context's encoding keeps values of different types apart, and is the same for
    # equal values however they were built (interned or not)
    keys = {diskcache.render_key("t.j2", {"a": v})[0] for v in (1, 1.0, True, "1", None, [1], (1,), 2)}
    assert len(keys) == 7  # [1] and (1,) are both sequences of 1 (lists and tuples canonicalize alike)
    built = "".join(["src", "0_ne0"])
    assert diskcache.render_key("t.j2", {"a": built}) == diskcache.render_key("t.j2", {"a": "src0_ne0"})
    assert diskcache.template_hash() in text and "fusec " in text


# -- write-behind --------------------------------------------------------------------------------------


def test_miss_returns_the_uncached_render_and_leaves_the_entry_pending(cache_dir, monkeypatch):
    g = _graph()
    monkeypatch.setenv("FUSEC_DISABLE_RENDER_CACHE", "1")
    plain = _sources(g, "wgsl")
    monkeypatch.delenv("FUSEC_DISABLE_RENDER_CACHE")
    diskcache.reset()
    assert _sources(g, "wgsl") == plain
    n = diskcache.STATS.misses
    assert n > 0 and diskcache.pending() == n and diskcache.STATS.disk_writes == 0
    assert not (cache_dir / "kernels").exists()
    assert diskcache.flush() == n and diskcache.pending() == 0
    assert len(list((cache_dir / "kernels").rglob("*.json"))) == n
    diskcache.reset()  # a fresh process reads what the flush wrote
    assert _sources(g, "wgsl") == plain
    assert diskcache.STATS.misses == 0 and diskcache.STATS.disk_hits == n


def test_memory_hit_is_served_only_after_verification(cache_dir, monkeypatch):
    calls = []

    def fake(template, **ctx):
        calls.append(ctx["node_name"])
        return f"// nodes: {ctx['node_name']}\nfn main() {{ }}\n"

    monkeypatch.setattr(diskcache.env, "render", fake)
    a = diskcache.cached_render("wgsl/v.j2", node_name="a", params=[("n", "u32", 1)])
    assert calls == ["a"] and diskcache.STATS.verified == 0  # one render, verification pending
    b = diskcache.cached_render("wgsl/v.j2", node_name="b", params=[("n", "u32", 2)])
    assert len(calls) == 2 and calls[1].startswith("\x01")  # the verification render, then a hit
    c = diskcache.cached_render("wgsl/v.j2", node_name="c", params=[("n", "u32", 3)])
    assert len(calls) == 2 and diskcache.STATS.verified == 1 and diskcache.STATS.memory_hits == 2
    assert (a, b, c) == tuple(f"// nodes: {x}\nfn main() {{ }}\n" for x in "abc")
    assert diskcache.pending() == 1 and diskcache.flush() == 1  # verified, written at the flush
    assert len(calls) == 2


def test_flush_refuses_a_template_using_a_left_out_value(cache_dir, monkeypatch):
    """A pending entry whose template puts a parameter value into the code is dropped at the flush
    (nothing written) and the key is rendered every time afterwards."""
    def fake(template, **ctx):
        return f"const P = {ctx['params'][0][2]};\n"

    monkeypatch.setattr(diskcache.env, "render", fake)
    assert diskcache.cached_render("wgsl/u.j2", node_name="a", params=[("n", "u32", 1)]) == "const P = 1;\n"
    assert diskcache.flush() == 0 and diskcache.pending() == 0
    assert not (cache_dir / "kernels").exists()
    assert diskcache.cached_render("wgsl/u.j2", node_name="b", params=[("n", "u32", 5)]) == "const P = 5;\n"
    assert diskcache.STATS.uncacheable == 1 and diskcache.STATS.memory_hits == 0


def test_context_changed_by_the_caller_after_the_miss_is_not_cached(cache_dir, monkeypatch):
    """The pending entry shares the caller's context values; if they change before the verification,
    the key no longer matches and nothing is cached."""
    def fake(template, **ctx):
        return f"// nodes: {ctx['node_name']}\nlet w = {ctx['widths'][0]};\n"

    monkeypatch.setattr(diskcache.env, "render", fake)
    widths = [4]
    assert diskcache.cached_render("wgsl/m.j2", node_name="a", widths=widths).endswith("w = 4;\n")
    widths[0] = 8
    assert diskcache.flush() == 0 and not (cache_dir / "kernels").exists()
    assert diskcache.cached_render("wgsl/m.j2", node_name="b", widths=[4]).endswith("w = 4;\n")
    assert diskcache.STATS.misses == 2 and diskcache.flush() == 1  # not marked uncacheable: cached now


def test_reset_drops_pending_entries(cache_dir):
    _sources(_graph(), "wgsl")
    assert diskcache.pending() > 0
    diskcache.reset()
    assert diskcache.pending() == 0 and diskcache.flush() == 0
    assert not (cache_dir / "kernels").exists()


_EXIT_SCRIPT = """
import os, sys
from fusec.codegen import diskcache
import fusec.codegen as cg
from fusec.ir import GraphBuilder
b = GraphBuilder()
x = b.input("x", "f32", (8, 2))
g = b.build([b.scale(x, 2.0, name="y")])
cg.emit(g.by_name("y"), "wgsl")
assert diskcache.pending() == 1 and diskcache.STATS.disk_writes == 0
if sys.argv[1] == "kill":
    os._exit(0)  # no atexit: pending entries are lost
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_pending_entries_are_written_at_interpreter_exit(tmp_path, how):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEC_DISABLE")}
    env.update(FUSEC_CACHE_DIR=str(tmp_path), PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, how], env=env, cwd=root, check=True, timeout=120)
    files = list((tmp_path / "kernels").rglob("*.json"))
    if how == "kill":
        assert files == []
    else:
        assert len(files) == 1 and json.loads(files[0].read_text())["source"]


def test_cli_compile_flushes_pending_renders(cache_dir, tmp_path):
    """``fusec compile`` called in-process (no interpreter exit) leaves nothing pending."""
    from fusec.cli import main

    g = {"format": "fusec-graph", "version": 1, "outputs": [2], "nodes": [
        {"id": 0, "name": "a", "op": "NONE", "dtype": "f32", "ne": [8, 2, 1, 1], "flags": ["input"]},
        {"id": 1, "name": "b", "op": "NONE", "dtype": "f32", "ne": [8, 2, 1, 1], "flags": ["input"]},
        {"id": 2, "name": "y", "op": "ADD", "dtype": "f32", "ne": [8, 2, 1, 1], "src": [0, 1]}]}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(g))
    assert main(["compile", "--graph", str(path), "--target", "wgsl", "-o", str(tmp_path / "out"), "--no-check"]) == 0
    assert diskcache.pending() == 0 and diskcache.STATS.misses > 0
    assert diskcache.STATS.disk_writes == diskcache.STATS.misses
    assert len(list((cache_dir / "kernels").rglob("*.json"))) == diskcache.STATS.misses
