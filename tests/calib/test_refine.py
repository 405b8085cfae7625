"""kvfx.refine: end-to-end (logit-KL) distillation through the live rewrite — gradients reach the projections,
training lowers the held-out KL, the result compresses to exactly what was trained, the model is untouched, and
bad input or a diverging run never yields wrong projections."""
import math

import pytest
import torch

import kvfx
from kvfx.calib.matryoshka import truncate
from kvfx.calib.refine import Refine, refine
from kvfx.passes.compile import CompileOptions, KvfxBackend, compile_isolated
from kvfx.passes.counters import counters

from helpers import compressed_kl, random_projections, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    m = tiny_llama(layers=2, seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(12)  # a peaked next-token distribution: compression errors show in the KL
    return m


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = _model()
    return m, _text(40, 24)


def _text(n: int, length: int) -> torch.Tensor:
    """Token sequences from one fixed sparse Markov chain: held-out sequences look like the training ones."""
    g = torch.Generator().manual_seed(1)
    nxt = torch.randint(3, 64, (64, 3), generator=g)
    seqs = torch.empty(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(3, 64, (n,), generator=g)
    for t in range(1, length):
        seqs[:, t] = nxt[seqs[:, t - 1], torch.randint(3, (n,), generator=g)]
    return seqs


HELD = 4  # held-out sequences (the last ones)


def _compressed_kl(m, proj, ids) -> float:
    return compressed_kl(m, proj, ids[-HELD:])


def test_live_backend_passes_gradients(setup):
    m, ids = setup
    proj = random_projections(m, rank=4, kind="oblique")
    live = proj.to(dtype=torch.float32)
    for p in live.sites.values():
        for kind, t in p.tensors().items():
            setattr(p, kind, t.clone().requires_grad_(True))
    fwd = compile_isolated(m.forward, backend=KvfxBackend(live, CompileOptions(backend="eager"), fold=False, live=True))
    for w in m.parameters():
        w.requires_grad_(False)
    try:
        fwd(input_ids=ids[:1], use_cache=False).logits.square().mean().backward()
    finally:
        for w in m.parameters():
            w.requires_grad_(True)
    assert counters["kvfx"]["live_graphs"] == 1 and counters["kvfx"]["folded_o"] == 0
    for p in live.sites.values():
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in p.tensors().values())
    with pytest.raises(ValueError, match="cannot fold"):
        KvfxBackend(live, fold=True, live=True)


@pytest.mark.parametrize("method,granularity", [("kqsvd", "head"), ("kqsvd", "layer"), ("pca", "head"), ("pca", "layer"),
                                                       ("kqsvd", "kv")])
def test_refine_lowers_held_out_kl_and_compresses_to_it(setup, method, granularity):
    m, ids = setup
    before_state = {k: v.clone() for k, v in m.state_dict().items()}
    start = kvfx.calibrate(m, ids.split(1), method=method, rank=0.5, granularity=granularity, progress=False)
    out = refine(m, start, ids, Refine(steps=20, lr=1e-2, batch=4, eval_sequences=HELD), progress=False)
    rep = out.report["refine"]
    assert rep["fallback"] == 0.0 and rep["kl_after"] < 0.9 * rep["kl_before"]
    assert rep["orthonormal"] == (method == "pca") and rep["train_tokens"] == (len(ids) - HELD) * 24
    # the curve: 10 tenths of the 20 steps, falling; the trained KL is what was returned
    assert len(rep["train_kl"]) == 10 and rep["train_kl"][-1] < rep["train_kl"][0] and rep["kl_trained"] == rep["kl_after"]
    assert out.method == f"{method}+refine" and out.ranks == start.ranks
    assert all(p.shared == (granularity == "kv") for p in out.sites.values())  # a shared latent stays shared
    assert "sites" not in out.report and out.report["start_sites"] == start.report["sites"]  # errors of the start
    # the trained projections, applied by the ordinary (folded, frozen) compress path, give the reported KL
    assert _compressed_kl(m, out, ids) == pytest.approx(rep["kl_after"], rel=2e-3)
    assert _compressed_kl(m, start, ids) == pytest.approx(rep["kl_before"], rel=2e-3)
    # the model is untouched: same weights, trainable again, plain forward
    assert all(torch.equal(v, before_state[k]) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters()) and "forward" not in m.__dict__
    if method == "pca":  # tied and orthonormal stays tied and orthonormal
        for p in out.sites.values():
            a = p.key_down
            assert torch.allclose(a.transpose(1, 2) @ a, torch.eye(a.shape[-1]).expand_as(a.transpose(1, 2) @ a), atol=1e-5)
            assert torch.equal(p.key_up.reshape(a.shape), a)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantization_aware_refine(setup, kind):
    """Refine(quantize=kind) trains through the rounded latents; that compress path gives the reported KL."""
    m, ids = setup
    start = kvfx.calibrate(m, ids.split(1), method="kqsvd", rank=0.5, granularity="kv", progress=False)
    out = refine(m, start, ids, Refine(steps=20, lr=1e-2, batch=4, eval_sequences=HELD, quantize=kind),
                 progress=False)
    rep = out.report["refine"]
    assert rep["quantize"] == kind and rep["fallback"] == 0.0 and rep["kl_after"] < 0.9 * rep["kl_before"]
    assert compressed_kl(m, out, ids[-HELD:], quantize=kind) == pytest.approx(rep["kl_after"], rel=2e-3)
    assert compressed_kl(m, start, ids[-HELD:], quantize=kind) == pytest.approx(rep["kl_before"], rel=2e-3)


def test_nested_training_serves_every_rank(setup):
    m, ids = setup
    start = kvfx.calibrate(m, ids.split(1), method="pca", rank=1.0, progress=False)
    out = refine(m, start, ids, Refine(steps=20, lr=1e-2, batch=4, rank_set=(0.25, 0.5, 0.75), eval_sequences=HELD), progress=False)
    rep = out.report["refine"]
    assert rep["fallback"] == 0.0 and rep["kl_after"] < rep["kl_before"] and rep["rank_set"] == [0.25, 0.5, 0.75]
    assert out.ranks == start.ranks  # full bases; truncate() serves each rank
    gains = [_compressed_kl(m, truncate(out, r), ids) < _compressed_kl(m, truncate(start, r), ids) for r in (0.25, 0.5, 0.75)]
    assert sum(gains) >= 2


def test_saved_and_loaded(setup, tmp_path):
    m, ids = setup
    start = kvfx.calibrate(m, ids.split(1), method="kqsvd", rank=0.5, granularity="layer", progress=False)
    out = refine(m, start, ids, Refine(steps=2, lr=1e-3), progress=False)
    out.save(tmp_path / "p.safetensors")
    back = kvfx.Projections.load(tmp_path / "p.safetensors")
    assert back.method == "kqsvd+refine" and back.report["refine"]["steps"] == 2
    assert all(torch.equal(back.sites[n].value_up, out.sites[n].value_up) for n in out.sites)


def test_deterministic(setup):
    m, ids = setup
    start = kvfx.calibrate(m, ids.split(1), method="kqsvd", rank=0.5, progress=False)
    a = refine(m, start, ids, Refine(steps=4, lr=1e-2), progress=False)
    b = refine(m, start, ids, Refine(steps=4, lr=1e-2), progress=False)
    assert all(torch.equal(a.sites[n].key_down, b.sites[n].key_down) for n in a.sites)


def test_diverging_training_falls_back_to_start(setup, caplog):
    m, ids = setup
    start = kvfx.calibrate(m, ids.split(1), method="kqsvd", rank=0.5, progress=False)
    out = refine(m, start, ids, Refine(steps=3, lr=math.inf), progress=False)
    assert out.report["refine"]["fallback"] == 1.0
    assert math.isnan(out.report["refine"]["kl_trained"])  # training stopped: nothing trained to measure
    assert all(torch.equal(out.sites[n].key_down, start.sites[n].key_down) for n in start.sites)
    assert "refine" in caplog.text
    assert counters["kvfx"]["rewritten"] > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(rank_set=()), "rank_set"),
    (dict(rank_set=(0.5, -1)), "rank_set"), (dict(eval_sequences=-2), "eval_sequences"), (dict(batch=0), "batch"),
    (dict(quantize="int6"), "quantize"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Refine(**kwargs)


def test_training_curve_takes_tenths():
    from kvfx.calib.refine import curve
    assert curve([float(i) for i in range(20)]) == [0.5 + 2 * i for i in range(10)]
    assert curve([1.0, 3.0, 5.0]) == [1.0, 3.0, 5.0] and curve([]) == []


def test_bad_inputs(setup):
    m, ids = setup
    oblique = kvfx.calibrate(m, ids.split(1), method="kqsvd", rank=0.5, progress=False)
    with pytest.raises(ValueError, match="tied projections"):
        refine(m, oblique, ids, Refine(steps=1, orthonormal=True), progress=False)
    with pytest.raises(ValueError, match="no calibration sequences"):
        refine(m, oblique, [], Refine(steps=1), progress=False)
    with pytest.raises(ValueError, match="LongTensors"):
        refine(m, oblique, [ids.float()], Refine(steps=1), progress=False)
    shared = kvfx.calibrate(m, ids.split(1), method="kqsvd", rank=0.5, granularity="kv", progress=False)
    with pytest.raises(ValueError, match="has one"):
        refine(m, shared, ids, Refine(steps=1, rank_set=(0.5, 1.0)), progress=False)
    with pytest.raises(TypeError, match="kvfx.Projections"):
        refine(m, {"a": 1}, ids, Refine(steps=1), progress=False)
    mc = kvfx.compress(torch.compile(m, backend="eager"), oblique)
    try:
        with pytest.raises(ValueError, match="already compressed"):
            refine(mc, oblique, ids, Refine(steps=1), progress=False)
    finally:
        kvfx.decompress(mc)
