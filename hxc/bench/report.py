"""Showing profiles: a terminal table, JSON rows, and a self-contained HTML report with
SVG charts (no plotting library needed; the SVG also works on its own, e.g. in a
README)."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from hxc.bench.baselines import REFERENCE, is_baseline
from hxc.manifests.schema import Host, Manifest, Profile



@dataclass(frozen=True)
class Row:
    host: Host | None
    profile: Profile
    speedup: float | None  # baseline p50 / this p50, same host, scenario and batch


def rows(manifest: Manifest, profiles: Iterable[Profile] | None = None, baseline: str = REFERENCE.candidate) -> list[Row]:
    """Latest profile per (host, scenario, batch, candidate, device), with speed-ups."""
    hosts = {h.id: h for h in manifest.hosts}
    latest: dict[tuple, Profile] = {}
    for p in profiles if profiles is not None else manifest.profiles:
        latest[(p.host_id, p.scenario, p.batch, p.candidate, p.device)] = p
    base = {(p.host_id, p.scenario, p.batch): p for p in latest.values() if p.candidate == baseline}
    out = []
    for key, p in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[1].latency.p50_ms)):
        b = base.get((p.host_id, p.scenario, p.batch))
        out.append(Row(hosts.get(p.host_id), p, b.latency.p50_ms / p.latency.p50_ms if b else None))
    return out


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
    }  # fmt: skip


def profiles_table(manifest: Manifest, profiles: Iterable[Profile] | None = None):
    from hxc import ui

    t = ui.table("host", "scenario", "batch", "candidate", "device", "p50 ms", "p99 ms", "items/s",
                 "vs torch", "spread", title="Benchmark profiles")  # fmt: skip
    for r in rows(manifest, profiles):
        p = r.profile
        vs = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        style = "" if r.speedup is None else ("green" if r.speedup >= 1 else "red")
        t.add_row(
            r.host.hostname if r.host else p.host_id[:8], p.scenario, str(p.batch), p.candidate, _short(p.device),
            f"{p.latency.p50_ms:.3g}", f"{p.latency.p99_ms:.3g}", f"{p.items_per_second:.4g}",
            f"[{style}]{vs}[/{style}]" if style else vs, f"{p.latency.spread:.0%}",
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
        groups[(r.profile.scenario, r.profile.batch)].append(r)
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
            vs = "" if r.speedup is None else f"  {r.speedup:.2f}x vs torch"
            parts.append(
                f'<text x="{left - 6}" y="{y + bar_h - 5}" text-anchor="end" font-size="11">{html.escape(label)}</text>'
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>'
                f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 5}" font-size="11">{p.latency.p50_ms:.3g} ms{vs}</text>'
            )
            y += bar_h + gap
        y += 24
    head = f'<text x="10" y="20" font-size="15" font-weight="bold">{html.escape(title or manifest.model.name)}</text>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" font-family="sans-serif" '
            f'font-size="12"><rect width="100%" height="100%" fill="white"/>{head}{"".join(parts)}</svg>\n')  # fmt: skip


def html_report(manifest: Manifest) -> str:
    """A self-contained page: the chart, the numbers, and the hosts they came from."""
    rs = rows(manifest)
    cols = ["host", "scenario", "batch", "candidate", "device", "p50 ms", "p90 ms", "p99 ms", "items/s", "vs torch", "spread"]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.host.hostname if r.host else r.profile.host_id[:8], r.profile.scenario, r.profile.batch,
            r.profile.candidate, r.profile.device, f"{r.profile.latency.p50_ms:.3g}", f"{r.profile.latency.p90_ms:.3g}",
            f"{r.profile.latency.p99_ms:.3g}", f"{r.profile.items_per_second:.4g}",
            "-" if r.speedup is None else f"{r.speedup:.2f}x", f"{r.profile.latency.spread:.0%}",
        )) + "</tr>"
        for r in rs
    )  # fmt: skip
    hosts = "".join(
        f"<li><b>{html.escape(h.hostname)}</b> ({h.id}): {html.escape(h.cpu_model)}, {h.cpu_cores} cores; "
        f"{html.escape('; '.join(h.devices) or 'no GPU')}; "
        f"{html.escape(', '.join(f'{k} {v}' for k, v in h.versions.items()))}</li>"
        for h in manifest.hosts
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>hxc report: {html.escape(manifest.model.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}}td:nth-child(-n+5),th:nth-child(-n+5){{text-align:left}}</style>
</head><body><h1>{html.escape(manifest.model.name)}</h1>
<p>{len(manifest.profiles)} profiles from {len(manifest.hosts)} host(s). Latency is per call with inputs already on
the device; "vs torch" is PyTorch eager's p50 divided by the row's p50 on the same host.</p>
{svg_chart(manifest)}
<table><tr>{"".join(f"<th>{c}</th>" for c in cols)}</tr>{body}</table>
<h2>Hosts</h2><ul>{hosts}</ul></body></html>
"""
