"""`kvfx info P.safetensors`: what a projections file holds and where it comes from."""
from __future__ import annotations

from collections import Counter

from .. import quant


def add_arguments(p) -> None:
    p.add_argument("projections", metavar="P.safetensors", help="a projections file (kvfx calibrate -o ...)")
    p.add_argument("--sites", action="store_true", help="one line per attention site")


def _ranks(projections) -> str:
    counts = Counter((p.key_rank, p.shared) if p.shared else (f"{p.key_rank}/{p.value_rank}", False)
                     for p in projections.sites.values())
    return ", ".join(f"{r}{' shared K+V' if shared else ' (K/V)'} × {n}" for (r, shared), n in counts.items())


def describe(projections) -> list[str]:
    fmt = projections.quantize
    shapes = list(projections.shapes.values())
    before = sum(4 * s.kv_heads * s.head_dim for s in shapes)  # bytes of a 16-bit K+V cache per token
    after = sum(p.cached_bytes(quant.site(fmt, n)) for n, p in projections.sites.items())
    lines = [f"method           {projections.method} ({projections.report.get('granularity', '?')} granularity)",
             f"attention sites  {len(projections.sites)}",
             f"ranks            {_ranks(projections)}",
             f"latent format    {quant.describe(fmt) if fmt else '16-bit (none recorded)'}"
             + (", rotated" if projections.report.get("rotation") else ""),
             f"bytes per token  {after} (16-bit cache: {before}; {after / before:.3f} of its bytes)"]
    alloc = projections.report.get("allocation")
    if alloc:
        lines.append(f"allocation       budget {alloc.get('budget')}, achieved {alloc.get('achieved', 0):.3f}, "
                     f"measure {alloc.get('measure')}"
                     + (f", predicted KL {alloc['predicted_kl']:.4g}" if "predicted_kl" in alloc else ""))
    centred, sites = sum(bool(p.means()) for p in projections.sites.values()), len(projections.sites)
    where = ("around the calibration means" if centred == sites else "around zero" if not centred
             else f"around the calibration means at {centred} of {sites} sites")
    lines.append(f"rounding         {where} (low-bit latents)")
    ref = projections.report.get("refine")
    if ref:
        lines.append(f"refine           {ref.get('steps')} steps, {ref.get('train_tokens')} tokens, held-out KL "
                     f"{ref.get('kl_before', float('nan')):.4g} -> {ref.get('kl_after', float('nan')):.4g}"
                     + (" (fallback: start kept)" if ref.get("fallback") else ""))
    prov = projections.provenance
    if not prov:
        lines.append("provenance       none recorded (a file from before kvfx recorded it): not checked at compress")
        return lines
    model, data = prov.get("model") or {}, prov.get("data") or {}
    lines.append(f"made by          kvfx {prov.get('kvfx_version', '?')}, file format {prov.get('format_version', '?')}"
                 f", {prov.get('created', '?')}")
    if model:
        shape = ", ".join(f"{k} {model[k]}" for k in ("layers", "heads", "kv_heads", "head_dim", "vocab") if k in model)
        lines.append(f"model            {model.get('architecture')} ({shape}; {model.get('parameters', 0):,} "
                     f"parameters; weights sha256 {str(model.get('weights_sha256'))[:16]}…)")
    if data:
        lines.append(f"calibration data {data.get('description', '?')}, {data.get('tokens', '?')} tokens")
    recipe = prov.get("recipe")
    if "budget" in prov or recipe:
        lines.append(f"recipe           budget {prov.get('budget')}, {prov.get('method')}, "
                     f"{quant.describe(prov.get('quantize'))}"
                     + (f", {', '.join(f'{k} {v}' for k, v in recipe.items())}" if recipe else ""))
    return lines


def run(args) -> int:
    from .common import load_projections
    projections = load_projections(args.projections)
    print(f"{args.projections}")
    for line in describe(projections):
        print(f"  {line}")
    if args.sites:
        for name, p in projections.sites.items():
            rank = f"{p.key_rank} shared" if p.shared else f"{p.key_rank}/{p.value_rank}"
            print(f"  {name:40s} {rank:12s} {p.cached_bytes(quant.site(projections.quantize, name))} bytes/token"
                  + (f"  {quant.site(projections.quantize, name)}" if isinstance(projections.quantize, dict) else ""))
    return 0
