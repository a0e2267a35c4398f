"""How big is a runtime-only hxc install, next to the full one?

Builds a wheel of this checkout and installs it into two fresh virtual environments:
without extras (`pip install hxc`: IREE's runtime, numpy, click, rich) and with every
extra (`pip install 'hxc[all]'`: torch, iree-turbine, the IREE compiler, onnx, ONNX
Runtime), then measures both on disk (allocated blocks, like `du`) with their largest
packages, next to make's development .venv (hxc[all,test]).

    python benchmarks/install_size.py [--dev .venv]

Writes benchmarks/results/install_size.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def du(path: Path) -> int:
    """Bytes on disk (allocated blocks, hard links counted once), like `du -s`."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def largest(site: Path, n: int = 8) -> dict[str, float]:
    sizes = {p.name: du(p) for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")}
    return {k: round(v / 2**20, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:n]}


def site_packages(venv: Path) -> Path:
    [site] = (venv / "lib").glob("python3*/site-packages")
    return site


def build(d: Path, wheel: Path, extras: str) -> dict:
    """A fresh venv with `wheel[extras]` installed: its size and largest packages."""
    venv = d / f"venv-{extras or 'runtime'}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    spec = f"{wheel}[{extras}]" if extras else str(wheel)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", spec], check=True)
    site = site_packages(venv)
    frozen = subprocess.run([sys.executable, "-m", "pip", "--python", python, "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return {"venv_mib": round(du(venv) / 2**20, 1), "site_packages_mib": round(du(site) / 2**20, 1),
            "largest_mib": largest(site), "packages": frozen}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", type=Path, default=REPO / ".venv", help="the development environment (make's .venv)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hxc-install-") as tmp:
        d = Path(tmp)
        # From a copy: setuptools builds in the source tree and keeps whatever a stale build/ holds.
        source = shutil.copytree(REPO, d / "src", ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                               "__pycache__", ".*_cache", ".hypothesis"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", d / "w", source],
                       check=True)  # fmt: skip
        [wheel] = (d / "w").glob("hxc-*.whl")
        thin = build(d, wheel, "")
        full = build(d, wheel, "all")
    dev_site = site_packages(args.dev)
    dev = {"venv_mib": round(du(args.dev) / 2**20, 1), "site_packages_mib": round(du(dev_site) / 2**20, 1),
           "largest_mib": largest(dev_site)}  # fmt: skip
    path = save("install_size", {"runtime_only": thin, "all": full, "dev": dev,
                                 "ratio_runtime_to_all": round(thin["venv_mib"] / full["venv_mib"], 3)})  # fmt: skip
    print(f"pip install hxc: {thin['venv_mib']} MiB; pip install 'hxc[all]': {full['venv_mib']} MiB "
          f"({100 * thin['venv_mib'] / full['venv_mib']:.1f}%); make's dev .venv: {dev['venv_mib']} MiB; wrote {path}")


if __name__ == "__main__":
    main()
