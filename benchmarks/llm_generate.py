"""Language-model generation, first cut: time to first token (prompts of 32 and 128
tokens) and decode tokens/s at batch 1, hxc (IREE on the CPU) against Hugging Face
eager PyTorch with the same thread count, interleaved, medians and ratios.

    PYTHONPATH=. python benchmarks/llm_generate.py            # Llama, 4 layers, hidden 256, random weights
    PYTHONPATH=. python benchmarks/llm_generate.py --family gpt2 --rounds 7 --json

The model is a random-weight `transformers` model (nothing is downloaded), saved as a
Hugging Face directory and compiled with `hxc compile`'s own path (cpu:host). Pairs
with the same threads: IREE `local-task` (one worker per core) against torch with
`torch.set_num_threads(cores)`, and IREE `local-sync` (the calling thread) against
torch with one thread. Each round runs every contender once per measurement, in
turn, so load on this shared machine falls on all of them alike.

What is timed, per contender:
- TTFT: prompt ids in -> first token chosen (hxc: `generate(ids, max_new_tokens=1)`,
  the prompt in chunks of 32; HF: one forward over the prompt with a DynamicCache,
  then argmax of the last logits);
- decode: 64 greedy steps after a 32-token prompt, per token (hxc: `generate`'s time
  per output token; HF: 64 forwards of one token over the cache, argmax each), as
  tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DECODE_STEPS = 64


def random_model(family: str, layers: int, hidden: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 32)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                             max_position_embeddings=512, bos_token_id=0, eos_token_id=1)  # fmt: skip
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, bos_token_id=0,
                        eos_token_id=1)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


class HF:
    """Hugging Face eager: the model's own forward with its DynamicCache."""

    def __init__(self, model: torch.nn.Module, threads: int) -> None:
        self.model, self.threads = model, threads

    def _prefill(self, ids: list[int]):
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def ttft_ms(self, ids: list[int]) -> float:
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            t = time.perf_counter()
            self._prefill(ids)
            return (time.perf_counter() - t) * 1000

    def tokens_per_s(self, ids: list[int]) -> float:
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            token, cache = self._prefill(ids)
            t = time.perf_counter()
            for _ in range(DECODE_STEPS):
                out = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                token, cache = int(out.logits[0, -1].argmax()), out.past_key_values
            return DECODE_STEPS / (time.perf_counter() - t)


class Hxc:
    """hxc: the compiled bundle through `hxc.runtime.load(...).generate`, one state reused."""

    def __init__(self, bundle: Path, device: str) -> None:
        import hxc.runtime

        self.model = hxc.runtime.load(bundle, device=device, strict=True)
        self.state = self.model.new_state()
        self.label = f"{self.model.artifact.id} on {self.model.device.driver}"

    def ttft_ms(self, ids: list[int]) -> float:
        return self.model.generate(ids, 1, state=self.state).result().ttft_ms

    def tokens_per_s(self, ids: list[int]) -> float:
        r = self.model.generate(ids, DECODE_STEPS + 1, stop_token_ids=[], state=self.state).result()
        return 1000.0 / r.tpot_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    cores = os.cpu_count() or 1
    model = random_model(args.family, args.layers, args.hidden, args.vocab)
    work = Path(tempfile.mkdtemp(prefix="hxc-llm-bench-"))
    model.save_pretrained(str(work / "model"), safe_serialization=True)
    t = time.perf_counter()
    built = build_bundle(str(work / "model"), work / "model.hxc", "cpu:host", options=ImportOptions(max_context=256))
    assert built.written, [r.error for r in built.failed]
    compile_s = time.perf_counter() - t

    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(2, args.vocab, n).tolist() for n in (32, 128)}
    pairs = [(f"{cores} threads", Hxc(work / "model.hxc", "local-task"), HF(model, cores)),
             ("1 thread", Hxc(work / "model.hxc", "local-sync"), HF(model, 1))]  # fmt: skip
    measures = {"ttft_32_ms": lambda c: c.ttft_ms(prompts[32]), "ttft_128_ms": lambda c: c.ttft_ms(prompts[128]),
                "decode_tokens_per_s": lambda c: c.tokens_per_s(prompts[32])}  # fmt: skip
    samples: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for threads, ours, theirs in pairs:
            for name, measure in measures.items():
                for who, contender in (("hxc", ours), ("hf", theirs)):
                    samples.setdefault((threads, name, who), []).append(measure(contender))
    rows = []
    for threads, ours, _ in pairs:
        for name in measures:
            hxc_v = statistics.median(samples[(threads, name, "hxc")][1:])
            hf_v = statistics.median(samples[(threads, name, "hf")][1:])
            # A ratio above 1 means hxc is better: shorter TTFT, more tokens/s.
            speedup = hf_v / hxc_v if name.endswith("_ms") else hxc_v / hf_v
            rows.append({"threads": threads, "hxc": ours.label, "measure": name, "hxc_median": round(hxc_v, 3),
                         "hf_eager_median": round(hf_v, 3), "hxc_advantage": round(speedup, 2)})  # fmt: skip
    info = {"family": args.family, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
            "parameters": sum(p.numel() for p in model.parameters()), "rounds": args.rounds,
            "compile_s": round(compile_s, 1), "torch": torch.__version__, "cores": cores}  # fmt: skip
    if args.json:
        print(json.dumps({"model": info, "results": rows}, indent=2))
        return
    print(f"{args.family}, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab} "
          f"({info['parameters'] / 1e6:.1f} M parameters, random weights); compiled in {compile_s:.0f} s; "
          f"medians of {args.rounds} interleaved rounds")  # fmt: skip
    print("| threads | measure | hxc | HF eager | hxc advantage |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} ({r['hxc']}) | {r['measure']} | {r['hxc_median']:.2f} | {r['hf_eager_median']:.2f} "
              f"| {r['hxc_advantage']:.2f}x |")


if __name__ == "__main__":
    main()
