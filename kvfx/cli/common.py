"""What the subcommands share: the one-line user error, loading MODEL, reading --data, argument types."""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

MODEL_HELP = ("`default` (the bundled SmolLM2-135M-Instruct), a local transformers model directory, or a local "
              ".gguf file; nothing is downloaded")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """A user mistake: printed as one line naming the problem and the fix, exit code 2, no traceback."""


def say(msg: str) -> None:
    """Progress and notes go to stderr, results to stdout."""
    print(f"kvfx: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- arguments
def budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number; give a fraction of the 16-bit "
                                         "KV-cache bytes in (0, 1], e.g. --budget 0.25") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"budget {value} is outside (0, 1]; give the fraction of the 16-bit "
                                         "KV-cache bytes to keep, e.g. --budget 0.25 for a 4x smaller cache")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights' dtype (default float32)")


def add_data_args(p: argparse.ArgumentParser, windows: int, what: str) -> None:
    p.add_argument("--data", default="builtin", metavar="FILE|builtin[:DOMAIN]",
                   help=f"text to {what}: `builtin` (calibrate: the calibration halves of the four shipped texts in turn, "
                        f"`builtin:mix`; eval: the WikiText-2 test split), `builtin:DOMAIN` (one of kvfx.data.DOMAINS: "
                        f"wikitext, code, docs, fiction; `builtin:mix` for calibration) or a UTF-8 text file "
                        f"(default builtin)")
    p.add_argument("--windows", type=positive_int, default=windows, metavar="N",
                   help=f"windows of text to use (default {windows}; fewer if a file is shorter)")
    p.add_argument("--window", type=positive_int, default=512, metavar="TOKENS", help="tokens per window (default 512)")


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend the compressed model compiles through (default inductor; "
                        "`eager` compiles in seconds)")


def _builtin_domain(data: str, split: str) -> str | None:
    """The domain `--data builtin[:DOMAIN]` names ("mix": the calibration mix), None for a file."""
    from ..data import DOMAINS
    if data != "builtin" and not data.startswith("builtin:"):
        return None
    # bare `builtin`: calibrate on the mix (it holds off-domain, RESULTS.md "domains"), evaluate on WikiText-2
    domain = data.partition(":")[2] or ("mix" if split == "calibration" else "wikitext")
    if domain not in DOMAINS and not (domain == "mix" and split == "calibration"):
        mix = ", or mix" if split == "calibration" else ""
        raise CliError(f"unknown builtin text {domain!r}; use builtin:{{{','.join(DOMAINS)}}}{mix}")
    return domain


def check_data_file(data: str, split: str = "calibration") -> None:
    """Fail before loading a model when --data names a missing or empty file or an unknown builtin text."""
    if _builtin_domain(data, split):
        return
    path = Path(data)
    if not path.is_file():
        raise CliError(f"data file {data} not found; pass a UTF-8 text file or `--data builtin` (WikiText-2)")
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise CliError(f"data file {data} is empty; give a text file with at least one window of tokens "
                       "(--window, default 512) or use `--data builtin`")


