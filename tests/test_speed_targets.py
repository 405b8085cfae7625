"""benchmarks/speed_targets.py: issue 15's targets read off a speed run's rows (synthetic rows: each verdict both
ways), and speed.py --render, which prints a saved run's tables with them."""
from __future__ import annotations

import json

import pytest

from helpers import bench_module

MiB = 1 << 20


@pytest.fixture(scope="module")
def goals():
    return bench_module("speed_targets.py")


def _row(config, step_ms, cache_mib, batch=1, n=16384, bw=0.6, static=None, dtype="float32"):
    orig_ms, orig_mib, weights = 200.0, 720.0, 500 * MiB
    return dict(model="smollm2", dtype=dtype, config=config, cache="dynamic", batch=batch, N=n, step_ms=step_ms,
                cache_bytes=int(cache_mib * MiB), vs_dynamic=orig_ms / step_ms,
                vs_static=None if static is None else static / step_ms, bw_fraction=bw,
                bytes_ideal=(weights + orig_mib * MiB) / (weights + cache_mib * MiB))


def _res():
    rows = [_row("original-dynamic", 200.0, 720.0, bw=0.2),
            _row("kvfx-head-0.5-int4", 40.0, 48.0, bw=0.62),      # 5.0× against an ideal of ~2.2×: met
            _row("kvfx-kv-0.9375-int4", 150.0, 90.0, bw=0.13),    # 1.33× against ~2.0×: short
            _row("kvfx-identity", 210.0, 720.0, bw=0.3),          # slower than the original: not met
            _row("peer-quanto-int4", 120.0, 112.5, bw=0.2),
            _row("kvfx-head-0.5", 30.0, 360.0, n=4096)]           # not a target row (4k, batch 1)
    prefill = [dict(model="smollm2", dtype="float32", config="original-dynamic", cache="dynamic", ms=1000.0,
                    vs_dynamic=1.0, note=""),
               dict(model="smollm2", dtype="float32", config="kvfx-kv-0.9375-int4", cache="dynamic", ms=1250.0,
                    vs_dynamic=0.8, note="")]
    longest = [dict(model="smollm2", dtype="float32", config="original-dynamic", cache="dynamic",
                    bytes_per_token=46080, tokens=100_000, vs_dynamic=1.0),
               dict(model="smollm2", dtype="float32", config="kvfx-head-0.5-int4", cache="dynamic",
                    bytes_per_token=3064, tokens=1_500_000, vs_dynamic=15.0),
               dict(model="smollm2", dtype="float32", config="kvfx-kv-0.5", cache="dynamic",
                    bytes_per_token=23040, tokens=180_000, vs_dynamic=1.8)]  # half the bytes, 1.8× < 1.9×
    return dict(bandwidth=25e9, rows=rows, prefill=prefill, longest=longest)


def test_decode_rows_met_and_short_by_how_much(goals):
    text = goals.targets(_res())
    lines = {ln.split(" | ")[3]: ln for ln in text.splitlines() if ln.startswith("| smollm2")}
    assert set(lines) == {"kvfx-head-0.5-int4", "kvfx-kv-0.9375-int4"}  # bytes saved, at 16k; identity saves none
    met = lines["kvfx-head-0.5-int4"]
    assert "| 5.00× |" in met and "| met | 0.62 | met | 3.00× (met) |" in met
    short = lines["kvfx-kv-0.9375-int4"]
    ideal = (500 + 720) / (500 + 90)
    assert f"| 1.33× | {ideal:.2f}× | short by {100 * (1 - (200 / 150) / ideal):.0f} % | 0.13 | short by 74 % |" in short
    assert "0.80× (not met)" in short  # the peer holds more bytes (112.5 MiB) and is faster
    assert "Decode: 1 of 2 rows at or above their bytes-ideal ratio, 1 of 2 at a bandwidth bound ≥ 0.5." in text


def test_faster_original_is_the_reference(goals):
    res = _res()
    res["rows"][1] = _row("kvfx-head-0.5-int4", 40.0, 48.0, static=60.0)  # the static original: 60 ms, faster
    row = next(ln for ln in goals.targets(res).splitlines() if "| kvfx-head-0.5-int4 |" in ln)
    assert "| 1.50× |" in row and "short by" in row  # against the faster original, 60 / 40, not 200 / 40
    res["rows"][1] = _row("kvfx-head-0.5-int4", 40.0, 48.0, static=900.0)  # a slower static original
    row = next(ln for ln in goals.targets(res).splitlines() if "| kvfx-head-0.5-int4 |" in ln)
    assert "| 5.00× |" in row


def test_other_targets_name_what_misses(goals):
    text = goals.targets(_res())
    assert "* Identity projections no slower than the original: not met: kvfx-identity 1 × 16384 0.95×." in text
    assert "* Prefill within 1.15 × the original's time: not met: kvfx-kv-0.9375-int4 1.25×." in text
    assert "not met: kvfx-kv-0.5 (0.50 of the bytes) 1.80× < 1.9×" in text


def test_nothing_to_say_without_target_rows(goals):
    res = _res()
    res = dict(res, rows=[r for r in res["rows"] if r["N"] < 16384], prefill=[], longest=[])
    assert goals.targets(res) == ""


def test_render_prints_a_saved_run_with_its_targets(tmp_path, capsys):
    speed = bench_module("speed.py")
    res = _res() | {"command": ["--models", "smollm2", "--contexts", "16384", "--batches", "1", "--configs",
                                "original-dynamic,kvfx-head-0.5-int4", "--prefill-len", "0"],
                    "machine": "Some CPU, 2 cores", "threads": 2}
    for r in res["rows"]:
        r.update(rss_delta=0, step_extra=0, tokens_per_s=1e3 / r["step_ms"], note="")
    for o in res["longest"]:
        o.update(extra_fixed=0, extra_per_token=0)
    saved, results = tmp_path / "run.json", tmp_path / "RESULTS.md"
    saved.write_text(json.dumps(res))
    results.write_text("# results\n")
    speed.main(["--render", str(saved), "--write", "--results", str(results), "--section", "speed-x"])
    out, text = capsys.readouterr().out, results.read_text()
    assert "Command: `python benchmarks/speed.py --models smollm2 --contexts 16384" in text
    assert "Machine: Some CPU, 2 cores; 2 torch threads" in text
    assert "| smollm2 | float32 | kvfx-head-0.5-int4 | dynamic | 1 | 16384 |" in text
    assert "Issue 15's decode targets" in text and "Issue 15's decode targets" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not a speed.py --json file"):
        speed.main(["--render", str(bad)])
