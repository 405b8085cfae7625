"""Coverage: every architecture of archs.ARCHS through explain -> calibrate -> compress -> forward (-> generate).

Supported architectures: explain finds one SDPA site per layer with the right heads / kv heads / head_dim /
RoPE / folds; full-rank identity projections reproduce the model (rel err <= 1e-5); calibrated rank-R
projections equal an independent low-rank reference (transformers' own SDPA attention on q·B, k·A, v·C, then
·Dᵀ; a plain-torch re-implementation for the hand-written module) and do change the output; decoders' compiled
generate equals eager generate of the UNcompressed model with kvfx.LowRankCache(P) (tokens and logits).
Unsupported architectures fail loudly with "unsupported: ..." from explain, calibrate and compress.
"""
import functools

import pytest
import torch

import archs
import kvfx
from kvfx.passes.compile import UnsupportedAttention

SUPPORTED = [a.name for a in archs.ARCHS if a.supported]
UNSUPPORTED = [a.name for a in archs.ARCHS if not a.supported]
DECODERS = [a.name for a in archs.ARCHS if a.supported and a.decoder]


@functools.lru_cache(maxsize=None)
def _calibrated(name: str):
    """(model, projections) per architecture, calibrated once per test session (kqsvd, rank 4 of 8)."""
    arch = archs.BY_NAME[name]
    model = arch.model()
    return model, archs.calibrate(arch, model)


def _layers(model) -> int:
    cfg = getattr(model, "config", None)
    return len(model.layers) if cfg is None else cfg.num_hidden_layers


@pytest.mark.parametrize("name", [a.name for a in archs.ARCHS])
def test_explain(name):
    arch = archs.BY_NAME[name]
    model = arch.model()
    text, exp = archs.explain_text(model)
    if not arch.supported:
        assert exp.rows == [] and "0 attention sites" in text
        assert "unsupported: no scaled_dot_product_attention call found" in text
        return
    cfg = getattr(model, "config", None)
    heads = cfg.num_attention_heads if cfg is not None else model.layers[0].attn.heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) if cfg is not None else model.layers[0].attn.kv_heads
    assert len(exp.rows) == _layers(model), text
    assert exp.graph_breaks == 0, text
    for row in exp.rows:
        assert (row.heads, row.kv_heads, row.head_dim) == (heads, kv, 8), text
        assert row.status == "ok", text
        assert row.rope == arch.rope, text
        assert row.foldable == arch.folds, text


@pytest.mark.parametrize("name", SUPPORTED)
def test_calibrate_compress_forward(name):
    arch = archs.BY_NAME[name]
    model, P = _calibrated(name)
    assert len(P.sites) == _layers(model)
    assert all(p.key_rank == archs.RANK and p.value_rank == archs.RANK for p in P.sites.values())
    # full rank, identity projections: the model itself
    assert archs.check_identity(arch, model, P) <= 1e-5
    # the reference is faithful: at identity it is the model too (so the rank-R comparison below means something)
    ids = archs.eval_ids()
    kw = {"use_cache": False} if arch.decoder else {}
    ident = archs.identity_projections(P)
    assert archs.rel_err(archs.reference(arch, model, ident, ids), archs.forward(model, ids, **kw)) <= 1e-5
    # rank R: equal to the low-rank reference, and really different from the model
    err, change = archs.check_lowrank(arch, model, P)
    assert err <= 1e-4, (err, change)
    assert change > 1e-3, (err, change)
    assert kvfx.counters["kvfx"]["rewritten"] == 2 * _layers(model)   # identity + rank R


@pytest.mark.parametrize("name", DECODERS)
def test_generate_matches_lowrank_cache(name):
    arch = archs.BY_NAME[name]
    model, P = _calibrated(name)
    got, expected = archs.check_generate(arch, model, P, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.sequences.shape[1] == archs.PROMPT + archs.NEW
    for a, b in zip(got.logits, expected.logits):
        assert archs.rel_err(a, b) <= 1e-4
    c = kvfx.counters["kvfx"]
    assert c["reassociated"] > 0 and c["reassociated"] == c["rewritten"]  # the cache path, every graph


def _projections_for(model) -> kvfx.Projections:
    """Identity projections named after the model's attention modules (calibration is impossible here)."""
    from kvfx.projections import SiteProjection, SiteShape
    if getattr(model, "config", None) is None:
        names, shape = [f"layers.{i}.attn" for i in range(len(model.layers))], SiteShape(4, 4, 8)
    else:
        c = model.config
        names = [f"model.layers.{i}.self_attn" for i in range(c.num_hidden_layers)]
        shape = SiteShape(c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    return kvfx.Projections({n: SiteProjection.identity(shape.kv_heads, shape.head_dim) for n in names},
                            {n: shape for n in names})


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_fails_clearly(name):
    arch = archs.BY_NAME[name]
    model = arch.model()
    with pytest.raises(ValueError, match=f"unsupported: .*({arch.reason})"):
        archs.calibrate(arch, model)
    cm = kvfx.compress(torch.compile(model, backend="eager"), _projections_for(model))
    with pytest.raises(UnsupportedAttention, match=f"unsupported: .*({arch.reason})"):
        archs.forward(cm, archs.eval_ids())
    assert not hasattr(model, "_kvfx") and "forward" not in model.__dict__   # compress undone


def test_gemma2_has_no_sdpa_in_transformers():
    """Why Gemma2 is unsupported: transformers itself refuses SDPA for it (no logit softcapping in SDPA)."""
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        archs._hf("Gemma2Config", "Gemma2ForCausalLM", attn="sdpa", **archs._LLAMA_LIKE)
