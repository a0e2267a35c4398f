"""What does `hxc.runtime.load` cost, and does loading copy the artifact?

For a ResNet-18 bundle (weights inline in the vmfb, and shared in weights.irpa), each
measurement runs in a fresh process so nothing is warm: time to probe the host,
select an artifact, load it (sha256 check + mmap + context), and the first and second
calls; and the process's resident memory before load, after load and after the
first call, next to the artifact's size. Inline and shared runs are interleaved.

    python benchmarks/load_overhead.py [--rounds 5] [--device cpu]
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

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import hxc.runtime
from hxc.manifests import read_manifest
t_import = time.perf_counter() - t0

def rss_mb(kind="RssAnon"):
    # Anonymous memory is what a copy costs; file-backed pages of an mmapped artifact
    # are shared with the page cache and are not a copy.
    for line in open("/proc/self/status"):
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024

bundle, device = sys.argv[1], sys.argv[2] or None
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
t = time.perf_counter(); probe = hxc.runtime.probe_host(); t_probe = time.perf_counter() - t
t = time.perf_counter(); sel = hxc.runtime.select(read_manifest(bundle), probe, device=device); t_select = time.perf_counter() - t
rss0, file0 = rss_mb(), rss_mb("RssFile")
t = time.perf_counter(); model = hxc.runtime.load(bundle, device=device, probe=probe); t_load = time.perf_counter() - t
rss1, file1 = rss_mb(), rss_mb("RssFile")
t = time.perf_counter(); model(x); t_first = time.perf_counter() - t
rss2, file2 = rss_mb(), rss_mb("RssFile")
t = time.perf_counter(); model(x); t_second = time.perf_counter() - t
m = model.manifest
print(json.dumps({
    "artifact": model.artifact.id, "device": model.device.label, "import_s": t_import, "probe_s": t_probe,
    "select_s": t_select, "load_s": t_load, "first_call_s": t_first, "second_call_s": t_second,
    "anon_before_load_mb": rss0, "anon_after_load_mb": rss1, "anon_after_first_call_mb": rss2,
    "file_before_load_mb": file0, "file_after_load_mb": file1, "file_after_first_call_mb": file2,
    "artifact_mb": model.artifact.size / 2**20, "weights_mb": sum(w.size for w in m.weights) / 2**20,
}))
"""


def measure(bundle: Path, device: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hxc.examples.zoo:resnet18")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hxc-bench-load-"))
    bundles = {}
    for mode in ("inline", "shared"):
        bundles[mode] = work / f"{mode}.hxc"
        print(f"compiling {args.model} with {mode} weights", file=sys.stderr)
        hxc("compile", args.model, "-t", "cpu:host,vulkan", "--weights", mode, "-o", str(bundles[mode]))
    runs: dict[str, list[dict]] = {m: [] for m in bundles}

    def run(mode: str):
        def fn() -> float:
            r = measure(bundles[mode], args.device)
            runs[mode].append(r)
            return r["probe_s"] + r["select_s"] + r["load_s"]

        return fn

    interleave({m: run(m) for m in bundles}, args.rounds)
    summary = {}
    for mode, rs in runs.items():
        keys = [k for k in rs[0] if isinstance(rs[0][k], float)]
        summary[mode] = {"artifact": rs[0]["artifact"], "device": rs[0]["device"],
                         **{k: median([r[k] for r in rs]) for k in keys}}  # fmt: skip
    path = save("load_overhead", {"model": args.model, "rounds": args.rounds, "median": summary, "runs": runs})
    for mode, s in summary.items():
        print(f"{mode:>6} weights: probe {s['probe_s'] * 1e3:.1f} ms + select {s['select_s'] * 1e3:.2f} ms, "
              f"load {s['load_s'] * 1e3:.1f} ms, first call {s['first_call_s'] * 1e3:.1f} ms, "
              f"second {s['second_call_s'] * 1e3:.1f} ms; anonymous memory +{s['anon_after_load_mb'] - s['anon_before_load_mb']:.1f} MB "
              f"on load, +{s['anon_after_first_call_mb'] - s['anon_before_load_mb']:.1f} MB after the first call; "
              f"file-backed +{s['file_after_load_mb'] - s['file_before_load_mb']:.1f} MB "
              f"(artifact {s['artifact_mb']:.1f} MB, weights {s['weights_mb']:.1f} MB)")  # fmt: skip
    print(f"({path})")


if __name__ == "__main__":
    main()
