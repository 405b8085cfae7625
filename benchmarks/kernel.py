"""kvfx::decode_attention alone: the C++ CPU kernel against SDPA over a float copy, per latent shape.

One decode step's attention for one layer at context N (SmolLM2's shapes: 9 query heads, 3 kv heads), timed on a
warm cache (the same layer again and again: its rows stay in the CPU caches) and cold (30 layers in turn, as a
real step reads them: each layer's rows come from memory). Prints ms per layer, the kernel's GFLOP/s
(2·multiply-adds of the scores and value sums) and its read rate on the cold pass.

    python benchmarks/kernel.py                  # N=16384, batch 1
    python benchmarks/kernel.py --batch 4 --n 4096
    KVFX_NO_AMX=1 python benchmarks/kernel.py    # low-bit rows decoded to float32 (no integer path)
    KVFX_AVX2_INTEGER=1 python benchmarks/kernel.py   # AVX2-only CPUs: the opt-in integer path
    python benchmarks/kernel.py --stages          # AVX-512 VNNI / AMX CPUs: where a block's time goes, by stage

Bands rows (kv-bits-*) take the integer path too: on AMX and AVX-512 VNNI int2 codes as int4 groups, the int8 band as
int8 chunks, int3 / int5 bands transcoded to their levels (int4 nibbles / bytes) a block of rows at a time; on AVX2
int4 / int3 / int2 codes as 4-bit integers (not bands with an int8 band).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kvfx import quant
from kvfx.ops import lowbit_attention as la

# name: (latent heads, query rows per latent head, width, shared K+V latent, storage)
SHAPES = {"head-0.5-float32": (3, 3, 32, False, "float32"), "kv-0.5-float32": (1, 9, 192, True, "float32"),
          "head-0.5-int8": (3, 3, 32, False, "int8"), "head-0.5-int4": (3, 3, 32, False, "int4"),
          "head-0.25-int4": (3, 3, 16, False, "int4"),
          "kv-0.5-int8": (1, 9, 192, True, "int8"), "kv-0.9375-int4": (1, 9, 360, True, "int4"),
          # kvfx.allocate_bits' bands (int8 / int4 / int2 runs of one row) at 25 % and 12.5 % of a 16-bit cache
          "kv-bits-0.25": (1, 9, 304, True, "int8x80+int4x176+int2x48"),
          "kv-bits-0.125": (1, 9, 256, True, "int4x96+int2x160"),
          # the same with int3 bands (kvfx.allocate_bits' most common choice for SmolLM2 since int3 exists)
          "kv-bits3-0.25": (1, 9, 336, True, "int8x64+int4x160+int3x80+int2x32"),
          "kv-bits3-0.125": (1, 9, 256, True, "int4x64+int3x64+int2x128"),
          # with int5 bands (the recipe's since session 26; docs/calibration.md's example row): on AMX the int3 / int5
          # bands are transcoded to their levels first
          "kv-bits5-0.25": (1, 9, 368, True, "int8x16+int5x96+int4x160+int3x64+int2x32"),
          # kv-bits3-0.125 with e8 lattice codes in its int2 band's place (the same bytes; transcoded to int4 nibbles
          # on AMX / VNNI), and an allocation with them at 12.5 % (allocate_bits(..., levels=(8, 5, 4, 3, "e8")))
          "kv-bits3e8-0.125": (1, 9, 256, True, "int4x64+int3x64+e8x128"),
          "kv-bits5e8-0.125": (1, 9, 288, True, "int5x16+int4x16+int3x32+e8x224")}


def _rows(b, h, n, width, storage, spare=512):
    """A cache slot as kvfx's cache hands it over: a [:, :, :n] view of reserved storage."""
    x = torch.randn(b, h, n + spare, width)
    stored = x if storage == "float32" else quant.quantize(x, storage)
    return stored[:, :, :n]


def _layers(args, h, r, shared, storage):
    """args.layers layers' (keys, values) slots; a shared latent's values are its keys."""
    return [(k, k if shared else _rows(args.batch, h, args.n, r, storage))
            for k in (_rows(args.batch, h, args.n, r, storage) for _ in range(args.layers))]


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


STAGES = ("scale codes", "key scores", "softmax", "weights", "value sums")


