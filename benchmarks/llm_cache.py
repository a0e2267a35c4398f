"""The KV cache's cost per decode step against the maximum context and the filled
length (issue 26, item 2): the same random-weight Llama compiled at several maximum
contexts, each bundle's decode step timed with the same number of tokens in the
cache, interleaved in one process, medians and ratios.

    PYTHONPATH=. python benchmarks/llm_cache.py                      # contexts 256 and 4096, 100 tokens, 1 and 4 slots
    PYTHONPATH=. python benchmarks/llm_cache.py --filled 100,1000,3000 --json

Goal: the step at 100 tokens with a 4,096-token context <= 1.2x the step at 100 tokens
with a 256-token context. A step reads `span` rows of each layer's cache (every slot's
filled length) and writes one row per slot in place, so its cost follows the tokens in
the cache; the part-1 form (one cache for all layers, attention over the whole context,
the write copying it) measured 4.2-6.7 ms at 256 and 92-129 ms at 4096 on this model.

What is timed: one `decode` call with every slot active at position `filled + i` (i = 0..
steps-1 after a prefill of `filled` tokens into each slot), logits read back, on
local-sync (the calling thread: one core, the least noisy on this shared machine) unless
--device says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="256,4096")
    parser.add_argument("--filled", default="100", help="tokens in each slot's cache when a step is timed")
    parser.add_argument("--slots", default="1,4")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round and bundle")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="local-sync")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import hxc.runtime
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions
    from hxc.lm_calls import decode_args
    from hxc.runtime.generate import prefill

    from llm_generate import random_model

    contexts = [int(c) for c in args.contexts.split(",")]
    filled = [int(f) for f in args.filled.split(",")]
    slot_counts = [int(s) for s in args.slots.split(",")]
    model = random_model("llama", args.layers, args.hidden, args.vocab)
    model.config.max_position_embeddings = max(contexts)
    work = Path(tempfile.mkdtemp(prefix="hxc-llm-cache-"))
    model.save_pretrained(str(work / "model"), safe_serialization=True)
    loaded = {}
    for slots in slot_counts:
        for ctx in contexts:
            out = work / f"c{ctx}-s{slots}.hxc"
            built = build_bundle(str(work / "model"), out, "cpu:host",
                                 options=ImportOptions(max_context=ctx, slots=slots))  # fmt: skip
            assert built.written, [r.error for r in built.failed]
            m = hxc.runtime.load(out, device=args.device, strict=True)
            loaded[(slots, ctx)] = (m, m.new_state(), m.manifest.language_model)

    rng = np.random.default_rng(0)
    samples: dict[tuple[int, int, int], list[float]] = {}
    for r in range(args.rounds + 1):  # the first round warms up and is dropped
        for f in filled:
            runs = {key: v for key, v in loaded.items() if f + args.steps <= key[1]}
            for (slots, ctx), (m, state, lm) in runs.items():
                for s in range(slots):
                    prefill(m, lm, rng.integers(2, args.vocab, f).tolist(), state, slot=s)
            times: dict[tuple[int, int], list[float]] = {key: [] for key in runs}
            # Step by step, every bundle in turn: load on this shared machine falls on all alike.
            for i in range(args.steps):
                for (slots, ctx), (m, state, lm) in runs.items():
                    a = decode_args({s: (3, f + i) for s in range(slots)}, slots, ctx)
                    t = time.perf_counter()
                    m.call_flat("decode", a, state=state)
                    times[(slots, ctx)].append((time.perf_counter() - t) * 1000)
            if r:
                for (slots, ctx), v in times.items():
                    samples.setdefault((slots, ctx, f), []).append(statistics.median(v))
    rows = [{"slots": s, "max_context": c, "filled": f, "step_ms": round(statistics.median(v), 3),
             "kv_cache_mib": round(loaded[(s, c)][2].kv_bytes_per_token * (c + 1) * s / 2**20, 1)}
            for (s, c, f), v in sorted(samples.items())]  # fmt: skip
    base = {(r["slots"], r["filled"]): r["step_ms"] for r in rows if r["max_context"] == min(contexts)}
    for row in rows:
        row["vs_smallest_context"] = round(row["step_ms"] / base[(row["slots"], row["filled"])], 2) \
            if (row["slots"], row["filled"]) in base else None
    info = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "device": args.device,
            "rounds": args.rounds, "steps": args.steps}  # fmt: skip
    if args.json:
        print(json.dumps({"model": info, "results": rows}, indent=2))
        return
    print(f"Llama {args.layers} layers, hidden {args.hidden}; {args.device}; medians of {args.rounds} interleaved rounds")
    print("| slots | max context | filled | KV cache MiB | decode step ms | vs context " + str(min(contexts)) + " |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['slots']} | {r['max_context']} | {r['filled']} | {r['kv_cache_mib']} | {r['step_ms']:.3f} | "
              f"{r['vs_smallest_context']}x |")


if __name__ == "__main__":
    main()
