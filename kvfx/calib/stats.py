"""Streaming float64 Gram statistics per attention site (memory O(h·d²), independent of token count).

Per site and kv head g (query head i belongs to group g = i // (heads / kv_heads)):
    key       G_K[g]  = Σ_tokens kᵀk            (post-RoPE keys, as SDPA reads them)
    query     G_Q[g]  = Σ_{i∈g} Σ_tokens q_iᵀq_i (group-summed Grams: the per-head GQA objective)
    query_sum G_S[g]  = Σ_tokens (Σ_{i∈g} q_i)ᵀ(Σ_{i∈g} q_i)  (the seed's summed-query variant)
    value     G_V[g]  = Σ_tokens vᵀv
    output    G_O[g]  = Σ_{i∈g} W_O,i W_O,iᵀ    (W_O,i: the d rows of W_O that read head i)
With attention_weight = γ > 0 every token's key and value rows count f_t^γ, the attention it receives
(calib/weights.py); the query Grams and the first moments count every token once.
Cross-head Grams of the concatenated kv heads (key_joint, value_joint: [h·d, h·d]) serve the joint latent
(`granularity="layer"`, see `joint()`); with the key-value cross Gram kv_joint = Σ_tokens [k]ᵀ[v] they also serve
the shared K+V latent (`granularity="kv"`, see calib/shared.py). Stats from several processes add up (see calib/distributed.py, `reduce_stats`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .weights import attention_weights

_FIELDS = ("key", "query", "query_sum", "value", "key_joint", "value_joint", "kv_joint", "key_sum", "value_sum",
           "output")
_SUMMED = _FIELDS[:-1]  # accumulated over tokens (W_O Grams are not)


@dataclass
class SiteStats:
    heads: int
    kv_heads: int
    head_dim: int
    key: torch.Tensor        # [h, d, d] float64
    query: torch.Tensor
    query_sum: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    key_joint: torch.Tensor | None = None    # [h·d, h·d]
    value_joint: torch.Tensor | None = None
    kv_joint: torch.Tensor | None = None     # [h·d, h·d]: Σ [k_1 … k_h]ᵀ [v_1 … v_h]
    key_sum: torch.Tensor | None = None      # [h, d]: Σ_tokens k (first moments: the means kvfx.quant centres on)
    value_sum: torch.Tensor | None = None    # [h, d]: Σ_tokens v
    tokens: int = 0
    # γ of the attention-aware token weights (calib/weights.py): each token's row of the summed key / value Grams
    # counts f_t^γ; 0 (default) counts every token once. Query Grams and the first moments are never weighted.
    attention_weight: float = 0.0
    # with attention_weight > 0: value rows weighted by their own first-order cost u_t^γ (u_t = Σ_q p_qt²) instead
    # of the key's f_t^γ (calib/weights.py)
    own_value_weight: bool = False
    # learned calibrators (stiefel, matryoshka) also need a few whole sequences and W_O itself, not only Grams
    sample_limit: int = 0                    # keep the first `sample_limit` sequences of q/k/v
    samples: list = field(default_factory=list)
    w_rows: torch.Tensor | None = None       # [H, d, hidden], float32
    # derived results that calibrators memoise on these statistics (reference attention outputs, matryoshka's
    # trained bases); emptied whenever the statistics change (add / reduce_stats / set_output_weight)
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def empty(cls, heads: int, kv_heads: int, head_dim: int) -> "SiteStats":
        z = lambda: torch.zeros(kv_heads, head_dim, head_dim, dtype=torch.float64)  # noqa: E731
        j = lambda: torch.zeros(kv_heads * head_dim, kv_heads * head_dim, dtype=torch.float64)  # noqa: E731
        m = lambda: torch.zeros(kv_heads, head_dim, dtype=torch.float64)  # noqa: E731
        return cls(heads, kv_heads, head_dim, z(), z(), z(), z(), z(), j(), j(), j(), m(), m())

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def add(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, is_causal: bool = False,
            scale: float | None = None) -> None:
        """Accumulate one batch: q [b, H, n, d], k/v [b, h, N, d] (before any repeat_kv); attn_mask, is_causal and
        scale as the site's SDPA call takes them (they only matter with attention_weight > 0)."""
        self.memo.clear()
        b, H, n, d = q.shape
        h = k.shape[1]
        for i in range(min(b, self.sample_limit - len(self.samples))):
            self.samples.append(tuple(t[i].detach().float().cpu().clone() for t in (q, k, v)))
        dev = self.key.device    # statistics stay where they were made (CPU); activations may be on a GPU
        r = None
        if self.attention_weight:  # each token's key / value rows count its weight in the Grams below
            wk, wv = attention_weights(q, k, v, self.attention_weight, attn_mask, is_causal, scale)
            r = tuple(w.to(dev).sqrt()[:, None, :, None] for w in (wk, wv if self.own_value_weight else wk))
        q = q.detach().to(dev, torch.float64).reshape(b, h, self.group, n, d)
        k = k.detach().to(dev, torch.float64)
        v = v.detach().to(dev, torch.float64)
        if self.key_sum is not None:
            self.key_sum += k.sum((0, 2))
            self.value_sum += v.sum((0, 2))
        if r is not None:
            k, v = k * r[0], v * r[1]
        self.key += torch.einsum("bhnd,bhne->hde", k, k)
        self.value += torch.einsum("bhnd,bhne->hde", v, v)
        self.query += torch.einsum("bhgnd,bhgne->hde", q, q)
        qs = q.sum(2)
        self.query_sum += torch.einsum("bhnd,bhne->hde", qs, qs)
        if self.key_joint is not None:
            kj, vj = k.transpose(1, 2).reshape(-1, h * d), v.transpose(1, 2).reshape(-1, h * d)
            self.key_joint += kj.T @ kj
            self.value_joint += vj.T @ vj
            if self.kv_joint is not None:
                self.kv_joint += kj.T @ vj
        self.tokens += b * k.shape[2]

    def means(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(key mean, value mean) over the calibration tokens, [h, d] float32 each; None for statistics collected
        before first moments were (their projections round latents uncentred)."""
        if self.key_sum is None or self.value_sum is None or not self.tokens:
            return None
        return (self.key_sum / self.tokens).float(), (self.value_sum / self.tokens).float()

    def set_output_weight(self, w_rows: torch.Tensor) -> None:
        """w_rows [H, d, hidden]: the rows of W_O (in x·W_O form) that read each query head."""
        self.memo.clear()
        self.w_rows = w_rows.detach().float().cpu().clone()
        w = w_rows.detach().to(self.key.device, torch.float64).reshape(self.kv_heads, self.group, self.head_dim, -1)
        self.output = torch.einsum("hgdo,hgeo->hde", w, w)

    def joint(self) -> "SiteStats":
        """The same statistics seen as ONE head of width h·d (the joint cross-head latent): cross-head key and
        value Grams, block-diagonal query and output Grams (each query head reads only its own kv head)."""
        if self.key_joint is None:
            raise ValueError("these statistics have no cross-head Grams; collect them again with this kvfx.")
        bd = lambda g: torch.block_diag(*g)[None]  # noqa: E731
        return SiteStats(self.heads, 1, self.kv_heads * self.head_dim, self.key_joint[None], bd(self.query),
                         bd(self.query_sum), self.value_joint[None], bd(self.output), tokens=self.tokens)
