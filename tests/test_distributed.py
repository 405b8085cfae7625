"""Distributed calibration on CPU: 2 gloo processes, each with its own shard of the calibration batches.

Each rank runs `kvfx.calibrate(model, my_shard)` (which all-reduces the Gram statistics by itself: rank 0 with
the default distributed=None, rank 1 with distributed=True), the same with distributed=False, and the explicit
`collect_stats` -> `reduce_stats` recipe; the parent process calibrates on ALL batches alone. The
summed statistics must equal the single-process statistics (float64, rel 1e-10), the projections must equal
the single-process projections (1e-5) and be bit-identical on both ranks, and with `distributed=False`
each rank must get only its own shard's statistics. The model is the hand-written SDPAAttention LM of
tests/coverage/archs.py (RoPE, GQA 4/2, fused qkv with biases).
"""
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "coverage"))

import archs  # noqa: E402
import kvfx  # noqa: E402
from kvfx.calib.collect import collect_stats  # noqa: E402
from kvfx.calib.distributed import is_distributed, reduce_stats  # noqa: E402
from kvfx.calib.stats import _SUMMED  # noqa: E402

WORLD = 2
RANK = 4  # of head_dim 8
SAMPLES = 4  # whole q/k/v sequences kept per site (for learned calibrators); gathered rank 0 first


def _model():
    """float64, so that activations do not depend on the thread count (float32 GEMMs do, at ~1e-8 in the Grams)."""
    return archs.BY_NAME["hand_sdpa"].model(seed=0).double()


