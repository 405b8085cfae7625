"""Calibration: per-site statistics (`stats`) -> rank-R projections via a registered `Calibrator`.

Built-in methods: "pca", "eigen", "kqsvd", "stiefel", "matryoshka" (see their modules). The model observer and
the `calibrate()` entry point live in `collect.py` (imports kvfx.passes; kept out of this file to avoid import
cycles).
"""
from . import eigen, identity, kqsvd, matryoshka, pca, stiefel  # noqa: F401  (register the built-in calibrators)
from .base import CALIBRATORS, Calibrator, get_calibrator, register_calibrator
from .stats import SiteStats

__all__ = ["CALIBRATORS", "Calibrator", "SiteStats", "get_calibrator", "register_calibrator"]
