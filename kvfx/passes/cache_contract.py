"""The interface between kvfx's cache layers (kvfx/cache.py) and the matcher (match.py).

The cache's projection tensors are attributes of its layers; Dynamo names a graph input after the attribute it
was read from (`...layers[3].kvfx_key_up`), and that name is all the matcher sees. The names live here, once:
the cache sets them and the matcher reads them, and tests/passes/test_cache_contract.py fails if either side
drifts (a site over a renamed attribute would be traced as if there were no low-rank cache at all).
"""
from __future__ import annotations

KEY_DOWN, KEY_UP = "kvfx_key_down", "kvfx_key_up"          # write: k·A; read: K̃·Bᵀ
VALUE_DOWN, VALUE_UP = "kvfx_value_down", "kvfx_value_up"  # write: v·C; read: Ṽ·Dᵀ
PROJECTION_ATTRS = (KEY_DOWN, KEY_UP, VALUE_DOWN, VALUE_UP)
DOWN_OF_UP = {KEY_UP: KEY_DOWN, VALUE_UP: VALUE_DOWN}  # the cache write that pairs with a reconstruction


def attribute(source_name: str | None) -> str | None:
    """The cache projection attribute a graph input was read from (its source name's last attribute), or None."""
    last = (source_name or "").rsplit(".", 1)[-1]
    return last if last in PROJECTION_ATTRS else None
