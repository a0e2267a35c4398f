"""The target registry: every module in this package (except `base`) is one family.

Families are found by file name and imported only when asked for, the way tinygrad
finds its `ops_*.py` backends: adding a family means adding one file here.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Sequence

from hxc.errors import UsageError
from hxc.registry import member_names
from hxc.targets.base import CompilePlan, Device, TargetFamily, Variant

__all__ = [
    "CompilePlan",
    "Device",
    "TargetFamily",
    "Variant",
    "all_variants",
    "extra_flags_for",
    "families",
    "family",
    "family_names",
    "parse_extra_flags",
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


def parse_extra_flags(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Expert IREE flags, `FAMILY[:VARIANT]:--flag[=value]`, as (selector, flag) pairs.
    The selector names a family (every variant of it) or one variant (by name or alias,
    stored by its name). Unknown families and variants raise UsageError."""
    out = []
    for spec in specs:
        selector, sep, rest = spec.partition(":--")
        if not sep or not selector or not rest:
            raise UsageError(
                f"malformed --iree-flag {spec!r}",
                hint="write FAMILY[:VARIANT]:--flag, e.g. vulkan:--iree-vulkan-target=rdna3 or cpu:host:--iree-opt-level=O2",
            )
        fam_name, _, var_name = selector.partition(":")
        fam = family(fam_name)
        if var_name:
            v = fam.variant(var_name)
            if v is None:
                names = [x.name for x in fam.variants] + [a for x in fam.variants for a in x.aliases]
                raise UsageError(_unknown(f"{fam.name} variant {var_name!r}", var_name, names))
            selector = v.id
        out.append((selector, "--" + rest))
    return tuple(out)


def extra_flags_for(variant: Variant, extra: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The expert flags (from `parse_extra_flags`) that apply to `variant`, in order."""
    return tuple(flag for selector, flag in extra if selector in (variant.family, variant.id))


def _unknown(what: str, given: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(given, valid, n=1, cutoff=0.5)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what}{suggestion}. Valid: {', '.join(valid)}"
