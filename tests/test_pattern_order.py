"""Overlapping patterns: benefit decides, the report names winner and loser, and nothing depends on
the order of the pattern files or of the patterns inside them (issue 6, part 8).

Orders of the shipped ``patterns/*.fuse`` files -- every rotation, the reverse, and a fixed random
sample of the others (:data:`ORDERS`, 720; with 8 files there are 40320 in all) -- each with the
patterns inside every file shuffled too, rewrite the Llama-3.2-1B decode graph (cut to 2 layers)
and a synthetic graph where RMS_NORM -> MUL overlaps RMS_NORM -> MUL -> ADD (and ADD chains and a
split GLU overlap other matches) into the same graph (serialized JSON and structural key) with the
same FusionReport.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fusec.dsl import default_patterns, load_patterns, parse_patterns
from fusec.ir import GraphBuilder, dumps
from fusec.ir.graph import Graph
from fusec.models import build_llama_decode, load_config
from fusec.resources import patterns_dir
from fusec.rewrite import rewrite
from fusec.runtime.key import structural_key

FILES = sorted(patterns_dir().glob("*.fuse"))
PER_FILE = {f.name: parse_patterns(f.read_text(encoding="utf-8"), f"patterns/{f.name}") for f in FILES}


def overlap_graph() -> Graph:
    """``norm -> mul -> y`` matches rms_norm_mul (root ``mul``, benefit 2) and rms_norm_mul_add
    (root ``y``, benefit 3); ``z = y + c`` matches add_chain_3 (benefit 3) through ``y`` (equal
    benefit: the earlier root wins); ``gate = silu(c) * x`` matches silu_mul (benefit 1) and the
    canonicalization swiglu_decomposed."""
    b = GraphBuilder()
    x = b.input("x", "f32", (16, 3))
    w = b.weight("w", "f32", (16,))
    bias = b.input("bias", "f32", (16, 3))
    c = b.input("c", "f32", (16, 3))
    y = b.add(b.mul(b.rms_norm(x, 1e-6, name="norm"), w, name="mul"), bias, name="y")
    z = b.add(y, c, name="z")
    gate = b.mul(b.silu(c, name="act"), x, name="gate")
    return b.build([z, gate])


def llama_graph() -> Graph:
    return build_llama_decode(load_config("llama-3.2-1b").with_layers(2), 1, 256, 1024)


def outcome(g: Graph, pats) -> tuple[str, str, dict]:
    fg, rep = rewrite(g, pats)
    return dumps(fg), structural_key(fg).digest, rep.to_dict()


def test_file_permutations_cover_the_shipped_files():
    assert len(FILES) >= 2 and sum(map(len, PER_FILE.values())) == len(default_patterns())


def check_orders(g: Graph, perms) -> int:
    ref = outcome(g, default_patterns())
    rnd = random.Random(1234)
    n = 0
    for perm in perms:
        pats = []
        for name in perm:
            inner = list(PER_FILE[name])
            rnd.shuffle(inner)
            pats += inner
        assert outcome(g, pats) == ref, perm
        n += 1
    return n


def sample_orders(n: int, seed: int) -> list[tuple[str, ...]]:
    """``n`` distinct file orders: every rotation of the sorted names, the reverse, then random
    permutations (fixed ``seed``); all of them when there are at most ``n``."""
    names = sorted(PER_FILE)
    if math.factorial(len(names)) <= n:
        return list(itertools.permutations(names))
    orders = [tuple(names[i:] + names[:i]) for i in range(len(names))] + [tuple(names[::-1])]
    seen, rnd = set(orders), random.Random(seed)
    while len(orders) < n:
        perm = tuple(rnd.sample(names, len(names)))
        if perm not in seen:
            seen.add(perm)
            orders.append(perm)
    return orders


ORDERS = sample_orders(720, 7)


def test_overlap_graph_does_not_depend_on_file_or_pattern_order():
    assert check_orders(overlap_graph(), ORDERS) == len(set(ORDERS)) == 720


def test_llama_does_not_depend_on_file_or_pattern_order_sampled():
    """24 of the file orders (every file first once, reversed, random ones): a quick guard."""
    assert check_orders(llama_graph(), sample_orders(24, 11)) == 24


@pytest.mark.slow
def test_llama_does_not_depend_on_file_or_pattern_order_720():
    assert check_orders(llama_graph(), ORDERS) == 720


def test_loader_file_order_does_not_matter():
    """Through the loader itself: ``load_patterns`` with the files in rotated and reversed orders."""
    g = overlap_graph()
    orders = [FILES[i:] + FILES[:i] for i in range(len(FILES))] + [FILES[::-1]]
    outs = {outcome(g, load_patterns(order))[:2] for order in orders}
    assert len(outs) == 1
    assert [p.name for p in load_patterns(FILES[::-1])] != [p.name for p in load_patterns(FILES)]


def test_overlap_report_names_winner_and_loser():
    g = overlap_graph()
    fg, rep = rewrite(g, default_patterns())
    applied = {(a.pattern, a.root, a.nodes) for a in rep.applied}
    assert applied == {("rms_norm_mul_add", "y", ("norm", "mul", "y")), ("swiglu_decomposed", "gate", ("act", "gate"))}
    lost = {(nf.pattern, nf.root): (nf.kind, nf.reason) for nf in rep.not_fused}
    assert lost[("rms_norm_mul", "mul")] == ("overlap", "overlaps higher-benefit match rms_norm_mul_add at 'y'")
    assert lost[("add_chain_3", "z")] == ("overlap", "overlaps equal-benefit earlier match rms_norm_mul_add at 'y'")
    assert lost[("silu_mul", "gate")] == ("overlap", "overlaps higher-benefit match swiglu_decomposed at 'gate'")
    assert rep.why_not("mul")[0].kind == "overlap"
    text = rep.format()
    assert "not fused: rms_norm_mul at 'mul': overlaps higher-benefit match rms_norm_mul_add at 'y'" in text
    assert sorted(t.op for t in fg.ops) == ["ADD", "FUSED", "SWIGLU"]


def test_overlap_winner_is_by_benefit_not_by_name_or_position():
    """Two private patterns over the same two nodes: the higher benefit wins whichever is listed,
    named or rooted first; the loser is reported as an overlap with the winner's name."""
    text = """
pattern a_short {
  match {
    y = SCALE(SILU(x))
  }
  rewrite F(x) kernel k
  benefit 1
}
pattern z_long {
  match {
    y = SCALE(SILU(x))
  }
  rewrite G(x) kernel k
  benefit 5
}
"""
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 2))
    g = b.build([b.scale(b.silu(x, name="s"), 2.0, name="y")])
    pats = parse_patterns(text, "t.fuse")
    for order in (pats, pats[::-1]):
        fg, rep = rewrite(g, order)
        assert [a.pattern for a in rep.applied] == ["z_long"]
        (nf,) = rep.not_fused
        assert (nf.pattern, nf.kind, nf.reason) == ("a_short", "overlap", "overlaps higher-benefit match z_long at 'y'")
