"""Weight-only quantisation of language models: weights.irpa bytes and decode step time
(batch 1) of fp32, int8 and int4 artifacts built by `hxc compile --precision
fp32,int8,int4` (cpu:host), on local-task with 1 and 2 threads, and each quantised
artifact's recorded error against float32. A fourth contender, `fp32-stack64`, is fp32
built with the stack limit the quantised artifacts get
(`--iree-flag cpu:--iree-llvmcpu-stack-allocation-limit=65536`, see hxc/targets/cpu.py):
where data tiling fails on the attention at the default limit, hxc's own fp32 artifact
falls back to no data tiling, and this one says what fp32 gains from the same flag.

    PYTHONPATH=. python benchmarks/llm_precision.py                  # tiny + 100M, writes the JSON below
    PYTHONPATH=. python benchmarks/llm_precision.py --models tiny --rounds 3 --no-write

Models (random weights, nothing downloaded): `tiny`, the test suite's Llama (2 layers,
hidden 64, vocabulary 384, `hxc.examples.llm`); `100m`, a Llama of hidden 768, 12
layers, 12 heads, intermediate 2048, vocabulary 32000 (134 M parameters with its
untied LM head). Decode: after a 32-token prompt, 64 greedy tokens through
`hxc.runtime.load(...).generate`, the time per output token; each thread count runs in
a process of its own (IREE fixes its worker count at the first local-task device),
which loads the three artifacts and times them in turn, round after round, so load on
this shared machine falls on all of them alike; medians over the rounds (the first
dropped). Random weights make the greedy agreement pessimistic: their logits are
nearly flat, so small changes flip near-ties a trained model would not have.

Results: benchmarks/results/llm_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRECISIONS = ("fp32", "int8", "int4")
STACK64 = "--iree-llvmcpu-stack-allocation-limit=65536"
PROMPT_TOKENS = 32
DECODE_STEPS = 64
RESULTS = Path(__file__).parent / "results" / "llm_precision.json"



def _data_tiling(flags) -> str | bool:
    """Which of IREE's data-tiling paths the artifact was built with (hxc's CPU fallback
    tries the global-optimisation one when the default fails), or False."""
    if "--iree-opt-data-tiling" in flags:
        return "dispatch-creation"
    return "global-optimisation" if "--iree-global-opt-data-tiling" in flags else False

def save_model(name: str, directory: Path) -> Path:
    """The model `name` as a Hugging Face directory."""
    if name == "tiny":
        from hxc.examples.llm import save_tiny_lm

        return save_tiny_lm(directory, "llama")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(directory), safe_serialization=True)
    return directory


def build(source: Path, out: Path, group_size: int | None) -> dict:
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions
    from hxc.manifests import read_manifest
    from hxc.manifests.schema import to_json

    options = ImportOptions(max_context=256, group_size=group_size)
    t = time.perf_counter()
    result = build_bundle(str(source), out, "cpu:host", precisions=PRECISIONS, use_cache=False, options=options)
    if not result.written:
        raise SystemExit(f"build failed: {[b.error for b in result.failed]}")
    compile_s = time.perf_counter() - t
    stack64 = build_bundle(str(source), out.with_suffix(".stack64.hxc"), "cpu:host", use_cache=False, options=options,
                           extra_flags=[("cpu", STACK64)])  # fmt: skip
    if not stack64.written:
        raise SystemExit(f"build failed: {[b.error for b in stack64.failed]}")
    m = read_manifest(out)
    arts = {a.precision: a for a in m.ok_artifacts}
    return {
        "compile_s": round(compile_s, 1),
        "weights_bytes": {w.precision: w.size for w in m.weights},
        "artifact_bytes": {p: a.size for p, a in arts.items()},
        # The flags each artifact was built with, and when the family's defaults failed, why.
        "data_tiling": {**{p: _data_tiling(a.flags) for p, a in arts.items()},
                        "fp32-stack64": _data_tiling(stack64.manifest.ok_artifacts[0].flags)},
        "fallback": {p: a.fallback for p, a in arts.items() if a.fallback},
        "error": {p: {"precision_error": a.precision_error, **to_json(a.quantization)}
                  for p, a in arts.items() if a.quantization is not None},
    }  # fmt: skip


def child(bundle: str, threads: int, rounds: int) -> None:
    """Time decode per contender, interleaved; print {contender: [ms per token, ...]}."""
    import iree.runtime as rt

    rt.flags.parse_flags(f"--task_topology_max_group_count={threads}")
    import numpy as np

    import hxc.runtime

    models = {p: hxc.runtime.load(bundle, device="local-task", precision=p, strict=True) for p in PRECISIONS}
    for p, m in models.items():
        assert m.artifact.precision == p, (p, m.artifact.id)
    models["fp32-stack64"] = hxc.runtime.load(Path(bundle).with_suffix(".stack64.hxc"), device="local-task", strict=True)
    states = {p: m.new_state() for p, m in models.items()}
    vocab = models["fp32"].manifest.language_model.vocab_size
    prompt = np.random.default_rng(0).integers(2, vocab, PROMPT_TOKENS).tolist()
    times: dict[str, list[float]] = {p: [] for p in models}
    for _ in range(rounds + 1):
        for p, m in models.items():
            r = m.generate(prompt, DECODE_STEPS + 1, stop_token_ids=[], state=states[p]).result()
            times[p].append(r.tpot_ms)
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,100m")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--group-size", type=int, default=None, help="input features per scale (default: hxc's)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not write {RESULTS}")
    parser.add_argument("--child", nargs=3, metavar=("BUNDLE", "THREADS", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return

    work = Path(tempfile.mkdtemp(prefix="hxc-llm-precision-"))
    out: dict = {"decode": f"ms per output token after a {PROMPT_TOKENS}-token prompt, {DECODE_STEPS} tokens, batch 1, "
                           "local-task; medians of interleaved rounds",
                 "cores": os.cpu_count(), "models": {}}  # fmt: skip
    for name in args.models.split(","):
        source = save_model(name, work / name)
        record = build(source, work / f"{name}.hxc", args.group_size)
        record["decode_ms"] = {}
        for threads in (int(t) for t in args.threads.split(",")):
            run = subprocess.run([sys.executable, __file__, "--child", str(work / f"{name}.hxc"), str(threads), str(args.rounds)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            times = json.loads(run.stdout.strip().splitlines()[-1])
            med = {p: statistics.median(ts[1:]) for p, ts in times.items()}
            record["decode_ms"][f"{threads} thread{'s' if threads > 1 else ''}"] = {
                **{p: round(v, 3) for p, v in med.items()},
                **{f"{p}_speedup": round(med["fp32"] / med[p], 2) for p in ("int8", "int4")},
                **{f"{p}_speedup_vs_fp32_stack64": round(med["fp32-stack64"] / med[p], 2) for p in ("int8", "int4")},
            }
        out["models"][name] = record
        print(json.dumps({name: record}, indent=2), flush=True)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
