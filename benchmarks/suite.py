"""hxc's CPU artifact against PyTorch eager, torch.compile and ONNX Runtime, on real
models, in one interleaved run per model (same inputs, same thread count).

Models: an MLP, ResNet-18 at batch 1 and 8, a BERT-base encoder and a GPT-2 small
decoder built from `transformers` configs with random weights. For each model every
contender is timed with hxc's own bench harness (A B C D A B C D ..., medians), and
the achieved GFLOP/s is compared with this CPU's measured peak (a large f32 matmul
in PyTorch, which reaches ~90% of the hardware's peak through oneDNN).

    python benchmarks/suite.py                      # all models
    python benchmarks/suite.py --models mlp,resnet18 --min-time 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

from hxc.bench.measure import Budget, Contender, measure  # noqa: E402

warnings.filterwarnings("ignore")


def models() -> dict[str, tuple[str, dict]]:
    """name -> (hxc factory reference, keyword arguments)."""
    return {
        "mlp": ("hxc.examples.zoo:mlp_large", {}),
        "resnet18": ("hxc.examples.zoo:resnet18", {}),
        "resnet18-b8": ("hxc.examples.zoo:resnet18_b8", {}),
        "bert-base": ("hxc.examples.zoo:bert_base", {}),
        "gpt2-small": ("hxc.examples.zoo:gpt2_small", {}),
    }


def peak_gflops(seconds: float = 3.0) -> float:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def flops(model: torch.nn.Module, args: tuple) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return float(counter.get_total_flops())


def torch_contender(name: str, fn, args) -> Contender:
    def prepare(_inputs):
        def call():
            with torch.inference_mode():
                fn(*args)

        return call

    return Contender(name, "cpu", lambda: None, prepare, device_time_only=True, threads=torch.get_num_threads())


def ort_contender(model: torch.nn.Module, args: tuple, work: Path) -> Contender | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = work / "model.onnx"
    try:
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17)
    except Exception as e:  # some models do not export; say so and go on
        print(f"  onnxruntime: torch.onnx.export failed ({str(e).splitlines()[0][:120]})", file=sys.stderr)
        return None
    holder = {}

    def open_():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        holder["s"] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def prepare(_inputs):
        s = holder["s"]
        feed = {i.name: a.numpy() for i, a in zip(s.get_inputs(), args)}
        return lambda: s.run(None, feed)

    return Contender("onnxruntime", "cpu", open_, prepare, device_time_only=True, threads=os.cpu_count())


def hxc_contenders(ref: str, work: Path, tune: bool) -> list[Contender]:
    """The CPU artifact with hxc's defaults, and (with --tune) the one `hxc compile --tune` keeps."""
    import hxc.runtime
    from hxc.compiler.build import build_bundle

    out = []
    for label, tuner in (("hxc", None), ("hxc-tuned", "tune")):
        if tuner and not tune:
            continue
        bundle = work / f"{label}.hxc"
        t = time.perf_counter()
        kwargs = {}
        if tuner:
            from hxc.bench.tune import tune as tune_fn

            kwargs["tune"] = tune_fn
        result = build_bundle(ref, bundle, "cpu:host", **kwargs)
        assert result.written, [r.error for r in result.failed]
        print(f"  {label}: compiled in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        holder = {}

        def open_(bundle=bundle, holder=holder):
            holder["m"] = hxc.runtime.load(bundle, device="cpu", strict=True)

        out.append(Contender(label, "cpu", open_, lambda inputs, holder=holder: holder["m"].prepare(inputs),
                             device_time_only=True, threads=os.cpu_count()))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(models()))
    ap.add_argument("--min-time", type=float, default=5.0, help="seconds of timed calls per contender")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to warm up)")
    ap.add_argument("--tune", action="store_true", help="also time the artifact `hxc compile --tune` keeps")
    args = ap.parse_args()
    import importlib

    peak = peak_gflops()
    print(f"measured peak: {peak:.0f} GFLOP/s (f32 matmul, {torch.get_num_threads()} threads)", file=sys.stderr)
    budget = Budget(warmup=5, min_iterations=20, min_seconds=args.min_time, max_seconds=max(60.0, args.min_time))
    results = {}
    for name in args.models.split(","):
        ref, _ = models()[name]
        mod, _, fn = ref.partition(":")
        model, inputs = getattr(importlib.import_module(mod), fn)()
        print(f"{name}: building contenders", file=sys.stderr)
        work = Path(tempfile.mkdtemp(prefix=f"hxc-suite-{name}-"))
        contenders = hxc_contenders(ref, work, args.tune)
        contenders.append(torch_contender("torch-eager", model, inputs))
        if not args.no_compile:
            compiled = torch.compile(model)
            t = time.perf_counter()
            with torch.inference_mode():
                compiled(*inputs)
            print(f"  torch.compile: first call {time.perf_counter() - t:.1f}s", file=sys.stderr)
            contenders.append(torch_contender("torch-compile", compiled, inputs))
        if (ort := ort_contender(model, inputs, work)) is not None:
            contenders.append(ort)
        arrays = [a.numpy() for a in inputs]
        timings = measure(contenders, arrays, budget)
        n_flops = flops(model, inputs)
        eager = next(t for t in timings if t.contender.id == "torch-eager").stats().p50_ms
        rows = {}
        for t in timings:
            s = t.stats()
            rows[t.contender.id] = {
                "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "spread": s.spread, "iterations": s.iterations,
                "ratio_to_eager": s.p50_ms / eager, "gflops": n_flops / (s.p50_ms / 1000) / 1e9,
                "fraction_of_peak": n_flops / (s.p50_ms / 1000) / 1e9 / peak,
            }  # fmt: skip
        results[name] = {"flops": n_flops, "contenders": rows}
        best = min(rows, key=lambda k: rows[k]["p50_ms"])
        print(f"{name}: " + ", ".join(f"{k} {v['p50_ms']:.3g} ms ({v['ratio_to_eager']:.2f}x eager)" for k, v in rows.items())
              + f"; fastest: {best}")  # fmt: skip
    path = save("suite", {"peak_gflops": peak, "threads": torch.get_num_threads(), "min_time_s": args.min_time, "models": results})
    print_markdown(results, peak)
    print(f"({path})")


def print_markdown(results: dict, peak: float) -> None:
    names = ["hxc", "hxc-tuned", "torch-eager", "torch-compile", "onnxruntime"]
    present = [n for n in names if any(n in r["contenders"] for r in results.values())]
    print("\n| model | " + " | ".join(f"{n} p50 ms (x eager, % peak)" for n in present) + " | fastest |")
    print("|---|" + "---|" * (len(present) + 1))
    for model, r in results.items():
        cells = []
        for n in present:
            c = r["contenders"].get(n)
            cells.append("-" if c is None else f"{c['p50_ms']:.3g} ({c['ratio_to_eager']:.2f}x, {c['fraction_of_peak']:.0%})")
        best = min(r["contenders"], key=lambda k: r["contenders"][k]["p50_ms"])
        print(f"| {model} | " + " | ".join(cells) + f" | {best} |")
    print(f"\npeak = {peak:.0f} GFLOP/s measured with a 2048^3 f32 matmul in PyTorch")


if __name__ == "__main__":
    main()
