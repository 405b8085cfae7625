"""kvfx: low-rank KV-cache compression for any torch.compile'd transformer, as an FX graph pass.

    projections = kvfx.calibrate(model, batches, method="kqsvd", rank=0.5)
    projections = kvfx.best_config(model, batches, budget=0.25)   # or: the best known recipe for a byte budget
    model = kvfx.compress(torch.compile(model), projections)

The `kvfx` command (kvfx/cli) wraps the same calls: kvfx explain / calibrate / eval / generate / bench / info.
"""
from .cache import LowRankCache
from .calib.allocate import Budget
from .calib.bits import allocate_bits
from .calib.refine import Refine, refine
from .calib.collect import calibrate
from .calib.matryoshka import truncate
from .calib.sensitivity import allocate, sensitivity
from .compress import compress, decompress, make_cache
from .evaluate import cache_perplexities
from .explain import Explanation, explain
from .passes.compile import UnsupportedAttention
from .passes.counters import counters
from .projections import Projections, ProjectionError, SiteProjection, SiteShape
from .provenance import model_fingerprint
from .recipe import best_config
from .rotate import rotate_latents

__version__ = "0.1.0"


__all__ = ["calibrate", "best_config", "compress", "decompress", "make_cache", "cache_perplexities", "explain", "Explanation",
           "Budget", "Refine", "refine", "sensitivity", "allocate", "truncate", "rotate_latents", "allocate_bits",
           "Projections", "SiteProjection", "SiteShape", "ProjectionError", "UnsupportedAttention", "LowRankCache",
           "counters", "model_fingerprint"]
