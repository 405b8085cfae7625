"""The kvfx command end to end, as a user runs it: `python -m kvfx ...` in a fresh process on real files.

A user's own model (a tiny llama saved with save_pretrained, SmolLM2's tokenizer) goes through calibrate → info →
eval → generate; the bundled SmolLM2 (`default`) through calibrate with tiny settings. Argument errors are in
test_cli_errors.py (in process: they fail before any model loads).
"""
from __future__ import annotations

import re

import pytest

from conftest import error_lines, kvfx_cli


@pytest.fixture(scope="module")
def calibrated(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "p.safetensors"
    res = kvfx_cli("calibrate", tiny_dir, "--budget", "0.25", "--windows", "2", "--window", "32", "-o", out)
    assert res.returncode == 0, res.stderr
    return out, res


def test_calibrate_own_model(calibrated):
    out, res = calibrated
    assert out.is_file()
    # bits per direction (the sites are 32 numbers wide: 16 in int4, 16 in int3 fit 25 % exactly: 9 + 7 bytes of a
    # 64-byte 16-bit row; bands come in 16s)
    assert f"wrote {out}: 2 attention sites, int5x16+int2x16 latents, 0.250 of the 16-bit KV-cache bytes" in res.stdout
    assert "calibration statistics over 2 window(s) of 32 tokens" in res.stderr  # progress on stderr


def test_info(calibrated):
    out, _ = calibrated
    res = kvfx_cli("info", out, "--sites")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for want in ("ranks            32 shared K+V × 2", "latent format    int5x16+int2x16, rotated",
                 "bytes per token  32 (16-bit cache: 128; 0.250 of its bytes)",
                 "rounding         around the calibration means (low-bit latents)",  # weighted Grams: centred
                 "model            LlamaForCausalLM (layers 2, heads 4, kv_heads 2, head_dim 8, vocab 49152",
                 "calibration data builtin mix of wikitext, code, docs, fiction (calibration texts), 64 tokens",
                 "recipe           budget 0.25, kqsvd@kv, int5x16+int2x16", "model.layers.1.self_attn",
                 "model.layers.0.self_attn                 32 shared    16 bytes/token  int5x16+int2x16"):
        assert want in text, text


def test_eval_and_generate(calibrated, tiny_dir):
    out, _ = calibrated
    res = kvfx_cli("eval", tiny_dir, out, "--windows", "1", "--window", "32", "--backend", "eager")
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| original") or line.startswith("| kvfx")]
    assert len(rows) == 2 and rows[0].startswith("| original | 128 |") and rows[1].startswith("| kvfx kqsvd, int5x16+int2x16")
    ppl = [float(v) for row in rows for v in row.strip("| ").split(" | ")[2:]]
    assert all(p > 1 for p in ppl)
    assert "perplexity through the cache" in res.stdout

    res = kvfx_cli("generate", tiny_dir, out, "--prompt", "The capital of France is", "--chat",
                   "--max-new-tokens", "4", "--backend", "eager")
    assert res.returncode == 0, res.stderr
    rows = {line.split(" | ")[0]: line.split(" | ") for line in res.stdout.splitlines() if line.startswith("| ")}
    original = next(v for k, v in rows.items() if k.startswith("| original"))
    kvfx_row = next(v for k, v in rows.items() if k.startswith("| kvfx"))
    assert int(kvfx_row[1]) * 3 < int(original[1])  # bands in 21.9 % of 16-bit vs the float32 original: 1/9
    assert float(kvfx_row[-1].strip(" |")) > 0


def test_projections_of_another_model_refused(calibrated, other_dir, tmp_path):
    out, _ = calibrated
    res = kvfx_cli("eval", other_dir, out, "--windows", "1", "--window", "32", "--backend", "eager")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    [line] = error_lines(res.stderr)
    assert line.startswith("kvfx eval: error: These projections were calibrated for another model: weights differ")


@pytest.mark.slow
def test_calibrate_default_model(tmp_path):
    """The bundled SmolLM2, as the README's quick start runs it (tiny settings)."""
    out = tmp_path / "smollm2.safetensors"
    res = kvfx_cli("calibrate", "default", "--budget", "0.125", "--windows", "1", "--window", "64", "--per-direction",
                   "-o", out)
    assert res.returncode == 0, res.stderr
    # bits per direction; 64 tokens span few directions, so the bands may keep fewer bytes than the budget allows
    found = re.search(r"30 attention sites, ((int\d+x\d+\+?)+|bits per direction \(30 site formats\)) latents, "
                      r"(0\.\d+) of the 16-bit KV-cache bytes", res.stdout)
    assert found and 0.05 < float(found.group(3)) <= 0.125, res.stdout
    res = kvfx_cli("info", out)
    assert "LlamaForCausalLM (layers 30, heads 9, kv_heads 3, head_dim 64, vocab 49152" in res.stdout


def test_user_mistake_is_one_line_exit_2_no_file(tmp_path):
    out = tmp_path / "p.safetensors"
    res = kvfx_cli("calibrate", "default", "--budget", "1.5", "-o", out)
    assert res.returncode == 2 and res.stdout == "" and not out.exists()
    assert res.stderr.strip().splitlines() == [
        "kvfx calibrate: error: argument --budget: budget 1.5 is outside (0, 1]; give the fraction of the 16-bit "
        "KV-cache bytes to keep, e.g. --budget 0.25 for a 4x smaller cache (see `kvfx calibrate --help`)"]
