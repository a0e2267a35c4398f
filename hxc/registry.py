"""How hxc's registries (target families, model frontends) find their members: one
module per member in the registry's package, found by file name and imported only
when asked for, the way tinygrad finds its `ops_*.py` backends."""

from __future__ import annotations

from pathlib import Path

NOT_MEMBERS = frozenset({"base"})  # every registry keeps its shared record types in base.py


def member_names(package_file: str) -> tuple[str, ...]:
    """The member modules of the package whose `__init__.py` is `package_file`, sorted,
    without importing any of them."""
    here = Path(package_file).parent
    names = (p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))
    return tuple(sorted(n for n in names if n not in NOT_MEMBERS))
