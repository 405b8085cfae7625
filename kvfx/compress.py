"""`kvfx.compress(torch.compile(model), projections)`: the one entry point that applies projections."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from . import quant
from .cache import LowRankCache
from .passes.compile import (CompileOptions, KvfxBackend, UnsupportedAttention, compile_isolated, options_of,
                             original_module)
from .passes.match import is_fallback_name
from .projections import Projections, ProjectionError
from .provenance import check_provenance


@dataclass
class CompressState:
    """What compress changed on the module, so it can be checked and undone."""
    projections: Projections
    backend: KvfxBackend
    options: CompileOptions
    cache: str
    original_forward: object
    had_generate: bool
    quantize: str | None = None


def _check_model(module: torch.nn.Module, projections: Projections, check_model: bool = True) -> None:
    if not isinstance(projections, Projections):
        raise TypeError(f"projections must be kvfx.Projections (from kvfx.calibrate or Projections.load), "
                        f"got {type(projections).__name__}.")
    projections.validate()
    original_module(module, "compress")  # refuses a model kvfx already compressed
    names = dict(module.named_modules())
    missing = [n for n in projections.sites if not is_fallback_name(n) and n not in names]
    if missing:
        raise ProjectionError(f"The model has no module '{missing[0]}' (and {len(missing) - 1} more) that these "
                              "projections were calibrated for: they come from another model. Recalibrate.")
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "num_attention_heads"):
        shapes = {s.as_list()[0] for s in projections.shapes.values()}
        heads = cfg.num_attention_heads
        if shapes and heads not in shapes:
            raise ProjectionError(f"The model has {heads} attention heads but the projections were made for "
                                  f"{sorted(shapes)}: another model. Recalibrate.")
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
        want = [heads, kv_heads, head_dim]
        other = next((n for n, s in projections.shapes.items() if head_dim and s.as_list() != want), None)
        if other is not None:
            raise ProjectionError(f"The model's attention has heads/kv heads/head_dim {want} but the projections for "
                                  f"'{other}' were made for {projections.shapes[other].as_list()}: another model. "
                                  "Recalibrate with kvfx.calibrate(model, ...).")
        n_layers = getattr(cfg, "num_hidden_layers", None)
        if n_layers is not None and n_layers != len(projections.sites):
            raise ProjectionError(f"The model has {n_layers} layers but the projections cover "
                                  f"{len(projections.sites)} attention sites: another model. Recalibrate.")
    if check_model:  # the recorded model fingerprint and file format (kvfx/provenance.py), when there is one
        check_provenance(projections, module)


def _param_info(module: torch.nn.Module):
    p = next(module.parameters(), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


def make_cache(model: torch.nn.Module, cache: str | None = None, max_cache_len: int | None = None, *,
               kind: str | None = None) -> LowRankCache:
    """A fresh low-rank cache for a compressed model (what generate gets by default). `cache`: "dynamic" or "static",
    as in `compress(..., cache=...)`; default the one compress was given. (`kind=` is the old name, deprecated.)"""
    if kind is not None:
        import warnings
        warnings.warn("kvfx.make_cache(kind=...) is deprecated; pass cache=... (as kvfx.compress takes it).",
                      DeprecationWarning, stacklevel=2)
        cache = cache or kind
    kind = cache
    state: CompressState = getattr(model, "_kvfx", None)
    if state is None:
        raise ProjectionError("make_cache needs a model returned by kvfx.compress.")
    dtype, device = _param_info(model)
    return LowRankCache(state.projections, kind or state.cache, max_cache_len, dtype=dtype, device=device,
                        quantize=state.quantize)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which the model's forward / generate take a cache: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated), `past_key_values` before."""
    module = getattr(model, "_orig_mod", model)
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def _generate_with_cache(model, generate, *args, **kwargs):
    given = any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))
    if not given and kwargs.get("use_cache", True):
        ids = next((kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds") if kwargs.get(k) is not None),
                   args[0] if args else None)
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        new = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None)
        total = kwargs.get("max_length") or getattr(config, "max_length", None) or 20
        max_len = ids.shape[1] + new if new else max(total, ids.shape[1] + 1)
        # static: the cache's length; dynamic: room reserved for the whole generation (no step grows it)
        kwargs[cache_kwarg(model)] = make_cache(model, max_cache_len=max_len)
    return generate(*args, **kwargs)


