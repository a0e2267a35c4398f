"""The mixed step (a decode step carrying a prefill chunk in one call, `hxc.lm_calls.MIXED`)
against a prefill call then a decode call, in process, on one bundle, interleaved:

1. **calls**: at each cache span of `--spans`, the time of `decode` (8 slots busy at a
   short position) + `prefill` (one chunk of the smallest size at that span) against one
   `mixed` call doing both;
2. **a stream beside a long prompt** (the setting of `llm_serve.py`'s phase 3, without the
   server): one sequence decodes; a `--long-prompt`-token prompt joins; the stream's
   inter-token gaps while the prompt is read, p50 and p99, against its gaps alone, with
   `Batch(mixed=True)` and `Batch(mixed=False)`, alternately for `--rounds` rounds.

    PYTHONPATH=. python benchmarks/llm_mixed.py                      # 100M Llama, context 2,192, chunks 8 and 128
    PYTHONPATH=. python benchmarks/llm_mixed.py --size 7m --rounds 5

The model is llm_serve.py's random-weight Llama, compiled once (cpu:host) with its
`compile_bundle` (kept under `--work`). Writes benchmarks/results/llm_mixed.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402
from llm_serve import SIZES, compile_bundle, quantile, save_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="100m")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--stream-tokens", type=int, default=200, help="the running stream's output tokens")
    ap.add_argument("--spans", default="8,500,1000,1990")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="keep the model and bundle here (and reuse them)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hxc-llm-mixed-"))
    work.mkdir(parents=True, exist_ok=True)
    context = args.long_prompt + 192
    hf = save_model(work / f"llama-{args.size}", args.size)
    bundle = compile_bundle(hf, work / f"llama-{args.size}-s{args.slots}-c{context}-p8-128.hxc", args.slots, context, (8, 128))

    import hxc.runtime
    from hxc.lm_calls import MIXED, decode_args, mixed_args, prefill_args

    model = hxc.runtime.load(bundle, device="cpu:host")
    if MIXED not in model.functions:
        raise SystemExit(f"{bundle}: no `{MIXED}` function (built before it?): delete it and run again")
    slots, vocab = args.slots, SIZES[args.size][5]
    state = model.new_state()
    steps = {s: (5, 100) for s in range(slots) if s != 1}  # every slot but the chunk's decodes
    piece = list(range(2, 10))

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000

    calls = {}
    for at in (int(x) for x in args.spans.split(",")):
        separate, mixed = [], []
        for _ in range(max(5, 4 * args.rounds)):
            separate.append(timed(lambda: (model.call_flat("prefill", prefill_args(piece, at, 1, 8, context), state=state),
                                           model.call_flat("decode", decode_args(steps, slots, context), state=state))))  # fmt: skip
            mixed.append(timed(lambda: model.call_flat(MIXED, mixed_args(steps, slots, piece, at, 1, 8, context), state=state)))
        calls[at] = {"prefill_then_decode_ms": statistics.median(separate), "mixed_ms": statistics.median(mixed),
                     "ratio": statistics.median(mixed) / statistics.median(separate)}  # fmt: skip
        print(f"span {at}: {calls[at]}", file=sys.stderr, flush=True)

    from hxc.runtime.batching import Batch

    rng = random.Random(2)

    def beside(mixed: bool) -> dict:
        batch = Batch(model, mixed=mixed)
        batch.add("s", [rng.randrange(2, vocab) for _ in range(64)], args.stream_tokens, stop_token_ids=[])
        for _ in range(10):  # bounded warm-up: its prompt and first tokens
            batch.step()
        alone, t = [], time.perf_counter()
        for _ in range(30):
            batch.step()
            now = time.perf_counter()
            alone.append(now - t)
            t = now
        batch.add("long", [rng.randrange(2, vocab) for _ in range(args.long_prompt)], 4, stop_token_ids=[])
        gaps, t = [], time.perf_counter()
        for _ in range(args.stream_tokens + args.long_prompt):  # bounded: the stream ends within its tokens
            if "s" not in batch:
                break
            events = batch.step()
            now = time.perf_counter()
            if any(e.id == "s" for e in events):
                gaps.append(now - t)
                t = now
        for id in batch.running:
            batch.cancel(id)
        p50 = quantile(alone, 50) * 1000
        return {"itl_p50_alone_ms": p50, "itl_p50_beside_ms": quantile(gaps, 50) * 1000,
                "itl_p99_beside_ms": quantile(gaps, 99) * 1000, "ratio_p99_to_alone": quantile(gaps, 99) * 1000 / p50,
                "gaps": len(gaps)}  # fmt: skip

    runs: dict[str, list[dict]] = {"mixed": [], "prefill_then_decode": []}
    for r in range(args.rounds):
        for name in runs:
            runs[name].append(beside(name == "mixed"))
            print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    summary["mixed_vs_separate_itl_p50_beside"] = (summary["mixed"]["itl_p50_beside_ms"]
                                                  / summary["prefill_then_decode"]["itl_p50_beside_ms"])  # fmt: skip
    summary["mixed_vs_separate_itl_p99_beside"] = (summary["mixed"]["itl_p99_beside_ms"]
                                                  / summary["prefill_then_decode"]["itl_p99_beside_ms"])  # fmt: skip
    path = save("llm_mixed" if args.size == "100m" else f"llm_mixed_{args.size}",
                {"config": {**vars(args), "work": str(work)}, "calls": calls, "runs": runs, "summary": summary,
                 "load_average_1min_at_end": os.getloadavg()[0]})  # fmt: skip
    print(summary)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
