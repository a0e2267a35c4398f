"""Bundle size and load time with weights shared (one weights.irpa per bundle) versus
inline (a copy inside every artifact), for a 110M-parameter BERT-base encoder compiled
for 7 target variants.

Load time is measured in a fresh process per load (probe + select + sha256 checks +
mmap + context creation + first call), inline and shared interleaved, medians.

    python benchmarks/weights_sharing.py [--model hxc.examples.zoo:bert_base] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import hxc, interleave, median, save  # noqa: E402

TARGETS = "cpu:host,cpu:x86-64-v3,cpu:x86-64-v4,cpu:aarch64,cuda:sm_89,rocm:gfx942,vulkan:spirv"

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import hxc.runtime
from hxc.verify import load_golden
from hxc.manifests import read_manifest
from pathlib import Path
b = Path(sys.argv[1])
inputs, _ = load_golden(b, read_manifest(b))
t1 = time.perf_counter()
model = hxc.runtime.load(b, device=sys.argv[2])
t2 = time.perf_counter()
model.run_flat(inputs)
t3 = time.perf_counter()
print(json.dumps({"load_s": t2 - t1, "first_call_s": t3 - t2, "artifact": model.artifact.id}))
"""


def bundle_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hxc.examples.zoo:bert_base")
    ap.add_argument("--targets", default=TARGETS)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hxc-bench-weights-"))
    bundles = {}
    sizes = {}
    for mode in ("inline", "shared"):
        bundles[mode] = work / f"{mode}.hxc"
        print(f"compiling {args.model} for {args.targets} with {mode} weights", file=sys.stderr)
        hxc("compile", args.model, "-t", args.targets, "--weights", mode, "-o", str(bundles[mode]))
        manifest = json.loads((bundles[mode] / "manifest.json").read_text())
        sizes[mode] = {
            "bundle_mb": bundle_bytes(bundles[mode]) / 2**20,
            "artifacts_mb": sum(a["size"] for a in manifest["artifacts"] if a["size"]) / 2**20,
            "weights_mb": sum(w["size"] for w in manifest["weights"]) / 2**20,
            "program_mb": (bundles[mode] / "program.pt2").stat().st_size / 2**20,
            "artifacts": len(manifest["artifacts"]),
        }
    loads: dict[str, list[dict]] = {}
    failures: dict[str, list] = {}

    def loader(mode: str, device: str):
        def fn() -> float | None:
            out = subprocess.run([sys.executable, "-c", CHILD, str(bundles[mode]), device], capture_output=True, text=True)
            if out.returncode != 0:  # record it and go on: one failed load is a result too
                failures.setdefault(f"{mode}/{device}", []).append(out.stderr.strip().splitlines()[-1:])
                return None
            r = json.loads(out.stdout.strip().splitlines()[-1])
            loads.setdefault(f"{mode}/{device}", []).append(r)
            return r["load_s"]

        return fn

    interleave({f"{m}/{d}": loader(m, d) for d in ("cpu", "vulkan") for m in ("inline", "shared")}, args.rounds)
    summary = {k: {"load_ms": median([r["load_s"] for r in v]) * 1e3,
                   "first_call_ms": median([r["first_call_s"] for r in v]) * 1e3} for k, v in loads.items()}  # fmt: skip
    path = save("weights_sharing", {"model": args.model, "targets": args.targets, "sizes": sizes, "load": summary, "runs": loads,
                                     "failures": failures})
    for mode, s in sizes.items():
        print(f"{mode:>6}: bundle {s['bundle_mb']:.0f} MiB ({s['artifacts']} artifacts {s['artifacts_mb']:.0f} MiB, "
              f"weights {s['weights_mb']:.0f} MiB, program {s['program_mb']:.1f} MiB)")  # fmt: skip
    for k, s in summary.items():
        print(f"{k:>14}: load {s['load_ms']:.0f} ms, first call {s['first_call_ms']:.0f} ms")
    for k, f in failures.items():
        print(f"{k:>14}: {len(f)} load(s) failed: {f[0]}")
    print(f"({path})")


if __name__ == "__main__":
    main()