def check_output(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise CliError(f"output {path} is a directory; give a file name such as {out / 'projections.safetensors'}")
    if not out.parent.resolve().is_dir():
        raise CliError(f"output folder {out.parent} does not exist; create it or write elsewhere")
    return out


# ---------------------------------------------------------------------------------------------- model
def _no_sdpa(message: str) -> bool:
    return "scaled_dot_product_attention" in message or "sdpa" in message.lower()


def load_model(spec: str, dtype: str = "float32"):
    """(model, tokenizer) for MODEL, with SDPA attention, in eval mode, from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import load_default_model
    if spec == "default":
        try:
            return load_default_model(DTYPES[dtype])
        except FileNotFoundError as e:
            raise CliError(str(e)) from None
    path = Path(spec)
    if not path.exists():
        raise CliError(f"model {spec} does not exist; pass {MODEL_HELP}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CliError(f"model {spec} is a file but not a .gguf file; pass a .gguf file or a transformers model "
                           "directory (the folder with config.json)")
        directory, extra, kind = str(path.parent), {"gguf_file": path.name}, "GGUF file"
    else:
        if not (path / "config.json").is_file():
            raise CliError(f"model directory {spec} has no config.json; pass the folder model.save_pretrained() "
                           "wrote, or a .gguf file")
        directory, extra, kind = str(path), {}, "model directory"
    _check_architecture(spec, directory, extra, kind)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, attn_implementation="sdpa",
                                                     dtype=DTYPES[dtype], **extra)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if "Unrecognized configuration class" in msg or "AutoModelForCausalLM" in msg:
            raise CliError(f"{spec} is not a causal language model ({_first_line(e)}); kvfx compresses the KV cache "
                           "of decoder models loadable with AutoModelForCausalLM") from None
        if _no_sdpa(msg):
            raise CliError(f"{spec} cannot use SDPA attention ({_first_line(e)}); kvfx rewrites "
                           "torch's scaled_dot_product_attention, so it needs an architecture transformers runs with "
                           "attn_implementation='sdpa'") from None
        raise CliError(f"transformers cannot load the {kind} {spec} ({_first_line(e)}); check that it is complete "
                       "and of an architecture this transformers version knows") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable tokenizers
        if kind == "GGUF file":
            raise CliError(f"transformers cannot read the GGUF file {spec} ({_first_line(e)}); convert the model "
                           "to a transformers directory or use a GGUF of a supported architecture") from None
        raise CliError(f"no usable tokenizer in {spec} ({_first_line(e)}); save one there with "
                       "tokenizer.save_pretrained(path)") from None
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        raise CliError(f"{spec} loaded with {model.config._attn_implementation} attention, not SDPA; kvfx needs "
                       "attn_implementation='sdpa'")
    return model.eval(), tokenizer


def _check_architecture(spec: str, directory: str, extra: dict, kind: str) -> None:
    """Refuse a model that is no causal LM or cannot run SDPA attention from its config, before reading weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, **extra)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"transformers cannot read the {kind} {spec} ({_first_line(e)}); check that it is complete "
                       "and of an architecture this transformers version knows") from None
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise CliError(f"{spec} is a {config.model_type} model, not a causal language model; kvfx compresses the KV "
                       "cache of decoder models loadable with AutoModelForCausalLM") from None
    if getattr(cls, "_supports_sdpa", None) is False:
        raise CliError(f"{spec} ({cls.__name__}) cannot use SDPA attention in transformers; kvfx rewrites torch's "
                       "scaled_dot_product_attention, so it needs an architecture that runs with "
                       "attn_implementation='sdpa'")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# ---------------------------------------------------------------------------------------------- projections
def load_projections(path: str):
    from ..projections import Projections
    if not Path(path).is_file():
        raise CliError(f"projections file {path} not found; make one with `kvfx calibrate MODEL --budget 0.25 -o {path}`")
    return Projections.load(path)


def check_applicable(model, projections) -> None:
    """Everything kvfx.compress checks (sites, shapes, model fingerprint, format), before any long work: compress
    (lazy: nothing compiles yet) and undo it; raises ProjectionError naming what differs."""
    import kvfx
    kvfx.decompress(kvfx.compress(torch.compile(model, backend="eager"), projections))


# ---------------------------------------------------------------------------------------------- data
def load_windows(tokenizer, data: str, n: int, window: int, split: str) -> tuple[torch.Tensor, str]:
    """(windows [k, window], description) from a builtin text's `split` ("calibration" / "test") or a file."""
    from ..data import DOMAINS, calibration_mix, domain_windows
    domain = _builtin_domain(data, split)
    if domain:
        try:
            if domain == "mix":
                return calibration_mix(tokenizer, n, window), f"builtin mix of {', '.join(DOMAINS)} (calibration texts)"
            ids = domain_windows(tokenizer, domain, "calib" if split == "calibration" else "test", n, window)
        except (FileNotFoundError, ValueError) as e:
            raise CliError(f"builtin text unavailable: {e}") from None
        name = DOMAINS[domain][0 if split == "test" else 1]
        return ids, ("builtin WikiText-2" if domain == "wikitext" else f"builtin {domain}") + f" ({name})"
    check_data_file(data, split)
    raw = Path(data).read_bytes()
    ids = tokenizer(raw.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    have = len(ids) // window
    if have < 1:
        raise CliError(f"data file {data} has {len(ids)} tokens, fewer than one window of {window}; give more text "
                       f"or a smaller --window")
    if have < n:
        say(f"{data} holds {have} window(s) of {window} tokens, fewer than --windows {n}: using {have}")
    k = min(n, have)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return torch.tensor(ids[: k * window]).view(k, window), f"file {Path(data).name} (sha256 {digest})"


def model_and_windows(args, split: str, projections=None):
    """A subcommand's model (checked against `projections` when given) and data windows, from its arguments:
    (model, tokenizer, windows, description of the data). The data file is checked before the model loads."""
    check_data_file(args.data, split)
    model, tokenizer = load_model(args.model, args.dtype)
    if projections is not None:
        check_applicable(model, projections)
    windows, description = load_windows(tokenizer, args.data, args.windows, args.window, split)
    return model, tokenizer, windows, description
