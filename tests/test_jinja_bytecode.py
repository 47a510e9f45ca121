"""Jinja bytecode compiled at build time (fusec.codegen.jinja_bytecode, hatch_build.py): shipped
entries are used without compiling, relocated to the installed path, stale or foreign entries are
recompiled, and the kernels rendered from bytecode are byte-identical to freshly compiled ones."""

from __future__ import annotations

import shutil

import jinja2
import pytest

import fusec.codegen as cg
from fusec.codegen import diskcache, env
from fusec.codegen import jinja_bytecode as jb
from fusec.dsl import default_patterns
from fusec.models import build_llama_decode, config_from_dict
from fusec.resources import templates_dir
from fusec.rewrite import rewrite

TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "vocab_size": 61, "tie_word_embeddings": False, "max_position_embeddings": 512,
}
NAME = "wgsl/norm_epilogue.wgsl.j2"


@pytest.fixture
def compiles(monkeypatch):
    """Names of the templates Jinja compiles (parse + codegen) from here on."""
    names: list[str] = []
    orig = jinja2.Environment.compile

    def counting(self, source, name=None, filename=None, raw=False, defer_init=False):
        names.append(name)
        return orig(self, source, name, filename, raw, defer_init)

    monkeypatch.setattr(jinja2.Environment, "compile", counting)
    return names


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A fresh user cache dir, shipped bytecode in ``tmp_path/shipped`` (empty until precompiled),
    and a fresh process environment built from them."""
    shipped = tmp_path / "shipped"
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path / "user"))
    for v in ("FUSEC_DISABLE_DISK_CACHE", "FUSEC_DISABLE_JINJA_BYTECODE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("FUSEC_DISABLE_RENDER_CACHE", "1")  # every kernel is really rendered by Jinja
    monkeypatch.setattr(env, "SHIPPED_DIRS", (str(shipped),))
    env.environment.cache_clear()
    diskcache.reset()
    yield shipped
    env.environment.cache_clear()
    diskcache.reset()


def _cache(shipped, user=None):
    return jb.TemplateBytecodeCache([shipped], lambda: user)


def test_shipped_bytecode_is_used_without_compiling(tmp_path, compiles):
    build = tmp_path / "build" / "templates"  # compiled elsewhere (build folder), then installed
    shutil.copytree(templates_dir(), build)
    n = jb.precompile(build, tmp_path / "shipped")
    assert n == len(list(templates_dir().rglob("*.j2"))) and len(compiles) == n
    compiles.clear()
    e = jb.make_environment(templates_dir(), _cache(tmp_path / "shipped"))
    t = e.get_template(NAME)
    assert compiles == []
    assert t.filename == str(templates_dir() / NAME)  # tracebacks name the installed file


def test_edited_template_is_recompiled_not_served_stale(tmp_path, compiles):
    src = tmp_path / "templates"
    (src / "wgsl").mkdir(parents=True)
    (src / "wgsl" / "t.j2").write_text("old {{ x }}\n")
    jb.precompile(src, tmp_path / "shipped")
    shipped_entry = next((tmp_path / "shipped").glob("*.cache")).read_bytes()
    (src / "wgsl" / "t.j2").write_text("new {{ x }}\n")
    compiles.clear()
    e = jb.make_environment(src, _cache(tmp_path / "shipped", tmp_path / "user"))
    assert e.get_template("wgsl/t.j2").render(x=1) == "new 1\n"
    assert compiles == ["wgsl/t.j2"]
    assert next((tmp_path / "shipped").glob("*.cache")).read_bytes() == shipped_entry  # read-only
    assert len(list((tmp_path / "user").glob("*.cache"))) == 1  # the recompiled entry went to the user dir
    compiles.clear()
    e2 = jb.make_environment(src, _cache(tmp_path / "shipped", tmp_path / "user"))  # a later process
    assert e2.get_template("wgsl/t.j2").render(x=2) == "new 2\n" and compiles == []


def test_entries_of_other_options_or_python_are_ignored(tmp_path, compiles, monkeypatch):
    src = tmp_path / "templates"
    src.mkdir()
    (src / "t.j2").write_text("{% if x %}\n  a\n{% endif %}\n")
    with monkeypatch.context() as m:
        m.setattr(jb, "OPTIONS_HASH", "other-options")  # e.g. built with other lexer options or Jinja
        jb.precompile(src, tmp_path / "other")
    compiles.clear()
    e = jb.make_environment(src, _cache(tmp_path / "other"))
    assert e.get_template("t.j2").render(x=True) == "  a\n" and compiles == ["t.j2"]

    jb.precompile(src, tmp_path / "py")
    entry = next((tmp_path / "py").glob("*.cache"))
    data = bytearray(entry.read_bytes())
    data[len(jinja2.bccache.bc_magic) - 1] ^= 0xFF  # the header's Python version byte
    entry.write_bytes(bytes(data))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / entry.name).write_bytes(jinja2.bccache.bc_magic + b"garbage")
    for d in ("py", "corrupt"):
        compiles.clear()
        e = jb.make_environment(src, _cache(tmp_path / d))
        assert e.get_template("t.j2").render(x=True) == "  a\n" and compiles == ["t.j2"]


def test_switches(isolated, compiles, monkeypatch, tmp_path):
    jb.precompile(templates_dir(), isolated)
    compiles.clear()
    monkeypatch.setenv("FUSEC_DISABLE_DISK_CACHE", "1")  # user dir off, shipped bytecode still used
    env.environment().get_template(NAME)
    assert compiles == [] and not (tmp_path / "user").exists()
    env.environment.cache_clear()
    monkeypatch.setenv("FUSEC_DISABLE_JINJA_BYTECODE", "1")  # both off
    assert env.environment().bytecode_cache is None
    env.environment().get_template(NAME)
    assert compiles == [NAME]


def test_user_dir_entries_are_written_atomically_and_reused(isolated, compiles, tmp_path, monkeypatch):
    monkeypatch.delenv("FUSEC_DISABLE_RENDER_CACHE")  # (it turns the user dir off too)
    env.environment().get_template(NAME)  # nothing shipped: compiled, dumped to the user dir
    user = tmp_path / "user" / "jinja"
    assert compiles == [NAME] and [p.name.startswith(".") for p in user.iterdir()] == [False]
    env.environment.cache_clear()
    compiles.clear()
    env.environment().get_template(NAME)
    assert compiles == []


def _sources(backend):
    cfg = config_from_dict(TINY, name="tiny-bc")
    g = rewrite(build_llama_decode(cfg, 1, 32, 64), default_patterns())[0]
    return [(k.entry, k.source, k.params, k.grid) for k in cg.emit_graph(g, backend)]


@pytest.mark.parametrize("backend", ["wgsl", "cuda", "msl"])
def test_kernels_from_shipped_bytecode_are_byte_identical(isolated, compiles, monkeypatch, backend):
    jb.precompile(templates_dir(), isolated)
    compiles.clear()
    from_bytecode = _sources(backend)
    assert compiles == []  # every template of the Llama graph came from the shipped bytecode
    env.environment.cache_clear()
    monkeypatch.setenv("FUSEC_DISABLE_JINJA_BYTECODE", "1")
    compiled = _sources(backend)
    assert len(set(compiles)) >= 5  # the graph uses several template families
    assert from_bytecode == compiled


def test_load_bucket_reads_what_jinja_reads(tmp_path):
    """``load_bucket`` (``marshal.loads`` from the bytes) gives Jinja's own ``Bucket.load_bytecode``
    result on every entry, and misses on a wrong checksum, a wrong magic and truncated data."""
    import marshal

    out = tmp_path / "bc"
    jb.precompile(templates_dir(), out)
    e = jb.make_environment(templates_dir())
    cache = _cache(out)
    for p in sorted(templates_dir().rglob("*.j2")):
        name = p.relative_to(templates_dir()).as_posix()
        source, filename, _ = e.loader.get_source(e, name)
        ref = jinja2.bccache.Bucket(e, cache.get_cache_key(name), cache.get_source_checksum(source))
        with open(out / f"{ref.key}.cache", "rb") as f:
            ref.load_bytecode(f)
        data = (out / f"{ref.key}.cache").read_bytes()
        b = jinja2.bccache.Bucket(e, ref.key, ref.checksum)
        jb.load_bucket(b, data)
        assert ref.code is not None and marshal.dumps(b.code) == marshal.dumps(ref.code)
    stale = jinja2.bccache.Bucket(e, ref.key, "0" * 40)
    jb.load_bucket(stale, data)
    assert stale.code is None
    foreign = jinja2.bccache.Bucket(e, ref.key, ref.checksum)
    jb.load_bucket(foreign, b"j3" + data[2:])
    assert foreign.code is None
    short = jinja2.bccache.Bucket(e, ref.key, ref.checksum)
    try:
        jb.load_bucket(short, data[: len(data) // 2])
    except Exception:  # noqa: BLE001 - TemplateBytecodeCache._load turns errors into misses
        short.reset()
    assert short.code is None
