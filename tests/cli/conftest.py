"""Real files for the CLI tests: a user's own tiny model directory (with SmolLM2's tokenizer, so the builtin text
tokenizes into its vocabulary), another one with other weights, and models kvfx must refuse."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def tiny_model_dir(path: Path, tokenizer, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from kvfx.models import default_tokenizer
    return default_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), smollm2_tokenizer, seed=0)


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """The same architecture as tiny_dir with other weights: its projections must be refused."""
    return tiny_model_dir(tmp_path_factory.mktemp("other"), smollm2_tokenizer, seed=1)


@pytest.fixture(scope="session")
def refused_dirs(tmp_path_factory) -> dict[str, Path]:
    """Model folders kvfx refuses before reading weights: no causal LM (t5), no SDPA attention (gemma2)."""
    from transformers import Gemma2Config, T5Config
    out = {}
    for name, cfg in (("t5", T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8)),
                      ("gemma2", Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8))):
        out[name] = tmp_path_factory.mktemp(name)
        cfg.save_pretrained(out[name])
    return out


def kvfx_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m kvfx ARGS` as a user runs it (a fresh process; nothing downloaded)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "kvfx", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]
