"""The backend registry: every module in this package (except `base`) is one engine
that builds and runs artifacts: IREE (every target family), ONNX Runtime and
AOTInductor. Engines are found by file name and imported only when asked for, like
target families (`hxc.targets`); listing names needs no imports. An engine is a
dimension beside the target family: `cpu:host` is IREE code for the host CPU,
`cpu:onnxruntime` the ONNX program that ONNX Runtime's CPU execution provider runs.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from pathlib import Path

from hxc.engines.base import DEFAULT_ENGINE, Engine
from hxc.errors import UsageError

__all__ = ["DEFAULT_ENGINE", "Engine", "engine", "engine_names", "resolve_backends"]

_NOT_ENGINES = {"base"}


@functools.cache
def engine_names() -> tuple[str, ...]:
    here = Path(__file__).parent
    names = sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_") and p.stem not in _NOT_ENGINES)
    return (DEFAULT_ENGINE, *(n for n in names if n != DEFAULT_ENGINE))


@functools.cache
def engine(name: str) -> Engine:
    if name not in engine_names():
        close = difflib.get_close_matches(name, engine_names(), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown backend {name!r}{hint}. Valid: {', '.join(engine_names())}, all")
    return importlib.import_module(f"hxc.engines.{name}").ENGINE


def resolve_backends(spec: str) -> tuple[list[Engine], frozenset[str], list[str]]:
    """`iree,onnxruntime` -> those engines, in order; the names of those chosen only
    through `all` (whose failures are not the user's to fix); and notes. `all` means
    every engine whose build needs are installed here; the others become notes."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UsageError("no backends given", hint=f"choose from: {', '.join(engine_names())}, all")
    chosen: list[Engine] = []
    named: set[str] = set()
    notes: list[str] = []
    for item in items:
        if item == "all":
            for e in map(engine, engine_names()):
                if (why := e.missing_for_build()) is None:
                    chosen.append(e)
                else:
                    notes.append(f"backend {e.name} skipped: {why}")
            continue
        e = engine(item)
        if (why := e.missing_for_build()) is not None:
            from hxc.extras import MissingExtraError

            raise MissingExtraError(f"backend {e.name} cannot build here: {why}")
        chosen.append(e)
        named.add(e.name)
    chosen = list(dict.fromkeys(chosen))
    return chosen, frozenset(e.name for e in chosen if e.name not in named), notes
