"""The cache ↔ matcher interface (kvfx/passes/cache_contract.py): the cache's layers carry exactly the attribute
names the matcher looks for, and a compressed decode graph is matched as reading kvfx's cache. If either side is
renamed, these fail instead of the site silently being traced as a plain (uncompressed) one."""
import copy

import pytest
import torch

import kvfx
from helpers import model_inputs, random_projections, tiny_llama
from kvfx.compress import cache_kwarg
from kvfx.passes import cache_contract as cc


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cache_layers_carry_the_contract_attributes(kind):
    m = tiny_llama(1)
    cache = kvfx.LowRankCache(random_projections(m, rank=4), kind, max_cache_len=16)
    for layer in cache.layers:
        assert all(isinstance(getattr(layer, a, None), torch.Tensor) for a in cc.PROJECTION_ATTRS)
    assert cc.attribute("L['cache'].layers[0].kvfx_key_up") == cc.KEY_UP
    assert cc.attribute("L['cache'].layers[0].kvfx_key_upx") is None


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_step_over_kvfx_cache_is_matched_as_reading_it(kind):
    """explain traces a step that reads kvfx's cache: every site's keys and values come from the low-rank cache."""
    m = tiny_llama(2)
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), random_projections(m, rank=4), cache=kind)
    cache = kvfx.make_cache(cm, kind, max_cache_len=16)
    with torch.no_grad():
        cm(model_inputs(m, tokens=5), **{cache_kwarg(m): cache})
    rows = kvfx.explain(cm, model_inputs(m, tokens=1), **{cache_kwarg(m): cache}, print_table=False).rows
    assert len(rows) == 2 and all(r.cache == "lowrank" and r.status == "ok" for r in rows), rows
