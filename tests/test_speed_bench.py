"""benchmarks/speed.py: the --quick setting end to end (a subprocess: fresh Dynamo, own threads) and its refusals of
bad input (in process: they exit before any model is built)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import bench_module

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "speed.py"


def _has_quanto() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


HAS_QUANTO = _has_quanto()


@pytest.fixture(scope="module")
def speed():
    return bench_module("speed.py")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run: its JSON rows, its stdout and the RESULTS.md it wrote (a copy with another section)."""
    out = tmp_path_factory.mktemp("speed")
    rows, results = out / "rows.json", out / "RESULTS.md"
    results.write_text("# kvfx benchmark results\n\n## Another section\n\nkeep me\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(rows), "--write",
                           "--results", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(rows.read_text()), proc.stdout, results.read_text()


def _expected() -> set[tuple[str, str]]:
    want = {("original-dynamic", "dynamic"), ("original-static", "static"), ("kvfx-kv-0.5", "dynamic"),
            ("kvfx-kv-0.5", "static")}
    return want | ({("peer-quanto-int4", "quantized")} if HAS_QUANTO else set())


def test_quick_rows_and_ratios(quick):
    res = quick[0]
    rows = {(r["config"], r["cache"]): r for r in res["rows"]}
    assert set(rows) == _expected()
    assert res["bandwidth"] > 0
    for r in rows.values():
        assert (r["batch"], r["N"]) == (1, 256)
        for key in ("step_ms", "tokens_per_s", "cache_bytes", "vs_dynamic", "vs_static", "bytes_ideal",
                    "bw_fraction", "read_bw"):
            assert r[key] is not None and r[key] > 0, (r["config"], key, r[key])
        assert r["tokens_per_s"] == pytest.approx(1e3 / r["step_ms"])
        # the bandwidth bound divides by the read bandwidth measured beside the row, not the run's first probe
        assert r["bw_fraction"] == pytest.approx((r["weight_bytes"] + r["cache_bytes"]) / r["read_bw"]
                                                 / (r["step_ms"] / 1e3))
    assert rows[("original-dynamic", "dynamic")]["vs_dynamic"] == 1.0
    assert rows[("original-static", "static")]["vs_static"] == 1.0
    full = rows[("original-dynamic", "dynamic")]["cache_bytes"]
    assert full == 2 * 2 * 2 * 256 * 64 * 4  # layers · K and V · kv heads · N · head_dim · float32
    # a shared K+V latent at 0.5 of 2·h·d: half the bytes; kvfx rewrote every site of the compiled decode
    kv = rows[("kvfx-kv-0.5", "dynamic")]
    assert kv["cache_bytes"] == full // 2 and kv["bytes_ideal"] > 1
    assert kv["kvfx_counters"].get("rewritten", 0) >= 2
    if HAS_QUANTO:  # int4 codes + per-group scale and shift: under a third of the float32 cache
        assert rows[("peer-quanto-int4", "quantized")]["cache_bytes"] < full / 3
    prefill = {(p["config"], p["cache"]): p for p in res["prefill"]}
    assert set(prefill) == _expected() and all(p["ms"] > 0 and p["vs_dynamic"] > 0 for p in prefill.values())
    longest = {(o["config"], o["cache"]): o for o in res["longest"]}
    assert set(longest) == _expected() and all(o["tokens"] > 0 for o in longest.values())
    # a preallocated half-size cache: about twice the tokens (a growing one also counts its spare storage)
    assert longest[("kvfx-kv-0.5", "static")]["vs_dynamic"] > 1.5


def test_quick_prints_and_writes_the_tables(quick):
    _, stdout, results = quick
    assert "read bandwidth" in stdout and "| model | dtype | config | cache | batch | N |" in stdout
    for config, kind in _expected():
        assert f"| {config} | {kind} | 1 | 256 |" in stdout
    if not HAS_QUANTO:
        assert "skip: peer-quanto-int4" in stdout
    assert "keep me" in results and results.count("## Decode speed") == 1
    assert "Command: `python benchmarks/speed.py --quick --threads 1" in results
    assert "| kvfx-kv-0.5 | static | 1 | 256 |" in results


def test_write_replaces_its_section(speed, tmp_path):
    path = tmp_path / "RESULTS.md"
    speed.write_results("first\n", path)
    speed.write_results("second\n", path)
    text = path.read_text()
    assert text.count("## Decode speed") == 1 and "second" in text and "first" not in text


@pytest.fixture
def restore_torch_state():
    """main() sets the thread count and Dynamo's recompile limit before it plans (and refuses)."""
    threads, limit = torch.get_num_threads(), torch._dynamo.config.recompile_limit
    yield
    torch.set_num_threads(threads)
    torch._dynamo.config.recompile_limit = limit


@pytest.mark.parametrize("argv, message", [
    (["--configs", "kvfx-foo-0.5"], "unknown configuration"),
    (["--configs", "kvfx-kv-1.5"], "unknown configuration"),
    (["--models", "gpt5"], "unknown 'gpt5'"),
    (["--dtype", "int8"], "unknown 'int8'"),
    (["--contexts", "40000"], "--contexts must be between"),
    (["--batches", "1@65536"], "contexts up to"),
    (["--warmup", "1"], "--warmup ≥ 3"),
    (["--memory-budget", "lots"], "--memory-budget"),
    # asked for explicitly, more than the budget holds: refused before anything is allocated, saying what fits
    (["--models", "llama-tiny", "--contexts", "32768", "--batches", "512", "--memory-budget", "2GiB"],
     "drop it or raise --memory-budget"),
])
def test_bad_input_exits_2(speed, capsys, restore_torch_state, argv, message):
    with pytest.raises(SystemExit) as e:
        speed.main(argv + ["--threads", "1"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_too_large_says_what_fits(speed, capsys, restore_torch_state):
    with pytest.raises(SystemExit):
        speed.main(["--models", "llama-tiny", "--contexts", "32768", "--batches", "512", "--memory-budget", "2GiB",
                    "--threads", "1"])
    err = capsys.readouterr().err
    assert "llama-tiny float32 batch 512 × N 32768 needs" in err and "at batch 512 N ≤" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_gpu_exits_2(speed, capsys):
    with pytest.raises(SystemExit) as e:
        speed.main(["--quick", "--device", "cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cuda" in err


def test_parse_bytes(speed):
    from speed_setup import parse_bytes
    assert parse_bytes("8GiB") == 8 * 2 ** 30 and parse_bytes("512MiB") == 2 ** 29
    assert parse_bytes("8e9") == 8 * 10 ** 9 and parse_bytes("1.5G") == 1.5e9
    with pytest.raises(ValueError):
        parse_bytes("8 parsecs")


def test_bits_configs_name_their_band_levels(speed):
    from speed_setup import parse_config
    now, before = parse_config("kvfx-kv-bits-0.25"), parse_config("kvfx-kv-bits842-0.125")
    assert (now.quantize, now.rank, now.levels) == ("bits", 0.25, (8, 4, 3, 2))
    assert (before.quantize, before.rank, before.levels) == ("bits", 0.125, (8, 4, 2))  # as measured before int3
    assert parse_config("kvfx-kv-bits5-0.25").levels == (8, 5, 4, 3, 2)  # with int5, the recipe's bands
    assert parse_config("kvfx-kv-bits5e8-0.125").levels == (8, 5, 4, 3, "e8")  # e8 lattice codes in int2's place
    assert now.exact == (0, 0) and parse_config("kvfx-kv-bits-0.125-s4r32-decoded").exact == (4, 32)
    assert parse_config("kvfx-kv-bits-0.125-s4r32-decoded").decoded  # exact rows: sinks 4, recent 32
    assert parse_config("kvfx-kv-bits-0.125-uncentred").uncentred and not now.uncentred
    assert parse_config("kvfx-kv-bits5e8-0.125-rw0.5").rounding_weight == 0.5 and now.rounding_weight == 1.0
    for bad in ("kvfx-kv-bits842-1.5", "kvfx-kv-bits-0.125-s4", "kvfx-kv-0.5-int4-s4r32", "kvfx-kv-bits5-0.25-rw1.5",
                "kvfx-kv-bits5-0.25-rw0", "kvfx-kv-0.5-int4-rw0.5"):
        with pytest.raises(ValueError, match="unknown configuration"):
            parse_config(bad)


def test_decoded_configs_switch_the_integer_path_off(speed):
    """'-decoded': the same low-bit configuration with its rows decoded to float32 in the kernel (KVFX_NO_AMX=1 while
    its rows run); '-avx2int': with the kernel's opt-in AVX2 integer path (KVFX_AVX2_INTEGER=1); '-tile': int4 rows
    of few query rows on AMX's tile unit instead of VNNI (KVFX_NO_VNNI=1). So the paths are measured side by side in one run."""
    from speed_setup import parse_config
    assert parse_config("kvfx-kv-bits-0.125-decoded").decoded and parse_config("kvfx-head-0.5-int4-decoded").decoded
    assert parse_config("kvfx-head-0.5-int4-avx2int").avx2_integer and parse_config("kvfx-kv-bits-0.125-avx2int").avx2_integer
    plain = parse_config("kvfx-head-0.5-int4")
    assert not plain.decoded and not plain.avx2_integer and not plain.tile
    tile = parse_config("kvfx-head-0.5-int4-tile")
    assert tile.tile and not tile.decoded
    with pytest.raises(ValueError, match="unknown configuration"):
        parse_config("kvfx-head-0.5-decoded")  # 16-bit latents have no integer path to switch


def test_linear_configs_side_by_side(speed, monkeypatch):
    """'-atenlinear': a kvfx configuration with its linears left to ATen (KVFX_NO_DECODE_LINEAR=1 while it runs);
    original-*-kvfxlinear: the original compiled with kvfx's decode linears alone. So what the matrix-vector
    kernel gains is measured apart from what the compressed cache gains, in one run."""
    import kvfx
    from helpers import model_inputs, tiny_llama
    from speed_setup import kvfx_linear_backend, parse_config
    assert parse_config("kvfx-head-0.5-int4-atenlinear").aten_linear and parse_config("kvfx-identity-atenlinear").aten_linear
    assert parse_config("kvfx-kv-bits5-0.25-atenlinear").aten_linear and not parse_config("kvfx-kv-bits5-0.25").aten_linear
    orig = parse_config("original-dynamic-kvfxlinear")
    assert orig.kvfx_linear and orig.family == "original" and orig.kinds(["static"]) == ["dynamic"]
    with pytest.raises(ValueError, match="unknown configuration"):
        parse_config("original-dynamic-atenlinear")
    m = tiny_llama(1)
    ids = model_inputs(m, tokens=4)
    with torch.no_grad():
        want = m(ids).logits
        got = torch.compile(m.forward, backend=kvfx_linear_backend({"backend": "eager"}))(ids).logits
    assert kvfx.counters["kvfx"]["decode_linears"] == 8  # q, k, v, o, gate, up, down, lm_head
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix, env", [("-pyattend", "KVFX_NO_DECODE_KERNEL"), ("-bmm", "KVFX_NO_DECODE_MATMUL"),
                                         ("-ungrouped", "KVFX_NO_LINEAR_GROUPS")])
def test_switch_suffixes_set_their_switch_while_the_configuration_runs(speed, monkeypatch, suffix, env):
    """'-pyattend': a kvfx configuration whose decode attention goes through the Python op
    (KVFX_NO_DECODE_KERNEL=1 while it runs, removed after): the C++ op's saving measured in one run; '-bmm': its
    decode step's small matmuls left to ATen (KVFX_NO_DECODE_MATMUL=1), likewise."""
    import os
    from speed_setup import Applied, parse_config
    c = parse_config("kvfx-head-0.5-int4-atenlinear-pyattend")
    assert c.py_attend and c.aten_linear and c.quantize == "int4" and not parse_config("kvfx-head-0.5-int4").py_attend
    assert parse_config("kvfx-kv-bits5-0.25-atenlinear-pyattend").py_attend
    assert parse_config("kvfx-head-0.5-int4-pyattend-bmm").bmm and not parse_config("kvfx-head-0.5-int4").bmm
    assert parse_config("kvfx-head-0.5-int4-bmm-ungrouped").ungrouped
    for wrong in ("kvfx-head-0.5-pyattend-atenlinear", "kvfx-head-0.5-bmm-pyattend"):
        with pytest.raises(ValueError, match="unknown configuration"):
            parse_config(wrong)  # the suffixes' order is fixed
    monkeypatch.setattr("speed_setup.projections_for", lambda *a: None)
    monkeypatch.setattr("speed_setup.kvfx.compress", lambda *a, **k: None)
    monkeypatch.setattr("speed_setup.kvfx.decompress", lambda *a, **k: None)
    monkeypatch.delenv(env, raising=False)
    applied = Applied(torch.nn.Linear(2, 2), parse_config("kvfx-head-0.5-int4" + suffix), "dynamic", {}, {}, {})
    assert os.environ.get(env) == "1"
    applied.undo()
    assert env not in os.environ


def test_integer_agreement_refuses_unknown_names_before_loading():
    """benchmarks/integer_agreement.py: a configuration or domain it does not know is refused (exit 2, naming what
    it takes) before the model loads."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "integer_agreement.py"), "--configs", "kv-0.3-int4",
                        "--domains", "poetry"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "kv-0.3-int4, poetry" in r.stderr and "kv-0.9375-int4" in r.stderr


def test_step_ab_interleaves_two_configurations():
    """benchmarks/step_ab.py: two configurations built side by side, their steps alternating, each with only its
    own switches set; one line with both medians and A / B. Unknown names are refused before any model loads."""
    script = str(ROOT / "benchmarks" / "step_ab.py")
    r = subprocess.run([sys.executable, script, "kvfx-head-0.5-int4", "kvfx-head-0.5-int4-bmm-ungrouped", "--model",
                        "llama-tiny", "--context", "64", "--steps", "3", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    assert "interleaved: kvfx-head-0.5-int4 " in line and "kvfx-head-0.5-int4-bmm-ungrouped" in line and "A / B" in line
    assert "KVFX_NO_DECODE_MATMUL" not in r.stderr
    r = subprocess.run([sys.executable, script, "kvfx-head-0.5-int4", "kvfx-head-2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unknown configuration 'kvfx-head-2'" in r.stderr


def test_step_ab_interleaves_prefills():
    """--prefill N: prompts of N tokens into fresh caches, alternating; a shared low-bit latent (kvfx::quantize
    writes its rows) against the original."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_ab.py"), "original-dynamic", "kvfx-kv-0.5-int4",
                        "--model", "llama-tiny", "--prefill", "40", "--steps", "2", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    assert "prefill of 40 tokens" in line and "kvfx-kv-0.5-int4" in line and "A / B" in line
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_ab.py"), "original-dynamic", "kvfx-kv-0.5-int4",
                        "--prefill", "-3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "need --prefill >= 0" in r.stderr  # refused before any model loads
