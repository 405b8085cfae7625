"""Rewritten graphs compute the low-rank attention they claim to, checked against plain-PyTorch references.

Full-rank identity projections must reproduce the model; rank-R projections must equal helpers' independent
reference softmax((q·B_i)(k·A)ᵀ/sqrt(d))·(v·C)·D_iᵀ (a transformers attention function or, for the
hand-written model, a re-implementation of its forward). All float32.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvfx
from archs import compressed_copy
from helpers import (hand_model, hand_reference, identity_projections, model_inputs, random_projections,
                     reference_model, rel_err, run, tiny_gpt2, tiny_llama)

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "hand": hand_model}


def reference(model, projections, x, **kw):
    if model.__class__.__name__ == "HandModel":
        return hand_reference(model, x, projections)
    return run(reference_model(model, projections), x, **kw)


# ---------------------------------------------------------------------------------------------- full rank
@pytest.mark.parametrize("name,backend", [("llama", "inductor"), ("gpt2", "eager"), ("hand", "eager")])
def test_identity_full_rank_reproduces_model(name, backend):
    m = MODELS[name](1 if backend == "inductor" else 2)
    x = model_inputs(m, batch=2)
    expected = run(m, x)
    out = run(compressed_copy(m, identity_projections(m), backend), x)
    assert rel_err(out, expected) <= 1e-5
    assert kvfx.counters["kvfx"]["rewritten"] == len(identity_projections(m).sites)


@pytest.mark.parametrize("name", ["llama", "gpt2", "hand"])
def test_reference_is_faithful_at_identity(name):
    """The reference itself: with identity projections it is the original model."""
    m = MODELS[name](2)
    x = model_inputs(m, batch=2)
    assert rel_err(reference(m, identity_projections(m), x), run(m, x)) <= 1e-5


def test_low_rank_changes_the_output():
    """Guard against vacuous comparisons: rank 4 of 8 really changes the logits."""
    m = tiny_llama(2)
    x = model_inputs(m)
    assert rel_err(reference(m, random_projections(m, 4), x), run(m, x)) > 1e-2


# ---------------------------------------------------------------------------------------------- rank R
@pytest.mark.parametrize("kind", ["orthonormal", "oblique"])
def test_llama_low_rank(kind):
    m = tiny_llama(2)
    P = random_projections(m, rank=4, kind=kind, seed=3)
    x = model_inputs(m, batch=2)
    out = run(compressed_copy(m, P), x)
    assert rel_err(out, reference(m, P, x)) <= 1e-4
    c = kvfx.counters["kvfx"]
    assert (c["rewritten"], c["folded_o"], c["folded_q"], c["folded_k"]) == (2, 2, 0, 0)  # RoPE: q/k stay


@pytest.mark.parametrize("kind,use_cache", [("orthonormal", False), ("oblique", False), ("oblique", True)])
def test_gpt2_low_rank(kind, use_cache):
    m = tiny_gpt2(2)
    P = random_projections(m, rank=3, kind=kind, seed=4)
    x = model_inputs(m, batch=2)
    out = run(compressed_copy(m, P), x, use_cache=use_cache)
    assert rel_err(out, reference(m, P, x, use_cache=use_cache)) <= 1e-4
    c = kvfx.counters["kvfx"]
    folded = [c[f"folded_{x}"] for x in "qkvo"]
    # without a cache everything folds into c_attn / c_proj; transformers' DynamicCache keeps full keys/values
    assert folded == ([2, 2, 2, 2] if not use_cache else [2, 0, 0, 2])


@pytest.mark.parametrize("kind", ["orthonormal", "oblique"])
def test_hand_low_rank(kind):
    m = hand_model(2)
    P = random_projections(m, rank=5, kind=kind, seed=5)
    x = model_inputs(m, batch=3)
    assert rel_err(run(compressed_copy(m, P), x), reference(m, P, x)) <= 1e-4
    c = kvfx.counters["kvfx"]
    assert [c[f"folded_{x}"] for x in "qkvo"] == [2, 2, 2, 2]


@pytest.mark.parametrize("name", ["gpt2", "hand"])
def test_fold_off_matches_fold_on(name):
    """fold=False keeps every matmul (nothing folded) and computes the same thing."""
    m = MODELS[name](2)
    P = random_projections(m, rank=4, kind="oblique", seed=6)
    x = model_inputs(m)
    kw = dict(use_cache=False) if name == "gpt2" else {}
    folded = run(compressed_copy(m, P), x, **kw)
    torch._dynamo.reset()
    kvfx.counters.clear()
    plain = run(compressed_copy(m, P, fold=False), x, **kw)
    assert rel_err(plain, folded) <= 1e-5
    assert kvfx.counters["kvfx"]["rewritten"] == 2
    assert not any(kvfx.counters["kvfx"][f"folded_{x}"] for x in "qkvo")


def test_sites_get_their_own_projection():
    """Swapping the two layers' projections must change the result (each site reads its own A, B, C, D)."""
    m = hand_model(2)
    P = random_projections(m, rank=4, seed=7)
    names = list(P.sites)
    swapped = kvfx.Projections({names[0]: P.sites[names[1]], names[1]: P.sites[names[0]]}, P.shapes, "test")
    x = model_inputs(m)
    out = run(compressed_copy(m, swapped), x)
    assert rel_err(out, reference(m, swapped, x)) <= 1e-4
    assert rel_err(out, reference(m, P, x)) > 1e-3


def test_gqa_groups_use_their_kv_heads_b_and_d():
    """Query head i must use kv group i // 2: make the two kv heads' B and D very different."""
    m = tiny_llama(1)
    P = random_projections(m, rank=4, kind="oblique", seed=8)
    for p in P.sites.values():
        p.key_up[1] *= 3.0
        p.value_up[1] = -p.value_up[1]
    x = model_inputs(m)
    assert rel_err(run(compressed_copy(m, P), x), reference(m, P, x)) <= 1e-4


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rank=st.integers(1, 8), kind=st.sampled_from(["orthonormal", "oblique"]), seed=st.integers(0, 1000),
       tokens=st.integers(1, 7))
def test_hand_any_rank(rank, kind, seed, tokens):
    torch._dynamo.reset()
    m = hand_model(1, seed=seed)
    P = random_projections(m, rank=rank, kind=kind, seed=seed)
    x = model_inputs(m, tokens=tokens, seed=seed)
    assert rel_err(run(compressed_copy(m, P), x), reference(m, P, x)) <= 1e-4
