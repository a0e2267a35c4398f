"""`route_cost.py host`: routing by cost on this host's real devices, measured through
real servers, against all-on-fastest and round robin, and against the simulator on the
same trace (issue 28: "simulated vs measured within 15% for throughput and attainment").

The devices: the CPU (`cpu:host`) and lavapipe (`vulkan:spirv`), each pinned to one
core of this 2-core machine (`--pin`), so that they compute side by side as two
devices would; priced by a prices file as stand-ins for a fast, dear device and a
slow, cheap one (PRICES). The model: the 7 M-parameter random-weight Llama of
`llm_serve.py` (word-level tokenizer), 4 slots, context 640, prefill chunks 16 and 128.

1. **Speeds**: `hxc bench` on the bundle under `taskset -c 0` (one core, as each
   server worker has): time to first token at 32/128/512 prompt tokens and decode at
   batch 1 and 4 per device. Then a short load through a server on both devices, and
   the speeds its router measured (its /routing view: the bench's, corrected by every
   first token and step seen through the serving path); those set the trace and are
   the simulator's truth (a simulation from the bench speeds alone is reported beside).
2. **Trace** (seeded Poisson, `--seconds` of arrivals): 70% interactive (prompt 32-128,
   16-32 tokens out, TTFT <= 4x the CPU's 128-token prefill, TPOT <= 2.5x its decode
   step at 4 sequences: targets lavapipe cannot meet), 30% batch (prompt 256-512, 64
   out, end to end <= 4x lavapipe's time for the largest alone at 4 sequences). The
   rate: all-on-fastest's CPU at 70% busy, found on the simulator.
3. **Measured**, each configuration a fresh server (or two): `cost` routing on both
   devices; all-on-fastest (the CPU alone); round robin (a server per device, the
   client alternating). Every request is a streamed completion through the real
   `openai` client with its targets as extra body fields; TTFT, TPOT and end-to-end
   are timed by the client; cost = each device's busy seconds (`/metrics`
   `hxc_lm_device_busy_seconds`) x its price.
4. **Simulated**: the same trace through `hxc.pool.lm_simulate` with the measured speeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_serve import HxcServer, save_model  # the sibling benchmark's server and model

SIZE, SLOTS, CONTEXT, CHUNKS = "7m", 4, 640, (16, 128)
# Per hour: stand-ins for a dear fast device and a cheap slow one. Lavapipe on one core
# decodes this model ~85x slower than the CPU (bench: 197 against 2.3 ms a step), so it is
# cheaper per token only when priced below 1/85 of the CPU.
PRICES = {"cpu:host": 0.09, "vulkan:spirv": 0.0005}
PRICE_PATTERNS = {"cpu:host": "local-task*", "vulkan:spirv": "vulkan*"}
CORES = {"cpu:host": 0, "vulkan:spirv": 1}
UTILISATION = 0.7


def build(work: Path) -> Path:
    out = work / "llm7m-route.hxc"
    if (out / "manifest.json").exists():
        return out
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    hf = save_model(work / "llama-7m", SIZE)
    result = build_bundle(str(hf), out, "cpu:host,vulkan:spirv",
                          options=ImportOptions(max_context=CONTEXT, slots=SLOTS, prefill_chunk=CHUNKS))  # fmt: skip
    assert result.written, [r.error for r in result.failed]
    return out


def bench_one_core(bundle: Path) -> dict:
    """Each artifact's LMSpeed as `hxc bench` records it on one core (the bundle's profiles)."""
    from hxc.manifests import read_manifest
    from hxc.pool.lm_estimate import LMSpeed
    from hxc.runtime import probe_host
    from hxc.runtime.select import profiles_for

    host = probe_host()

    def recorded() -> tuple[dict, object]:
        m = read_manifest(bundle)
        speeds = ((a.id, LMSpeed.from_profiles(profiles_for(m, a, d, host.host().id)[0]))
                  for a in m.ok_artifacts if a.id in PRICES for d in host.devices)  # fmt: skip
        return {a: speed for a, speed in speeds if speed is not None}, m

    out, m = recorded()
    if set(out) != set(PRICES):
        env = {**os.environ, "LP_NUM_THREADS": "1"}
        subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "hxc.cli", "bench", str(bundle), "--baseline", "none",
                        "--min-iterations", "10", "--min-time", "0.3"], check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
        out, m = recorded()
    return {"speeds": {k: {"prefill": v.prefill, "step": v.step} for k, v in out.items()},
            "kv_bytes_per_token": m.language_model.kv_bytes_per_token}  # fmt: skip


def calibrate(bundle: Path, prices: Path, kinds: tuple, vocab: int, seed: int, benched: dict) -> dict:
    """Each device's speed as the server's router measures it through the whole serving
    path (start-up timing, then every first token and step of a short load on both
    devices), read from its /routing view: the simulator's truth for the comparison."""
    import urllib.request

    from hxc.pool.lm_estimate import LMSpeed
    from hxc.pool.lm_simulate import trace

    arrivals = trace(kinds, 2.0, 15.0, seed=seed + 100)
    with Server(bundle, tuple(PRICES), prices) as s:
        asyncio.run(replay([s], arrivals, vocab, "cost"))
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/v2/models/llm/routing?prompt_tokens=64", timeout=30) as r:
            view = json.loads(r.read())
    served = {d["name"]: LMSpeed(tuple(map(tuple, d["speed"]["prefill_ms"])), tuple(map(tuple, d["speed"]["step_ms"])))
              for d in view["devices"] if "speed" in d}  # fmt: skip
    # A pinned worker's router starts from its start-up timing (one prefill, one step), not
    # the profiles: the bench's curves, scaled to what the router measured at those points.
    return {n: b.scaled(served[n].prefill_ms(128) / b.prefill_ms(128), served[n].step_ms(1) / b.step_ms(1))
            for n, b in benched.items()}  # fmt: skip


