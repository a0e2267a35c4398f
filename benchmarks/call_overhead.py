"""What does hxc add to each call? The loaded model called the way a user calls it
(`m = hxc.runtime.load(bundle); m(*inputs)`, numpy and torch inputs) against the same
artifact's device-only call (`m.prepare(inputs)`: inputs already on the device,
results left there) and ONNX Runtime's own `session.run` on the same model, for the
IREE (`cpu:host`) and ONNX Runtime (`cpu:onnxruntime`) artifacts of the suite's MLP
(4x512, batch 8) and the example CNN (1x3x32x32).

Every contender of a model runs in one process, interleaved (A B C A B C ...): each
round times a block of calls per contender, one by one, and keeps the block's median;
the figures are medians of the round medians, so a burst of load from another process
reaches every contender alike. Overhead is user call minus device-only call.

    python benchmarks/call_overhead.py [--rounds 30] [--calls 200]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import median, save  # noqa: E402
from suite import ort_contender  # noqa: E402

warnings.filterwarnings("ignore")

MODELS = {"mlp": "hxc.examples.zoo:mlp_large", "cnn": "hxc.examples:convnet"}
ARTIFACTS = {"iree": "cpu:host", "onnxruntime": "cpu:onnxruntime"}


def rounds_of(calls: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, float]:
    """Median (over rounds) of each contender's per-round median call time, in µs."""
    per: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples = []
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                fn()
                samples.append(time.perf_counter_ns() - t0)
            per[name].append(median(samples) / 1000)
    return {name: median(xs) for name, xs in per.items()}


def model_row(name: str, ref: str, rounds: int, per_round: int) -> dict:
    import torch

    import hxc.runtime
    from hxc.build import build_bundle
    from hxc.dtypes import to_numpy

    mod, _, fn = ref.partition(":")
    model, inputs = getattr(importlib.import_module(mod), fn)()
    arrays = [to_numpy(t) for t in inputs]
    work = Path(tempfile.mkdtemp(prefix=f"hxc-call-overhead-{name}-"))
    bundle = work / "model.hxc"
    result = build_bundle(ref, bundle, "cpu:host", backends="iree,onnxruntime")
    assert result.written, [(r.id, r.error) for r in result.failed]

    calls: dict[str, Callable[[], object]] = {}
    loaded = {}
    for engine, art in ARTIFACTS.items():
        m = loaded[engine] = hxc.runtime.load(bundle, device=art, strict=True)
        calls[f"{engine} user numpy"] = lambda m=m: m(*arrays)
        calls[f"{engine} user torch"] = lambda m=m: m(*inputs)
        calls[f"{engine} device only"] = m.prepare(arrays)
    peer = ort_contender(model, inputs, work)
    assert peer is not None, "torch.onnx.export failed"
    peer.open()
    calls["onnxruntime session.run"] = peer.prepare(arrays)
    # Same answers before timing anything: the contenders compute the same thing.
    with torch.inference_mode():
        want = model(*inputs).numpy()
    for m in loaded.values():
        got = m(*arrays)
        assert abs(got - want).max() <= 1e-3 + 1e-3 * abs(want).max(), f"{m.artifact.id} disagrees with PyTorch"
    for fn_ in calls.values():  # warm up: first calls are twice as slow
        for _ in range(20):
            fn_()

    us = rounds_of(calls, rounds, per_round)
    ort = us["onnxruntime session.run"]
    row: dict = {"model": ref, "median_us": {k: round(v, 2) for k, v in us.items()}}
    for engine in ARTIFACTS:
        dev = us[f"{engine} device only"]
        for kind in ("numpy", "torch"):
            user = us[f"{engine} user {kind}"]
            row[f"{engine} {kind}"] = {"overhead_us": round(user - dev, 2), "user_over_device": round(user / dev, 3),
                                       "user_over_ort_session_run": round(user / ort, 3)}  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200, help="calls per contender per round")
    args = ap.parse_args()
    rows = {}
    for name, ref in MODELS.items():
        t = time.perf_counter()
        rows[name] = row = model_row(name, ref, args.rounds, args.calls)
        print(f"{name} ({time.perf_counter() - t:.0f}s):")
        for k, v in row["median_us"].items():
            print(f"  {k:28s} {v:9.1f} µs")
        for engine in ARTIFACTS:
            for kind in ("numpy", "torch"):
                r = row[f"{engine} {kind}"]
                print(f"  {engine} {kind}: overhead {r['overhead_us']:.1f} µs, user/device {r['user_over_device']:.3f}, "
                      f"user/ORT session.run {r['user_over_ort_session_run']:.3f}")  # fmt: skip
    path = save("call_overhead", {"rounds": args.rounds, "calls_per_round": args.calls, "models": rows})
    print(f"({path})")


if __name__ == "__main__":
    main()
