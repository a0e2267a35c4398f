"""Showing profiles: a terminal table, JSON rows, and a self-contained HTML report with
SVG charts (no plotting library needed; the SVG also works on its own, e.g. in a
README)."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hxc.bench.baselines import REFERENCE, is_baseline
from hxc.manifests.schema import Host, LatencyStats, Manifest, Profile

if TYPE_CHECKING:
    from hxc.runtime.select import Candidate, Selection

# Above this spread ((p90 - p50) / p50: p90 at 1.5x the p50) a timing is noise: the
# machine was busy while it ran, and its p50 (and any ratio built on it) says little.
NOISY_SPREAD = 0.5


def noisy(stats: LatencyStats) -> bool:
    return stats.spread > NOISY_SPREAD


@dataclass(frozen=True)
class Row:
    host: Host | None
    profile: Profile
    speedup: float | None  # baseline p50 / this p50, same host, scenario and batch
    baseline: Profile | None = None  # the profile `speedup` compares with

    @property
    def noisy(self) -> bool:
        """Its own timing, or the baseline's it is compared with, is noise."""
        return noisy(self.profile.latency) or (self.baseline is not None and noisy(self.baseline.latency))


def number(x: float, digits: int = 3) -> str:
    """About `digits` significant digits, never in exponent notation, thousands
    separated: 115,100 / 3,210 / 0.361 / 0.0224 (one format across a table)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude >= digits - 1:
        return f"{round(x):,}"
    return f"{x:.{digits - 1 - magnitude}f}"


def ratio(x: float) -> str:
    """A speed ratio: 18.07x, 1.00x, 0.0062x (a device 300x slower is not 0.00x)."""
    return f"{x:.2f}x" if x >= 0.1 else f"{number(x, 2)}x"


def percent(x: float) -> str:
    return f"{number(100 * x, 2) if x < 10 else f'{round(100 * x):,}'}%"


def scenario_of(p: Profile) -> str:
    """The profile's scenario as shown: a language model's says what it timed."""
    g = p.generation
    if g is None:
        return p.scenario
    return f"first token, prompt {g.prompt_tokens}" if g.phase == "prefill" else f"per token, after {g.prompt_tokens}"


def per_second(p: Profile) -> float:
    """The items/s column: a language model's items are tokens (prompt tokens through
    prefill, tokens decoded), any other model's the rows of its batches."""
    tokens = p.tokens_per_s
    return p.items_per_second if tokens is None else tokens


def _order(p: Profile) -> tuple:
    # A language model's rows in the order they are measured: first token by prompt length,
    # then per token by batch (its scenario aside: batch B is "offline").
    g = p.generation
    return (p.scenario,) if g is None else ("generation", g.phase != "prefill", g.prompt_tokens, p.batch)


def rows(manifest: Manifest, profiles: Iterable[Profile] | None = None, baseline: str = REFERENCE.candidate) -> list[Row]:
    """Latest profile per (host, scenario, batch, candidate, device), with speed-ups."""
    hosts = {h.id: h for h in manifest.hosts}
    latest: dict[tuple, Profile] = {}
    for p in profiles if profiles is not None else manifest.profiles:
        latest[(p.host_id, scenario_of(p), p.batch, p.candidate, p.device)] = p
    base = {(p.host_id, scenario_of(p), p.batch): p for p in latest.values() if p.candidate == baseline}
    out = []
    for key, p in sorted(latest.items(), key=lambda kv: (kv[0][0], _order(kv[1]), kv[0][2], kv[1].latency.p50_ms)):
        b = base.get((p.host_id, scenario_of(p), p.batch))
        out.append(Row(hosts.get(p.host_id), p, b.latency.p50_ms / p.latency.p50_ms if b else None, b))
    return out


def noise_note(rs: list[Row]) -> str | None:
    """What to say under a table with noisy rows: which, why it matters, what to do."""
    bad = [r for r in rs if r.noisy]
    if not bad:
        return None
    loads = [c.other_load for r in bad if (c := r.profile.conditions) and c.other_load is not None]
    load = f"; other processes used up to {max(loads):.1f} cores meanwhile" if loads else ""
    return (f"* noise: {len(bad)} of {len(rs)} rows have a timing, or a baseline they are compared with, that spread over "
            f"{percent(NOISY_SPREAD)} (p90 more than {1 + NOISY_SPREAD:g}x the p50){load}. The numbers marked are not "
            f"reliable: re-run `hxc bench` when the machine is quieter, or with a longer --min-time.")


