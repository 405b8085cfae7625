"""User mistakes: each is one line `kvfx <command>: error: <problem>; <fix>`, exit code 2, no traceback, and no
output file left behind. In process (kvfx.cli.main): these fail before or right after a tiny model loads."""
from __future__ import annotations

import pytest

from conftest import error_lines
from kvfx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def fails(capsys, argv, match: str) -> str:
    """Run the command; it must exit 2 with exactly one error line containing `match`."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith(f"kvfx {argv[0]}: error: ") and match in line, line
    return line


@pytest.mark.parametrize("value,match", [("0", "budget 0.0 is outside (0, 1]"), ("1.5", "budget 1.5 is outside (0, 1]"),
                                         ("-0.25", "is outside (0, 1]"), ("quarter", "budget 'quarter' is not a number"),
                                         ("nan", "budget nan is outside (0, 1]")])
def test_budget_outside_range(capsys, tmp_path, value, match):
    out = tmp_path / "p.safetensors"
    fails(capsys, ["calibrate", "default", "--budget", value, "-o", out], match)
    assert not out.exists()


def test_missing_required_and_unknown(capsys):
    fails(capsys, ["calibrate", "default", "-o", "p.safetensors"], "the following arguments are required: --budget")
    fails(capsys, ["eval", "default", "p.safetensors", "--windows", "0"], "'0' is not a whole number >= 1")
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2


def test_bad_model_paths(capsys, tmp_path, refused_dirs):
    fails(capsys, ["explain", tmp_path / "nope"], "does not exist; pass `default`")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    fails(capsys, ["explain", tmp_path / "weights.bin"], "is a file but not a .gguf file")
    fails(capsys, ["explain", tmp_path], "has no config.json")
    fails(capsys, ["explain", refused_dirs["t5"]], "is a t5 model, not a causal language model")
    fails(capsys, ["explain", refused_dirs["gemma2"]], "(Gemma2ForCausalLM) cannot use SDPA attention")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    fails(capsys, ["explain", tmp_path / "broken.gguf"], "transformers cannot read the GGUF file")


def test_bad_data_and_output(capsys, tmp_path, tiny_dir):
    out = tmp_path / "p.safetensors"
    base = ["calibrate", tiny_dir, "--budget", "0.25", "-o", out]
    fails(capsys, base + ["--data", tmp_path / "missing.txt"], "missing.txt not found")
    (tmp_path / "empty.txt").write_text("  \n")
    fails(capsys, base + ["--data", tmp_path / "empty.txt"], "empty.txt is empty")
    (tmp_path / "short.txt").write_text("Only a few words of text.\n")
    fails(capsys, base + ["--data", tmp_path / "short.txt"], "tokens, fewer than one window of 512; give more text")
    fails(capsys, ["calibrate", tiny_dir, "--budget", "0.25", "-o", tmp_path / "no" / "p.safetensors"],
          "does not exist; create it")
    fails(capsys, ["calibrate", tiny_dir, "--budget", "0.25", "-o", tmp_path], "is a directory")
    fails(capsys, base + ["--refine", "-3"], "--refine -3: give a number of training steps >= 0")
    fails(capsys, base + ["--attention-weight", "2"], "'2' is not a number in [0, 1]")
    fails(capsys, base + ["--sinks", "4"], "give the context (tokens) the budget is counted at")
    fails(capsys, ["calibrate", tiny_dir, "--budget", "0.5", "-o", out, "--sinks", "4", "--context", "512"],
          "exact rows come with bits per latent direction")
    fails(capsys, base + ["--data", "builtin:poetry"], "unknown builtin text 'poetry'; use builtin:{wikitext,code")
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_user_text_file_calibrates(capsys, tmp_path, tiny_dir):
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "p.safetensors"
    assert main(["calibrate", str(tiny_dir), "--budget", "0.5", "--data", str(text), "--windows", "50",
                 "--window", "32", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "int8 latents" in captured.out and "fewer than --windows 50: using" in captured.err
    assert main(["info", str(out)]) == 0
    assert "calibration data file mine.txt (sha256 " in capsys.readouterr().out


def test_builtin_domains_and_the_mix_calibrate(capsys, tmp_path, tiny_dir):
    out = tmp_path / "p.safetensors"
    for data, shown in [("builtin:code", "builtin code (calib.txt)"), ("builtin:mix", "builtin mix of wikitext, code")]:
        assert main(["calibrate", str(tiny_dir), "--budget", "0.5", "--data", data, "--windows", "4",
                     "--window", "32", "-o", str(out)]) == 0
        capsys.readouterr()
        assert main(["info", str(out)]) == 0
        assert f"calibration data {shown}" in capsys.readouterr().out
    fails(capsys, ["eval", tiny_dir, out, "--data", "builtin:mix"], "unknown builtin text 'mix'; use builtin:{wikitext")


def test_bad_projections_files(capsys, tmp_path, tiny_dir):
    fails(capsys, ["info", tmp_path / "none.safetensors"], "none.safetensors not found; make one with `kvfx calibrate")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    fails(capsys, ["info", junk], "is corrupt or not a safetensors file")
    fails(capsys, ["eval", tiny_dir, junk, "--windows", "1", "--window", "32"], "is corrupt")
    fails(capsys, ["generate", tiny_dir, junk, "--prompt", "hi"], "is corrupt")


def test_bench_without_checkout(capsys, monkeypatch, tmp_path):
    from kvfx.cli import bench
    assert bench.script().name == "speed.py" and bench.script().is_file()  # this checkout has it
    monkeypatch.setattr(bench, "script", lambda: tmp_path / "benchmarks" / "speed.py")
    fails(capsys, ["bench"], "runs the benchmark script of a source checkout")
