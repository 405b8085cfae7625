"""Pass 6 — compile: the Dynamo backend that runs match → rewrite → fold → decode → decode kernel → decode matmuls →
decode linears, then the user's compiler.

Why a backend (and not Inductor's pre_grad_custom_pass): a backend sees Dynamo's torch-IR graph with
the real parameters in `example_inputs`, so folds can compute W·A once from real weights, new tensors
can enter as extra inputs, and it works whatever the inner compiler is (Inductor with any mode, "eager",
or a user backend) — `mode="lite"` and FX-graph-cache rules for custom passes do not apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..projections import Projections, ProjectionError, SiteShape
from .constants import GraphConstants, fresh_copy
from .counters import counters
from . import decode_kernel, decode_linear, decode_matmul
from .decode import group_decode_sites
from .fold import fold_sites
from .match import find_sites
from .rewrite import rewrite_sites


class UnsupportedAttention(ProjectionError):
    """An SDPA call kvfx cannot rewrite (the message says why)."""


@dataclass
class CompileOptions:
    """What the user asked torch.compile for; kvfx keeps it."""
    backend: str | Callable = "inductor"
    mode: str | None = None
    options: dict = field(default_factory=dict)   # inductor config patches (resolved mode + options=)
    kwargs: dict = field(default_factory=dict)    # extra kwargs of a non-inductor backend
    dynamic: bool | None = None
    fullgraph: bool = False


def original_module(model, who: str) -> torch.nn.Module:
    """The nn.Module under a torch.compile wrapper, for an entry point (`who`) that needs the uncompressed model:
    refused, with the fix, when kvfx already compressed it."""
    module, _ = options_of(model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{who} needs a torch.nn.Module, got {type(module).__name__}.")
    if getattr(module, "_kvfx", None) is not None:
        raise ProjectionError(f"{who}: this model is already compressed by kvfx; pass the original model "
                              "(kvfx.decompress(model) undoes it).")
    return module


def options_of(compiled: Any) -> tuple[torch.nn.Module, CompileOptions]:
    """(original module, compile options) of a torch.compile'd module; private torch API, kept here only."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule, innermost_backend
        if not isinstance(compiled, OptimizedModule):
            return compiled, CompileOptions()
        ctx = compiled.dynamo_ctx
        inner = innermost_backend(ctx.callback)
        opts = CompileOptions(dynamic=getattr(ctx, "_dynamic", None), fullgraph=bool(getattr(ctx, "fullgraph", False)))
        if type(inner).__name__ == "_TorchCompileInductorWrapper":
            opts.backend, opts.options = "inductor", dict(inner.config)
        elif type(inner).__name__ == "_TorchCompileWrapper":
            opts.backend, opts.kwargs = inner.compiler_fn, dict(inner.kwargs)
            opts.mode = opts.kwargs.get("mode")
        else:
            opts.backend = inner
        return compiled._orig_mod, opts
    except AttributeError as e:  # torch internals moved
        raise RuntimeError(
            f"kvfx could not read torch.compile's options from {type(compiled).__name__} ({e}); this torch "
            f"({torch.__version__}) changed its internals. Pass the plain module to kvfx.compress instead.") from e


# Inductor settings kvfx asks for in CPU inference graphs (the user's own options win): no size / stride or alignment
# assert after each ATen or kvfx op call in the generated wrapper (SmolLM2's step: ~700 calls, ~2 % of a step at 16k
# tokens; kvfx's ops' shapes are checked by their fake kernels, tests/ops' opcheck; their outputs are fresh tensors).
DECODE_PATCHES = {"size_asserts": False, "alignment_asserts": False}


def inner_compiler(opts: CompileOptions) -> Callable:
    """compiler(gm, example_inputs, defaults=None): the user's compiler; `defaults` are Inductor config patches
    applied where the user set nothing else (ignored by other backends)."""
    if opts.backend == "inductor":
        from torch._inductor.compile_fx import compile_fx
        patches = dict(opts.options)
        return lambda gm, ex, defaults=None: compile_fx(gm, ex, config_patches={**(defaults or {}), **patches} or None)
    if isinstance(opts.backend, str):
        from torch._dynamo.backends.registry import lookup_backend
        fn = lookup_backend(opts.backend)
    else:
        fn = opts.backend
    return lambda gm, ex, defaults=None: fn(gm, ex, **opts.kwargs)


