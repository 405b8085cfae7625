"""Shared builders for kvfx tests: tiny models, projections, and an independent low-rank attention reference.

Everything here is plain PyTorch / transformers: the reference never goes through kvfx's graph passes or
its cache, so comparing against it checks the rewrite rather than re-running it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvfx.projections import Projections, SiteProjection, SiteShape

from archs import lowrank_attention  # noqa: F401  (tests/coverage/archs.py: the one plain-torch reference)

VOCAB = 64


# ---------------------------------------------------------------------------------------------- models
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def bench_module(script: str, name: str | None = None):
    """A script of benchmarks/ imported as a module (its own imports of benchmarks/ files resolve; registered in
    sys.modules, where dataclasses look their module up)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name or f"kvfx_bench_{Path(script).stem}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_llama(layers: int = 2, seed: int = 0, heads: int = 4, kv_heads: int = 2, head_dim: int = 8):
    """Llama with RoPE and GQA (4 query heads over 2 kv heads), float32, eval, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 2, seed: int = 0):
    """GPT-2: fused Conv1D c_attn with biases, learned positions (no RoPE), MHA with 4 heads of 8."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg).eval()


class HandAttention(nn.Module):
    """Hand-written causal MHA: q/k/v/o nn.Linear around F.scaled_dot_product_attention (no RoPE).

    `key_dim` != head_dim makes q and k widths differ: an SDPA kvfx cannot rewrite (for explain tests).
    """

    def __init__(self, hidden: int = 32, heads: int = 4, head_dim: int = 8, key_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.key_dim = key_dim or head_dim
        self.q_proj = nn.Linear(hidden, heads * self.key_dim, bias=True)
        self.k_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.key_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class HandBlock(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = HandAttention(**kw)

    def forward(self, x):
        return x + self.attn(x)


class HandModel(nn.Module):
    """A stack of HandBlocks on float inputs [batch, tokens, hidden]; sites `layers.{i}.attn`."""

    def __init__(self, layers: int = 2, seed: int = 0, **kw):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(HandBlock(**kw) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def hand_model(layers: int = 2, seed: int = 0, **kw) -> HandModel:
    return HandModel(layers, seed, **kw).eval()


# ---------------------------------------------------------------------------------------------- sites
def site_specs(model) -> tuple[list[str], SiteShape]:
    """(attention site names in layer order, their common shape) for the tiny models above."""
    if isinstance(model, HandModel):
        a = model.layers[0].attn
        return [f"layers.{i}.attn" for i in range(len(model.layers))], SiteShape(a.heads, a.heads, a.head_dim)
    cfg = model.config
    if cfg.model_type == "gpt2":
        return ([f"transformer.h.{i}.attn" for i in range(cfg.n_layer)],
                SiteShape(cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head))
    return ([f"model.layers.{i}.self_attn" for i in range(cfg.num_hidden_layers)],
            SiteShape(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim))


def model_inputs(model, batch: int = 1, tokens: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, HandModel):
        return torch.randn(batch, tokens, model.layers[0].attn.q_proj.in_features, generator=g)
    return torch.randint(3, VOCAB, (batch, tokens), generator=g)


def run(model, x, **kw):
    """Model output as one tensor (logits for HF models)."""
    with torch.no_grad():
        out = model(x, **kw)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---------------------------------------------------------------------------------------------- projections
def _orthonormal(h, d, r, g):
    return torch.linalg.qr(torch.randn(h, d, d, generator=g, dtype=torch.float64))[0][..., :r].float().contiguous()


def _oblique(h, d, r, g):
    return (torch.randn(h, d, r, generator=g) / math.sqrt(d)).contiguous()


def identity_projections(model) -> Projections:
    names, shape = site_specs(model)
    return Projections({n: SiteProjection.identity(shape.kv_heads, shape.head_dim) for n in names},
                       {n: shape for n in names}, method="test")


def random_projections(model, rank: int | None = None, kind: str = "orthonormal", seed: int = 0,
                       names: list[str] | None = None, shape: SiteShape | None = None) -> Projections:
    """Random rank-R projections. "orthonormal": A, B, C, D with orthonormal columns, all different;
    "oblique": A≠B and C≠D are arbitrary Gaussian matrices (nothing a rewrite could cancel)."""
    if model is not None:
        names, shape = site_specs(model)
    r = shape.head_dim // 2 if rank is None else rank
    g = torch.Generator().manual_seed(seed)
    make = _orthonormal if kind == "orthonormal" else _oblique
    sites = {n: SiteProjection(*(make(shape.kv_heads, shape.head_dim, r, g) for _ in range(4))) for n in names}
    return Projections(sites, {n: shape for n in names}, method="test")


# ---------------------------------------------------------------------------------------------- reference
def kvfx_ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (AttentionInterface) computing kvfx's low-rank math in plain torch.

    Same contract as transformers' sdpa_attention_forward: keys/values arrive with kv heads, the output
    is returned transposed to [batch, tokens, heads, head_dim]. The projection is `module.kvfx_ref_proj`.
    Only unpadded causal self-attention is supported (what the tests use), so attention_mask must be None.
    """
    assert attention_mask is None, "kvfx_ref expects no padding mask (transformers passes None for custom attention)"
    out = lowrank_attention(query, key, value, module.kvfx_ref_proj, scaling, causal=True,
                            quantize=getattr(module, "kvfx_ref_quantize", None))
    return out.transpose(1, 2).contiguous(), None


def _register_ref():
    from transformers import AttentionInterface
    AttentionInterface.register("kvfx_ref", kvfx_ref_attention)


def reference_model(model, projections: Projections, quantize: str | None = None):
    """A deepcopy of an HF model whose attention computes the low-rank math with `projections` (eager); quantize:
    on latents rounded as a low-bit cache stores them ("int8", "int4", bands; a dict: per site)."""
    _register_ref()
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = "kvfx_ref"
    for name, mod in ref.named_modules():
        if name in projections.sites:
            mod.kvfx_ref_proj = projections.sites[name]
            mod.kvfx_ref_quantize = quantize.get(name) if isinstance(quantize, dict) else quantize
    missing = set(projections.sites) - {n for n, m in ref.named_modules() if hasattr(m, "kvfx_ref_proj")}
    assert not missing, missing
    return ref


def hand_reference(model: HandModel, x, projections: Projections):
    """The HandModel forward with each attention replaced by lowrank_attention (plain torch)."""
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            a = layer.attn
            b, n, _ = x.shape
            q = a.q_proj(x).view(b, n, a.heads, a.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(b, n, a.heads, a.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(b, n, a.heads, a.head_dim).transpose(1, 2)
            o = lowrank_attention(q, k, v, projections.sites[f"layers.{i}.attn"])
            x = x + a.o_proj(o.transpose(1, 2).reshape(b, n, a.heads * a.head_dim))
    return x


def reference_greedy(model, projections: Projections, ids, new_tokens: int, quantize: str | None = None):
    """Greedy decoding with the low-rank math and NO cache: the full sequence is re-run every step."""
    ref = reference_model(model, projections, quantize)
    seq = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = ref(seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- graphs
_PLACEHOLDER_RE = re.compile(r"\b[lL]_(\w+?)_(?:parameters|buffers)_(\w+?)_\b")
_SITE_RE = re.compile(r"\bkvfx_(?:model_layers|transformer_h|layers)_\d+_(?:self_attn|attn)_")
_CLEANUP_RE = re.compile(r";\s+(?:\w+ = )+None$")


def short_names(code: str) -> str:
    """Dynamo placeholder names shortened: l_self_modules_..._q_proj_parameters_weight_ -> q_proj.weight,
    and kvfx constants without their site prefix: kvfx_model_layers_0_self_attn_key_up -> kvfx_key_up. The cache
    argument reads l_kwargs_cache_... whichever name this transformers gives it (`past_key_values` before 5.24)."""
    code = _PLACEHOLDER_RE.sub(lambda m: f"{m.group(1).split('_modules_')[-1]}.{m.group(2)}", code)
    return _SITE_RE.sub("kvfx_", code).replace("l_kwargs_past_key_values_", "l_kwargs_cache_")


def graph_excerpt(gm, start: str, stop: str) -> str:
    """Lines of gm.code from the first line containing `start` to the first later line containing `stop`,
    stripped of indentation and of the `;  x = None` cleanup tails, with short names."""
    lines = [short_names(_CLEANUP_RE.sub("", ln.strip())) for ln in gm.code.splitlines()]
    i = next(i for i, ln in enumerate(lines) if start in ln)
    j = next(j for j in range(i, len(lines)) if stop in lines[j])
    return "\n".join(lines[i:j + 1])


def capture_graphs(fn, *args, on_graph=None, **kwargs):
    """What `on_graph(gm, example_inputs)` returns for each FX graph Dynamo captures from fn(*args, **kwargs)
    (torch IR, what kvfx's backend receives). It runs inside the backend: after compilation Dynamo drops the
    placeholders' source metadata that kvfx's matcher reads."""
    results = []

    def backend(gm, example_inputs):
        results.append(on_graph(gm, example_inputs) if on_graph else gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend)(*args, **kwargs)
    return results


def forward_of(model):
    """The model's own (uncompiled) forward, bound."""
    return type(model).forward.__get__(model)


@contextlib.contextmanager
def compressed(m, proj, backend: str = "eager", **kwargs):
    """kvfx.compress(torch.compile(m, backend=backend), proj, **kwargs), decompressed (and Dynamo reset) after."""
    import kvfx
    cm = kvfx.compress(torch.compile(m, backend=backend), proj, **kwargs)
    try:
        yield cm
    finally:
        kvfx.decompress(cm)
        torch._dynamo.reset()


def compressed_kl(m, proj, seqs, quantize=None) -> float:
    """Mean over `seqs` of KL(m ‖ m compressed with `proj` by the ordinary, folded compress path)."""
    import kvfx
    from kvfx.calib.live import kl
    teacher = [F.log_softmax(m(input_ids=s[None], use_cache=False).logits.float(), -1).to(torch.bfloat16) for s in seqs]
    mc = kvfx.compress(torch.compile(m, backend="eager"), proj, quantize=quantize)
    try:
        with torch.no_grad():
            return sum(float(kl(mc(input_ids=s[None], use_cache=False).logits, t)) for s, t in zip(seqs, teacher)) / len(seqs)
    finally:
        kvfx.decompress(mc)
        torch._dynamo.reset()


def decode_steps_without_recompiles(model, logits, kw: dict, steps: int, warmup: int = 4):
    """Greedy one-token steps through `model` with cache kwargs `kw`: `warmup` steps that may compile (the static
    decode graph, then its symbolic version), then `steps` under fail_on_recompile. Returns the last logits."""
    for _ in range(warmup):
        logits = model(logits[:, -1:].argmax(-1), **kw).logits
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), **kw).logits
    finally:
        torch.compiler.set_stance("default")
    return logits
