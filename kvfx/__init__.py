"""kvfx: low-rank KV-cache compression for any torch.compile'd transformer, as an FX graph pass.

    projections = kvfx.calibrate(model, batches, method="kqsvd", rank=0.5)
    model = kvfx.compress(torch.compile(model), projections)
"""
from .cache import LowRankCache
from .calib.allocate import Budget
from .calib.refine import Refine, refine
from .calib.sensitivity import allocate, sensitivity
from .compress import compress, decompress, make_cache
from .explain import Explanation, explain
from .passes.counters import counters
from .projections import Projections, ProjectionError, SiteProjection, SiteShape
from .rotate import rotate_latents

__version__ = "0.1.0"


def calibrate(*args, **kwargs):
    """See kvfx.calib.collect.calibrate."""
    from .calib.collect import calibrate as _calibrate
    return _calibrate(*args, **kwargs)


__all__ = ["Budget", "Refine", "refine", "sensitivity", "allocate", "Projections", "SiteProjection", "SiteShape", "ProjectionError", "LowRankCache", "calibrate",
           "compress", "rotate_latents", "decompress", "explain", "make_cache", "counters"]
