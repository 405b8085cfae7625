"""benchmarks/domains.py: its configuration grammar and its byte accounting (kvfx's cache and the peers' honest
count), on a tiny Llama. The full table is a command (sweeps `domains`, `domains-calib`), not a test."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvfx
from helpers import VOCAB, bench_module, random_projections, tiny_llama

@pytest.fixture(scope="module")
def bench():
    return bench_module("domains.py")


def test_configurations_parse_and_bad_ones_are_refused(bench, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("a refused command line ran the benchmark"))
    c = bench.parse("kqsvd@kv:0.9375:int4:rot:calib=code")
    assert (c.method, c.granularity, c.rank, c.quantize, c.rotate, c.calib) == ("kqsvd", "kv", 0.9375, "int4", True,
                                                                                 "code")
    p = bench.parse("hqq:3:g32:r128")
    assert (p.peer, p.bits, p.group, p.residual) == ("hqq", 3, 32, 128)
    b = bench.parse("kqsvd@kv:0.125:bits:measured")
    assert (b.per_direction, b.measured, b.rank) == (True, 2, 0.125) and not bench.parse("kqsvd@kv:0.25:bits").measured
    assert bench.parse("kqsvd@kv:0.125:bits:refine=60").refine == 60
    assert bench.parse("kqsvd@kv:0.125:bits:sinks=4:recent=32").exact == (4, 32)
    assert bench.parse("kqsvd@kv:0.125:bits:recent=8").exact == (0, 8)
    assert bench.parse("kqsvd@kv:0.125:bits:uncentred").uncentred and not bench.parse("kqsvd@kv:0.125:bits").uncentred
    assert bench.parse("kqsvd@kv:0.5:int4:uncentred").uncentred
    assert bench.parse("kqsvd@kv:0.5:shrink=0.1").shrink == 0.1 and bench.parse("kqsvd@kv:0.5").shrink == 0
    assert bench.parse("kqsvd@kv:0.25:bits:measured").measured == 2
    assert bench.parse("kqsvd@kv:0.25:bits:measured=4").measured == 4 and not bench.parse("kqsvd@kv:0.25:bits").measured
    weighted = bench.parse("kqsvd@kv:0.125:bits:kw=8")
    assert weighted.key_weight == 8 and bench.parse("kqsvd@kv:0.5").key_weight is None
    assert bench.label(weighted).endswith(", key weight 8")
    aw = bench.parse("kqsvd@kv:0.125:bits:aw=0.5")
    assert aw.attention_weight == 0.5 and bench.parse("kqsvd@kv:0.125:bits").attention_weight == 0
    assert bench.label(aw).endswith(", tokens weighted by attention^0.5") and not aw.own_value_weight
    assert bench.parse("kqsvd@kv:0.125:bits:aw=0.5:vw").own_value_weight
    lattice = bench.parse("kqsvd@kv:0.125:bits:e8")
    assert lattice.lattice and not bench.parse("kqsvd@kv:0.125:bits").lattice
    assert "(int8/int5/int4/int3/e8 bands)" in bench.label(replace(lattice, levels=(8, 5, 4, 3, "e8")))
    cheap = bench.parse("kqsvd@kv:0.125:bits:e8:rw=0.5")
    assert cheap.rounding_weight == 0.5 and bench.parse("kqsvd@kv:0.125:bits").rounding_weight == 1.0
    assert ", rounding priced 0.5 × a dropped direction" in bench.label(cheap)
    assert "rounding priced" not in bench.label(bench.parse("kqsvd@kv:0.125:bits"))
    fell = replace(bench.parse("kqsvd@kv:0.125:bits:refine=60"), refine_fell_back=True)
    assert ", refined 60 steps (fell back to its start: held-out KL not lowered)" in bench.label(fell)
    slow = bench.parse("kqsvd@kv:0.125:bits:refine=60:lr=5e-05")
    assert slow.refine_lr == 5e-5 and bench.parse("kqsvd@kv:0.125:bits:refine=60").refine_lr == bench.REFINE_LR
    assert ", refined 60 steps at lr 5e-05" in bench.label(slow) and " at lr" not in bench.label(fell)
    held_out = bench.parse("kqsvd@kv:0.125:bits:calib=mix-code")
    assert held_out.calib == "mix-code" and bench.mixed("mix-code") == ("wikitext", "docs", "fiction")
    assert "calibrated on the mix without code" in bench.label(held_out) and bench.mixed("mix") == tuple(bench.DOMAINS)
    for bad in ["kqsvd:half", "kqsvd:0.5:shrink=1", "kqsvd:0.5:shrink=0", "kqsvd:0.5:calib=mix-poetry", "kqsvd:0.5:int6", "quanto:4:64:r32", "kqsvd:0.5:calib=poetry", "kqsvd@kv:0.25:measured",
                "kqsvd@kv:0.25:bits:refine=0", "kqsvd@kv:0.25:refine=5", "kqsvd@kv:0.25:sinks=4",
                "kqsvd:0.5:kw=8", "kqsvd@kv:0.5:kw=0", "kqsvd@kv:0.5:aw=0", "kqsvd@kv:0.5:aw=1.5", "kqsvd@kv:0.5:vw",
                "kqsvd@kv:0.25:bits:measured=0", "kqsvd@kv:0.25:e8", "kqsvd@kv:0.25:rw=0.5",
                "kqsvd@kv:0.25:bits:rw=0", "kqsvd@kv:0.25:bits:rw=1.5", "kqsvd@kv:0.25:bits:lr=1e-4",
                "kqsvd@kv:0.25:bits:refine=9:lr=0"]:
        with pytest.raises(SystemExit, match="bad configuration"):
            bench.parse(bad)
    for spec in bench.DEFAULT:
        bench.parse(spec)
    with pytest.raises(SystemExit, match="--bit-levels: levels must be distinct band formats"):
        bench.main(["--bit-levels", "8,6,2"])  # refused before the model loads
    with pytest.raises(SystemExit, match="a profile on 4 windows needs as many calibration windows; --calib-windows is 2"):
        bench.main(["--configs", "kqsvd@kv:0.25:bits:measured=4", "--calib-windows", "2"])


def test_kvfx_bytes_are_what_its_cache_holds(bench):
    m = tiny_llama(2, heads=4, kv_heads=2, head_dim=32)
    proj = random_projections(m, rank=16)
    cm = kvfx.compress(torch.compile(m, backend="eager"), proj, quantize="int4")
    rec = bench.Recorder(lambda: kvfx.make_cache(cm))
    windows = torch.randint(3, VOCAB, (1, 48), generator=torch.Generator().manual_seed(0))
    kvfx.cache_perplexities(cm, windows, rec, chunk=8, progress=False)
    assert rec.last.get_seq_length() == 48
    # int4 rows of 16 numbers: 8 code bytes + 1 scale byte, against 2 bytes × 32 numbers per head
    assert bench.kvfx_bytes(rec.last, 2, 32) == pytest.approx(9 / 64) == pytest.approx(proj.kv_fraction("int4"))
    kvfx.decompress(cm)


def test_peer_bytes_count_codes_scales_zero_points_and_the_window_it_held(bench):
    pytest.importorskip("optimum.quanto")
    from transformers import QuantizedCache
    m = tiny_llama(2, heads=4, kv_heads=2, head_dim=32)
    cfg = bench.parse("quanto:4:g32:r16")
    rec = bench.Recorder(lambda: QuantizedCache(backend="quanto", config=m.config, nbits=4, q_group_size=32,
                                                residual_length=16))
    windows = torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))
    kvfx.cache_perplexities(m, windows, rec, chunk=8, progress=False)
    # prefill 32 tokens (quantized), then chunks of 8: the window holds 8, then 8 + 8 >= 16 flushes it, ...
    assert rec.residuals == [8, 0, 8, 0]
    mean = 4
    expected = ((64 - mean) * (4 + 32 / 32) / 16 + mean) / 64
    assert bench.peer_bytes(rec.last, rec.residuals, cfg) == pytest.approx(expected)


def test_frontier_plot_reads_the_domains_tables(tmp_path):
    """benchmarks/plot_frontier.py: every kvfx / peer row of a domains table (not the original's, not other tables),
    each once; the frontier keeps only points nothing beats on bytes and worst domain; the plot is written."""
    pf = bench_module("plot_frontier.py")
    table = ("| configuration | KV bytes | wikitext | code | worst |\n|---|---|---|---|---|\n"
             "| original (DynamicCache), cache ppl | 1.000 | 24.35 | 6.64 | - |\n"
             "| kvfx a | 0.250 | 1.02 | 1.03 | 1.03 |\n| QuantizedCache quanto int4 | 0.360 | 1.0 | 1.02 | 1.02 |\n"
             "| kvfx b | 0.125 | 1.3 | 1.2 | 1.3 |\n| kvfx c | 0.200 | 1.4 | 1.5 | 1.5 |\n\n"
             "| method | ppl |\n|---|---|\n| kvfx other | 9.0 |\n")
    points = pf.load_points(table + table)
    assert points == [("kvfx a", 0.25, 1.03), ("QuantizedCache quanto int4", 0.36, 1.02), ("kvfx b", 0.125, 1.3),
                      ("kvfx c", 0.2, 1.5)]
    assert pf.frontier([(x, y) for c, x, y in points if c.startswith("kvfx")]) == [(0.125, 1.3), (0.25, 1.03)]
    results = tmp_path / "R.md"
    results.write_text(table)
    assert pf.plot(results, tmp_path / "f.png").stat().st_size > 0
