"""Provenance of a projections file: which kvfx, which model, which data, which recipe made it.

Stored in `projections.report["provenance"]` (a separate `provenance` entry of the safetensors metadata when
saved) and checked by `kvfx.compress`: projections stamped for another model — another architecture, other
attention shapes or other weights — are refused before the model is touched.

The model fingerprint is cheap: the architecture, the config's attention shapes, and a sha256 over the first
million numbers of the first three 2-D weights (`named_parameters` order: usually the token embedding and the
first block's q/k projections), rounded to bfloat16 so that the same weights loaded in float32, bfloat16 or
float16 hash alike. A handful of sampled weights are kept too: when the hashes differ (another dtype rounded
differently) but the samples agree to 1 %, the weights are the same model's.
"""
from __future__ import annotations

import hashlib
import time

import torch

from .projections import FORMAT_VERSION, ProjectionError, Projections

HASHED_TENSORS = 3
HASHED_NUMBERS = 1 << 20
SAMPLES_PER_TENSOR = 8
CONFIG_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
               "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab": "vocab_size"}


def kvfx_version() -> str:
    from . import __version__
    return __version__


def _hashed(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, p in module.named_parameters():
        if p.dim() == 2 and not p.is_meta:
            out.append((name, p))
            if len(out) == HASHED_TENSORS:
                break
    return out


def model_fingerprint(model: torch.nn.Module) -> dict:
    """{architecture, model_type, attention shapes from the config, parameters, weights_sha256, weights_sample}."""
    from .passes.compile import options_of
    module, _ = options_of(model)
    cfg = getattr(module, "config", None)
    fp = {"architecture": type(module).__name__, "model_type": getattr(cfg, "model_type", None)}
    for key, attr in CONFIG_KEYS.items():
        value = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(value, int):
            fp[key] = value
    fp["parameters"] = sum(p.numel() for p in module.parameters())
    h, sample = hashlib.sha256(), []
    for name, p in _hashed(module):
        flat = p.detach().reshape(-1)[:HASHED_NUMBERS].to("cpu", torch.bfloat16)
        h.update(f"{name}:{list(p.shape)};".encode())
        h.update(flat.view(torch.int16).numpy().tobytes())
        idx = torch.linspace(0, flat.numel() - 1, SAMPLES_PER_TENSOR).long()
        sample += [float(v) for v in flat[idx].float()]
    fp["weights_sha256"] = h.hexdigest()
    fp["weights_sample"] = sample
    return fp


def stamp(projections: Projections, model: torch.nn.Module | None = None, **fields) -> Projections:
    """Record provenance in `projections.report["provenance"]` (in place; returns the projections): kvfx
    version, file format, creation time, the model's fingerprint (when given) and any extra fields (data,
    method, budget, quantize...)."""
    prov = dict(projections.report.get("provenance") or {})
    prov.update(kvfx_version=kvfx_version(), format_version=FORMAT_VERSION,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if model is not None:
        prov["model"] = model_fingerprint(model)
    prov.update(fields)
    projections.report["provenance"] = prov
    return projections


def _same_weights(want: dict, have: dict) -> bool:
    if want.get("weights_sha256") == have.get("weights_sha256"):
        return True
    a, b = want.get("weights_sample") or [], have.get("weights_sample") or []
    if not a or len(a) != len(b):
        return False
    return all(abs(x - y) <= 1e-2 * max(abs(x), abs(y)) + 1e-3 for x, y in zip(a, b))


def check_provenance(projections: Projections, model: torch.nn.Module) -> None:
    """Refuse projections whose provenance names another file format or another model (ProjectionError saying
    what differs). Projections without provenance (older files, hand-made ones) pass unchecked."""
    prov = projections.report.get("provenance") or {}
    version = prov.get("format_version")
    if version is not None and (not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION):
        raise ProjectionError(f"These projections were written in kvfx file format {version!r} (kvfx "
                              f"{prov.get('kvfx_version', '?')}); this kvfx {kvfx_version()} reads formats 1.."
                              f"{FORMAT_VERSION}. Use the kvfx that wrote them or recalibrate.")
    want = prov.get("model")
    if not want:
        return
    have = model_fingerprint(model)
    diffs = [f"{k} {want[k]!r} vs this model's {have.get(k)!r}" for k in ("architecture", *CONFIG_KEYS, "parameters")
             if k in want and want[k] != have.get(k)]
    if not diffs and not _same_weights(want, have):
        diffs.append(f"weights differ (sha256 {str(want.get('weights_sha256'))[:12]}… vs "
                     f"{have['weights_sha256'][:12]}…)")
    if diffs:
        raise ProjectionError("These projections were calibrated for another model: " + "; ".join(diffs) +
                              ". Recalibrate on this model (kvfx.calibrate or `kvfx calibrate MODEL`), or pass "
                              "check_model=False to kvfx.compress to apply them anyway.")
