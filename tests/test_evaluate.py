"""kvfx.cache_perplexities (kvfx/evaluate.py): the cache path scores what the forward scores, and windows run side
by side give the numbers they give one at a time."""
from __future__ import annotations

import pytest
import torch

import kvfx
from helpers import VOCAB, random_projections, tiny_llama


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))


def test_original_cache_path_equals_its_forward_and_batches_agree(windows):
    from transformers import DynamicCache
    m = tiny_llama(2)
    one = kvfx.cache_perplexities(m, windows, lambda: DynamicCache(config=m.config), chunk=4, progress=False)
    assert one["cached_second_half"] == pytest.approx(one["forward_second_half"], rel=1e-5)
    three = kvfx.cache_perplexities(m, windows, lambda: DynamicCache(config=m.config), chunk=4, progress=False,
                                    batch_size=3)
    assert three == pytest.approx(one, rel=1e-5)


def test_compressed_int4_cache_batches_agree(windows):
    m = tiny_llama(2, head_dim=32)
    cm = kvfx.compress(torch.compile(m, backend="eager"), random_projections(m, rank=16), quantize="int4")
    one = kvfx.cache_perplexities(cm, windows, lambda: kvfx.make_cache(cm), chunk=8, progress=False)
    two = kvfx.cache_perplexities(cm, windows, lambda: kvfx.make_cache(cm), chunk=8, progress=False, batch_size=2)
    assert two == pytest.approx(one, rel=1e-5)
    kvfx.decompress(cm)


def test_bad_arguments_are_refused(windows):
    m = tiny_llama(1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        kvfx.cache_perplexities(m, windows, lambda: None, batch_size=0)
    with pytest.raises(ValueError, match="windows must be"):
        kvfx.cache_perplexities(m, windows[0], lambda: None)
