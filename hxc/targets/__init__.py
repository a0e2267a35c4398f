"""The target registry: every module in this package (except `base`) is one family.

Families are found by file name and imported only when asked for, the way tinygrad
finds its `ops_*.py` backends: adding a family means adding one file here.
"""

from __future__ import annotations

import difflib
import functools
import importlib

from hxc.errors import UsageError
from hxc.registry import member_names
from hxc.targets.base import CompilePlan, Device, TargetFamily, Variant

__all__ = [
    "CompilePlan",
    "Device",
    "TargetFamily",
    "Variant",
    "all_variants",
    "families",
    "family",
    "family_names",
    "resolve",
]

@functools.cache
def family_names() -> tuple[str, ...]:
    return member_names(__file__)


@functools.cache
def family(name: str) -> TargetFamily:
    if name not in family_names():
        raise UsageError(_unknown(f"target family {name!r}", name, family_names()))
    return importlib.import_module(f"hxc.targets.{name}").FAMILY


def families() -> tuple[TargetFamily, ...]:
    return tuple(family(n) for n in family_names())


def all_variants() -> tuple[Variant, ...]:
    return tuple(v for f in families() for v in f.variants)


def resolve(spec: str | list[str]) -> list[Variant]:
    """Turn `cpu,cuda:sm_89,rocm:gfx942` into variants, in order, without duplicates.

    A bare family name means its default variants; `all` means every family's defaults.
    Unknown names raise UsageError listing what is valid, with the closest match.
    """
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in part.split(",")]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise UsageError("no targets given", hint=f"choose from: {', '.join(family_names())}")
    out: list[Variant] = []
    for item in items:
        fam_name, _, var_name = item.partition(":")
        if fam_name == "all" and not var_name:
            chosen = [v for f in families() for v in f.default_variants]
        else:
            fam = family(fam_name)
            if not var_name:
                chosen = list(fam.default_variants)
            else:
                v = fam.variant(var_name)
                if v is None:
                    names = [x.name for x in fam.variants] + [a for x in fam.variants for a in x.aliases]
                    raise UsageError(_unknown(f"{fam.name} variant {var_name!r}", var_name, names))
                chosen = [v]
        out.extend(v for v in chosen if v not in out)
    return out


def _unknown(what: str, given: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(given, valid, n=1, cutoff=0.5)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what}{suggestion}. Valid: {', '.join(valid)}"
