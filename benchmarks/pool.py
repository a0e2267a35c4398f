"""The device pool on this machine's real devices, and its scheduler in simulation.

    python benchmarks/pool.py [--rounds 5] [--seconds 2]

For the example CNN and a 3-layer MLP, both with a dynamic batch, compiled for the CPU
(llvm-cpu on local-task) and Mesa's lavapipe (vulkan), in interleaved rounds
(A B C ... A B C ..., medians):

  pinned (pin="split": the CPU worker on one core, lavapipe on the other)
    - each device alone, through its worker, as pinned in the pool
    - both devices at once but independently (each its own one-device pool on its own
      core, called from its own thread): what the two cores give when both compute, the
      ceiling for any pool here (the devices share memory bandwidth and caches even when
      pinned apart)
    - the pool of both with judgement off (balancing: the scheduler alone decides who
      gets what): goal >= 90% of the sum, each device busy >= 90%; and the same with
      backup copies off (the fast device idles while the slow one ends the call)
    - the pool of both with judgement on (on a host shared with other jobs it may still
      leave lavapipe out when the others' load makes it look costly)
  unpinned (every worker sees both cores, the normal case)
    - the pool of both, judgement on (judgement): goal >= 95% of the best single
      configuration, the CPU artifact on all cores
    - the pool of both with judgement off (what leaving nothing out would give)
    - the CPU artifact alone: in this process (the whole batch in one call, and in calls
      of the pool's chunk size, after its size search), and through its worker; the
      best of the three is the "best single configuration"

A naive even split is computed from the devices' measured rates (2 x the slower one):
running it for real would take minutes on lavapipe. Then the scheduler simulation:
devices with speeds 1:1, 1:4 and 1:30, and one that dies mid-run, against the ideal
summed throughput (goal >= 95%, finish skew within one chunk), and short calls (2 s,
after a first call that measured the speeds) with a slow device 30x and 100x slower
that spends 100 ms on any call, with and without backup copies.

Writes benchmarks/results/pool.json (or --out PATH).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

from hxc.bench.measure import Budget  # noqa: E402
from hxc.bench.pool import sized_call  # noqa: E402
from hxc.bench.run import run_bench  # noqa: E402
from hxc.build import build_bundle  # noqa: E402
from hxc.compiler.imported import ImportOptions  # noqa: E402
from hxc.pool import Pool  # noqa: E402
from hxc.pool.simulate import SimDevice, simulate  # noqa: E402
import hxc.runtime  # noqa: E402

MODELS = {"convnet": (3, 32, 32), "mlp": (64,)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="about how long each measured call runs")
    ap.add_argument("--models", default="convnet,mlp")
    ap.add_argument("--out", type=Path, help="write the results here instead of benchmarks/results/pool.json")
    args = ap.parse_args()
    os.environ.setdefault("HXC_CACHE_DIR", str(Path(tempfile.gettempdir()) / "hxc-bench-cache"))
    results = {"rounds": args.rounds, "seconds_per_call": args.seconds, "load_before": os.getloadavg(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results["models"][name] = bench_model(name, Path(tmp), args.rounds, args.seconds)
    results["load_after"] = os.getloadavg()
    results["simulation"] = simulation()
    if args.out:
        path = args.out
        path.write_text(json.dumps(results, indent=2) + "\n")
    else:
        path = save("pool", results)
    print(f"wrote {path}", file=sys.stderr)


def bench_model(name: str, tmp: Path, rounds: int, seconds: float) -> dict:
    bundle = tmp / f"{name}.hxc"
    built = build_bundle(f"hxc.examples:{name}", bundle, "cpu:host,vulkan:spirv", options=ImportOptions(dynamic_batch=True))
    assert built.written, [r.error for r in built.failed]
    # Profiles first, as a user would have them: they size the unpinned pool's first chunks.
    run_bench(bundle, baselines=[], budget=Budget(min_iterations=20, min_seconds=0.5, max_seconds=20))
    row = [np.random.default_rng(0).standard_normal((1, *MODELS[name]), dtype=np.float32)]
    cpu = hxc.runtime.load(bundle, device="cpu:host", strict=True)

    pinned = Pool(bundle, pin="split")
    pinned_all = Pool(bundle, pin="split", judge=False)
    pinned_nobackup = Pool(bundle, pin="split", judge=False, backups=False)
    unpinned = Pool(bundle)
    naive = Pool(bundle, judge=False)
    times: dict[str, list[float]] = {}
    busy: dict[str, dict[str, list[float]]] = {"pinned pool": {}, "pinned pool, judgement off": {}, "unpinned pool": {},
                                               "unpinned pool, judgement off": {},
                                               "pinned pool, judgement off, no backups": {}}  # fmt: skip

    def record(label: str, rate: float) -> None:
        times.setdefault(label, []).append(rate)
        print(f"  {name} {label}: {rate:.4g} items/s", file=sys.stderr, flush=True)
        settle()

    def settle() -> None:
        # A call returns once every row is stored, but a losing backup copy may still be
        # computing (lavapipe: up to ~1 s); the next measurement starts when it is done,
        # or it would pay for it (the unpinned pool, measured after the pinned one, did).
        deadline = time.monotonic() + 30
        for p in every:
            p.settle(max(0.0, deadline - time.monotonic()))

    def pool_call(label: str, pool: Pool) -> None:
        before = pool.stats()
        rate = sized_call(pool, row, row, seconds)
        after = pool.stats()
        record(label, rate)
        wall = after.wall_s - before.wall_s
        for a, b in zip(after.devices, before.devices):
            busy[label].setdefault(a.name, []).append((a.busy_s - b.busy_s) / wall)

    def in_process(chunked: bool) -> float:
        # The same rows as a pool call of `seconds`, in one call or in calls of the
        # pool's own chunk size for the CPU (smaller batches are kinder to the caches).
        speed = next(m for m in unpinned.members if m.name == "cpu:host").speed
        n = max(1, int((speed.rate or 1000) * seconds))
        step = max(1, int(speed.units_for(0.05 * speed.scale))) if chunked else n
        x = np.ascontiguousarray(np.broadcast_to(row[0], (n, *row[0].shape[1:])))
        t0 = time.perf_counter()
        for start in range(0, n, step):
            cpu.run_flat([x[start:start + step]])
        return n / (time.perf_counter() - t0)

    # The same devices pinned as in `pinned`, each in a pool of its own, to run at once.
    separate = [Pool(bundle, [m.name], pin={m.name: m.worker.cpus}) for m in pinned.members]
    every = (pinned, pinned_all, pinned_nobackup, unpinned, naive, *separate)

    def concurrently() -> None:
        with concurrent.futures.ThreadPoolExecutor(len(separate)) as ex:
            rates = list(ex.map(lambda p: sized_call(p, row, row, seconds), separate))
        for p, rate in zip(separate, rates):
            record(f"{p.members[0].name} at once, pinned", rate)
        record("both at once, pinned, no pool", sum(rates))

    try:
        for pool in every:  # warm up, measure speeds, let the judgement happen
            sized_call(pool, row, row, seconds)
            settle()
        for r in range(rounds):
            print(f"{name}: round {r + 1}/{rounds}", file=sys.stderr)
            for m in pinned.members:
                with pinned.using(m.name):
                    record(f"{m.name} alone, pinned", sized_call(pinned, row, row, seconds))
            concurrently()
            pool_call("pinned pool, judgement off", pinned_all)
            pool_call("pinned pool, judgement off, no backups", pinned_nobackup)
            pool_call("pinned pool", pinned)
            pool_call("unpinned pool", unpinned)
            pool_call("unpinned pool, judgement off", naive)
            record("cpu:host alone, all cores, in process, one call", in_process(chunked=False))
            record("cpu:host alone, all cores, in process, chunked", in_process(chunked=True))
            with unpinned.using("cpu:host"):
                record("cpu:host alone, all cores, worker", sized_call(unpinned, row, row, seconds))
        explain = {"pinned": pinned.explain(), "pinned, judgement off": pinned_all.explain(), "unpinned": unpinned.explain()}
        left_out = {m.name: m.left_out for m in unpinned.members}
        left_out_pinned = {m.name: m.left_out for m in pinned.members}
        copies = {d.name: {"backups": d.backups, "wasted_rows": d.wasted, "items": d.items} for d in pinned_all.stats().devices}
        chunk_scale = {label: {m.name: {"scale": m.speed.scale, "tuned": m.speed.tuned, "fixed_ms": m.speed.fixed_s * 1000}
                               for m in pool.members}
                       for label, pool in (("pinned", pinned_all), ("unpinned", unpinned))}  # fmt: skip
    finally:
        for pool in every:
            pool.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
    alone = {m: med[f"{m} alone, pinned"] for m in ("cpu:host", "vulkan:spirv")}
    singles = [k for k in med if k.startswith("cpu:host alone, all cores")]
    best_label = max(singles, key=lambda k: med[k])
    best_single = med[best_label]
    # Round by round against the same round's best single: drift of the machine's speed
    # between rounds then cancels out.
    paired = statistics.median(p / b for p, b in zip(times["unpinned pool"], times[best_label]))
    paired_balancing = statistics.median(p / c for p, c in zip(times["pinned pool, judgement off"],
                                                               times["both at once, pinned, no pool"]))  # fmt: skip
    out = {
        "items_per_second": med,
        "spread": spread,
        "samples": times,
        "pinned_sum": sum(alone.values()),
        "naive_even_split_computed": 2 * min(alone.values()),
        "balancing": {
            "pool_vs_sum": med["pinned pool, judgement off"] / sum(alone.values()),
            "busy": {d: statistics.median(v) for d, v in busy["pinned pool, judgement off"].items()},
            "goal": "pool >= 0.90 x sum, each device busy >= 0.90",
            "backups": copies,  # over every call of the pinned pool (warm-up included)
            "no_backups_vs_sum": med["pinned pool, judgement off, no backups"] / sum(alone.values()),
            "no_backups_busy": {d: statistics.median(v) for d, v in busy["pinned pool, judgement off, no backups"].items()},
            "both_at_once_vs_sum": med["both at once, pinned, no pool"] / sum(alone.values()),
            "pool_vs_both_at_once": paired_balancing,
            "judgement_on_vs_sum": med["pinned pool"] / sum(alone.values()),
            "judgement_on_busy": {d: statistics.median(v) for d, v in busy["pinned pool"].items()},
            "judgement_on_left_out": left_out_pinned,
        },
        "judgement": {
            "pool_vs_best_single": med["unpinned pool"] / best_single,
            "best_single": best_single,
            "best_single_is": best_label,
            "pool_vs_best_single_paired": paired,
            "judgement_off_vs_best_single": med["unpinned pool, judgement off"] / best_single,
            "busy": {d: statistics.median(v) for d, v in busy["unpinned pool"].items()},
            "left_out": left_out,
            "goal": "pool >= 0.95 x the CPU artifact alone on all cores",
        },
        "chunk_time_scale": chunk_scale,  # the fraction of the 50 ms chunk time each device's size search settled on
        "explain": explain,
    }
    print(f"{name}: balancing {out['balancing']['pool_vs_sum']:.3f} of the pinned sum "
          f"({out['balancing']['pool_vs_both_at_once']:.3f} of both at once, which is "
          f"{out['balancing']['both_at_once_vs_sum']:.3f} of the sum), busy {out['balancing']['busy']}; "
          f"without backups {out['balancing']['no_backups_vs_sum']:.3f}, busy {out['balancing']['no_backups_busy']}; "
          f"judgement {out['judgement']['pool_vs_best_single']:.3f} of the best single ({best_label}; "
          f"paired by round {paired:.3f})", file=sys.stderr)  # fmt: skip
    return out


def simulation() -> dict:
    cases = {
        "1:1": [SimDevice("a", 1000), SimDevice("b", 1000)],
        "1:4": [SimDevice("a", 4000), SimDevice("b", 1000, prior_error=2.0)],
        "1:30": [SimDevice("a", 3000, prior_error=0.5), SimDevice("b", 100)],
        "one fails mid-run": [SimDevice("a", 3000), SimDevice("b", 1000),
                              SimDevice("c", 1000, fails_at=1.0, detect_s=0.2)],  # fmt: skip
    }
    out = {}
    for case, devices in cases.items():
        r = simulate(devices, units=20_000, target_s=0.05)
        out[case] = {"efficiency": r.efficiency, "skew_ms": r.skew_s * 1000, "chunk_ms": r.chunk_s * 1000,
                     "units_done": r.units_done, "chunks": r.chunks, "lost_and_requeued": r.lost,
                     "every_unit_once": r.done == [1] * r.units}  # fmt: skip
        print(f"simulation {case}: {r.efficiency:.3f} of ideal, skew {r.skew_s * 1000:.1f} ms (chunk {r.chunk_s * 1000:.0f} ms)",
              file=sys.stderr)  # fmt: skip
    # Short calls: 2 s of work after a first call that measured the speeds (and the slow
    # device's 100 ms per call), medians over seeds, with and without backup copies.
    for ratio in (30, 100):
        devices = [SimDevice("fast", 3000, prior_error=0), SimDevice("slow", 3000 / ratio, per_chunk_s=0.1, prior_error=0)]
        units = int(2 * sum(d.speed for d in devices))
        for backups in (False, True):
            runs = [simulate(devices, units, warmup=units, backups=backups, seed=s) for s in range(7)]
            case = f"1:{ratio}, 2 s calls, 100 ms per slow call, backups {'on' if backups else 'off'}"
            out[case] = {"efficiency": statistics.median(r.efficiency for r in runs),
                         "efficiency_range": [min(r.efficiency for r in runs), max(r.efficiency for r in runs)],
                         "backups": sum(r.backups for r in runs), "wasted_units": sum(r.wasted for r in runs),
                         "every_unit_once": all(r.done == [1] * r.units for r in runs)}  # fmt: skip
            print(f"simulation {case}: median {out[case]['efficiency']:.3f} of ideal "
                  f"({min(r.efficiency for r in runs):.3f}-{max(r.efficiency for r in runs):.3f})", file=sys.stderr)  # fmt: skip
    return out


if __name__ == "__main__":
    main()
