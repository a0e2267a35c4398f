"""Routing language-model requests by TTFT/TPOT targets and price per token, and what
it saves (issue 28).

    PYTHONPATH=. python benchmarks/route_cost.py sim --bundle B.hxc       # the simulated fleet, from B's bench profiles
    PYTHONPATH=. python benchmarks/route_cost.py sim --profiles benchmarks/results/route_cost_sim.json   # again, no bench
    PYTHONPATH=. python benchmarks/route_cost.py host --seconds 120   # this host's CPU and lavapipe, real servers (_route_host.py)

`sim`: the simulated fleet (`hxc.pool.lm_simulate`, which routes with the router's own
estimate and policies), on issue 28's fixed specification:
  - 2 GPU-class devices at $2.99/h, each with 60x this CPU's prefill rate and 25x its
    decode rate at batch 1, decode batching as measured here (the CPU's step(b)
    curve, every point / 25), 80 GB of KV cache;
  - 20 CPU nodes at $0.09/h with this host's measured rates and 16 GB of KV each;
  - a trace of Poisson arrivals for 1 hour: 70% interactive (prompt 128-512 tokens,
    output 64-128, TTFT <= 300 ms, TPOT <= 50 ms), 30% batch (prompt 1,024-2,048,
    output 256, end to end <= 60 s), at the arrival rate that has all-on-fastest run
    the GPUs at 70% (bisection on the simulator);
  - cost = sum of busy device-seconds x price.
"This host's rates" are the `hxc bench` profiles of a real bundle (a ~100M-parameter
Llama, 8 slots, prefill chunks 8 and 128): time to the first token of 32-, 128- and
512-token prompts and a decode step at batch 1 and 8, read as `LMSpeed.from_profiles`
reads them (between points linearly, beyond them along the last segment: a 2,048-token
prompt and batches past 8 are extrapolated). They are written into the results, so
`--profiles` reruns the simulation without benching. Reported for `cost` and `latency`
routing, all-on-fastest and round robin: attainment (overall, per class), cost per 1M
output tokens, utilisation; goal: `cost` >= 35% below all-on-fastest at >= 99% within
targets. The assumptions are written beside the numbers.

Writes benchmarks/results/route_cost_sim.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

from hxc.pool.lm_estimate import LMSpeed  # noqa: E402
from hxc.pool.lm_simulate import INTERACTIVE_AND_BATCH, LMDevice, LMSimResult, simulate, trace  # noqa: E402

# Issue 28's fleet, fixed.
GPUS, GPU_PRICE, GPU_PREFILL_X, GPU_DECODE_X, GPU_KV_BYTES = 2, 2.99, 60.0, 25.0, 80e9
CPUS, CPU_PRICE, CPU_KV_BYTES = 20, 0.09, 16e9
HOURS = 1.0
TARGET_UTILISATION = 0.70  # of the GPUs, under all-on-fastest
GPU_MAX_SLOTS = 64  # a GPU's slots: as many longest sequences (2,048 + 256 tokens) as its KV holds, at most this
LONGEST = 2048 + 256
ROUTINGS = ("cost", "latency", "fastest", "round_robin")
GOAL_SAVING, GOAL_ATTAINMENT = 0.35, 0.99


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    sim = sub.add_parser("sim", help="the simulated fleet")
    src = sim.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="a language-model bundle `hxc bench` has profiled on this host")
    src.add_argument("--profiles", type=Path, help="a results JSON of this script (its `measured`), instead of a bundle")
    sim.add_argument("--artifact", default="cpu:host", help="the bundle's artifact whose profiles are this host's CPU")
    sim.add_argument("--noise", type=float, default=0.1, help="each simulated step takes (1 +- noise) x its true time")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--hours", type=float, default=HOURS, help="trace length (the specification: 1)")
    sim.add_argument("--chunk-rule", choices=("smallest", "largest"), default="smallest",
                     help="how a prompt is read while others decode: smallest = Batch.step's rule (the specification's "
                          "run); largest = a what-if, every device reading its largest chunk (written to "
                          "route_cost_sim_largest_chunks.json)")
    sim.add_argument("--out", type=Path, help="write here instead of benchmarks/results/route_cost_sim.json")
    host = sub.add_parser("host", help="this host's real devices through real servers, against the simulator")
    host.add_argument("--seconds", type=float, default=120.0, help="trace length (arrivals)")
    host.add_argument("--work", type=Path, default=None, help="where the bundle and prices file go (default: a temp dir)")
    host.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.part == "sim":
        run_sim(args)
    else:
        from _route_host import run_host

        data = run_host(args.seconds, args.work, args.seed)
        print(f"wrote {save('route_cost_host', {'part': 'host', **data})}", file=sys.stderr)


def measured_from_bundle(bundle: Path, artifact: str) -> dict:
    """This host's CPU speed on `bundle`'s `artifact`, from its recorded profiles, and the
    cache geometry the fleet is sized by."""
    from hxc.manifests.bundle import read_bundle

    manifest = read_bundle(bundle, None).manifest
    lm = manifest.language_model
    if lm is None:
        raise SystemExit(f"{bundle}: not a language-model bundle")
    mine = [p for p in manifest.profiles if p.candidate == artifact and p.generation is not None]
    speed = LMSpeed.from_profiles(mine)
    if speed is None:
        raise SystemExit(f"{bundle}: no prefill and decode profiles of {artifact}; run `hxc bench {bundle}` first")
    return {"bundle": str(bundle), "artifact": artifact, "model": manifest.model.name,
            "devices": sorted({p.device for p in mine}), "recorded": max(p.recorded for p in mine),
            "prefill_ms": [list(x) for x in speed.prefill], "step_ms": [list(x) for x in speed.step],
            "kv_bytes_per_token": lm.kv_bytes_per_token, "slots": lm.slots, "chunks": list(lm.chunks),
            "max_context": lm.max_context}  # fmt: skip


def fleet(measured: dict, noise: float, smallest: bool = True) -> tuple[list[LMDevice], dict]:
    """Issue 28's fleet from this host's measured speed, and how each number was reached."""
    cpu = LMSpeed(tuple(map(tuple, measured["prefill_ms"])), tuple(map(tuple, measured["step_ms"])))  # type: ignore[arg-type]
    gpu = cpu.scaled(1 / GPU_PREFILL_X, 1 / GPU_DECODE_X)
    kv = measured["kv_bytes_per_token"]
    chunks = tuple(measured["chunks"])
    gpu_slots = min(GPU_MAX_SLOTS, int(GPU_KV_BYTES // (kv * LONGEST)))
    devices = [LMDevice(f"gpu{i}", gpu, gpu_slots, int(GPU_KV_BYTES // kv), GPU_PRICE, chunks, noise=noise,
                          smallest_while_decoding=smallest)
               for i in range(GPUS)]  # fmt: skip
    devices += [LMDevice(f"cpu{i}", cpu, measured["slots"], int(CPU_KV_BYTES // kv), CPU_PRICE, chunks, noise=noise,
                          smallest_while_decoding=smallest)
                for i in range(CPUS)]  # fmt: skip
    spec = {"gpu": {"count": GPUS, "price_per_hour": GPU_PRICE, "prefill_x": GPU_PREFILL_X, "decode_x": GPU_DECODE_X,
                    "kv_bytes": GPU_KV_BYTES, "kv_tokens": devices[0].kv_tokens, "slots": gpu_slots,
                    "slots_rule": f"min({GPU_MAX_SLOTS}, KV bytes / ({kv} B/token x {LONGEST} tokens))",
                    "prefill_ms": [list(x) for x in gpu.prefill], "step_ms": [list(x) for x in gpu.step]},
            "cpu": {"count": CPUS, "price_per_hour": CPU_PRICE, "kv_bytes": CPU_KV_BYTES, "kv_tokens": devices[-1].kv_tokens,
                    "slots": measured["slots"], "slots_rule": "the bundle's slots",
                    "prefill_ms": measured["prefill_ms"], "step_ms": measured["step_ms"]},
            "chunks": list(chunks), "noise": noise,
            "chunk_while_decoding": "smallest (Batch.step)" if smallest else "largest (what-if, not Batch.step)"}  # fmt: skip
    return devices, spec


def gpu_utilisation(r: LMSimResult) -> float:
    return statistics.fmean(d.utilisation for d in r.devices if d.name.startswith("gpu"))


def find_rate(devices: list[LMDevice], hours: float, seed: int, kv: int) -> tuple[float, list[dict]]:
    """The arrival rate at which all-on-fastest keeps the GPUs busy TARGET_UTILISATION of
    the time: bracketed by doubling on a trace a tenth as long, then bisected on the
    whole trace around that (the trace's draws do not depend on the rate, so
    utilisation grows with it)."""
    tried: list[dict] = []

    def util(rate: float, duration: float) -> float:
        t0 = time.perf_counter()
        r = simulate(devices, trace(INTERACTIVE_AND_BATCH, rate, duration, seed), "fastest", seed=seed,
                     kv_bytes_per_token=kv, duration_s=duration)  # fmt: skip
        u = gpu_utilisation(r)
        tried.append({"rate_per_s": rate, "hours": duration / 3600, "gpu_utilisation": u, "seconds": time.perf_counter() - t0})
        print(f"  rate {rate:.4f}/s over {duration:.0f} s: GPU utilisation {u:.4f} ({tried[-1]['seconds']:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
        return u

    def bisect(lo: float, hi: float, duration: float, tolerance: float, rounds: int) -> float:
        for _ in range(rounds):
            mid = (lo + hi) / 2
            u = util(mid, duration)
            if abs(u - TARGET_UTILISATION) < tolerance:
                return mid
            lo, hi = (mid, hi) if u < TARGET_UTILISATION else (lo, mid)
        return (lo + hi) / 2

    short = hours * 3600 / 10
    lo, hi = 0.0, 1.0
    for _ in range(20):  # bounded: utilisation reaches 1 at some finite rate
        if util(hi, short) >= TARGET_UTILISATION:
            break
        lo, hi = hi, hi * 2
    guess = bisect(lo, hi, short, 0.01, 8)
    return bisect(guess * 0.9, guess * 1.1, hours * 3600, 0.002, 8), tried


def summary(r: LMSimResult) -> dict:
    kinds = sorted({s.kind for s in r.served})
    by_group: dict[str, list] = {"gpu": [], "cpu": []}
    for d in r.devices:
        by_group["gpu" if d.name.startswith("gpu") else "cpu"].append(d)
    out: dict = {"attainment": r.attainment, "attainment_by_class": {k: r.attainment_of(k) for k in kinds},
                 "cost_per_1M_output_tokens": r.cost_per_million, "cost": r.cost, "output_tokens": r.output_tokens,
                 "throughput_tokens_per_s": r.throughput, "span_s": r.span_s,
                 "requests": len(r.served), "expected_misses": sum(s.expected_miss for s in r.served)}  # fmt: skip
    for group, uses in by_group.items():
        out[group] = {"utilisation_mean": statistics.fmean(d.utilisation for d in uses),
                      "utilisation": [round(d.utilisation, 4) for d in uses], "busy_s": sum(d.busy_s for d in uses),
                      "cost": sum(d.cost for d in uses), "sequences": sum(d.sequences for d in uses),
                      "output_tokens": sum(d.output_tokens for d in uses)}  # fmt: skip
    per_class: dict = {}
    for k in kinds:
        mine = [s for s in r.served if s.kind == k]
        where: dict = {}
        for group in ("gpu", "cpu"):
            here = [s for s in mine if s.device.startswith(group)]
            where[group] = {"requests": len(here), "missed": sum(not s.met for s in here),
                            "missed_expected": sum((not s.met) and s.expected_miss for s in here)}  # fmt: skip
        per_class[k] = {"requests": len(mine), "where": where,
                        "ttft_ms": _pcts([s.ttft_ms for s in mine]), "tpot_ms": _pcts([s.tpot_ms for s in mine]),
                        "e2e_ms": _pcts([s.e2e_ms for s in mine])}  # fmt: skip
    out["classes"] = per_class
    return out


def _pcts(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    return {"p50": xs[len(xs) // 2], "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))], "max": xs[-1]}


def run_sim(args: argparse.Namespace) -> None:
    if args.profiles is not None:
        measured = json.loads(args.profiles.read_text())["measured"]
    else:
        measured = measured_from_bundle(args.bundle, args.artifact)
    kv = measured["kv_bytes_per_token"]
    devices, spec = fleet(measured, args.noise, args.chunk_rule == "smallest")
    duration = args.hours * 3600
    print(f"fleet: {GPUS} GPU-class ({spec['gpu']['slots']} slots), {CPUS} CPU ({spec['cpu']['slots']} slots); "
          f"finding the rate for {TARGET_UTILISATION:.0%} GPU utilisation under all-on-fastest", file=sys.stderr)  # fmt: skip
    rate, tried = find_rate(devices, args.hours, args.seed, kv)
    arrivals = trace(INTERACTIVE_AND_BATCH, rate, duration, args.seed)
    results: dict = {}
    for routing in ROUTINGS:
        t0 = time.perf_counter()
        r = simulate(devices, arrivals, routing, seed=args.seed, kv_bytes_per_token=kv, duration_s=duration)
        results[routing] = summary(r)
        s = results[routing]
        print(f"{routing:12s} attainment {s['attainment']:.4f} ({', '.join(f'{k} {v:.4f}' for k, v in s['attainment_by_class'].items())})"
              f"  ${s['cost_per_1M_output_tokens']:.4f}/1M tokens  GPU {s['gpu']['utilisation_mean']:.3f} CPU {s['cpu']['utilisation_mean']:.3f}"
              f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    fastest, cost = results["fastest"], results["cost"]
    saving = 1 - cost["cost_per_1M_output_tokens"] / fastest["cost_per_1M_output_tokens"]
    goal = {"saving_vs_fastest": saving, "cost_attainment": cost["attainment"], "fastest_attainment": fastest["attainment"],
            "met": saving >= GOAL_SAVING and cost["attainment"] >= GOAL_ATTAINMENT,
            "goal": f"cost routing >= {GOAL_SAVING:.0%} lower cost per 1M output tokens than all-on-fastest "
                    f"at >= {GOAL_ATTAINMENT:.0%} within targets"}  # fmt: skip
    print(f"cost vs all-on-fastest: {saving:.1%} cheaper per 1M output tokens at {cost['attainment']:.2%} within targets "
          f"(fastest {fastest['attainment']:.2%}): goal {'met' if goal['met'] else 'NOT met'}", file=sys.stderr)  # fmt: skip
    data = {"part": "sim", "measured": measured, "fleet": spec, "seed": args.seed,
            "trace": {"hours": args.hours, "rate_per_s": rate, "requests": len(arrivals),
                      "classes": [asdict(c) for c in INTERACTIVE_AND_BATCH], "rate_search": tried},
            "assumptions": ASSUMPTIONS, "routings": results, "goal": goal}  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        name = "route_cost_sim" if args.chunk_rule == "smallest" else "route_cost_sim_largest_chunks"
        print(f"wrote {save(name, data)}", file=sys.stderr)


ASSUMPTIONS = [
    "CPU speed: this host's `hxc bench` profiles of the bundle (p50 time to the first token of 32/128/512-token prompts, "
    "a decode step at batch 1 and at the bundle's slots); read linearly between points and along the last segment beyond "
    "them (LMSpeed's rule): prompts past 512 tokens and batches past the measured ones are extrapolated, not measured",
    "GPU-class speed: every CPU prefill point / 60 and every decode step point / 25 (the CPU's batching curve, scaled)",
    "a step = one prefill chunk of the oldest prompt being read (the smallest of the bundle's chunks while others decode, "
    "else the largest the prompt fills, as Batch.step) + one decode call of every sequence with a token to extend; a "
    "chunk from f to f+c tokens costs prefill(f+c) - prefill(f) (the measured time to first token, differenced), "
    "whatever the chunk size; a decode step costs step(batch) whatever the positions",
    "each step takes (1 +- noise) x its true time, uniformly; the router starts from the true speeds (profiles exact) "
    "and corrects them by what it measures, as the live router does",
    "every request generates exactly its max tokens (no early end of sequence)",
    "a request waits in its device's queue for a slot, first come first served; it is admitted when its prompt + max "
    "tokens fit the KV tokens not yet reserved; no preemption",
    "TPOT = (end - first token) / (tokens - 1); a request is within target when its TTFT, TPOT and end-to-end time meet "
    "every target it has",
    "cost = busy device-seconds (a step running) x price per hour; idle devices cost nothing",
    "utilisation = busy seconds / the span (the trace's hour, or until the last token if later)",
    "80 GB = 80e9 bytes, 16 GB = 16e9 bytes of KV cache",
]


if __name__ == "__main__":
    main()