def _batches():
    """5 batches (split 3 / 2: the ranks see different token counts), all one shape (one compile per collection)."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, archs.VOCAB, (2, 8), generator=g) for _ in range(5)]


def _shard(rank: int) -> list:
    return _batches()[rank::WORLD]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_dict(stats) -> dict:
    return {name: {**{f: getattr(st, f).clone() for f in _SUMMED if getattr(st, f) is not None},
                   "output": st.output.clone(), "tokens": st.tokens,
                   "samples": [tuple(t.clone() for t in s) for s in st.samples]} for name, st in stats.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from transformers.utils import logging
        logging.set_verbosity_error()
        model = _model()
        shard = _shard(rank)
        result = {"is_distributed": is_distributed()}
        # the default (distributed=None: all-reduce because a 2-rank group is up) on rank 0, distributed=True on
        # rank 1: both take part in the same all-reduce
        result["auto"] = kvfx.calibrate(model, shard, method="kqsvd", rank=RANK, progress=False,
                                        **({"distributed": True} if rank == 1 else {}))
        result["local"] = kvfx.calibrate(model, shard, method="kqsvd", rank=RANK, progress=False, distributed=False)
        stats = collect_stats(model, shard, progress=False, samples=SAMPLES)
        result["local_stats"] = _stats_dict(stats)
        result["reduced_stats"] = _stats_dict(reduce_stats(stats))
        torch.save({k: (v.sites if isinstance(v, kvfx.Projections) else v) for k, v in result.items()}
                   | {"tokens": {k: v.report.get("tokens") for k, v in result.items()
                                 if isinstance(v, kvfx.Projections)}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 gloo ranks computed (run once for the module)."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _assert_sites_close(got: dict, expected: kvfx.Projections, tol: float) -> None:
    assert list(got) == list(expected.sites)
    for name, p in got.items():
        q = expected.sites[name]
        for f in ("key_down", "key_up", "value_down", "value_up"):
            assert getattr(p, f).shape == getattr(q, f).shape
            assert _rel(getattr(p, f), getattr(q, f)) <= tol, (name, f, _rel(getattr(p, f), getattr(q, f)))


def test_summed_stats_equal_single_process(ranks):
    full = collect_stats(_model(), _batches(), progress=False)
    total_tokens = sum(b.numel() for b in _batches())
    for r, res in enumerate(ranks):
        assert res["is_distributed"]
        assert list(res["reduced_stats"]) == list(full)
        for name, st in full.items():
            got, local = res["reduced_stats"][name], res["local_stats"][name]
            assert got["tokens"] == st.tokens == total_tokens
            assert local["tokens"] == sum(b.numel() for b in _shard(r)) < total_tokens
            for f in _SUMMED:
                if getattr(st, f) is not None:
                    assert _rel(got[f], getattr(st, f)) <= 1e-10, (r, name, f)
                    assert _rel(local[f], getattr(st, f)) > 1e-3, (r, name, f)   # a shard alone is not the whole
            assert torch.equal(got["output"], st.output)  # W_O Grams: the same on every rank, not summed
            # sample sequences: every rank ends with the same SAMPLES, rank 0's first (rank 0 alone has 6)
            assert len(local["samples"]) == SAMPLES and len(got["samples"]) == SAMPLES
            for a, b in zip(got["samples"], ranks[0]["local_stats"][name]["samples"]):
                assert all(torch.equal(x, y) for x, y in zip(a, b))
    first = [res["local_stats"][next(iter(full))]["samples"][0][0] for res in ranks]
    assert not torch.equal(*first)  # rank 1 really had other samples before the gather


def test_projections_equal_single_process(ranks):
    model, batches = _model(), _batches()
    single = kvfx.calibrate(model, batches, method="kqsvd", rank=RANK, progress=False)
    for res in ranks:
        _assert_sites_close(res["auto"], single, 1e-5)
        assert res["tokens"]["auto"] == single.report["tokens"] == sum(b.numel() for b in batches)
    for f in ("key_down", "key_up", "value_down", "value_up"):  # every rank fits the very same projections
        for name in single.sites:
            assert torch.equal(getattr(ranks[0]["auto"][name], f), getattr(ranks[1]["auto"][name], f))


def test_distributed_false_keeps_each_shard(ranks):
    for r, res in enumerate(ranks):
        local = kvfx.calibrate(_model(), _shard(r), method="kqsvd", rank=RANK, progress=False)
        _assert_sites_close(res["local"], local, 1e-5)
        assert res["tokens"]["local"] == sum(b.numel() for b in _shard(r))
    # and the two shards really give different projections (otherwise the tests above prove nothing)
    name = next(iter(ranks[0]["local"]))
    assert _rel(ranks[0]["local"][name].key_down, ranks[1]["local"][name].key_down) > 1e-3


def test_distributed_true_without_process_group():
    import torch.distributed as dist
    assert not (dist.is_available() and dist.is_initialized())
    assert not is_distributed()
    with pytest.raises(ValueError, match=r"distributed=True.*needs torch.distributed initialized.*torchrun"):
        kvfx.calibrate(_model(), _batches()[:1], rank=RANK, progress=False, distributed=True)


def test_reduce_stats_without_process_group_is_a_noop():
    stats = collect_stats(_model(), _batches()[:2], progress=False)
    before = _stats_dict(stats)
    assert reduce_stats(stats) is stats
    after = _stats_dict(stats)
    for name in before:
        assert all(torch.equal(before[name][f], after[name][f]) for f in before[name] if f not in ("tokens", "samples"))
        assert before[name]["tokens"] == after[name]["tokens"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibrate_on_cuda_matches_cpu():
    """What an NCCL rank does: the model and its batches on the GPU. The statistics must not depend on where the
    activations live (float64 Grams either way)."""
    model, batches = _model(), _batches()
    cpu = collect_stats(model, batches, progress=False)
    gpu = collect_stats(model.cuda(), [b.cuda() for b in batches], progress=False)
    for name, st in cpu.items():
        assert gpu[name].tokens == st.tokens
        for f in (*_SUMMED, "output"):
            if getattr(st, f) is not None:
                assert _rel(getattr(gpu[name], f).cpu(), getattr(st, f)) <= 1e-10, (name, f)
    P = kvfx.calibrate(model, [b.cuda() for b in batches], method="kqsvd", rank=RANK, progress=False)
    _assert_sites_close(P.to(device="cpu").sites,
                        kvfx.calibrate(model.cpu(), batches, method="kqsvd", rank=RANK, progress=False), 1e-5)
