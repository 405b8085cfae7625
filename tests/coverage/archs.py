"""The architectures kvfx is checked on, in one place: tests/coverage (parametrized) and benchmarks/coverage.py.

Each entry builds a tiny random-weight model (float32, eval, CPU; transformers models with
attn_implementation="sdpa" where transformers offers it) and says what it is: decoder (generate is checked)
or encoder, whether kvfx is expected to support it, and if not, why. Hand-written modules live here too:
`SDPAAttention` (configurable: heads / kv heads / head_dim / bias / RoPE / fused qkv; also used by
tests/test_properties.py) and `MatmulAttention` (matmul -> softmax -> matmul, no SDPA: unsupported).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 64
HIDDEN = 32


# ---------------------------------------------------------------------------------------------- hand-written
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(n: int, d: int, offset: int = 0, base: float = 10000.0, dtype=torch.float32):
    """Rotate-half RoPE tables [n, d] for positions offset..offset+n-1."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    t = torch.arange(offset, offset + n, dtype=torch.float32)
    emb = torch.cat([torch.outer(t, inv)] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class SDPAAttention(nn.Module):
    """Causal self-attention around F.scaled_dot_product_attention, written by hand.

    heads query heads over kv_heads key/value heads (GQA via enable_gqa=False + explicit repeat_interleave
    of k/v, like transformers' repeat_kv), optional biases on q/k/v, optional rotate-half RoPE computed in
    forward, and either one fused qkv Linear (split into [H·d, h·d, h·d]) or separate q/k/v Linears.
    """

    def __init__(self, hidden: int = HIDDEN, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                 bias: bool = True, rope: bool = True, fused: bool = False):
        super().__init__()
        assert heads % kv_heads == 0
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope, self.fused = rope, fused
        q, kv = heads * head_dim, kv_heads * head_dim
        if fused:
            self.qkv_proj = nn.Linear(hidden, q + 2 * kv, bias=bias)
        else:
            self.q_proj = nn.Linear(hidden, q, bias=bias)
            self.k_proj = nn.Linear(hidden, kv, bias=bias)
            self.v_proj = nn.Linear(hidden, kv, bias=bias)
        self.o_proj = nn.Linear(q, hidden, bias=False)

    def qkv(self, x: torch.Tensor):
        """q [b, H, n, d] (after RoPE), k, v [b, h, n, d] (after RoPE, before repeat): what SDPA reads."""
        b, n, _ = x.shape
        H, h, d = self.heads, self.kv_heads, self.head_dim
        if self.fused:
            q, k, v = self.qkv_proj(x).split([H * d, h * d, h * d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, n, H, d).transpose(1, 2)
        k = k.view(b, n, h, d).transpose(1, 2)
        v = v.view(b, n, h, d).transpose(1, 2)
        if self.rope:
            cos, sin = rope_cos_sin(n, d, dtype=x.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x)
        g = self.heads // self.kv_heads
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class MatmulAttention(nn.Module):
    """Causal MHA written as matmul -> softmax -> matmul (no SDPA call: nothing kvfx can rewrite)."""

    def __init__(self, hidden: int = HIDDEN, heads: int = 4, head_dim: int = 8, **_):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim)
        self.k_proj = nn.Linear(hidden, heads * head_dim)
        self.v_proj = nn.Linear(hidden, heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = scores.softmax(-1) @ v
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class HandBlock(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.attn = attn

    def forward(self, x):
        return x + self.attn(self.norm(x))


class HandLM(nn.Module):
    """Embedding -> blocks of one attention module each -> vocab head; input_ids [b, n] -> logits (no cache)."""

    def __init__(self, attn: Callable[[], nn.Module], layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(HandBlock(attn()) for _ in range(layers))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


# ---------------------------------------------------------------------------------------------- transformers
def _hf(config_cls: str, model_cls: str, attn: str = "sdpa", **cfg):
    import transformers
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                               **cfg)
    return getattr(transformers, model_cls)._from_config(config, attn_implementation=attn)


_LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8)


@dataclass
class Arch:
    name: str
    build: Callable[[], nn.Module]
    what: str                          # the feature this entry covers
    decoder: bool = True               # generate with a KV cache is checked
    hf: bool = True                    # a transformers model (input_ids -> .logits / .last_hidden_state)
    supported: bool = True
    reason: str = ""                   # why not supported (expected error text, a regex)
    rope: bool = False                 # explain should report RoPE
    folds: str = ""                    # what explain should report foldable (no cache; "o" = W_O)
    extra: dict = field(default_factory=dict)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()


ARCHS: list[Arch] = [
    Arch("llama", lambda: _hf("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE), "RoPE, GQA 4/2", rope=True, folds="o"),
    Arch("mistral", lambda: _hf("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE, sliding_window=4),
         "RoPE, GQA, sliding window 4", rope=True, folds="o"),
    Arch("qwen2", lambda: _hf("Qwen2Config", "Qwen2ForCausalLM", **{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}),
         "q/k/v biases", rope=True, folds="o"),
    Arch("qwen3", lambda: _hf("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_LIKE), "q/k RMSNorm", rope=True, folds="o"),
    Arch("gemma3_text", lambda: _hf("Gemma3TextConfig", "Gemma3ForCausalLM", **{**_LLAMA_LIKE, "num_hidden_layers": 2},
                                    sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"],
                                    query_pre_attn_scalar=12, attn_logit_softcapping=None,
                                    final_logit_softcapping=30.0),
         "sliding/full layers, q/k norm, query_pre_attn_scalar", rope=True, folds="o"),
    # transformers refuses attn_implementation="sdpa" for Gemma2 (`_supports_sdpa = False`: SDPA has no logit
    # softcapping), so it runs its eager matmul -> tanh softcap -> softmax -> matmul attention: no SDPA site.
    Arch("gemma2", lambda: _hf("Gemma2Config", "Gemma2ForCausalLM", attn="eager", **_LLAMA_LIKE, sliding_window=4,
                               query_pre_attn_scalar=12, attn_logit_softcapping=50.0),
         "attention logit softcapping (eager attention only)", supported=False,
         reason="no scaled_dot_product_attention|no attention site"),
    Arch("phi3", lambda: _hf("Phi3Config", "Phi3ForCausalLM", hidden_size=HIDDEN, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
         "fused qkv_proj (sliced), GQA", rope=True, folds="o"),
    Arch("gpt2", lambda: _hf("GPT2Config", "GPT2LMHeadModel", n_embd=HIDDEN, n_layer=1, n_head=4, n_positions=64),
         "Conv1D fused c_attn, learned positions", folds="qo"),
    Arch("gpt_neox", lambda: _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=HIDDEN, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.25}),
         "per-head interleaved fused qkv, partial RoPE (25%)", rope=True, folds="o"),
    Arch("opt", lambda: _hf("OPTConfig", "OPTForCausalLM", hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=1,
                            num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=64),
         "query scaled before SDPA (scale=1.0)", folds="o"),
    Arch("bert", lambda: _hf("BertConfig", "BertModel", hidden_size=HIDDEN, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64),
         "encoder, bidirectional, no cache, no RoPE", decoder=False, folds="qkvo"),
    Arch("hand_sdpa", lambda: HandLM(lambda: SDPAAttention(fused=True, bias=True, rope=True)),
         "hand-written: fused qkv Linear, RoPE, GQA 4/2", decoder=False, hf=False, rope=True,
         folds="o"),
    Arch("hand_matmul", lambda: HandLM(MatmulAttention),
         "hand-written matmul -> softmax -> matmul", decoder=False, hf=False, supported=False,
         reason="no scaled_dot_product_attention|no attention site"),
]
BY_NAME = {a.name: a for a in ARCHS}


# ---------------------------------------------------------------------------------------------- inputs / outputs
def token_batches(n: int = 4, batch: int = 2, tokens: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Random token batches for calibration (ids 3.. avoid bos/eos/pad)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, tokens), generator=g) for _ in range(n)]


def output_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(type(out))


def forward(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model(ids, **kw))


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- low-rank reference
def _lowrank_sdpa_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: kvfx's low-rank math, then transformers' own SDPA attention.

    softmax((q·B_i)(k·A)ᵀ·scaling + mask)·(v·C)·D_iᵀ with q [b, H, n, d], k/v [b, h, m, d] (kv heads): the
    projections are applied by hand (einsum) and the attention itself (mask, sliding window, causality, GQA)
    is transformers' sdpa_attention_forward on the projected tensors, so only the projection math is ours.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    p = module.kvfx_ref_proj
    H, h = query.shape[1], key.shape[1]
    g = H // h
    B, D = p.key_up.repeat_interleave(g, 0), p.value_up.repeat_interleave(g, 0)
    q = torch.einsum("bHnd,Hdr->bHnr", query, B.to(query.dtype))
    k = torch.einsum("bhmd,hdr->bhmr", key, p.key_down.to(key.dtype))
    v = torch.einsum("bhmd,hdr->bhmr", value, p.value_down.to(value.dtype))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5    # the ORIGINAL 1/sqrt(d), not 1/sqrt(R)
    out, _ = sdpa_attention_forward(module, q, k, v, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return torch.einsum("bnHr,Hdr->bnHd", out, D.to(out.dtype)).contiguous(), None   # out is [b, n, H, Rv]


def attention_modules(model) -> list[nn.Module]:
    """The modules that call transformers' attention interface, in layer order."""
    mods = [m for _, m in model.named_modules() if hasattr(m, "is_causal") and hasattr(m, "config")
            and any(isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D" for c in m.children())]
    return mods


def reference_model(model, projections):
    """A deepcopy of a transformers model whose attention computes the low-rank math (eager, plain torch)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register("kvfx_coverage_ref", _lowrank_sdpa_interface)
    # the same masks as "sdpa" (without this, transformers builds NO mask for a custom attention function:
    # sliding windows and padding would be lost and only SDPA's is_causal would remain)
    AttentionMaskInterface.register("kvfx_coverage_ref", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    ref = copy.deepcopy(model)
    mods = attention_modules(ref)
    sites = list(projections.sites.values())
    assert len(mods) == len(sites), (len(mods), len(sites))
    for m, p in zip(mods, sites):
        m.kvfx_ref_proj = p
    ref.set_attn_implementation("kvfx_coverage_ref") if hasattr(ref, "set_attn_implementation") else None
    ref.config._attn_implementation = "kvfx_coverage_ref"
    for m in ref.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "kvfx_coverage_ref"
    return ref


def hand_reference(model: HandLM, ids, projections) -> torch.Tensor:
    """HandLM forward with each SDPAAttention's attention computed by the low-rank math (plain torch)."""
    with torch.no_grad():
        x = model.embed(ids)
        for layer, p in zip(model.layers, projections.sites.values()):
            a = layer.attn
            b, n, _ = x.shape
            q, k, v = a.qkv(layer.norm(x))
            o = lowrank_attention(q, k, v, p)
            x = x + a.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        return model.head(x)


def low_bit_round(x: torch.Tensor, kind: str = "int8") -> torch.Tensor:
    """What a low-bit latent cache keeps of x (kvfx.quant's formats, written out independently). int8: per row of
    the last dim, scale s = 2^(e/8) with e the smallest integer such that 127·s >= max|x|; x -> round(x / s)·s.
    int4: the same per run of 32 consecutive numbers of a row (the last run shorter), with 7 for 127. int2: per run
    of 32, e the smallest with 2·s >= max|x|, x -> (floor(x / s) clipped to [-2, 1] + 1/2)·s; int3 the same with 4
    and [-4, 3], int5 with 16 and [-16, 15]. Bands
    "int8x3+int4x40": the first 3 columns as int8 (one scale for the 3), the next 40 as int4. e8: _e8_round."""
    if "x" in kind:
        widths = [int(part.split("x")[1]) for part in kind.split("+")]
        kinds = [part.split("x")[0] for part in kind.split("+")]
        return torch.cat([low_bit_round(p, k) for p, k in zip(x.split(widths, -1), kinds)], -1)
    if kind == "e8":
        return torch.cat([_e8_round(part) for part in x.split(32, -1)], -1)
    top, group = {"int8": (127, x.shape[-1]), "int5": (16, 32), "int4": (7, 32), "int3": (4, 32), "int2": (2, 32)}[kind]
    out = []
    for part in x.split(group, -1):
        amax = part.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        s = torch.exp2(torch.ceil(8 * torch.log2(amax / top)).clamp(-128, 127) / 8)
        if kind in ("int2", "int3", "int5"):
            out.append((torch.floor(part / s).clamp(-top, top - 1) + 0.5) * s)
        else:
            out.append(torch.round(part / s).clamp(-top, top) * s)
    return torch.cat(out, -1)


def _e8_point(y: list[float]) -> list[float]:
    """The point of E8 = D8 ∪ (D8 + ½) nearest the 8 numbers y, one vector at a time: for each coset, every
    coordinate rounded half to even (after the shift), and where their sum is odd the coordinate with the largest
    rounding error (the first of equals) moved one step the other way (up where it was exact); the nearer coset's
    point (D8's on a tie)."""
    best = None
    for shift in (0.0, 0.5):
        r = [round(v - shift) for v in y]  # Python's round: half to even
        if sum(r) % 2:
            d = [v - shift - ri for v, ri in zip(y, r)]
            i = max(range(8), key=lambda j: (abs(d[j]), -j))
            r[i] += -1 if d[i] < 0 else 1
        p = [ri + shift for ri in r]
        dist = sum((a - b) ** 2 for a, b in zip(p, y))
        if best is None or dist < best[0]:
            best = (dist, p)
    return best[1]


def _e8_round(part: torch.Tensor) -> torch.Tensor:
    """kvfx.quant's e8 on a group of 32 (or fewer, a multiple of 8) numbers a row, written out: step s = 2^(e/8),
    e the nearest integer to 8·log2 of max(the group's rms, 1.02 / √10 × its largest 8-vector's length); each
    8-vector y = x / s goes to its nearest E8 point; a point outside the ball x·x <= 10 is found again for y·0.97
    (up to 4 times), then for y drawn in to length 2.15."""
    rows = part.double().reshape(-1, part.shape[-1])
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        vecs = row.reshape(-1, 8)
        top = float(vecs.pow(2).sum(-1).max().sqrt())
        rms = max(float(row.pow(2).mean().sqrt()), 1e-30)
        s = 2.0 ** (max(min(round(8 * math.log2(max(rms, top * 1.02 / math.sqrt(10)))), 127), -128) / 8)
        for j, v in enumerate(vecs):
            y = [float(t) / s for t in v]
            p = _e8_point(y)
            for _ in range(4):
                if sum(t * t for t in p) <= 10:
                    break
                y = [t * 0.97 for t in y]
                p = _e8_point(y)
            if sum(t * t for t in p) > 10:
                n = math.sqrt(sum(t * t for t in y))
                p = _e8_point([t * min(1.0, 2.15 / n) for t in y])
            out[i, 8 * j:8 * j + 8] = torch.tensor(p, dtype=torch.float64) * s
    return out.reshape(part.shape).to(part.dtype)


def _mean_latents(proj, A, C, g):
    """The latents of the projections' key / value means ([H | 1, 1, R] float64, per query head), or zeros."""
    km, vm = getattr(proj, "key_mean", None), getattr(proj, "value_mean", None)
    if km is None:
        return 0.0, 0.0
    km, vm = km.double(), vm.double()
    if getattr(proj, "shared", False):
        c = (km.reshape(-1) @ A[0] + vm.reshape(-1) @ C[0])[None, None]
        return c, c
    if A.shape[0] == 1 and A.shape[1] == km.numel():  # one latent over the kv heads
        return (km.reshape(-1) @ A[0])[None, None], (vm.reshape(-1) @ C[0])[None, None]
    per_head = lambda m, P: torch.einsum("hd,hdr->hr", m, P).repeat_interleave(g, 0)[:, None]  # noqa: E731
    return per_head(km, A), per_head(vm, C)


def lowrank_attention(q, k, v, proj, scale: float | None = None, causal: bool = True,
                      quantize: str | None = None) -> torch.Tensor:
    """softmax((q·B_i)(k·A)ᵀ·scale + causal mask)·(v·C)·D_iᵀ in float64, written out with einsum (a shared K+V
    latent: k·A and v·C are both replaced by c = [k_1 … k_h]·A + [v_1 … v_h]·C).

    q [b, H, n, d]; k, v [b, h, m, d] (kv heads); query head i uses kv group i // (H/h). Returns [b, H, n, d]."""
    b, H, n, d = q.shape
    h, m = k.shape[1], k.shape[2]
    g = H // h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    A, B, C, D = (t.to(torch.float64) for t in (proj.key_down, proj.key_up, proj.value_down, proj.value_up))
    B, D = B.repeat_interleave(g, 0), D.repeat_interleave(g, 0)
    if getattr(proj, "shared", False):  # one latent c = [k_1 … k_h]·A + [v_1 … v_h]·C, read as key and value
        flat = lambda t: t.double().transpose(1, 2).flatten(2)  # noqa: E731
        c = (flat(k) @ A[0] + flat(v) @ C[0])[:, None].expand(b, H, m, A.shape[-1])
        k_lat = v_lat = c
    else:
        k_lat = torch.einsum("bhmd,hdr->bhmr", k.double(), A).repeat_interleave(g, 1)
        v_lat = torch.einsum("bhmd,hdr->bhmr", v.double(), C).repeat_interleave(g, 1)
    if quantize:  # the cached latents as a low-bit cache holds them (rows are per token: the head repeat commutes),
        # rounded around the calibration means' latents where the projections have means
        k_off, v_off = _mean_latents(proj, A, C, g)
        k_lat, v_lat = low_bit_round(k_lat - k_off, quantize) + k_off, low_bit_round(v_lat - v_off, quantize) + v_off
    q_lat = torch.einsum("bHnd,Hdr->bHnr", q.double(), B)
    s = torch.einsum("bHnr,bHmr->bHnm", q_lat, k_lat) * scale
    if causal:
        s = s.masked_fill(torch.arange(m)[None, :] > torch.arange(n)[:, None] + (m - n), float("-inf"))
    o = torch.einsum("bHnm,bHmr->bHnr", s.softmax(-1), v_lat)
    return torch.einsum("bHnr,Hdr->bHnd", o, D).to(q.dtype)


def reference(arch: Arch, model, projections, ids) -> torch.Tensor:
    """The model's output with every attention site computing the low-rank math (independent of kvfx passes)."""
    if not arch.hf:
        return hand_reference(model, ids, projections)
    kw = {"use_cache": False} if arch.decoder else {}
    return forward(reference_model(model, projections), ids, **kw)


# ---------------------------------------------------------------------------------------------- projections
def identity_projections(projections):
    """Full-rank identity projections with the same sites/shapes as `projections`."""
    from kvfx.projections import Projections, SiteProjection
    sites = {n: SiteProjection.identity(s.kv_heads, s.head_dim) for n, s in projections.shapes.items()}
    return Projections(sites, dict(projections.shapes), method="identity")


# ---------------------------------------------------------------------------------------------- the checks
RANK = 4            # of head_dim 8
PROMPT, NEW = 6, 8  # generate: prompt tokens, new tokens


def calibrate(arch: Arch, model, rank=RANK, method: str = "kqsvd"):
    import kvfx
    return kvfx.calibrate(model, token_batches(), method=method, rank=rank, progress=False)


def compressed_copy(model, projections, backend="eager", **kw):
    """kvfx.compress(torch.compile(deepcopy(model), backend=...), projections, **kw): the original stays the plain
    model the references run. backend="inductor" compiles with torch.compile's defaults. (The tests' one such
    helper; tests/helpers.py `compressed` is the context-manager form that decompresses after.)"""
    import kvfx
    m = copy.deepcopy(model)
    compiled = torch.compile(m) if backend == "inductor" else torch.compile(m, backend=backend)
    return kvfx.compress(compiled, projections, **kw)


def eval_ids(seed: int = 7, batch: int = 2, tokens: int = 8) -> torch.Tensor:
    return token_batches(1, batch, tokens, seed)[0]


def _kw(arch: Arch) -> dict:
    return {"use_cache": False} if arch.decoder else {}


def check_identity(arch: Arch, model, projections) -> float:
    """rel err of the compressed model with full-rank identity projections vs the model itself."""
    ids = eval_ids()
    return rel_err(forward(compressed_copy(model, identity_projections(projections)), ids, **_kw(arch)),
                   forward(model, ids, **_kw(arch)))


def check_lowrank(arch: Arch, model, projections) -> tuple[float, float]:
    """(rel err vs the independent low-rank reference, rel change vs the original model) at rank R."""
    ids = eval_ids()
    out = forward(compressed_copy(model, projections), ids, **_kw(arch))
    return rel_err(out, reference(arch, model, projections, ids)), rel_err(out, forward(model, ids, **_kw(arch)))


def check_generate(arch: Arch, model, projections, **gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressed model's generate, eager generate of the UNcompressed model with LowRankCache(P))."""
    import kvfx
    ids = eval_ids(seed=11, batch=1, tokens=PROMPT)
    gen = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0) | gen
    with torch.no_grad():
        expected = model.generate(ids, past_key_values=kvfx.LowRankCache(projections), **gen)
        got = compressed_copy(model, projections).generate(ids, **gen)
    return got, expected


def explain_text(model, ids=None) -> tuple[str, "object"]:
    import contextlib
    import io

    import kvfx
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exp = kvfx.explain(model, eval_ids() if ids is None else ids)
    return buf.getvalue(), exp