def row_json(r: Row) -> dict:
    p, s, c = r.profile, r.profile.latency, r.profile.conditions
    return {
        "host": p.host_id, "hostname": r.host.hostname if r.host else None, "candidate": p.candidate,
        "device": p.device, "scenario": p.scenario, "batch": p.batch, "p50_ms": s.p50_ms, "p90_ms": s.p90_ms,
        "p99_ms": s.p99_ms, "mean_ms": s.mean_ms, "stdev_ms": s.stdev_ms, "min_ms": s.min_ms,
        "iterations": s.iterations, "spread": round(s.spread, 4), "throughput": p.throughput,
        "items_per_second": p.items_per_second, "load_ms": p.load_ms, "first_call_ms": p.first_call_ms,
        "memory_mb": p.memory_mb, "device_time_only": p.device_time_only, "threads": p.threads,
        "speedup_vs_torch": None if r.speedup is None else round(r.speedup, 4), "recorded": p.recorded,
        "p99_observed": s.p99_observed, "isolated": c.isolated if c else False,
        "interleaved_with": list(c.interleaved_with) if c else None, "other_load": c.other_load if c else None,
        "noisy": r.noisy, **_generation_json(p),
    }  # fmt: skip


def _generation_json(p: Profile) -> dict:
    """A language model's profile in its own terms: time to first token and prompt
    tokens per second through prefill; or time per output token (the mean: a
    generation's length is the sum) and tokens per second over the batch's sequences;
    with the artifact's memory."""
    g = p.generation
    if g is None:
        return {}
    memory = {"weights_bytes": g.weights_bytes, "kv_bytes_per_token": g.kv_bytes_per_token}
    if g.phase == "prefill":
        return {"phase": g.phase, "prompt_tokens": g.prompt_tokens, "ttft_ms": p.latency.p50_ms,
                "tokens_per_s": p.tokens_per_s, **memory}  # fmt: skip
    return {"phase": g.phase, "prompt_tokens": g.prompt_tokens, "tpot_ms": p.latency.mean_ms,
            "tokens_per_s": p.tokens_per_s, **memory}  # fmt: skip


def profiles_table(manifest: Manifest, profiles: Iterable[Profile] | None = None):
    """The profiles as a table, with a caption saying which rows are noise (if any)."""
    from hxc import ui

    rs = rows(manifest, profiles)
    t = ui.table("host", "scenario", "batch", "candidate", "device", "p50 ms", "p99 ms", "items/s",
                 "vs torch", "spread", title="Benchmark profiles", caption=noise_note(rs))  # fmt: skip
    for r in rs:
        p = r.profile
        mark = "*" if noisy(p.latency) else ""
        vs = "-" if r.speedup is None else ratio(r.speedup) + ("*" if r.noisy else "")
        style = "yellow" if r.noisy else "" if r.speedup is None else ("green" if r.speedup >= 1 else "red")
        spread = percent(p.latency.spread) + (" noisy" if noisy(p.latency) else "")
        t.add_row(
            r.host.hostname if r.host else p.host_id[:8], scenario_of(p), str(p.batch), p.candidate, _short(p.device),
            number(p.latency.p50_ms) + mark, number(p.latency.p99_ms), number(per_second(p), 4),
            f"[{style}]{vs}[/{style}]" if style else vs, f"[yellow]{spread}[/yellow]" if noisy(p.latency) else spread,
        )  # fmt: skip
    return t


def _short(device: str) -> str:
    return device if len(device) <= 40 else device[:37] + "..."


# --- charts ----------------------------------------------------------------------


def svg_chart(manifest: Manifest, title: str | None = None) -> str:
    """One panel per (scenario, batch): p50 latency bars per host and candidate, on a
    log scale (a software Vulkan device can be 30x slower than the CPU)."""
    groups: dict[tuple[str, int], list[Row]] = defaultdict(list)
    for r in rows(manifest):
        groups[(scenario_of(r.profile), r.profile.batch)].append(r)
    width, bar_h, gap, left, right = 760, 18, 6, 300, 120
    y = 40
    parts = []
    for (scenario, batch), rs in sorted(groups.items()):
        parts.append(f'<text x="10" y="{y}" font-weight="bold">{html.escape(scenario)}, batch {batch}: p50 latency (ms, log scale)</text>')
        y += 12
        lo = min(r.profile.latency.p50_ms for r in rs)
        hi = max(r.profile.latency.p50_ms for r in rs)
        span = max(math.log10(hi) - math.log10(lo), 1e-9) if hi > lo else 1.0
        for r in rs:
            p = r.profile
            frac = 0.08 + 0.92 * ((math.log10(p.latency.p50_ms) - math.log10(lo)) / span if hi > lo else 1.0)
            w = frac * (width - left - right)
            colour = "#8c8c8c" if is_baseline(p.candidate) else "#3b7dd8"
            host = r.host.hostname if r.host else p.host_id[:8]
            label = f"{host} · {p.candidate} · {p.device.split(':', 1)[0]}"
            vs = "" if r.speedup is None else f"  {ratio(r.speedup)} vs torch"
            parts.append(
                f'<text x="{left - 6}" y="{y + bar_h - 5}" text-anchor="end" font-size="11">{html.escape(label)}</text>'
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>'
                f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 5}" font-size="11">{number(p.latency.p50_ms)} ms{vs}</text>'
            )
            y += bar_h + gap
        y += 24
    head = f'<text x="10" y="20" font-size="15" font-weight="bold">{html.escape(title or manifest.model.name)}</text>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" font-family="sans-serif" '
            f'font-size="12"><rect width="100%" height="100%" fill="white"/>{head}{"".join(parts)}</svg>\n')  # fmt: skip


