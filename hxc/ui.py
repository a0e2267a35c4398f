"""Terminal rendering: tables, progress and errors. Results go to stdout, progress and
diagnostics to stderr, so `hxc ... --json > out.json` stays clean."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

import os as _os

# Piped output (CI logs, `make demo`) gets a wide table instead of rich's 80 columns.
_WIDTH = None if sys.stdout.isatty() or _os.environ.get("COLUMNS") else 160
out = Console(highlight=False, soft_wrap=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # one error, one line, even in pipes


def print_json(data: Any) -> None:
    """Strict JSON on stdout. JSON has no NaN or Infinity (Python's `json` would write
    them anyway, and other parsers reject the document), so they print as null; results
    that can hold them say so in a field of their own (`nonfinite`)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def finite(x: float | None) -> float | None:
    """A number as JSON can carry it: NaN and infinities become None."""
    return x if x is None or math.isfinite(x) else None


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return finite(data)
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def error(message: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(message))


def warn(message: str) -> None:
    err.print(Text("warning: ", style="bold yellow") + Text(message))


def human_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(*columns: str, title: str | None = None, caption: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False, caption=caption,
              caption_justify="left", caption_style="yellow")  # fmt: skip
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


class CompileProgress:
    """One line per target: spinner while compiling, then a check or a cross with the
    time and size. Without a terminal it prints one plain line per finished target."""

    def __init__(self, enabled: bool = True) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.enabled = enabled
        self.stage = ""
        self._lock = threading.Lock()
        self._live: Live | None = None

    def __enter__(self) -> CompileProgress:
        if self.enabled and err.is_terminal:
            self._live = Live(self._render(), console=err, refresh_per_second=10, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        if self._live is not None:
            self._live.update(self._render())
        elif self.enabled:
            err.print(f"[dim]{stage}…[/dim]")

    def on_event(self, event: Any) -> None:
        with self._lock:
            row = self.rows.setdefault(event.label, {"state": "queued"})
            if event.kind == "start":
                row.update(state="running", started=time.perf_counter())
            else:
                r = event.result
                size = r.file.stat().st_size if r.file is not None and r.file.exists() else None
                row.update(state=r.status, seconds=r.seconds, size=size, cached=r.cached, error=r.error)
                if self._live is None and self.enabled:
                    err.print(self._line(event.label, row))
        if self._live is not None:
            self._live.update(self._render())

    def _line(self, target: str, row: dict[str, Any]) -> Text:
        if row["state"] == "ok":
            detail = f"{row['seconds']:.1f}s  {human_size(row['size'])}" + ("  (cached)" if row.get("cached") else "")
            return Text.assemble(("✓ ", "green"), (f"{target:<28}", "bold"), detail)
        if row["state"] == "failed":
            return Text.assemble(("✗ ", "red"), (f"{target:<28}", "bold"), f"{row['seconds']:.1f}s  ", (row["error"] or "", "red"))
        return Text.assemble(("· ", "dim"), (f"{target:<28}", "dim"), "queued")

    def _render(self) -> Table:
        grid = Table.grid(padding=(0, 1))
        grid.add_column()
        if self.stage and all(r["state"] != "running" for r in self.rows.values()) and self.stage != "compiling":
            grid.add_row(Spinner("dots", text=Text(self.stage + "…", style="dim")))
        for target, row in self.rows.items():
            if row["state"] == "running":
                elapsed = time.perf_counter() - row["started"]
                grid.add_row(Spinner("dots", text=Text.assemble((f"{target:<28}", "bold"), f"{elapsed:.0f}s")))
            else:
                grid.add_row(self._line(target, row))
        return grid
