"""Issue 15's targets, read off one speed.py run's rows: which configurations meet each, and by how much not.

    decode at 16k (batch 1, and batches of >= 64k cached tokens in all): every kvfx configuration that saves cache
      bytes is faster than the faster original (DynamicCache or StaticCache, whichever the run has) by at least its
      bytes-ideal ratio, and within 2x of its own bytes' read time (bandwidth bound >= 0.5); faster than each peer
      (QuantizedCache) row that holds at least as many cache bytes;
    full-rank identity projections no slower than the original (every row);
    prefill no slower than 1.15 x the original;
    longest context in the memory budget >= 1.9 x at half the cache bytes, >= 3.6 x at a quarter.

speed_report.tables appends `targets(res)` below the measured tables, so every RESULTS section of a speed run says
where it stands; the rows are speed.py's (`res` as speed.py's --json writes it).
"""
from __future__ import annotations

ANCHOR = 0.5            # bandwidth bound a compressed step reaches at least
PREFILL_SLOWDOWN = 1.15  # prefill time at most this times the original's
LONGEST = ((0.25, 3.6), (0.5, 1.9))  # (cache bytes at most this fraction of the original's, longest context × at least)
CONTEXT, BATCHED = 16384, 65536       # the decode targets' context (batch 1) and batched total


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "-"
    return "met" if value >= target else f"short by {100 * (1 - value / target):.0f} %"


def _key(r: dict) -> tuple:
    return r["model"], r["dtype"], r["batch"], r["N"]


def _faster_original(r: dict) -> float | None:
    """Speed-up against the faster original (the smaller of the ratios: the faster one's step is the shorter)."""
    known = [v for v in (r.get("vs_dynamic"), r.get("vs_static")) if v is not None]
    return min(known) if known else None


def _decode_rows(rows: list[dict]) -> list[tuple[dict, float]]:
    """The rows the decode targets are about, with their cache bytes as a fraction of the original's: kvfx
    configurations saving bytes, at 16k (batch 1) or batched."""
    ref = {_key(r): r for r in rows if r["config"] == "original-dynamic"}
    out = []
    for r in rows:
        orig = ref.get(_key(r))
        if not r["config"].startswith("kvfx-") or orig is None or r["cache_bytes"] >= orig["cache_bytes"]:
            continue
        if (r["batch"] == 1 and r["N"] >= CONTEXT) or (r["batch"] > 1 and r["batch"] * r["N"] >= BATCHED):
            out.append((r, r["cache_bytes"] / orig["cache_bytes"]))
    return out


def _vs_peers(r: dict, rows: list[dict]) -> str:
    """The fastest peer row holding at least r's cache bytes: its step over r's; '-' without such a row."""
    peers = [p for p in rows if p["config"].startswith("peer-") and _key(p) == _key(r)
             and p["cache_bytes"] >= r["cache_bytes"]]
    if not peers:
        return "-"
    worst = min(p["step_ms"] for p in peers) / r["step_ms"]
    return f"{worst:.2f}× ({'met' if worst > 1 else 'not met'})"


def targets(res: dict) -> str:
    rows = res.get("rows") or []
    lines = []
    decode = _decode_rows(rows)
    if decode:
        lines += ["Issue 15's decode targets, from the rows above (speed-up against the faster original of the run; "
                  f"batch 1 at ≥ {CONTEXT} tokens and batches of ≥ {BATCHED} cached tokens; peers: the fastest "
                  "QuantizedCache row holding at least the configuration's cache bytes):", "",
                  "| model | dtype | batch × N | config | cache × original | speed-up | bytes-ideal | ≥ bytes-ideal | "
                  f"bandwidth bound | ≥ {ANCHOR} | vs peer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r, frac in decode:
            up, ideal = _faster_original(r), r.get("bytes_ideal")
            lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} × {r['N']} | {r['config']} | {frac:.3f} | "
                         f"{'-' if up is None else f'{up:.2f}×'} | {'-' if ideal is None else f'{ideal:.2f}×'} | "
                         f"{'-' if up is None or ideal is None else _verdict(up, ideal)} | {r['bw_fraction']:.2f} | "
                         f"{_verdict(r['bw_fraction'], ANCHOR)} | {_vs_peers(r, rows)} |")
        met = sum(1 for r, _ in decode if (_faster_original(r) or 0) >= (r.get("bytes_ideal") or float("inf")))
        anchor = sum(1 for r, _ in decode if r["bw_fraction"] >= ANCHOR)
        lines += ["", f"Decode: {met} of {len(decode)} rows at or above their bytes-ideal ratio, {anchor} of "
                  f"{len(decode)} at a bandwidth bound ≥ {ANCHOR}."]
    others = _other_targets(res)
    if others:
        lines += ([""] if lines else []) + others
    return "\n".join(lines) + "\n" if lines else ""


def _other_targets(res: dict) -> list[str]:
    rows, out = res.get("rows") or [], []
    ident = [r for r in rows if r["config"].startswith("kvfx-identity")]
    if ident:
        ups = [(r, _faster_original(r)) for r in ident]
        slow = [f"{r['config']} {r['batch']} × {r['N']} {up:.2f}×" for r, up in ups if up is not None and up < 1]
        out.append(f"* Identity projections no slower than the original: "
                   f"{'met on every row' if not slow else 'not met: ' + ', '.join(slow)}.")
    pre = [p for p in res.get("prefill") or [] if p["config"].startswith("kvfx-") and p.get("vs_dynamic")]
    if pre:
        slow = [f"{p['config']} {1 / p['vs_dynamic']:.2f}×" for p in pre if 1 / p["vs_dynamic"] > PREFILL_SLOWDOWN]
        out.append(f"* Prefill within {PREFILL_SLOWDOWN} × the original's time: "
                   f"{'met by every kvfx row' if not slow else 'not met: ' + ', '.join(slow)}.")
    longest = res.get("longest") or []
    ref = {(o["model"], o["dtype"]): o for o in longest if o["config"] == "original-dynamic"}
    checks = []
    for o in longest:
        base = ref.get((o["model"], o["dtype"]))
        if not o["config"].startswith("kvfx-") or base is None or not o.get("vs_dynamic"):
            continue
        frac = o["bytes_per_token"] / base["bytes_per_token"]
        want = next((t for f, t in LONGEST if frac <= f), None)
        if want is not None:
            checks.append((o, frac, want))
    if checks:
        short = [f"{o['config']} ({frac:.2f} of the bytes) {o['vs_dynamic']:.2f}× < {want}×"
                 for o, frac, want in checks if o["vs_dynamic"] < want]
        verdict = f"not met: {', '.join(short)}" if short else f"met by all {len(checks)} rows that hold at most half"
        out.append(f"* Longest context in the budget (≥ {LONGEST[1][1]}× at half the bytes, ≥ {LONGEST[0][1]}× at a "
                   f"quarter): {verdict}.")
    return out