def stage_split(args) -> None:
    """Where the integer path's blocks spend their time: a build that counts each stage's time-stamp-counter cycles
    (summed over the threads), per cached row, with the stages' shares, on the cold pass. On AMX CPUs per-head int4 /
    int8 rows (up to 4 query rows a kv head) run on AVX-512 VNNI, the shared latents on the tile unit, whose stages
    are coarser: its scale codes include the int3 / int5 bands' transcoding, its key scores the value rows' tile
    layout, its value sums the weights' rounding (weights: -). On AVX-512 VNNI CPUs without AMX every int4 / int8 row
    and the bands run on VNNI (their scale codes include the int3 / int5 bands' transcoding)."""
    rounding = la.integer_rounding("cpu")
    if rounding not in ("amx", "vnni"):
        raise SystemExit("--stages counts the integer path on AVX-512 VNNI / AMX CPUs: this CPU (or KVFX_NO_AMX) takes "
                         "another path")
    ext = la._build(stages=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n}, batch {args.batch}; "
          "time-stamp-counter cycles per cached row (all threads), stage shares in brackets")
    print(f"{'latent':18s} {'unit':>5s} " + " ".join(f"{s:>16s}" for s in STAGES) + f" {'total':>7s}")
    for name in ("head-0.5-int8", "head-0.5-int4", "head-0.25-int4", "kv-0.9375-int4", "kv-bits5-0.25"):
        h, g, r, shared, storage = SHAPES[name]
        if not la.takes_integer_path(rounding, storage):
            continue  # (rows that take no integer path here: no stages)
        layers = _layers(args, h, r, shared, storage)
        q = torch.randn(args.batch, h, g, r)
        bits, kbands, vbands = la.kernel_format(storage, r, r, shared)

        def run():
            for k, v in layers:
                ext.attend(q, k, v, r, r, bits, 0.125, None, shared, kbands, vbands)
        run()
        ext.stage_cycles()  # warm-up's counts dropped
        for _ in range(args.reps):
            run()
        counts = ext.stage_cycles().tolist()
        per_row = [c / counts[5] for c in counts[:5]]
        total = sum(per_row)
        tile = g > 4 or bits < 0 or os.environ.get("KVFX_NO_VNNI", "0") not in ("", "0")
        unit = "tile" if rounding == "amx" and tile else "vnni"
        cells = [f"{c:8.2f} ({c / total:4.0%})" if c else f"{'-':>16s}" for c in per_row]
        print(f"{name:18s} {unit:>5s} " + " ".join(cells) + f" {total:7.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=30, help="layers cycled through on the cold pass")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--stages", action="store_true", help="AVX-512 VNNI / AMX CPUs: cycles per cached row of each stage")
    args = p.parse_args()
    if not la.kernel_available("cpu"):
        raise SystemExit("the C++ kernel did not build here (needs a C++ compiler and ninja)")
    if args.stages:
        return stage_split(args)
    path = la.integer_rounding("cpu")
    rows = {"amx": "integer dot products (AMX)", "vnni": "int4 / int8 rows and bands: integer dot products (AVX-512 VNNI)", "avx2": "int4 / int3 / int2 codes: integer dot products (AVX2)",
            None: "decoded to float32"}[path]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n}, batch {args.batch}; "
          f"int8/int4 rows: {rows} (KVFX_NO_AMX=1: decoded)")
    print(f"{'latent':18s} {'warm kernel':>11s} {'warm SDPA':>10s} {'GFLOP/s':>8s} {'cold kernel':>11s} "
          f"{'cold SDPA':>10s} {'cold GB/s':>9s}   (ms per layer)")
    for name, (h, g, r, shared, storage) in SHAPES.items():
        kind = "float" if storage == "float32" else storage
        layers = _layers(args, h, r, shared, storage)
        q = torch.randn(args.batch, h, g, r)
        floats = [(la._decoded(k, r, kind), None if shared else la._decoded(v, r, kind)) for k, v in layers[:1]]

        def kernel(kv):
            return torch.ops.kvfx.decode_attention(q, kv[0], kv[1], r, r, kind, 0.125, None, shared)

        def sdpa(kv):
            k, v = kv
            return F.scaled_dot_product_attention(q, la._decoded(k, r, kind) if kind != "float" else k,
                                                  (la._decoded(v, r, kind) if kind != "float" else v), scale=0.125)
        warm_k = _median_ms(lambda: kernel(layers[0]), args.reps)
        warm_s = _median_ms(lambda: F.scaled_dot_product_attention(
            q, floats[0][0], floats[0][0] if shared else floats[0][1], scale=0.125), args.reps)
        cold_k = _median_ms(lambda: [kernel(kv) for kv in layers], 3) / args.layers
        cold_s = _median_ms(lambda: [sdpa(kv) for kv in layers], 3) / args.layers
        macs = args.batch * h * g * args.n * 2 * r
        nbytes = sum(t.numel() * t.element_size() for t in (layers[0][0], None if shared else layers[0][1])
                     if t is not None)
        print(f"{name:18s} {warm_k:11.3f} {warm_s:10.3f} {2 * macs / warm_k / 1e6:8.1f} {cold_k:11.3f} "
              f"{cold_s:10.3f} {nbytes / cold_k / 1e6:9.1f}", flush=True)


if __name__ == "__main__":
    main()