def compile_isolated(fn: Callable, **kwargs) -> Callable:
    """torch.compile with its own recompile budget where torch supports it (2.13+: isolate_recompiles).

    transformers wraps every model's forward in one shared function, so without isolation the compiled
    entries of all models (and of kvfx's calibration observer) share Dynamo's recompile_limit of 8."""
    import inspect
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        kwargs["isolate_recompiles"] = True
    return torch.compile(fn, **kwargs)


class KvfxBackend:
    """torch.compile backend: apply `projections` to every attention site, then compile with `opts`."""

    def __init__(self, projections: Projections, opts: CompileOptions | None = None, fold: bool = True,
                 live: bool = False, quantize: str | None = None):
        """live=True (end-to-end distillation): the graphs read the projection tensors at every call (rather
        than copies frozen at compile time), so assigning new tensors to `projections.sites[..]` — or training
        them in place — takes effect and gradients reach them. Folding is off in live mode.
        quantize="int8" / "int4": latents rounded as kvfx's low-bit cache stores them (kvfx.quant) where no such cache is used."""
        if live and fold:
            raise ValueError("KvfxBackend(live=True) cannot fold: folded weights are computed once; pass fold=False.")
        self.projections, self.opts, self.fold, self.live = projections, opts or CompileOptions(), fold, live
        self.quantize = quantize
        self.compile = inner_compiler(self.opts)
        self.graphs: list[fx.GraphModule] = []   # rewritten graphs, for tests and explain

    def transform(self, gm: fx.GraphModule, example_inputs) -> tuple[fx.GraphModule, GraphConstants | None]:
        new = fresh_copy(gm)  # every change goes to a copy: a refusal leaves Dynamo's graph as it was
        sites = find_sites(new)
        bad = [s for s in sites if s.status != "ok"]
        if bad:
            raise UnsupportedAttention("; ".join(f"{s.name}: {s.status}" for s in bad) +
                                       ". Run kvfx.explain(model, inputs) for the full table.")
        for s in sites:  # check everything before touching anything
            self.projections.check_site(s.name, SiteShape(s.num_heads, s.num_kv_heads, s.head_dim))
        if not sites:
            return gm, None
        consts = GraphConstants(new, example_inputs)
        rewrite_sites(new, sites, {s.name: self.projections.sites[s.name] for s in sites}, consts, self.quantize)
        if self.fold:
            fold_sites(new, sites, consts)
        group_decode_sites(new, sites, {s.name: self.projections.sites[s.name] for s in sites}, consts)
        new.graph.lint()
        new.recompile()
        counters["kvfx"]["graphs"] += 1
        if self.live:
            counters["kvfx"]["live_graphs"] += 1
        self.graphs.append(new)
        return new, consts

    def __call__(self, gm: fx.GraphModule, example_inputs):
        new, consts = self.transform(gm, example_inputs)
        extra = consts.tensors if consts is not None else []
        if not self.live and decode_kernel.wanted(example_inputs):
            new = decode_kernel.decode_kernels(new)  # a copy: self.graphs keeps the rewritten graph as it was
        if not self.live and decode_matmul.wanted(example_inputs):
            new = decode_matmul.decode_matmuls(new)  # likewise
        inference = not self.live and decode_linear.wanted(example_inputs)
        if inference:
            new = decode_linear.decode_linears(new)  # likewise
        compiled = self.compile(new, list(example_inputs) + _static(example_inputs, extra),
                                DECODE_PATCHES if inference else None)
        if not extra:
            return compiled
        if self.live:
            def run_live(*args):
                return compiled(*args, *consts.live())
            return run_live

        def run(*args):
            return compiled(*args, *extra)
        return run


def _static(example_inputs, extra: list[torch.Tensor]) -> list[torch.Tensor]:
    """kvfx's constants as example inputs with static shapes. Handed over as real tensors, AOTAutograd would
    fakify them in Dynamo's ShapeEnv with fresh symbols when the frame compiles with dynamic shapes; those
    symbols have no source, and a guard on one (e.g. `rank != 192`) breaks Dynamo's guard building."""
    from torch._guards import detect_fake_mode
    fake_mode = detect_fake_mode(list(example_inputs))
    if fake_mode is None or fake_mode.shape_env is None:
        return extra
    return [fake_mode.from_tensor(t, static_shapes=True) for t in extra]
