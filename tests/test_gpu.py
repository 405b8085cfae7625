"""The compiled low-rank path on a CUDA device (`pytest -m gpu`; skipped without one).

bf16 tiny Llama under Inductor: compressed generate (dynamic and static low-rank cache, 16-bit and low-bit
latents: whole-row codes, int3, bands, exact rows — the Triton kernel's formats) against the uncompressed model with kvfx's cache run eagerly; the static cache under CUDA graphs
(mode="reduce-overhead") decoding without recompiles; and the speed benchmark's --device cuda smoke run.
"""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvfx
from helpers import VOCAB, decode_steps_without_recompiles, random_projections, tiny_llama
from kvfx.compress import cache_kwarg

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GEN = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
NEW = 8


@pytest.fixture(scope="module")
def llama():
    m = tiny_llama(2, heads=4, kv_heads=2, head_dim=16).to("cuda", torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0)).cuda()
    return m, random_projections(m, rank=8, seed=1), ids


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4", "int3", "int4x4+int2x4", "int4|sinks2|recent4"])
def test_bf16_inductor_generate_matches_eager_cache(llama, kind, quantize):
    m, P, ids = llama
    with torch.no_grad():
        ref = m(ids, **{cache_kwarg(m): kvfx.LowRankCache(P, kind, max_cache_len=ids.shape[1] + 1,
                                                          dtype=torch.bfloat16, device="cuda",
                                                          quantize=quantize)}).logits
        cm = kvfx.compress(torch.compile(copy.deepcopy(m)), P, cache=kind, quantize=quantize)
        out = cm(ids, **{cache_kwarg(cm): kvfx.make_cache(cm, max_cache_len=ids.shape[1] + 1)}).logits
        assert (out.float() - ref.float()).abs().max() < 5e-2 * ref.float().abs().max()
        gen = cm.generate(ids, max_new_tokens=NEW, **GEN)
    assert gen.shape == (ids.shape[0], ids.shape[1] + NEW)
    assert kvfx.counters["kvfx"]["decode_grouped"] > 0


def test_static_cache_takes_cuda_graphs_without_recompiles(llama):
    m, P, ids = llama
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), mode="reduce-overhead"), P, cache="static")
    cache = kvfx.make_cache(cm, max_cache_len=ids.shape[1] + 40)
    kw = {cache_kwarg(cm): cache, "use_cache": True}
    with torch.no_grad():
        logits = decode_steps_without_recompiles(cm, cm(ids, **kw).logits, kw, 32)
    assert torch.isfinite(logits.float()).all()


def test_speed_benchmark_runs_on_cuda(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--device", "cuda", "--json",
                           str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
