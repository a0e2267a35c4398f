"""Which iree-compile flags should hxc's CPU variants use by default? Measured on real
models with the same harness as `hxc bench` (configurations interleaved, medians).

For each model this compiles `cpu:host` with every configuration the CPU family's
tuner knows (default = data tiling + im2col, and one change at a time), plus the flag
sets hxc does not use (IREE's own defaults with only the target CPU set, and IREE 3.13's
experimental convolution paths: Winograd, convolution data tiling), checks each build
against the golden sample, and times them all in one run. It also times the default
build at 1 and 2 runtime threads.

    python benchmarks/cpu_flags.py [--models mlp,resnet18,bert-base,gpt2-small] [--min-time 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402
from suite import models  # noqa: E402

from hxc import frontends  # noqa: E402
from hxc.bench.measure import Budget, Contender, measure  # noqa: E402
from hxc.build import import_model  # noqa: E402
from hxc.compiler.driver import CompileJob, compile_all  # noqa: E402
from hxc.compiler.imported import PARAMETER_SCOPE, ImportOptions  # noqa: E402
from hxc.engines.iree import IreeSession as Session  # noqa: E402
from hxc.runtime.probe import probe_host  # noqa: E402
from hxc.golden import compare_outputs, golden_arrays  # noqa: E402
from hxc.targets import family, resolve  # noqa: E402

warnings.filterwarnings("ignore")

CHILD = r"""
import sys, json, time, numpy as np, iree.runtime as rt
rt.flags.parse_flags(f"--task_topology_max_group_count={sys.argv[4]}")
from pathlib import Path
from hxc.engines.iree import IreeSession as Session
from hxc.runtime.probe import probe_host
from hxc.manifests.schema import from_json, Signature
sig = from_json(Signature, json.loads(Path(sys.argv[2]).read_text()))
inputs = [np.load(p) for p in sys.argv[5:]]
dev = next(d for d in probe_host().devices if d.driver == "local-task")
weights = (Path(sys.argv[3]), "model") if sys.argv[3] != "-" else None
call = Session.open(Path(sys.argv[1]), dev, weights).prepare(inputs, sig)
for _ in range(5): call()
ts = []
end = time.perf_counter() + 3.0
while time.perf_counter() < end or len(ts) < 20:
    t = time.perf_counter(); call(); ts.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"p50_ms": float(np.median(ts)), "n": len(ts)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,resnet18,resnet18-b8,bert-base,gpt2-small")
    ap.add_argument("--min-time", type=float, default=3.0)
    args = ap.parse_args()
    [host] = resolve("cpu:host")
    fam = family("cpu")
    device = next(d for d in probe_host().devices if d.driver == "local-task")
    budget = Budget(warmup=5, min_iterations=20, min_seconds=args.min_time, max_seconds=120)
    results = {}
    for name in args.models.split(","):
        ref, _ = models()[name]
        work = Path(tempfile.mkdtemp(prefix=f"hxc-flags-{name}-"))
        imported = import_model(frontends.recognise(ref), ref, ImportOptions(), work, lambda s: None)
        sha = hashlib.sha256(imported.mlir.read_bytes()).hexdigest()
        plan = fam.plan(host)
        configs = fam.tuning_configs(plan)
        target_cpu = next(f for f in plan.flags if f.startswith("--iree-llvmcpu-target-cpu"))
        configs.append(("iree-defaults", ("--iree-hal-target-device=local",
                                          "--iree-hal-local-target-device-backends=llvm-cpu", target_cpu)))  # fmt: skip
        configs += experiments(plan.flags)
        jobs = [dataclasses.replace(CompileJob(imported.mlir, sha, host), config=n, flags=f) for n, f in configs]
        print(f"{name}: compiling {len(jobs)} configurations", file=sys.stderr)
        compiled = compile_all(jobs, workdir=work)
        weights = (imported.weights, PARAMETER_SCOPE) if imported.weights else None
        inputs = [imported.golden[f"input_{i}"] for i in range(len(imported.signature.inputs))]
        contenders = []
        errors: dict[str, float] = {}
        _, expected = golden_arrays(imported.golden, imported.signature)
        for (cname, _), r in zip(configs, compiled):
            if r.status != "ok":
                print(f"  {cname}: failed to compile: {r.error}", file=sys.stderr)
                continue
            outputs = Session.open(r.vmfb, device, weights).invoke(inputs, imported.signature)
            comps = compare_outputs(outputs, expected, imported.signature, "fp32")
            errors[cname] = max(c.max_abs for c in comps)
            if not all(c.ok for c in comps):
                print(f"  {cname}: wrong numbers (max abs error {errors[cname]:.3g}); not timed", file=sys.stderr)
                continue
            holder: dict = {}

            def open_(vmfb=r.vmfb, holder=holder) -> None:
                holder["s"] = Session.open(vmfb, device, weights)

            contenders.append(Contender(cname, device.label, open_,
                                        lambda a, holder=holder: holder["s"].prepare(a, imported.signature), True))  # fmt: skip
        timings = {t.contender.id: t.stats().p50_ms for t in measure(contenders, inputs, budget)}
        results[name] = {"p50_ms": timings, "max_abs_error": errors,
                         "failed": {c: r.error for (c, _), r in zip(configs, compiled) if r.status != "ok"}}  # fmt: skip
        base = timings.get("default")
        print(f"{name}: " + ", ".join(f"{k} {v:.3g} ms ({v / base:.2f}x default)" for k, v in timings.items()))
        results[name]["threads"] = thread_scaling(compiled[0].vmfb, imported, work)
        print(f"{name}: default build, p50 by runtime threads: {results[name]['threads']}")
    path = save("cpu_flags", {"models": results})
    print(f"({path})")


WINOGRAD = "iree-linalg-ext-convert-conv2d-to-winograd{replace-all-convs=true}"


def experiments(flags: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """IREE 3.13's experimental convolution paths, on top of hxc's default flags. The
    Winograd rewrite (F(6,3)) takes IREE's named 3x3 stride-1 convolutions, NCHW as
    well as NHWC (13 of ResNet-18's 20 convolutions); convolution data tiling replaces
    im2col for every convolution."""
    without_im2col = tuple(f for f in flags if f != "--iree-global-opt-use-im2col-for-convs")
    pipeline = "--iree-preprocessing-pass-pipeline=builtin.module(util.func({}))"
    return [
        ("winograd", (*flags, pipeline.format(WINOGRAD))),
        ("channels-last+winograd", (*flags, pipeline.format(f"iree-preprocessing-convert-conv-to-channels-last,{WINOGRAD}"))),
        ("conv-data-tiling", (*without_im2col, *(f"--iree-dispatch-creation-experimental-set-data-tiling-ops={op}"
                                                 for op in ("matmul", "scaled_matmul", "convolution")))),
    ]


def thread_scaling(vmfb: Path, imported, work: Path) -> dict[str, float]:
    """Threads are fixed when the first local-task device is created, so each count
    runs in its own process."""
    import json

    import numpy as np

    sig = work / "signature.json"
    from hxc.manifests.schema import to_json

    sig.write_text(json.dumps(to_json(imported.signature)))
    paths = []
    for i in range(len(imported.signature.inputs)):
        p = work / f"in{i}.npy"
        np.save(p, imported.golden[f"input_{i}"])
        paths.append(str(p))
    out = {}
    for n in (1, os.cpu_count() or 1):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(vmfb), str(sig), str(imported.weights or "-"), str(n), *paths],
                              capture_output=True, text=True, check=True)  # fmt: skip
        out[str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])["p50_ms"]
    return out


if __name__ == "__main__":
    main()