def classes(speeds: dict) -> tuple:
    from hxc.pool.lm_simulate import RequestClass

    cpu, vk = speeds["cpu:host"], speeds["vulkan:spirv"]
    ttft = 4 * cpu.prefill_ms(128)
    tpot = 2.5 * cpu.step_ms(SLOTS)
    e2e = 4 * (vk.prefill_ms(512) + 64 * vk.step_ms(SLOTS))
    return (RequestClass("interactive", 0.7, (32, 128), (16, 32), ttft_ms=round(ttft, 1), tpot_ms=round(tpot, 1)),
            RequestClass("batch", 0.3, (256, 512), (64, 64), slo_ms=round(e2e, 1)))  # fmt: skip


def devices(speeds: dict, names: tuple[str, ...], noise: float = 0.1) -> list:
    from hxc.pool.lm_simulate import LMDevice

    return [LMDevice(n, speeds[n], SLOTS, SLOTS * CONTEXT, PRICES[n], CHUNKS, noise=noise) for n in names]


def find_rate(speeds: dict, kinds: tuple, seconds: float, kv: int) -> float:
    """The arrival rate at which all-on-fastest keeps the CPU 70% busy (bisection on the simulator)."""
    from hxc.pool.lm_simulate import simulate, trace

    lo, hi = 0.01, 50.0
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        r = simulate(devices(speeds, ("cpu:host",)), trace(kinds, mid, seconds, seed=1), "fastest", kv_bytes_per_token=kv,
                     duration_s=seconds)  # fmt: skip
        lo, hi = (mid, hi) if r.utilisation["cpu:host"] < UTILISATION else (lo, mid)
    return (lo * hi) ** 0.5


class Server(HxcServer):
    """`hxc serve` on `names`' devices, each pinned to its core, priced by `prices`, routing by cost."""

    def __init__(self, bundle: Path, names: tuple[str, ...], prices: Path) -> None:
        pins = [a for n in names for a in ("--pin", f"{n.split(':')[0]}={CORES[n]}")]
        super().__init__(bundle, ",".join(n.split(":")[0] for n in names), *pins, "--prices", str(prices),
                         "--policy", "cost", max_queue=100_000)  # fmt: skip

    def busy_seconds(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("hxc_lm_device_busy_seconds_total{"):
                device = line.split('device="', 1)[1].split('"', 1)[0]
                out[device] = float(line.rsplit(" ", 1)[1])
        return out


async def replay(servers: list[Server], arrivals: list, vocab: int, policy: str) -> list[dict]:
    """Send each arrival at its time (to `servers[i % n]`): streamed, its targets in the body."""
    import openai

    clients = [openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="none", max_retries=0, timeout=3600)
               for s in servers]  # fmt: skip
    rng = random.Random(7)
    t0 = time.perf_counter()

    async def one(i: int, a) -> dict:
        await asyncio.sleep(max(0.0, a.at_s - (time.perf_counter() - t0)))
        sent = time.perf_counter()
        targets = {k: v for k, v in (("ttft_ms", a.ttft_ms), ("tpot_ms", a.tpot_ms), ("slo_ms", a.slo_ms)) if v is not None}
        prompt = [rng.randrange(2, vocab) for _ in range(a.prompt_tokens)]
        stream = await clients[i % len(clients)].completions.create(
            model="llm", prompt=prompt, max_tokens=a.max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True, "policy": policy, **targets})  # fmt: skip
        times = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
        end = time.perf_counter()
        ttft = (times[0] - sent) * 1000 if times else float("inf")
        tpot = (times[-1] - times[0]) * 1000 / (len(times) - 1) if len(times) > 1 else 0.0
        e2e = (end - sent) * 1000
        met = all(t is None or v <= t for t, v in ((a.ttft_ms, ttft), (a.tpot_ms, tpot), (a.slo_ms, e2e)))
        return {"kind": a.kind, "tokens": len(times), "ttft_ms": ttft, "tpot_ms": tpot, "e2e_ms": e2e, "met": met,
                "end_s": end - t0}  # fmt: skip

    rows = await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))
    for c in clients:
        await c.close()
    return list(rows)


