"""How should IREE's CPU code compute ResNet-18's convolutions? Each way is measured
against PyTorch eager, interleaved in one process (A B A B ..., medians), at batch 1
and 8, and checked against PyTorch's output first (issue 13, item 3).

Ways tried (all on top of hxc's `cpu:host` flags unless said):
- default: IREE's fused im2col (`--iree-global-opt-use-im2col-for-convs`) + data tiling;
- channels-last: IREE converts the convolutions to NHWC first (a `--tune` option);
- img2col-op: IREE's preprocessing materialises im2col as its own linalg op
  (`iree-global-opt-convert-conv2d-to-img2col`) after channels-last, instead of the fused one;
- ukernels-mmt4d: the data-tiled matmuls through IREE's mmt4d ukernel;
- slices: a PyTorch-level rewrite before export (`benchmarks/_conv_matmul.py`): each
  convolution becomes NHWC "im2col by slices" (pad, kh*kw strided slices, concat along
  channels) and one plain matmul, which IREE data-tiles like any matmul;
- sum: the same slices, one matmul per kernel position, summed (no concatenation);
- fuse-pad: `--iree-dispatch-creation-enable-fuse-padding-into-linalg-consumer-ops`
  (`slices+fuse-pad`: a rewritten model compiled with that configuration's flags).

Results (README "Measurements"): `benchmarks/results/conv_paths.json`; `--out NAME`
writes another file, `--merge` keeps the batch sizes it already holds.

    python benchmarks/conv_paths.py [--batches 1,8] [--configs default,slices,...] [--min-time 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import RESULTS, save  # noqa: E402
from suite import torch_contender  # noqa: E402

from hxc import frontends  # noqa: E402
from hxc.bench.measure import Budget, Contender, measure, paired_ratio  # noqa: E402
from hxc.build import import_model  # noqa: E402
from hxc.compiler.driver import CompileJob, compile_all  # noqa: E402
from hxc.compiler.imported import PARAMETER_SCOPE, ImportOptions  # noqa: E402
from hxc.engines.iree import IreeSession as Session  # noqa: E402
from hxc.runtime.probe import probe_host  # noqa: E402
from hxc.targets import family, resolve  # noqa: E402
from hxc.targets.cpu import CHANNELS_LAST  # noqa: E402

warnings.filterwarnings("ignore")

IM2COL = "--iree-global-opt-use-im2col-for-convs"
PIPELINE = "--iree-preprocessing-pass-pipeline=builtin.module(util.func({}))"


def resnet18_slices(batch: int = 1):
    """hxc's ResNet-18 with its convolutions rewritten before export."""
    from _conv_matmul import convs_as_matmuls
    from hxc.examples.zoo import resnet18

    model, args = resnet18(batch)
    return convs_as_matmuls(model), args


def resnet18_slices_b8():
    return resnet18_slices(8)


def resnet18_sum(batch: int = 1):
    """As `resnet18_slices`, but one matmul per kernel position, summed (no concat)."""
    from _conv_matmul import convs_as_matmuls
    from hxc.examples.zoo import resnet18

    model, args = resnet18(batch)
    return convs_as_matmuls(model, concat=False), args


def resnet18_sum_b8():
    return resnet18_sum(8)


