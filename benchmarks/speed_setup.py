"""Helpers for benchmarks/speed.py: models, configurations, caches (build, fill, bytes), memory and bandwidth.

Only kvfx's public API is used (kvfx.calibrate / compress / decompress / make_cache / rotate_latents,
kvfx.cache.cache_nbytes, kvfx.compress.cache_kwarg): kvfx's internals may change under this benchmark.
"""
from __future__ import annotations

import gc
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field

import torch

import kvfx
from kvfx.cache import cache_nbytes
from kvfx.calib.collect import collect_stats, fit
from kvfx.compress import cache_kwarg
from kvfx.data import calibration_mix

GiB, MiB = 2 ** 30, 2 ** 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_CONTEXT = 32768

# ---------------------------------------------------------------------------------------------- models
# llama-rand: a real attention shape (Llama-2-7B/Llama-3-8B-like: head_dim 128, 32 query heads over 8 kv heads,
# hidden 4096, MLP 11008) with random weights and only --llama-layers layers.
LLAMA_RAND = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128)
LLAMA_TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, num_hidden_layers=2)
MODELS = ("smollm2", "llama-rand", "llama-tiny")


@dataclass(frozen=True)
class Shape:
    """What the cache of a model looks like (all layers alike) and what its weights weigh."""
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int

    def full_cache_bytes(self, batch: int, tokens: int, dtype: torch.dtype) -> int:
        """Keys + values at full width in the model's dtype (what transformers' own caches hold)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * batch * tokens * _itemsize(dtype)

    def weight_bytes(self, dtype: torch.dtype) -> int:
        return self.params * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_config(name: str, llama_layers: int):
    if name == "smollm2":
        from kvfx.models import default_model_config
        return default_model_config()
    from transformers import LlamaConfig
    shape = LLAMA_RAND | {"num_hidden_layers": llama_layers} if name == "llama-rand" else LLAMA_TINY
    return LlamaConfig(**shape, max_position_embeddings=65536, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       attn_implementation="sdpa")


def model_shape(config) -> Shape:
    """Cache shape from the config; parameter count from a meta-device instance (nothing allocated)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    heads = config.num_attention_heads
    return Shape(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                 getattr(config, "head_dim", None) or config.hidden_size // heads, config.vocab_size, params)


def model_label(name: str, shape: Shape) -> str:
    if name == "smollm2":
        return "smollm2"
    return f"{name} ({shape.layers} layers)"


def load_model(name: str, config, dtype: torch.dtype, device: torch.device):
    if name == "smollm2":
        from kvfx.models import load_default_model
        model, tok = load_default_model(dtype)
        model.kvfx_bench_tokenizer = tok  # real calibration text for layouts that depend on it (allocate_bits)
    else:
        from transformers import LlamaForCausalLM
        from transformers.initialization import no_init_weights
        with no_init_weights():
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
        _fill_random(model)
    return model.to(device).eval()


def _fill_random(model, seed: int = 0) -> None:
    """Random weights fast (speed does not depend on their values): one N(0, 0.02²) block of 2^20 + 7 numbers
    tiled over every matrix (filling 1 G numbers one by one takes ~10 s on 2 cores); norm weights 1."""
    block = torch.randn((1 << 20) + 7, generator=torch.Generator().manual_seed(seed)) * 0.02
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for i in range(0, flat.numel(), block.numel()):
                part = flat[i:i + block.numel()]
                part.copy_(block[:part.numel()])


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    name: str
    family: str                      # "original", "kvfx" or "peer"
    granularity: str = "head"
    rank: float = 1.0
    quantize: str | None = None      # kvfx latents stored as int8 / int4 (rotated first); "bits": allocate_bits
    method: str = "kqsvd"
    nbits: int = 0                   # peer: quanto bits
    levels: tuple = (8, 4, 3, 2)     # "bits": allocate_bits' band formats (kvfx-kv-bits842-*: without int3;
                                     # kvfx-kv-bits5-*: with int5, the recipe's since session 26)
    decoded: bool = False            # low-bit rows decoded to float32 in the kernel (KVFX_NO_AMX=1: no integer path)
    avx2_integer: bool = False       # the kernel's opt-in AVX2 integer path (KVFX_AVX2_INTEGER=1)
    tile: bool = False               # per-head int4 / int8 rows on AMX's tile unit, not VNNI (KVFX_NO_VNNI=1)
    exact: tuple = (0, 0)            # "bits": (sinks, recent) tokens held in 16 bits (reserved at EXACT_CONTEXT)
    uncentred: bool = False          # "bits": latents rounded around zero (Projections.uncentred: an ablation)
    rounding_weight: float = 1.0     # "bits": allocate_bits' rounding_weight (-rwR)
    aten_linear: bool = False        # kvfx: linears left to ATen (KVFX_NO_DECODE_LINEAR=1)
    kvfx_linear: bool = False        # original: compiled with kvfx's decode-linear pass alone (passes/decode_linear.py)
    py_attend: bool = False          # kvfx: decode attention through the Python op (KVFX_NO_DECODE_KERNEL=1)
    bmm: bool = False                # kvfx: a decode step's small matmuls left as ATen bmm (KVFX_NO_DECODE_MATMUL=1)
    ungrouped: bool = False          # kvfx: one linear call a weight, not (q, k, v) / (gate, up) (KVFX_NO_LINEAR_GROUPS=1)
    py_codec: bool = False           # kvfx: the cache's writes / reads through the Python ops (KVFX_NO_CPP_CODEC=1)

    def kinds(self, wanted: list[str]) -> list[str]:
        """Cache kinds this configuration runs with (kvfx: each of --cache-kinds)."""
        if self.family == "original":
            return [self.name.split("-")[1]]
        return ["quantized"] if self.family == "peer" else list(wanted)


_KVFX = re.compile(r"kvfx-(head|layer|kv)-([0-9]*\.?[0-9]+)(?:-(int8|int4))?(-decoded|-avx2int|-tile)?(-atenlinear)?(-pyattend)?"
                   r"(-bmm)?(-ungrouped)?(-pycodec)?")
# allocate_bits' bands in BUDGET (842: no int3; 5: with int5; 5e8: with int5 and e8 lattice codes for int2), -sSrW: the first S and last W tokens also held in 16 bits, -rwR: rounding_weight R
_BITS = re.compile(r"kvfx-kv-bits(842|5e8|5)?-([0-9]*\.?[0-9]+)(?:-s([0-9]+)r([0-9]+))?(-decoded|-avx2int)?(-uncentred)?(-atenlinear)?(-pyattend)?(-pycodec)?"
                   r"(?:-rw([0-9]*\.?[0-9]+))?")
LEVELS = {None: (8, 4, 3, 2), "842": (8, 4, 2), "5": (8, 5, 4, 3, 2), "5e8": (8, 5, 4, 3, "e8")}
EXACT_CONTEXT = 512  # exact rows' bytes reserved from the budget at the quality protocol's context (same layout)
DEFAULT_CONFIGS = ["original-dynamic", "original-static", "kvfx-head-0.5", "kvfx-head-0.25", "kvfx-layer-0.5",
                   "kvfx-layer-0.25", "kvfx-kv-0.5", "kvfx-kv-0.25", "kvfx-kv-0.5-int8", "kvfx-kv-0.9375-int4",
                   "kvfx-kv-0.5-int4", "kvfx-identity", "peer-quanto-int4", "peer-quanto-int2"]


def parse_config(name: str) -> Config:
    if name in ("original-dynamic", "original-static"):
        return Config(name, "original")
    if name in ("original-dynamic-kvfxlinear", "original-static-kvfxlinear"):
        return Config(name, "original", kvfx_linear=True)
    if name in ("kvfx-identity", "kvfx-identity-atenlinear"):
        return Config(name, "kvfx", method="identity", aten_linear=name.endswith("-atenlinear"))
    if name in ("peer-quanto-int4", "peer-quanto-int2"):
        return Config(name, "peer", nbits=int(name[-1]))
    m = _BITS.fullmatch(name)
    if m and 0 < float(m.group(2)) < 1 and (m.group(10) is None or 0 < float(m.group(10)) <= 1):
        return Config(name, "kvfx", "kv", float(m.group(2)), "bits", levels=LEVELS[m.group(1)],
                      decoded=m.group(5) == "-decoded", avx2_integer=m.group(5) == "-avx2int",
                      exact=(int(m.group(3) or 0), int(m.group(4) or 0)), uncentred=bool(m.group(6)),
                      aten_linear=bool(m.group(7)), py_attend=bool(m.group(8)), py_codec=bool(m.group(9)),
                      rounding_weight=float(m.group(10) or 1.0))
    m = _KVFX.fullmatch(name)
    if m and 0 < float(m.group(2)) <= 1 and not (m.group(4) and not m.group(3)):
        return Config(name, "kvfx", m.group(1), float(m.group(2)), m.group(3), decoded=m.group(4) == "-decoded",
                      avx2_integer=m.group(4) == "-avx2int", tile=m.group(4) == "-tile", aten_linear=bool(m.group(5)),
                      py_attend=bool(m.group(6)), bmm=bool(m.group(7)), ungrouped=bool(m.group(8)),
                      py_codec=bool(m.group(9)))
    raise ValueError(f"unknown configuration {name!r}: use original-dynamic, original-static, kvfx-identity, "
                     "peer-quanto-int4, peer-quanto-int2, kvfx-{head|layer|kv}-RANK[-int8|-int4] with RANK in "
                     "(0, 1] (e.g. kvfx-kv-0.5-int8) or kvfx-kv-bits-BUDGET (allocate_bits, BUDGET in (0, 1); "
                     "kvfx-kv-bits842-BUDGET: int8/int4/int2 bands only, as before int3; kvfx-kv-bits5-BUDGET: "
                     "int8/int5/int4/int3/int2 bands; kvfx-kv-bits5e8-BUDGET: int8/int5/int4/int3/e8 bands; + '-sSrW': the first S and "
                     "last W tokens also held in 16 bits, e.g. kvfx-kv-bits-0.125-s4r32; + '-uncentred': rounded around "
                     "zero, not the calibration mean; + '-rwR' (last): allocate_bits' rounding_weight R in (0, 1]); a low-bit kvfx "
                     "configuration + '-decoded': its rows decoded to float32 in the kernel (no integer path), "
                     "+ '-avx2int': the kernel's opt-in AVX2 integer path (KVFX_AVX2_INTEGER=1), + '-tile': per-head "
                     "int4 / int8 rows on AMX's tile unit, not VNNI (KVFX_NO_VNNI=1); a kvfx configuration "
                     "+ '-atenlinear': its linears left to ATen (KVFX_NO_DECODE_LINEAR=1); a kvfx configuration "
                     "+ '-pyattend': decode attention through the Python op (KVFX_NO_DECODE_KERNEL=1); a per-head / "
                     "layer / kv configuration + '-bmm' (last): a decode step's small matmuls left to ATen's bmm "
                     "(KVFX_NO_DECODE_MATMUL=1), + '-ungrouped' (last): one linear call a weight, not one for q, k, v "
                     "and one for gate, up (KVFX_NO_LINEAR_GROUPS=1), + '-pycodec' (last): the cache's writes and "
                     "reads through kvfx's Python ops, not their C++ twins (KVFX_NO_CPP_CODEC=1); "
                     "original-dynamic-kvfxlinear "
                     "/ original-static-kvfxlinear: the original with kvfx's decode linears only")


def kvfx_linear_backend(compile_opts: dict):
    """A torch.compile backend for the original: kvfx's decode-linear pass alone, then Inductor with the run's
    mode / options (the same inner compiler kvfx.compress uses)."""
    from kvfx.passes.compile import CompileOptions, inner_compiler
    from kvfx.passes.decode_linear import decode_linears, wanted
    backend, mode = compile_opts.get("backend") or "inductor", compile_opts.get("mode")
    options = torch._inductor.list_mode_options(mode) if mode and backend == "inductor" else {}
    inner = inner_compiler(CompileOptions(backend=backend, mode=mode, options=options))
    return lambda gm, ex: inner(decode_linears(gm) if wanted(ex) else gm, ex)  # kvfx's backend's rule


# Config flags and the environment switch each sets while its configuration runs.
SWITCHES = {"decoded": "KVFX_NO_AMX", "avx2_integer": "KVFX_AVX2_INTEGER", "tile": "KVFX_NO_VNNI",
            "aten_linear": "KVFX_NO_DECODE_LINEAR", "py_attend": "KVFX_NO_DECODE_KERNEL", "bmm": "KVFX_NO_DECODE_MATMUL",
            "ungrouped": "KVFX_NO_LINEAR_GROUPS", "py_codec": "KVFX_NO_CPP_CODEC"}


class Applied:
    """One configuration applied to the (shared, original) model; `undo` restores the model exactly."""

    def __init__(self, model, config: Config, kind: str, compile_opts: dict, projections: dict, peer_opts: dict):
        self.model, self.config, self.kind, self.note = model, config, kind, ""
        self.cache_kwarg = cache_kwarg(model)
        self.peer_opts = peer_opts
        for name in self._switches():  # this configuration's rows only: set while it runs (the kernel reads its
            os.environ[name] = "1"       # switches at every call, the passes when a graph compiles), removed by undo
        if config.family == "kvfx":
            proj = projections_for(model, config, projections)
            kvfx.compress(torch.compile(model, **compile_opts), proj, cache=kind,
                          quantize=proj.quantize if config.quantize == "bits" else config.quantize)
        elif config.kvfx_linear:
            model.forward = torch.compile(model.forward, backend=kvfx_linear_backend(compile_opts))
        else:
            model.forward = torch.compile(model.forward, **compile_opts)

    def make_cache(self, max_cache_len: int):
        from transformers import DynamicCache, QuantizedCache, StaticCache
        cfg = self.model.config
        if self.config.family == "kvfx":
            return kvfx.make_cache(self.model, self.kind, max_cache_len)  # dynamic: room reserved, as generate does
        if self.kind == "static":
            return StaticCache(config=cfg, max_cache_len=max_cache_len)
        if self.kind == "quantized":
            return QuantizedCache(backend="quanto", config=cfg, nbits=self.config.nbits, **self.peer_opts)
        return DynamicCache(config=cfg)

    def run_eager(self, reason: str) -> None:
        """The peer when its cache cannot be compiled: the model's own forward, said so in the row."""
        self.model.__dict__.pop("forward", None)
        torch._dynamo.reset()
        self.note = f"eager: compile failed ({reason})"

    def _switches(self) -> list[str]:
        return [env for flag, env in SWITCHES.items() if getattr(self.config, flag)]

    def undo(self) -> None:
        for name in self._switches():
            os.environ.pop(name, None)
        if self.config.family == "kvfx":
            try:
                kvfx.decompress(self.model)
            except kvfx.ProjectionError:  # compress undid itself when its first forward failed
                pass
        else:
            self.model.__dict__.pop("forward", None)
        torch._dynamo.reset()
        release_memory()


def release_memory() -> None:
    """gc, then hand freed memory back (CUDA: the caching allocator's blocks; CPU: freed heap pages, glibc
    malloc_trim), so RSS / free device memory measure what is still held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def projections_for(model, config: Config, memo: dict):
    """Projections for a kvfx config. Speed does not depend on their values, so they are calibrated on one batch of
    128 random tokens; int8/int4 latents are rotated first (kvfx.rotate_latents: exact, what a quality run does);
    "bits" latents come from kvfx.allocate_bits, whose band widths (how many columns a row keeps, so how much
    arithmetic a step does) depend on the statistics: on SmolLM2 they are calibrated on 4 windows of the shipped
    calibration mix, the layout a quality run gets; on random-weight models, on the random tokens."""
    key = (config.method, config.granularity, config.rank, config.quantize is not None, config.levels, config.exact,
           config.uncentred, config.rounding_weight)
    if key not in memo:
        device = next(model.parameters()).device
        ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        if config.quantize == "bits":
            tok = getattr(model, "kvfx_bench_tokenizer", None)
            windows = calibration_mix(tok, 4, 512).split(1) if tok is not None else [ids]
            stats = collect_stats(model, [w.to(device) for w in windows], progress=False)
            full = fit(stats, config.method, 1.0, granularity="kv")
            memo[key] = kvfx.allocate_bits(stats, full.uncentred() if config.uncentred else full, config.rank,
                                           levels=config.levels, exact=config.exact, context=EXACT_CONTEXT,
                                           rounding_weight=config.rounding_weight)
            return memo[key]
        proj = kvfx.calibrate(model, [ids.to(device)], method=config.method, rank=config.rank,
                              granularity=config.granularity, progress=False)
        memo[key] = kvfx.rotate_latents(proj) if config.quantize else proj
    return memo[key]


# ---------------------------------------------------------------------------------------------- caches
def fill_cache(cache, shape: Shape, batch: int, tokens: int, dtype, device, chunk: int = 8192) -> None:
    """Random cache contents of the right shape: cache.update(k, v, layer_idx) per layer with full-width
    [batch, kv_heads, tokens, head_dim] states in the model's dtype (chunked), eagerly. Every cache kind (transformers'
    dynamic / static / quantized, kvfx's LowRankCache) projects, quantises or stores them as it would in a prefill.
    One random block is reused for every chunk and layer: values do not change speed."""
    size = min(chunk, tokens)
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(batch, shape.kv_heads, size, shape.head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(k.shape, generator=g, device=device, dtype=dtype)
    with torch.no_grad():
        for start in range(0, tokens, size):
            n = min(size, tokens - start)
            for layer in range(shape.layers):
                out = cache.update(k[:, :, :n], v[:, :, :n], layer)
                del out


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor; a tensor subclass (quanto's packed codes, scales, shifts) by its inner tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def allocated_bytes(cache) -> int:
    """Bytes of the storages behind the cache's tensors (each once): a cache whose keys/values are views of storage
    with spare room (grown geometrically, or preallocated) holds more than cache_bytes counts."""
    storages = {}

    def add(t: torch.Tensor) -> None:
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            for n in t.__tensor_flatten__()[0]:
                add(getattr(t, n))
        elif t.numel():
            s = t.untyped_storage()
            storages[(s.device, s.data_ptr())] = s.nbytes()

    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values", "kvfx_exact_keys", "kvfx_exact_values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                add(t)
    return sum(storages.values())


def cache_bytes(cache) -> int:
    """Bytes the cache holds: kvfx.cache.cache_nbytes (keys/values; a static cache counts its whole preallocated
    length) plus, for transformers' QuantizedCache, its quantized codes, scales and shifts (cache_nbytes sees only
    its full-precision residual)."""
    total = cache_nbytes(cache)
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += _tensor_bytes(t)
    return total


# ---------------------------------------------------------------------------------------------- memory, timing
class Memory:
    """Process memory: on CPU resident set size from /proc/self/status, with the high-water mark VmHWM reset by
    writing 5 to /proc/self/clear_refs (ru_maxrss is monotone); on CUDA torch's allocator counters."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda or self._try_reset()

    @staticmethod
    def _status(field_name: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field_name}")

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else self._status("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            self._try_reset()

    def peak(self) -> int:
        """Peak since reset_peak (if VmHWM cannot be reset: the current RSS, a lower bound)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM") if self.resettable else self.current()

    def available(self) -> int:
        """Memory this process may still take: free device memory, or MemAvailable (+ what we hold already)."""
        if self.cuda:
            return torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated()
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return info["MemAvailable"] + self.current()


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def read_bandwidth(device: torch.device, gib: float = 1.0, runs: int = 5) -> float:
    """Bytes/s of torch.sum over a float32 tensor of `gib` GiB (median of `runs` after one warm-up)."""
    sync = synchronizer(device)
    x = torch.ones(int(gib * GiB) // 4, device=device)
    x.sum()
    times = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t)
    nbytes = x.numel() * 4
    del x
    return nbytes / statistics.median(times)


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far, from Dynamo's counters."""
    c = torch._dynamo.utils.counters
    return c["stats"]["unique_graphs"], sum(c["graph_break"].values())


@dataclass
class Fit:
    """extra memory ≈ fixed + per_token · tokens (least squares over the measured rows, both clipped at 0)."""
    fixed: float
    per_token: float
    points: list = field(default_factory=list)


def fit_extra(points: list[tuple[int, int]], noise: int = 64 * MiB) -> Fit:
    """A per-token slope only where the extras differ by more than allocator noise; else the largest as fixed."""
    xs = sorted({x for x, _ in points})
    ys = [y for _, y in points]
    if len(xs) < 2 or max(ys) - min(ys) < noise:
        return Fit(float(max(y for _, y in points)), 0.0, points)
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    slope = max(slope, 0.0)
    return Fit(max(my - slope * mx, 0.0), slope, points)


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 8GiB, 512MiB, 8e9)")
    unit = (m.group(2) or "").rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30,
             "ti": 2 ** 40}.get(unit)
    if scale is None:
        raise ValueError(f"cannot read the unit of {text!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    return int(float(m.group(1)) * scale)


def estimate_bytes(shape: Shape, dtype, batch: int, tokens: int) -> int:
    """Conservative memory need of one row before anything is allocated: weights (+25 %: kvfx's folded copies of the
    attention weights), twice the full-width cache (a compiled step of a dynamic cache holds the old and the
    concatenated tensors at once; the quantized peer dequantises a layer while filling) and 0.5 GiB of margin."""
    return int(1.25 * shape.weight_bytes(dtype) + 2 * shape.full_cache_bytes(batch, tokens, dtype) + GiB // 2)


def longest_fitting(shape: Shape, dtype, batch: int, limit: int) -> int:
    """The longest context estimate_bytes admits at `batch` under `limit` (0 if none)."""
    free = limit - 1.25 * shape.weight_bytes(dtype) - GiB // 2
    return max(0, math.floor(free / (2 * shape.full_cache_bytes(batch, 1, dtype))))
