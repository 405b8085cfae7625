"""Low-rank KV cache for transformers' generate: stores k·A and v·C (rank R), returns K̃·Bᵀ and Ṽ·Dᵀ.

Like transformers' QuantizedCache, each layer stores a compressed form and hands the model's Python code a
shape-consistent reconstruction, so Dynamo traces it with ordinary shapes. kvfx's graph pass then
reassociates SDPA(q, K̃·Bᵀ, Ṽ·Dᵀ) into SDPA(q·B, K̃, Ṽ)·Dᵀ: compiled code never materialises d-wide keys.
In eager mode the reconstruction is real and the result is the same low-rank attention.
A shared K+V latent (`SiteProjection.shared`) stores one latent c = k·A + v·C in the key slot (the value slot
stays 0 wide) and rebuilds keys and values from it: c·Bᵀ and c·Dᵀ.
With `quantize="int8"` or `"int4"` each slot holds int8 rows [codes | scale codes] (kvfx.quant) and reads dequantise
them. A format with exact rows ("int4|sinks4|recent32") also keeps the latents of the first and the last tokens in 16
bits (a fixed buffer of sinks + recent slots, the recent ones a ring) and reads take them where held
(`kvfx::dequantize` writes them over their codes' rows; a decode step's kernel reads them beside the codes).
Projections with calibration means (SiteProjection.latent_offsets) make a low-bit cache store latent − offset (codes
and exact rows) and add the offset back on read: rounding around the mean, exact otherwise.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from . import quant
from .ops import lowbit_attention  # noqa: F401  (registers torch.ops.kvfx.*)
from .passes import cache_contract as cc, decode_kernel
from .projections import Projections, SiteProjection


class _LowRankLayerMixin:
    """Projection on write, reconstruction on read, through the attributes passes/cache_contract.py names."""

    def _init_projection(self, proj: SiteProjection, dtype, device, quantize=None) -> None:
        quant.check(quantize)
        for width in {proj.key_rank, 0 if proj.shared else proj.value_rank} - {0}:
            quant.row_bytes(quantize, width)  # a bands format must span the latent (a clear error, before any write)
        self.kvfx_quantize = quantize
        self.kvfx_cpp_codec = bool(quantize) and torch.device(device).type == "cpu" and decode_kernel.cpp_codec()
        self.kvfx_exact = quant.exact_of(quantize)  # (sinks, recent) tokens whose latents are held in 16 bits
        self.kvfx_exact_keys = self.kvfx_exact_values = self.kvfx_exact_positions = None
        cast = lambda t: t.to(dtype=dtype, device=device).contiguous()  # noqa: E731
        # joint latent: down is [h·d, R] (2-D) and the cache holds one latent "head" [b, 1, N, R]
        down = lambda t: t[0] if proj.joint else t  # noqa: E731
        # the attribute names are the matcher's only view of these tensors: passes/cache_contract.py
        setattr(self, cc.KEY_DOWN, cast(down(proj.key_down)))            # [h, d, Rk] or [h·d, Rk]
        setattr(self, cc.KEY_UP, cast(proj.key_up.transpose(1, 2)))      # [h, Rk, d]  (Bᵀ)
        setattr(self, cc.VALUE_DOWN, cast(down(proj.value_down)))        # [h, d, Rv] or [h·d, Rv]
        setattr(self, cc.VALUE_UP, cast(proj.value_up.transpose(1, 2)))  # [h, Rv, d]  (Dᵀ)
        self.kvfx_shared = proj.shared
        # low-bit latents are rounded around the calibration mean's latent: subtracted on write, added back on read
        offsets = proj.latent_offsets() if quantize else (None, None)
        self.kvfx_key_offset, self.kvfx_value_offset = (None if o is None else cast(o) for o in offsets)
        self.kvfx_widths = (self.kvfx_key_down.shape[-1], 0 if proj.shared else self.kvfx_value_down.shape[-1])

    @staticmethod
    def _down(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if p.dim() == 2:  # joint: [b, h, n, d] -> [b, n, h·d] -> [b, 1, n, R]
            return torch.matmul(x.transpose(1, 2).flatten(2), p).unsqueeze(1)
        return torch.matmul(x, p)

    def _keep_exact(self, k: torch.Tensor, v: torch.Tensor, start) -> None:
        """Write the latents of the sink tokens (positions < S) and of the last W new tokens into their slots: a sink
        at its position, a recent token at S + (p - S) mod W (a ring); the rest go to the spare last slot, whose
        position stays -1 (never read). Tensor ops only: no guard on the position, no recompile as it moves."""
        sinks, recent = self.kvfx_exact
        slots = sinks + recent + quant.EXACT_SLOTS_SPARE
        dt = quant.exact_dtype(k.dtype)
        if self.kvfx_exact_keys is None or self.kvfx_exact_keys.shape[0] != k.shape[0]:
            self.kvfx_exact_keys = k.new_zeros(*k.shape[:2], slots, k.shape[-1], dtype=dt)
            self.kvfx_exact_values = v.new_zeros(*v.shape[:2], slots, v.shape[-1], dtype=dt)
            self.kvfx_exact_positions = torch.full((slots,), -1, dtype=torch.long, device=k.device)
            if isinstance(self, StaticLayer) and not torch.compiler.is_compiling():  # CUDA graphs: fixed addresses
                for t in (self.kvfx_exact_keys, self.kvfx_exact_values, self.kvfx_exact_positions):
                    torch._dynamo.mark_static_address(t)
        p = torch.arange(k.shape[-2], device=k.device) + start
        keep = (p < sinks) | (p > p[-1] - recent)
        slot = torch.where(p < sinks, p, sinks + torch.remainder(p - sinks, max(recent, 1)))
        slot = torch.where(keep, slot, slots - 1)
        self.kvfx_exact_positions.index_copy_(0, slot, torch.where(keep, p, -1))
        self.kvfx_exact_keys.index_copy_(2, slot, k.to(dt))
        if v.shape[-1]:
            self.kvfx_exact_values.index_copy_(2, slot, v.to(dt))

    def _read_args(self, rows: torch.Tensor | None, offset: torch.Tensor | None) -> tuple:
        """kvfx::dequantize's optional arguments: the exact rows and their positions for a format that holds some,
        the latent offset added back (both positional: passes/decode.py reads them from the node's args)."""
        exact = (rows, self.kvfx_exact_positions) if sum(self.kvfx_exact) else ()
        return exact if offset is None else (*(exact or (None, None)), offset)

    def _exact_batch(self, fn) -> None:
        """Apply a batch reordering (beam search, batch selection) to the exact rows as transformers does to keys."""
        if self.kvfx_exact_keys is not None:
            self.kvfx_exact_keys, self.kvfx_exact_values = fn(self.kvfx_exact_keys), fn(self.kvfx_exact_values)

    def _exact_crop(self, length: int) -> None:
        """Forget exact rows at positions >= length (a crop)."""
        if self.kvfx_exact_positions is not None:
            self.kvfx_exact_positions.masked_fill_(self.kvfx_exact_positions >= length, -1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._exact_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        super().reset()
        self._exact_crop(0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        k = self._down(key_states, self.kvfx_key_down)
        v = self._down(value_states, self.kvfx_value_down)
        if self.kvfx_shared:  # one latent: cached once, read as key and as value
            k, v = k + v, v[..., :0]
        kind, (rk, rv) = self.kvfx_quantize, self.kvfx_widths
        if self.kvfx_key_offset is not None:  # rows (codes and exact ones) hold latent - offset
            k = k - self.kvfx_key_offset
            if rv:
                v = v - self.kvfx_value_offset
        if sum(self.kvfx_exact):
            self._keep_exact(k, v, self._start())
        if kind:
            k = _quantize(k, kind, self.kvfx_cpp_codec)
            v = _quantize(v, kind, self.kvfx_cpp_codec) if rv else v.to(torch.int8)
        keys, values = self._store(k, v, *args, **kwargs)
        if kind:  # one opaque node each: a decode step reads the codes directly (kvfx::decode_attention)
            codes = quant.codes_of(kind)
            keys = torch.ops.kvfx.dequantize(keys, rk, codes, key_states.dtype,
                                             *self._read_args(self.kvfx_exact_keys, self.kvfx_key_offset))
            if rv:
                values = torch.ops.kvfx.dequantize(values, rv, codes, key_states.dtype,
                                                   *self._read_args(self.kvfx_exact_values, self.kvfx_value_offset))
        if self.kvfx_shared:
            return torch.matmul(keys, self.kvfx_key_up), torch.matmul(keys, self.kvfx_value_up)
        return torch.matmul(keys, self.kvfx_key_up), torch.matmul(values, self.kvfx_value_up)


def _quantize(x: torch.Tensor, kind: str, cpp_codec: bool) -> torch.Tensor:
    """Latent rows as the cache stores them. On CPU: kvfx::quantize, the C++ encoder (one opaque node; Inductor's
    kernel for quant.quantize's ops runs ~10× slower on many rows, and on a decode step's one row allocates a buffer
    per band's scale and codes, ~40 a layer); compiled, passes/decode_kernel.py calls it as a C++ op. One row without
    that pass (KVFX_NO_DECODE_KERNEL=1, no C++ build) or another device: quant.quantize's torch ops, which Inductor
    fuses into the step's own kernels (the Python op's dispatch would cost more than they do). `cpp_codec`: whether
    the pass will (decode_kernel.cpp_codec(), read when the cache is built: Dynamo then guards on a bool)."""
    if x.device.type == "cpu" and (x.shape[-2] > 1 or cpp_codec):
        return torch.ops.kvfx.quantize(x, kind)
    return quant.quantize(x, kind)


class _Slot:
    """One cached tensor of a growing layer: storage [b, h, capacity, w] written in place, and `filled`, an empty
    tensor whose last size is the number of cached tokens (a size Dynamo keeps symbolic, unlike an int attribute,
    on which it would specialise and recompile every step)."""

    def __init__(self, storage: torch.Tensor | None = None, filled: int = 0):
        self.storage, self.filled = storage, torch.empty(0, filled)
        torch._dynamo.maybe_mark_dynamic(self.filled, 1)

    @classmethod
    def holding(cls, t: torch.Tensor | None, capacity: int = 0) -> "_Slot":
        """A slot whose filled part is a copy of t ([b, h, n, w]), with room for `capacity` tokens."""
        if t is None or t.dim() != 4:  # DynamicLayer's lazy init stores a 1-D empty tensor
            return cls()
        storage = t.new_empty(*t.shape[:2], max(capacity, t.shape[2] + 1), t.shape[3])
        storage[:, :, : t.shape[2]].copy_(t)
        return cls(storage, t.shape[2])

    def view(self) -> torch.Tensor | None:
        return None if self.storage is None else self.storage[:, :, : self.filled.shape[-1]]

    def append(self, x: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
        """Write x [b, h, q, w] after the filled part, in place. Full storage is replaced by one a quarter larger
        (at least room.shape[-1] tokens: the reservation). One row always stays free: a filled part that is the
        whole storage would be contiguous, and Dynamo guards on that (a recompile the step the storage fills)."""
        n, q = self.filled.shape[-1], x.shape[-2]
        if self.storage is None or self.storage.shape[-2] <= n + q or self.storage.shape[0] != x.shape[0]:
            # the reservation exactly while it suffices (a guard only in this branch), else a quarter more
            capacity = room.shape[-1] + 1 if room.shape[-1] >= n + q else n + q + (n + q) // 4 + 256
            grown = x.new_empty(*x.shape[:2], capacity, x.shape[3])
            if n:
                grown[:, :, :n] = self.storage[:, :, :n]
            self.storage = grown
        self.storage.index_copy_(2, torch.arange(q, device=x.device) + n, x)
        self.filled = self.filled.new_empty(0, n + q)
        return self.storage[:, :, : n + q]


class LowRankDynamicLayer(_LowRankLayerMixin, DynamicLayer):
    """Growing rank-R cache layer, the default for generate. Unlike transformers' DynamicLayer, whose torch.cat
    copies the whole cache at every step, new rows are written in place into storage with spare room, sized by
    `reserve` tokens (generate reserves prompt + new tokens) and grown geometrically past it; `keys` / `values`
    are views of the filled part, so transformers' crop / reorder / batch methods work unchanged."""

    def __init__(self, proj: SiteProjection, dtype=torch.float32, device="cpu", quantize=None, reserve: int = 0):
        self._slots = {"keys": _Slot(), "values": _Slot()}
        self._room = torch.empty(0, reserve)  # its size: tokens to make room for (a symbolic size, no guard on it)
        torch._dynamo.maybe_mark_dynamic(self._room, 1)
        super().__init__()
        self._init_projection(proj, dtype, device, quantize)

    keys = property(lambda self: self._slots["keys"].view(),
                    lambda self, t: self._slots.__setitem__("keys", _Slot.holding(t, self._capacity())))
    values = property(lambda self: self._slots["values"].view(),
                      lambda self, t: self._slots.__setitem__("values", _Slot.holding(t, self._capacity())))

    def _capacity(self) -> int:
        storage = self._slots["keys"].storage if hasattr(self, "_slots") else None
        return 0 if storage is None else storage.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def _store(self, k: torch.Tensor, v: torch.Tensor, *args, **kwargs):
        self.is_initialized = True
        return self._slots["keys"].append(k, self._room), self._slots["values"].append(v, self._room)

    def get_seq_length(self) -> int:
        return self._slots["keys"].filled.shape[-1] if self.is_initialized else 0

    def _start(self):
        return self.get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._exact_crop(self.get_seq_length())

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._exact_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._exact_batch(lambda t: t[indices, ...])


class LowRankStaticLayer(_LowRankLayerMixin, StaticLayer):
    """Preallocated rank-R cache layer ([batch, kv_heads, max_cache_len, R]) for CUDA graphs."""

    def _store(self, k: torch.Tensor, v: torch.Tensor, *args, **kwargs):
        return StaticLayer.update(self, k, v, *args, **kwargs)

    def __init__(self, proj: SiteProjection, max_cache_len: int, dtype=torch.float32, device="cpu", quantize=None):
        super().__init__(max_cache_len=max_cache_len)
        self._init_projection(proj, dtype, device, quantize)

    def _start(self):
        return self.cumulative_length  # a tensor: the position moves without a guard

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._exact_crop(int(self.cumulative_length))


class LowRankCache(Cache):
    """One low-rank layer per attention site, in model order (= transformers' layer_idx). max_cache_len: the
    static cache's length; for the dynamic cache the tokens to reserve room for (it grows past them)."""

    def __init__(self, projections: Projections, kind: str = "dynamic", max_cache_len: int | None = None,
                 dtype=torch.float32, device="cpu", quantize=None):
        quant.check(quantize)
        if kind not in ("dynamic", "static"):
            raise ValueError(f"cache kind must be 'dynamic' or 'static', got {kind!r}.")
        if kind == "static" and not max_cache_len:
            raise ValueError("a static low-rank cache needs max_cache_len (prompt + new tokens).")
        sites = [(p, quant.site(quantize, n)) for n, p in projections.sites.items()]
        if kind == "dynamic":  # max_cache_len: room reserved for that many tokens (it grows past them)
            layers = [LowRankDynamicLayer(p, dtype, device, q, reserve=max_cache_len or 0) for p, q in sites]
        else:
            layers = [LowRankStaticLayer(p, max_cache_len, dtype, device, q) for p, q in sites]
        super().__init__(layers=layers)
        self.kind, self.quantize = kind, quantize

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values (what the cache exists to shrink)."""
        total = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None),
                      getattr(layer, "kvfx_exact_keys", None), getattr(layer, "kvfx_exact_values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def cache_nbytes(cache: Cache) -> int:
    """Bytes of cached keys/values of any transformers Cache (for side-by-side comparisons)."""
    return LowRankCache.nbytes(cache)