def html_report(manifest: Manifest, selection: Selection | None = None, hostname: str | None = None) -> str:
    """A self-contained page: which artifact the loader picks on this host (from
    `selection`, if given), the chart beside the hosts it came from, and the numbers."""
    rs = rows(manifest)
    cols = ["host", "scenario", "batch", "candidate", "device", "p50 ms", "p90 ms", "p99 ms", "items/s", "vs torch", "spread"]
    body = "".join(
        f"<tr{' class=noisy' if r.noisy else ''}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.host.hostname if r.host else r.profile.host_id[:8], scenario_of(r.profile), r.profile.batch,
            r.profile.candidate, r.profile.device,
            number(r.profile.latency.p50_ms) + ("*" if noisy(r.profile.latency) else ""),
            number(r.profile.latency.p90_ms), number(r.profile.latency.p99_ms), number(per_second(r.profile), 4),
            "-" if r.speedup is None else ratio(r.speedup) + ("*" if r.noisy else ""),
            percent(r.profile.latency.spread),
        )) + "</tr>"
        for r in rs
    )  # fmt: skip
    note = noise_note(rs)
    hosts = "".join(
        f"<li><b>{html.escape(h.hostname)}</b> ({h.id}): {html.escape(h.cpu_model)}, {h.cpu_cores} cores; "
        f"{html.escape('; '.join(h.devices) or 'no GPU')}; "
        f"{html.escape(', '.join(f'{k} {v}' for k, v in h.versions.items()))}</li>"
        for h in manifest.hosts
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>hxc report: {html.escape(manifest.model.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;width:100%}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}}td:nth-child(-n+5),th:nth-child(-n+5){{text-align:left}}
.top{{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}}.top>div{{flex:1;min-width:22em}}.top>svg{{flex:none}}
tr.noisy td{{color:#a86a00}}.note{{color:#a86a00}}</style>
</head><body><h1>{html.escape(manifest.model.name)}</h1>
<p>{len(manifest.profiles)} profiles from {len(manifest.hosts)} host(s). Latency is per call with inputs already on
the device; "vs torch" is PyTorch eager's p50 divided by the row's p50 on the same host.</p>
<div class="top">{svg_chart(manifest)}<div>{_choice_html(selection, hostname)}<h2>Hosts</h2><ul>{hosts}</ul></div></div>
<table><tr>{"".join(f"<th>{c}</th>" for c in cols)}</tr>{body}</table>
{f'<p class="note">{html.escape(note)}</p>' if note else ""}
</body></html>
"""


def _choice_html(selection: Selection | None, hostname: str | None) -> str:
    """Which artifact `hxc.runtime.load` picks on the host the report is written on."""
    where = f"on {html.escape(hostname)}" if hostname else "here"
    if selection is None:
        return ""
    head = f"<h2>The loader's pick {where}</h2>"
    best = selection.best
    if best is None:
        return head + "<p>No artifact of this bundle can run on this host.</p>"
    ranked = "".join(f"<li>{html.escape(c.artifact.id)} on {html.escape(c.device.label)}: {html.escape(_why(c))}</li>"
                     for c in selection.candidates[1:])  # fmt: skip
    others = f"<p>Then, in its order:</p><ol start=2>{ranked}</ol>" if ranked else ""
    rejected = (f"<p>{len(selection.rejected)} more cannot run {where} (<code>hxc select --explain</code> says why).</p>"
                if selection.rejected else "")  # fmt: skip
    return (f"{head}<p><code>hxc.runtime.load</code> ({html.escape(selection.policy)} policy) picks "
            f"<b>{html.escape(best.artifact.id)}</b> on {html.escape(best.device.label)}: {html.escape(_why(best))}.</p>"
            f"{others}{rejected}")


def _why(c: Candidate) -> str:
    """What a candidate's rank rests on, in the report's number format (`Candidate.reason`'s facts)."""
    if c.profile is None:
        return f"no profile; static order {c.static_rank}"
    parts = [f"measured on {c.measured_on}"]
    if c.latency is not None:
        s = c.latency.latency
        parts.append(f"p50 {number(s.p50_ms)} ms, p99 {number(s.p99_ms)} ms ({s.iterations:,} calls)")
    if c.throughput is not None:
        t = c.throughput
        parts.append(f"{number(t.items_per_second, 4)} items/s ({t.scenario}, batch {t.batch})")
    return ": ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:])
