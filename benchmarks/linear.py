"""kvfx's decode-linear op against F.linear: one decode step's linears of SmolLM2 (30 layers + the LM head, one row).

Every layer's weights are separate tensors, so a step's 0.54 GB (float32) / 0.27 GB (bfloat16) come from memory as in
a real step; the two ops take turns, median of 9 steps each. Prints ms a step and the read rate.

    python benchmarks/linear.py                   # float32 and bfloat16
    python benchmarks/linear.py --dtype bfloat16
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvfx.ops import decode_linear as dl

# SmolLM2-135M's decode-step linears (out, in): q, k, v, o, gate, up, down; the LM head
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
HEAD = (49152, 576)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], action="append")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=9)
    args = p.parse_args()
    op = dl.op()
    if op is None:
        raise SystemExit("the C++ kernel did not build here (needs a C++ compiler and ninja)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.dtype or ["float32", "bfloat16"]:
        dtype = getattr(torch, name)
        weights = [torch.randn(o, i).to(dtype) for _ in range(args.layers) for o, i in LAYER]
        weights.append(torch.randn(*HEAD).to(dtype))
        xs = {i: torch.randn(1, i).to(dtype) for i in {i for _, i in LAYER}}
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        fns = {"F.linear": lambda x, w: F.linear(x, w), "kvfx linear": lambda x, w: op(x, w, None)}
        times = {k: [] for k in fns}
        for _ in range(args.steps + 1):
            for k, f in fns.items():
                t = time.perf_counter()
                for w in weights:
                    f(xs[w.shape[1]], w)
                times[k].append(time.perf_counter() - t)
        for k, ts in times.items():
            m = statistics.median(ts[1:])
            print(f"{name:9s} {k:12s} {m * 1e3:7.2f} ms a step  {nbytes / m / 1e9:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
