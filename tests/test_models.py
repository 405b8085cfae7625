"""The default model's loader: the GGUF read once, then a converted copy in the cache folder (kvfx/models.py)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvfx import models

TEXT = "The capital of France is Paris.\ndef f(x):\n    return x ** 2  # ünïcode"


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.setenv("KVFX_CACHE_DIR", "off")
    assert models.cache_root() is None
    monkeypatch.delenv("KVFX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / "kvfx"


def test_first_load_converts_later_loads_read_the_copy(monkeypatch, tmp_path):
    """The GGUF reader is replaced by a tiny model here: the first load converts it, the second reads the folder
    (identical weights, a plain float model), a foreign folder without kvfx's marker is replaced."""
    tiny, calls = _tiny(), []
    tok = models.default_tokenizer()
    monkeypatch.setattr(models, "_from_gguf", lambda d, n, dtype: calls.append(dtype) or (tiny, tok))
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    target = models._converted_dir(*models.default_model_path())
    target.mkdir(parents=True)
    (target / "stray.txt").write_text("not kvfx's")
    first, tok1 = models.load_default_model(torch.float32)
    second, tok2 = models.load_default_model(torch.bfloat16)
    assert calls == [torch.float32] and (target / models._MARKER).is_file() and not (target / "stray.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary folder left behind
    for name, p in tiny.state_dict().items():
        assert torch.equal(first.state_dict()[name], p) and torch.equal(second.state_dict()[name], p.bfloat16())
    assert second.dtype == torch.bfloat16 and not hasattr(second.config, "quantization_config")
    assert tok1(TEXT).input_ids == tok2(TEXT).input_ids == tok(TEXT).input_ids


def test_unwritable_cache_reads_the_gguf(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tiny, tok = _tiny(), models.default_tokenizer()
    monkeypatch.setattr(models, "_from_gguf", lambda d, n, dtype: (tiny, tok))
    monkeypatch.setenv("KVFX_CACHE_DIR", str(blocker / "kvfx"))  # mkdir under a file fails
    model, _ = models.load_default_model(torch.bfloat16)
    assert model is tiny and model.dtype == torch.bfloat16


@pytest.mark.slow
def test_converted_copy_equals_the_gguf():
    """The real GGUF read directly against the cached copy: the same weights, config, tokenizer and chat template."""
    try:
        gguf_model, gguf_tok = models._from_gguf(*models.default_model_path(), torch.float32)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = models.load_default_model(torch.float32)
    ref = gguf_model.state_dict()
    assert model.state_dict().keys() == ref.keys()
    assert all(torch.equal(p, ref[name]) for name, p in model.state_dict().items())
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_parameters",
                "rms_norm_eps", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(model.config, key) == getattr(gguf_model.config, key), key
    assert model.generation_config.to_diff_dict() == gguf_model.generation_config.to_diff_dict()
    assert tok(TEXT).input_ids == gguf_tok(TEXT).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == gguf_tok.apply_chat_template(chat, tokenize=False)
    assert models.default_model_config().to_diff_dict() == model.config.to_diff_dict()
