"""Provenance in projections files (kvfx/provenance.py), on tiny models.

compress refuses projections recorded for another model or file format, saying what differs, and leaves the
model exactly as it was; files without provenance (older ones, hand-made ones) load and apply as before.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kvfx
from helpers import model_inputs, random_projections, run, tiny_llama
from kvfx.projections import FORMAT_VERSION, ProjectionError, Projections

pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibrated():
    m = tiny_llama(2)
    return m, kvfx.calibrate(m, windows().split(1), method="kqsvd", rank=0.5, progress=False)


def snapshot(m, x):
    return dict(params={k: v.clone() for k, v in m.state_dict().items()}, out=run(m, x))


def assert_untouched(m, x, before):
    after = snapshot(m, x)
    assert "forward" not in m.__dict__ and "generate" not in m.__dict__ and not hasattr(m, "_kvfx")
    assert all(torch.equal(after["params"][k], v) for k, v in before["params"].items())
    assert torch.equal(after["out"], before["out"])


def test_calibrate_stamps_and_file_keeps_it(calibrated, tmp_path):
    m, P = calibrated
    prov = P.provenance
    assert prov["kvfx_version"] == kvfx.__version__ and prov["format_version"] == FORMAT_VERSION
    assert prov["method"] == "kqsvd@head" and prov["data"]["tokens"] == 32
    fp = prov["model"]
    assert fp["architecture"] == "LlamaForCausalLM" and (fp["layers"], fp["heads"], fp["kv_heads"]) == (2, 4, 2)
    assert fp == kvfx.model_fingerprint(m) | {} and len(fp["weights_sha256"]) == 64
    path = tmp_path / "p.safetensors"
    P.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["provenance"])["model"] == fp
    assert "provenance" not in json.loads(meta["report"])  # stored once
    assert Projections.load(path).provenance == json.loads(json.dumps(prov))
    assert not list(tmp_path.glob(".*.tmp"))  # written via a temporary file, renamed


def test_fingerprint_same_weights_any_dtype_other_weights_differ(calibrated):
    m, _ = calibrated
    fp = kvfx.model_fingerprint(m)
    assert kvfx.model_fingerprint(torch.compile(m, backend="eager")) == fp
    half = tiny_llama(2).to(torch.bfloat16)
    from kvfx.provenance import _same_weights
    assert _same_weights(fp, kvfx.model_fingerprint(half))
    assert not _same_weights(fp, kvfx.model_fingerprint(tiny_llama(2, seed=1)))


def test_compress_refuses_other_weights_and_leaves_model_intact(calibrated):
    _, P = calibrated
    other = tiny_llama(2, seed=1)
    x = model_inputs(other)
    before = snapshot(other, x)
    with pytest.raises(ProjectionError, match=r"calibrated for another model: weights differ \(sha256 .*Recalibrate"):
        kvfx.compress(torch.compile(other, backend="eager"), P)
    assert_untouched(other, x, before)
    cm = kvfx.compress(torch.compile(other, backend="eager"), P, check_model=False)  # the escape hatch
    assert run(cm, x).shape == before["out"].shape
    kvfx.decompress(cm)


def test_compress_accepts_the_same_weights_in_a_new_instance(calibrated):
    m, P = calibrated
    cm = kvfx.compress(torch.compile(tiny_llama(2), backend="eager"), P)
    assert run(cm, model_inputs(m)).shape[-1] == 64
    kvfx.decompress(cm)


def test_compress_names_shape_differences(calibrated):
    _, P = calibrated
    P2 = Projections(P.sites, P.shapes, P.method, json.loads(json.dumps(P.report)))
    P2.report["provenance"]["model"]["vocab"] = 99
    m = tiny_llama(2)
    x = model_inputs(m)
    before = snapshot(m, x)
    with pytest.raises(ProjectionError, match="vocab 99 vs this model's 64"):
        kvfx.compress(torch.compile(m, backend="eager"), P2)
    assert_untouched(m, x, before)


def test_compress_refuses_unknown_format_version(calibrated):
    _, P = calibrated
    P2 = Projections(P.sites, P.shapes, P.method, json.loads(json.dumps(P.report)))
    P2.report["provenance"]["format_version"] = FORMAT_VERSION + 1
    m = tiny_llama(2)
    x = model_inputs(m)
    before = snapshot(m, x)
    with pytest.raises(ProjectionError, match=f"kvfx file format {FORMAT_VERSION + 1}.*reads formats 1..{FORMAT_VERSION}"):
        kvfx.compress(torch.compile(m, backend="eager"), P2)
    assert_untouched(m, x, before)


def test_file_without_provenance_loads_and_applies(tmp_path):
    """A format-1 file as written before provenance existed: no provenance, no quantize, nothing checked."""
    m = tiny_llama(2)
    P = random_projections(m, rank=4)
    tensors = {f"{n}/{k}": t for n, s in P.sites.items() for k, t in s.tensors().items()}
    meta = {"format": "kvfx.projections", "format_version": "1", "method": "test", "sites": json.dumps(list(P.sites)),
            "fingerprint": json.dumps({n: s.as_list() for n, s in P.shapes.items()}), "report": "{}"}
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata=meta)
    old = Projections.load(path)
    assert old.provenance == {} and old.quantize is None
    cm = kvfx.compress(torch.compile(tiny_llama(2, seed=5), backend="eager"), old)
    assert cm._kvfx.quantize is None
    kvfx.decompress(cm)


def test_load_refuses_garbled_format_version(tmp_path):
    m = tiny_llama(1)
    P = random_projections(m, rank=4)
    tensors = {f"{n}/{k}": t for n, s in P.sites.items() for k, t in s.tensors().items()}
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"format": "kvfx.projections", "format_version": "two"})
    with pytest.raises(ProjectionError, match="format version 'two'.*corrupt"):
        Projections.load(path)
