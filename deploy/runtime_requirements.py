"""Print (one per line, as a requirements file) the requirements of a runtime-only install of hxc (load, run, serve bundles),
read from pyproject.toml: the core dependencies without the compiler side (torch,
iree-turbine, the IREE compiler), plus the `serve` extra.

    python deploy/runtime_requirements.py > runtime.txt
    pip install --no-deps . && pip install -r runtime.txt

Used by deploy/Dockerfile and tests/test_serve_deploy.py, so the two install the same
thing; it goes away when a runtime-only extra exists in pyproject.toml (issue 14).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

COMPILER_SIDE = {"torch", "iree-turbine", "iree-base-compiler"}


def runtime_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    core = [r for r in project["dependencies"] if re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() not in COMPILER_SIDE]
    return core + project["optional-dependencies"]["serve"]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(runtime_requirements(root / "pyproject.toml")))