def _first_forward(module, compiled, *args, **kwargs):
    """The first call of a compressed forward is when kvfx sees the model's graphs. If a projection does not fit
    an attention site, or no attention site was found at all (nothing would be compressed), undo compress (the
    model is as before) and raise kvfx's error; afterwards the compiled forward is called directly."""
    if torch.compiler.is_compiling():  # traced by an outer compile / torch._dynamo.explain
        return compiled(*args, **kwargs)
    try:
        out = compiled(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        if isinstance(e.inner_exception, ProjectionError):
            decompress(module)
            raise e.inner_exception from None
        raise
    if not module._kvfx.backend.graphs:
        decompress(module)
        raise UnsupportedAttention(
            "unsupported: kvfx found no attention site in the compiled forward: the model calls no "
            "scaled_dot_product_attention "
            "(or torch.compile did not capture it), so nothing would be compressed. Check kvfx.explain(model, inputs); "
            "compress has been undone.")
    module.forward = compiled
    return out


def check_formats(projections: Projections, quantize) -> None:
    """Every site's format fits its latent (a bands format spans exactly its columns; a dict names every site)."""
    if quantize is None or not isinstance(projections, Projections):
        return
    for name, p in projections.sites.items():
        kind = quant.site(quantize, name)
        if kind:
            for width in {p.key_rank, 0 if p.shared else p.value_rank} - {0}:
                try:
                    quant.row_bytes(kind, width)
                except ValueError as e:
                    raise ValueError(f"site {name}: {e}") from None


def compress(model: torch.nn.Module, projections: Projections, *, cache: str = "dynamic",
             fold: bool = True, quantize: str | None = "auto", check_model: bool = True) -> torch.nn.Module:
    """Apply `projections` to every attention site of `model` (plain or torch.compile'd).

    Returns the original module with its forward compiled through kvfx's backend (the user's compile
    options kept) and `generate` using the compiled forward and a low-rank cache (`cache="dynamic"` or
    `"static"`). `quantize="int8"` stores the latents as int8 with one scale byte per row, `"int4"` as packed
    4-bit codes with one scale byte per 32 numbers (kvfx.quant): bytes ≈ (R + 1) / (2 · R), resp.
    (R/2 + R/32) / (2 · R), of the same latents in a 16-bit cache; `kvfx.rotate_latents(projections)` first
    makes the rounding much cheaper (exact, folded into the projections). `quantize="auto"` (the default) takes
    the format the projections record (`projections.quantize`, set by kvfx.best_config / `kvfx calibrate`), 16-bit
    latents if none; None forces 16-bit latents. A dict {site: format} gives each site its own (kvfx.allocate_bits
    records one: bits per latent direction, e.g. "int8x64+int4x224+int2x64"). Projections that record the model they were calibrated on
    (kvfx.provenance) are refused for another model unless `check_model=False`. Checks everything first: on error
    the model is left exactly as it was.
    """
    module, opts = options_of(model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"compress needs a torch.nn.Module or torch.compile(module), got {type(model).__name__}.")
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}.")
    if quantize == "auto":
        quantize = projections.quantize if isinstance(projections, Projections) else None
    quant.check(quantize)
    _check_model(module, projections, check_model)
    check_formats(projections, quantize)
    dtype, device = _param_info(module)
    projections = projections.to(dtype=torch.float32)
    backend = KvfxBackend(projections, opts, fold=fold, quantize=quantize)
    original_forward = module.__dict__.get("forward")
    compiled = compile_isolated(module.forward, backend=backend, dynamic=opts.dynamic, fullgraph=opts.fullgraph)
    module._kvfx = CompressState(projections, backend, opts, cache, original_forward, "generate" in module.__dict__,
                                 quantize)
    module.forward = functools.update_wrapper(functools.partial(_first_forward, module, compiled), module.forward,
                                              updated=())  # the forward's name and signature, for generate
    if hasattr(module, "generate"):
        module.generate = functools.partial(_generate_with_cache, module, module.generate)
    return module


def decompress(model: torch.nn.Module) -> torch.nn.Module:
    """Undo compress: the module's own forward and generate again."""
    state: CompressState = getattr(model, "_kvfx", None)
    if state is None:
        raise ProjectionError("This model is not compressed by kvfx.")
    if state.original_forward is None:
        del model.forward
    else:
        model.forward = state.original_forward
    if "generate" in model.__dict__ and not state.had_generate:
        del model.generate
    del model._kvfx
    return model