def flag_configs(flags: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    without = tuple(f for f in flags if f != IM2COL)
    return {
        "default": flags,
        "channels-last": (*flags, CHANNELS_LAST),
        "img2col-op": (
            *without,
            PIPELINE.format(
                "iree-preprocessing-convert-conv-to-channels-last,iree-global-opt-convert-conv2d-to-img2col"
            ),
        ),  # fmt: skip
        "ukernels-mmt4d": (*flags, "--iree-llvmcpu-enable-ukernels=mmt4d"),
        "fuse-pad": (*flags, "--iree-dispatch-creation-enable-fuse-padding-into-linalg-consumer-ops"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--configs", default="default,channels-last,img2col-op,ukernels-mmt4d,slices,slices+channels-last")
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--min-rounds", type=int, default=7, help="blocks per contender at the least")
    ap.add_argument("--out", default="conv_paths", help="name of the JSON file in benchmarks/results/")
    ap.add_argument("--merge", action="store_true", help="keep the other batch sizes already in that file")
    args = ap.parse_args()
    wanted = args.configs.split(",")
    [host] = resolve("cpu:host")
    plan = family("cpu").plan(host)
    device = next(d for d in probe_host().devices if d.driver == "local-task")
    previous = RESULTS / f"{args.out}.json"
    results = json.loads(previous.read_text())["models"] if args.merge and previous.exists() else {}
    for batch in (int(b) for b in args.batches.split(",")):
        suffix = "_b8" if batch == 8 else ""
        if batch not in (1, 8):
            raise SystemExit("--batches: 1 and 8 only (the suite's ResNet-18 sizes)")
        refs = {
            "original": f"hxc.examples.zoo:resnet18{suffix}",
            "slices": f"conv_paths:resnet18_slices{suffix}",
            "sum": f"conv_paths:resnet18_sum{suffix}",
        }
        work = Path(tempfile.mkdtemp(prefix=f"hxc-convpaths-b{batch}-"))
        for k in refs:
            (work / k).mkdir()
        imported = {k: import_model(frontends.recognise(r), r, ImportOptions(), work / k, lambda s: None)
                    for k, r in refs.items() if k == "original" or any(c.startswith(k) for c in wanted)}  # fmt: skip
        base = imported["original"]
        expected = base.golden["output_0"]  # PyTorch's output of the unmodified model
        inputs = [base.golden["input_0"]]
        jobs, names = [], []
        for name in wanted:
            model, _, flag_name = name.partition("+") if name.startswith(("slices", "sum")) else ("original", "", name)
            flags = flag_configs(plan.flags)[flag_name or "default"]
            imp = imported[model]
            sha = hashlib.sha256(imp.mlir.read_bytes()).hexdigest()
            jobs.append(dataclasses.replace(CompileJob(imp.mlir, sha, host), config=name, flags=flags))
            names.append((name, imp))
        print(f"batch {batch}: compiling {len(jobs)} configurations", file=sys.stderr, flush=True)
        compiled = compile_all(jobs, workdir=work, jobs=1)
        contenders, errors, failed = [], {}, {}
        for (name, imp), r in zip(names, compiled):
            if r.status != "ok":
                failed[name] = r.error
                print(f"  {name}: failed to compile: {r.error}", file=sys.stderr)
                continue
            weights = (imp.weights, PARAMETER_SCOPE) if imp.weights else None
            [out] = Session.open(r.vmfb, device, weights).invoke(inputs, imp.signature)
            errors[name] = float(np.abs(np.asarray(out) - expected).max())
            ok = np.allclose(out, expected, rtol=1e-3, atol=1e-4)
            print(
                f"  {name}: max abs error vs PyTorch {errors[name]:.3g}{'' if ok else ' WRONG: not timed'}",
                file=sys.stderr,
            )
            if not ok:
                continue
            holder: dict = {}

            def open_(vmfb=r.vmfb, weights=weights, holder=holder) -> None:
                holder["s"] = Session.open(vmfb, device, weights)

            contenders.append(Contender(name, "cpu", open_,
                                        lambda a, holder=holder, sig=imp.signature: holder["s"].prepare(a, sig), True))  # fmt: skip
        from hxc.examples.zoo import resnet18

        model, (x,) = resnet18(batch)
        contenders.append(torch_contender("torch eager", model, (x,)))
        budget = Budget(warmup=3, min_iterations=max(args.min_rounds, 7), min_seconds=args.min_time, max_seconds=120,
                        block_seconds=0.0)  # fmt: skip
        timings = measure(contenders, inputs, budget)
        eager = next(t for t in timings if t.contender.id == "torch eager")
        rows = {}
        for t in timings:
            s = t.stats()
            rows[t.contender.id] = {"p50_ms": s.p50_ms, "calls": s.iterations, "other_load": t.other_load,
                                    "ratio_to_eager": s.p50_ms / eager.stats().p50_ms,
                                    "paired_ratio_to_eager": paired_ratio(t, eager),
                                    "max_abs_error": errors.get(t.contender.id)}  # fmt: skip
            print(f"batch {batch} {t.contender.id}: {s.p50_ms:.1f} ms ({rows[t.contender.id]['ratio_to_eager']:.2f}x eager, "
                  f"paired {rows[t.contender.id]['paired_ratio_to_eager']:.2f}x, {s.iterations} calls, "
                  f"other load {t.other_load})", flush=True)  # fmt: skip
        results[f"resnet18-b{batch}"] = {"timings": rows, "failed": failed, "torch_threads": torch.get_num_threads()}
    print(f"({save(args.out, {'models': results})})")


if __name__ == "__main__":
    main()
