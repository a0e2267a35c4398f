"""How much can a forged `profiles.json` slow down `hxc run` of a signed bundle?

Profiles are outside the manifest's signature (bench adds them after signing), so
whoever can write beside a bundle can make them as large as they like. This times
`hxc run BUNDLE -i x.npy --trusted-keys KEY` (a fresh process each time, as a user
runs it) on copies of one signed bundle that differ only in their profiles:

  none        no profiles.json
  real        the profiles `hxc bench` recorded
  max         the real profiles repeated up to the bounds a reader accepts (the most a
              forger can make hxc parse)
  forged-30MB the real profiles repeated to 30 MB (the attack in the hardening issue)

Runs are interleaved (none, real, max, forged, none, ...) and medians compared.

    python benchmarks/forged_profiles.py [--bundle B.hxc] [--rounds 5] [--mb 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import median, save  # noqa: E402

RUN_TIMEOUT_S = 600


def _hxc(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hxc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=True)  # fmt: skip


def _repeat(doc: dict, count: int | None = None, size: int | None = None, max_bytes: int | None = None) -> bytes:
    """profiles.json with the real profiles repeated to `count` entries, or to at least
    `size` bytes; then cut to at most `max_bytes`."""
    one = doc["profiles"]

    def render(n: int) -> bytes:
        return (json.dumps({**doc, "profiles": (one * (n // len(one) + 1))[:n]}, indent=2) + "\n").encode()

    n = count if count is not None else len(one)
    raw = render(n)
    while size is not None and len(raw) < size:
        n = int(n * size / len(raw)) + len(one)
        raw = render(n)
    while max_bytes is not None and len(raw) > max_bytes:
        n = int(n * max_bytes / len(raw) * 0.99)
        raw = render(n)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, help="a bundle with profiles (default: the example convnet, benched here)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=float, default=30.0, help="size of the forged profiles.json")
    args = parser.parse_args()

    try:
        from hxc.manifests.bundle import MAX_PROFILES, MAX_PROFILES_BYTES
    except ImportError:  # an hxc from before the bounds, measured for comparison
        MAX_PROFILES, MAX_PROFILES_BYTES = 4096, 8 * 1024 * 1024

    work = Path(tempfile.mkdtemp(prefix="hxc-forged-"))
    try:
        base = work / "base.hxc"
        if args.bundle:
            shutil.copytree(args.bundle, base)
        else:
            _hxc("compile", "hxc.examples:convnet", "-t", "cpu:host,vulkan:spirv", "-o", base)
        if not (base / "profiles.json").exists():
            _hxc("bench", base, "--min-time", "0.05", "--min-iterations", "5", "--baseline", "none")
        _hxc("keygen", "-o", work / "k")
        _hxc("sign", base, "--key", work / "k")
        doc = json.loads((base / "profiles.json").read_text())
        variants = {
            "none": None,
            "real": (base / "profiles.json").read_bytes(),
            "max": _repeat(doc, count=MAX_PROFILES, max_bytes=MAX_PROFILES_BYTES),
            f"forged-{args.mb:g}MB": _repeat(doc, size=int(args.mb * 1024 * 1024)),
        }
        x = work / "x.npy"
        inputs = json.loads(_hxc("inspect", base, "--json").stdout)["signature"]["inputs"]
        np.save(x, np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in inputs[0]["shape"]],
                                                            dtype=np.float32))  # fmt: skip
        info = {}
        for name, profiles in variants.items():
            b = work / f"{name}.hxc"
            shutil.copytree(base, b)
            (b / "profiles.json").unlink()
            if profiles is not None:
                (b / "profiles.json").write_bytes(profiles)
            info[name] = {"profiles_bytes": len(profiles or b""),
                          "profiles": len(json.loads(profiles)["profiles"]) if profiles else 0}  # fmt: skip
        times: dict[str, list[float | None]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name in variants:
                t0 = time.perf_counter()
                try:
                    _hxc("run", work / f"{name}.hxc", "-i", x, "--trusted-keys", f"{work / 'k'}.pub")
                    times[name].append(time.perf_counter() - t0)
                except subprocess.TimeoutExpired:
                    times[name].append(None)
                print(f"  round {r + 1}/{args.rounds} {name}: {times[name][-1]}", file=sys.stderr, flush=True)
        medians = {n: median([t for t in ts if t is not None]) if all(t is not None for t in ts) else None
                   for n, ts in times.items()}  # fmt: skip
        ratios = {n: (m / medians["none"] if m is not None else None) for n, m in medians.items()}
        for name in variants:
            m = medians[name]
            print(f"{name:>14}: {info[name]['profiles']:>6} profiles, {info[name]['profiles_bytes'] / 2**20:6.2f} MiB: "
                  f"median {m if m is None else f'{m:.2f} s'}  ({ratios[name] and f'{ratios[name]:.2f}x'} of none)")  # fmt: skip
        path = save("forged_profiles", {"rounds": args.rounds, "variants": info, "seconds": times, "median_s": medians,
                                        "ratio_to_none": ratios, "cores": os.cpu_count()})  # fmt: skip
        print(f"saved {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