def measured(rows: list[dict], busy: dict[str, float]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    span = max(r["end_s"] for r in rows)
    cost = sum(busy.get(n, 0.0) * PRICES[n] / 3600 for n in PRICES)
    kinds = sorted({r["kind"] for r in rows})
    return {"attainment": sum(r["met"] for r in rows) / len(rows),
            "attainment_by_class": {k: sum(r["met"] for r in rows if r["kind"] == k) / sum(r["kind"] == k for r in rows) for k in kinds},
            "throughput_tokens_per_s": tokens / span, "output_tokens": tokens, "span_s": span,
            "busy_s": busy, "utilisation": {n: b / span for n, b in busy.items()},
            "cost_per_1m_tokens": cost / tokens * 1e6 if tokens else None}  # fmt: skip


def simulated(r) -> dict:
    return {"attainment": r.attainment, "attainment_by_class": {k: r.attainment_of(k) for k in ("interactive", "batch")},
            "throughput_tokens_per_s": r.throughput, "output_tokens": r.output_tokens, "span_s": r.span_s,
            "utilisation": r.utilisation, "cost_per_1m_tokens": r.cost_per_million}  # fmt: skip


CONFIGS = {  # name: (the devices, one server per device?, the routing the simulator runs)
    "cost": (("cpu:host", "vulkan:spirv"), False, "cost"),
    "all_on_fastest": (("cpu:host",), False, "fastest"),
    "round_robin": (("cpu:host", "vulkan:spirv"), True, "round_robin"),
}


def run_host(seconds: float, work: Path | None = None, seed: int = 0) -> dict:
    from hxc.manifests import read_manifest
    from hxc.pool.lm_estimate import LMSpeed
    from hxc.pool.lm_simulate import simulate, trace

    work = work or Path(tempfile.gettempdir()) / "hxc-route-cost"
    work.mkdir(parents=True, exist_ok=True)
    bundle = build(work)
    bench = bench_one_core(bundle)
    benched = {k: LMSpeed(tuple(map(tuple, v["prefill"])), tuple(map(tuple, v["step"]))) for k, v in bench["speeds"].items()}
    kv = bench["kv_bytes_per_token"]
    vocab = read_manifest(bundle).language_model.vocab_size
    prices = work / "prices.toml"
    prices.write_text("[devices]\n" + "".join(f'"{PRICE_PATTERNS[n]}" = {p}\n' for n, p in PRICES.items()))
    # The targets, the rate and the simulator's truth come from the speeds the router
    # measured through the server (the bench's device time leaves out the serving path).
    speeds = calibrate(bundle, prices, classes(benched), vocab, seed, benched)
    kinds = classes(speeds)
    rate = find_rate(speeds, kinds, seconds, kv)
    arrivals = trace(kinds, rate, seconds, seed=seed)
    out: dict = {"bench": bench, "served_speeds": {k: {"prefill": v.prefill, "step": v.step} for k, v in speeds.items()},
                 "rate_per_s": rate, "requests": len(arrivals), "seconds": seconds,
                 "classes": [c.__dict__ for c in kinds], "prices_per_hour": PRICES, "configs": {}}  # fmt: skip
    for name, (names, split, routing) in CONFIGS.items():
        print(f"host: {name} ({len(arrivals)} requests at {rate:.2f}/s)", file=sys.stderr)
        servers = [Server(bundle, (n,), prices) for n in names] if split else [Server(bundle, names, prices)]
        for s in servers:
            s.__enter__()
        try:
            rows = asyncio.run(replay(servers, arrivals, vocab, "cost"))
            busy: dict[str, float] = {}
            for s in servers:
                busy.update(s.busy_seconds())
        finally:
            for s in servers:
                s.__exit__()
        sim = simulate(devices(speeds, names), arrivals, routing, kv_bytes_per_token=kv, duration_s=seconds, seed=seed)
        by_bench = simulate(devices(benched, names), arrivals, routing, kv_bytes_per_token=kv, duration_s=seconds, seed=seed)
        m, s_ = measured(rows, busy), simulated(sim)
        out["configs"][name] = {"measured": m, "simulated": s_, "simulated_from_bench": simulated(by_bench),
                                "sim_over_measured": {k: s_[k] / m[k] if m[k] else None
                                                      for k in ("throughput_tokens_per_s", "attainment")}}  # fmt: skip
        print(f"  measured: attainment {m['attainment']:.1%}, {m['throughput_tokens_per_s']:.1f} tok/s, "
              f"${m['cost_per_1m_tokens']:.4f}/1M; simulated: {s_['attainment']:.1%}, {s_['throughput_tokens_per_s']:.1f} tok/s, "
              f"${s_['cost_per_1m_tokens']:.4f}/1M", file=sys.stderr)  # fmt: skip
    c, f = out["configs"]["cost"]["measured"], out["configs"]["all_on_fastest"]["measured"]
    out["goal"] = {"cost_attainment_at_least_fastest": c["attainment"] >= f["attainment"],
                   "cost_saving_vs_fastest": 1 - c["cost_per_1m_tokens"] / f["cost_per_1m_tokens"]}  # fmt: skip
    return out
