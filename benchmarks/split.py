"""A ~100M-parameter Llama-shaped model cut in two stages, run as a pipeline of two
pinned CPU workers, against each stage alone, the simulator's prediction and the
whole model (issue 29, item 4; ratios in one run).

    python benchmarks/split.py [--rounds 5] [--items 16] [--in-flight 4]

The model: token embedding, `--layers` Llama blocks (RMSNorm, causal attention with
rotary positions, SwiGLU MLP), a final norm and the LM head, random weights, one plain
forward over a fixed sequence of `--seq` tokens (no KV cache: generation stages come
later). Compiled for the host CPU twice: `--stages 2` (cut where the FLOPs balance) and
whole. In interleaved rounds (medians):

  (a) each stage alone on one pinned core: the pipeline (`hxc.pool.pipeline`, stage 0's
      worker on one core, stage 1's on the other) called with one item at a time, each
      stage's time as its worker measured it;
  (b) the same pipeline with `--in-flight` items in flight: its steady throughput
      (completions past the first `--in-flight`, over their time), against the slower
      stage's rate alone (goal >= 90%), and the caller's own CPU time per item;
  (c) the simulator (`hxc.pool.pipeline_simulate`) on the stage times of (a): each
      pinned worker a device of its own, the hop between them over shared memory
      (goal: within 15% of (b));
  (d) the whole model through one worker, pinned to one core and on both cores.

Writes benchmarks/results/split.json (or --out NAME), with the load average before and
after (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

from hxc.build import build_bundle  # noqa: E402
from hxc.compiler.imported import ImportOptions  # noqa: E402
from hxc.manifests import read_manifest  # noqa: E402
from hxc.pool.pipeline import Pipeline  # noqa: E402
from hxc.pool.pipeline_simulate import simulate_pipeline  # noqa: E402
from hxc.pool.worker import Deadlines, Worker  # noqa: E402
from hxc.runtime.placement import DeviceInfo, StageCost, evaluate  # noqa: E402

SOURCE = textwrap.dedent(
    '''
    import torch
    from torch import nn

    VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ = {vocab}, {hidden}, {layers}, {heads}, {ffn}, {seq}


    class RMSNorm(nn.Module):
        def __init__(self, d, eps=1e-5):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


    def rotate(x, cos, sin):
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-b, a), dim=-1) * sin


    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim = HIDDEN // HEADS
            self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
            inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
            angles = torch.outer(torch.arange(SEQ).float(), inv)
            angles = torch.cat((angles, angles), dim=-1)
            self.register_buffer("cos", angles.cos())
            self.register_buffer("sin", angles.sin())
            self.register_buffer("mask", torch.full((SEQ, SEQ), float("-inf")).triu(1))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, HEADS, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
            w = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + self.mask, dim=-1)
            return self.o_proj((w @ v).transpose(1, 2).reshape(b, t, HIDDEN))


    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
            self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
            self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.self_attn = RMSNorm(HIDDEN), Attention()
            self.post_attention_layernorm, self.mlp = RMSNorm(HIDDEN), MLP()

        def forward(self, x):
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))


    class LlamaShaped(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
            self.layers = nn.ModuleList([Block() for _ in range(LAYERS)])
            self.norm = RMSNorm(HIDDEN)
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

        def forward(self, ids):
            x = self.embed_tokens(ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))


    def model():
        torch.manual_seed(0)
        m = LlamaShaped().eval()
        for p in m.parameters():  # small random weights: activations stay finite through every layer
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
        return m, (torch.randint(0, VOCAB, (1, SEQ)),)
    '''
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=16, help="items per pipelined run")
    parser.add_argument("--alone", type=int, default=4, help="items per run of one item at a time")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default="split")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("split.py needs two cores: one per pinned stage worker")
    results: dict = {"load_before": os.getloadavg(), "config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="hxc-split-") as tmp:
        src = Path(tmp) / "llama_shaped.py"
        src.write_text(SOURCE.format(**{k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "ffn", "seq")}))
        staged, whole = Path(tmp) / "staged.hxc", Path(tmp) / "whole.hxc"
        for out, stages in ((staged, "2"), (whole, None)):
            t0 = time.perf_counter()
            built = build_bundle(f"{src}:model", out, "cpu:host", options=ImportOptions(stages=stages, weights="shared"))
            assert built.written, [r.error for r in built.failed]
            results.setdefault("compile_s", {})["staged" if stages else "whole"] = time.perf_counter() - t0
            print(f"compiled {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        results.update(measure(staged, whole, args))
    results["load_after"] = os.getloadavg()
    path = save(args.out, results)
    print(summary(results))
    print(f"wrote {path}", file=sys.stderr)


def measure(staged: Path, whole: Path, args: argparse.Namespace) -> dict:
    manifest = read_manifest(staged)
    import torch  # the parameter count, from the model itself

    namespace: dict = {}
    exec(compile(SOURCE.format(**{k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "ffn", "seq")}),
                 "llama_shaped", "exec"), namespace)  # fmt: skip
    model, example = namespace["model"]()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(*example).numpy()
    ids = example[0].numpy()
    items = [ids] * args.items

    cores = sorted(os.sched_getaffinity(0))
    deadlines = Deadlines(unmeasured_s=600, load_s=600)
    pipe = Pipeline(staged, ("cpu", "cpu"), pin=True, in_flight=args.in_flight, deadlines=deadlines, timeout_s=600)
    one_core = Worker(whole, "cpu:host", "cpu", manifest.signature, cpus=cores[:1], deadlines=deadlines, name="whole, 1 core")
    two_cores = Worker(whole, "cpu:host", "cpu", manifest.signature, deadlines=deadlines, name="whole, both cores")
    for w in (one_core, two_cores):
        w.start()
    for w in (one_core, two_cores):
        assert w.wait_ready(600), w.reason
    try:
        got = pipe(ids)
        error = float(np.abs(got - expected).max() / max(1e-12, float(np.abs(expected).max())))
        stage_ms: dict[int, list[float]] = {0: [], 1: []}
        in_pipeline_ms: dict[int, list[float]] = {0: [], 1: []}
        busy_share: dict[int, list[float]] = {0: [], 1: []}
        alone_latency, pipelined, caller_cpu, whole1, whole2 = [], [], [], [], []
        for r in range(args.rounds):
            # (a) one item at a time: each worker's own time for each call.
            before = [len(w.intervals) for w in pipe.stats().workers]
            t0 = time.perf_counter()
            for x in items[:args.alone]:
                pipe(x)
            alone_latency.append((time.perf_counter() - t0) / args.alone * 1000)
            for k, (w, n) in enumerate(zip(pipe.stats().workers, before)):
                stage_ms[k] += [(b - a) * 1000 for a, b in w.intervals[n:]]
            # (b) several in flight: steady throughput, the caller's CPU time, and each
            # worker's own call times and busy share meanwhile.
            before = [len(w.intervals) for w in pipe.stats().workers]
            t0 = time.monotonic()
            rate, cpu_ms = pipelined_run(pipe, items, args.in_flight)
            wall = time.monotonic() - t0
            pipelined.append(rate)
            caller_cpu.append(cpu_ms)
            for k, (w, n) in enumerate(zip(pipe.stats().workers, before)):
                calls = [(b - a) * 1000 for a, b in w.intervals[n:]]
                in_pipeline_ms[k] += calls
                busy_share[k].append(sum(calls) / 1000 / wall)
            # (d) the whole model.
            whole1.append(timed(one_core, ids, args.alone))
            whole2.append(timed(two_cores, ids, args.alone))
            print(f"  round {r + 1}/{args.rounds}: stages {statistics.median(stage_ms[0]):.1f} / "
                  f"{statistics.median(stage_ms[1]):.1f} ms alone, pipeline {rate:.2f} items/s "
                  f"(caller {cpu_ms:.2f} ms CPU/item), whole {1000 / whole1[-1]:.2f} / {1000 / whole2[-1]:.2f} items/s",
                  file=sys.stderr, flush=True)  # fmt: skip
        stats = pipe.stats()
    finally:
        pipe.close()
        one_core.close()
        two_cores.close()

    t = [statistics.median(stage_ms[k]) for k in (0, 1)]
    measured = statistics.median(pipelined)
    slower = 1000 / max(t)
    # (c) The placement model of what ran: `--placement 0:cpu,1:cpu --pin split`, a
    # worker per stage, the hop between them shared memory.
    costs = [StageCost(s.index, s.weights_bytes, out_bytes=sum(x.bytes for x in s.outputs)) for s in manifest.stages]
    devices = [DeviceInfo("cpu")]
    plan = evaluate(costs, devices, {(0, "cpu"): t[0], (1, "cpu"): t[1]}, ("cpu", "cpu"), pin=True)
    sim = simulate_pipeline(plan, items=args.items, in_flight=args.in_flight)
    # The same from the stage times the workers measured while both ran: what is left of
    # the gap then is the pipeline's own (hops, idle workers), not the stages' slowdown
    # when the other core is busy too (shared caches and memory bandwidth, other jobs).
    t_busy = [statistics.median(in_pipeline_ms[k]) for k in (0, 1)]
    busy_plan = evaluate(costs, devices, {(0, "cpu"): t_busy[0], (1, "cpu"): t_busy[1]}, ("cpu", "cpu"), pin=True)
    busy_sim = simulate_pipeline(busy_plan, items=args.items, in_flight=args.in_flight)
    return {
        "model": {"parameters": params, "layers": args.layers, "hidden": args.hidden, "seq": args.seq,
                  "stages": [{"first_module": s.first_module, "last_module": s.last_module, "flops": s.flops,
                              "weights_bytes": s.weights_bytes, "out_bytes": costs[s.index].out_bytes}
                             for s in manifest.stages],
                  "max_rel_error_vs_pytorch": error},
        "stage_alone_ms": t,
        "stage_alone_items_per_s": [1000 / x for x in t],
        "latency_one_in_flight_ms": statistics.median(alone_latency),
        "pipeline_items_per_s": measured,
        "pipeline_runs": pipelined,
        "pipeline_vs_slower_stage": measured / slower,
        "caller_cpu_ms_per_item": statistics.median(caller_cpu),
        "caller_cpu_share_of_a_core": statistics.median(caller_cpu) * measured / 1000,
        "simulated_items_per_s": sim.items_per_s,
        "simulated_vs_measured": sim.items_per_s / measured,
        "stage_in_pipeline_ms": t_busy,
        "worker_busy_share_in_pipeline": [statistics.median(busy_share[k]) for k in (0, 1)],
        "simulated_from_in_pipeline_times_items_per_s": busy_sim.items_per_s,
        "simulated_from_in_pipeline_times_vs_measured": busy_sim.items_per_s / measured,
        "predicted_items_per_s": plan.items_per_s,
        "whole_one_core_items_per_s": 1000 / statistics.median(whole1),
        "whole_both_cores_items_per_s": 1000 / statistics.median(whole2),
        "pipeline_vs_whole_both_cores": measured / (1000 / statistics.median(whole2)),
        "workers": [{"name": w.name, "cpus": w.cpus, "calls": w.calls, "busy_s": w.busy_s, "restarts": w.restarts}
                    for w in stats.workers],
        "goals": {"pipeline >= 90% of the slower stage alone": measured / slower >= 0.9,
                  "simulated within 15% of measured": abs(sim.items_per_s / measured - 1) <= 0.15},
    }  # fmt: skip


def pipelined_run(pipe: Pipeline, items: list, in_flight: int) -> tuple[float, float]:
    """(steady items/s, the caller's CPU ms per item) of one run of `items`, all submitted
    at once. Steady: the completions after the first `in_flight` (the pipeline filling)
    and before the last `in_flight` (draining), over their time, as the simulator counts."""
    done: list[float] = []
    cpu0 = time.process_time()
    futures = [pipe.submit([x]) for x in items]
    for f in futures:
        f.result(600)
        done.append(time.perf_counter())
    cpu = (time.process_time() - cpu0) * 1000 / len(items)
    done.sort()
    warm = min(in_flight, len(done) - 1)
    last = max(warm, len(done) - 1 - in_flight)
    if last <= warm:
        raise SystemExit(f"--items must exceed 2 x --in-flight ({2 * in_flight}) to measure a steady state")
    return (last - warm + 1) / (done[last] - done[warm - 1]), cpu


def timed(worker: Worker, ids: np.ndarray, n: int) -> float:
    """Median ms of `n` calls of the whole model through its worker."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        worker.run([ids], timeout=600)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def summary(r: dict) -> str:
    m = r["model"]
    return "\n".join([
        f"model: {m['parameters'] / 1e6:.0f}M parameters, {m['layers']} layers, hidden {m['hidden']}, {m['seq']} tokens; "
        f"stages cut at {m['stages'][1]['first_module']}; max relative error vs PyTorch {m['max_rel_error_vs_pytorch']:.1e}",
        f"(a) stage alone on one core: {r['stage_alone_ms'][0]:.1f} ms, {r['stage_alone_ms'][1]:.1f} ms "
        f"(one item at a time through both: {r['latency_one_in_flight_ms']:.1f} ms)",
        f"(b) pipeline, {r['config']['in_flight']} in flight: {r['pipeline_items_per_s']:.2f} items/s = "
        f"{r['pipeline_vs_slower_stage']:.0%} of the slower stage alone (goal >= 90%); caller CPU "
        f"{r['caller_cpu_ms_per_item']:.2f} ms/item ({r['caller_cpu_share_of_a_core']:.1%} of a core)",
        f"(c) simulated: {r['simulated_items_per_s']:.2f} items/s = {r['simulated_vs_measured']:.0%} of measured "
        f"(goal within 15%)",
        f"    while both ran, the stages took {r['stage_in_pipeline_ms'][0]:.1f} ms and {r['stage_in_pipeline_ms'][1]:.1f} ms, "
        f"the workers busy {r['worker_busy_share_in_pipeline'][0]:.0%} and {r['worker_busy_share_in_pipeline'][1]:.0%}; "
        f"simulated from those times: {r['simulated_from_in_pipeline_times_vs_measured']:.0%} of measured",
        f"(d) whole model: {r['whole_one_core_items_per_s']:.2f} items/s on one core, "
        f"{r['whole_both_cores_items_per_s']:.2f} on both (pipeline / whole on both: {r['pipeline_vs_whole_both_cores']:.0%})",
        f"load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
