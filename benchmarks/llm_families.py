"""Language-model family coverage (issue 26): every family hxc compiles
(`SUPPORTED_FAMILIES`), as the tiny random-weight model of `hxc.examples.llm`, built
through hxc's pipeline for cpu:host (llvm-cpu) and vulkan:spirv, and checked on
local-task and lavapipe against Hugging Face:

- free-running greedy tokens: `hxc generate --json --ignore-eos` (a child process per
  device: lavapipe never runs in this one) against `generate(do_sample=False)` on the
  same prompt: equal?, the first position that differs;
- logits: `hxc verify` (each artifact in its own worker) runs the bundle's greedy
  reference (a prompt of two prefill chunks, 16 steps, each fed Hugging Face's previous
  token) and gives the largest |logit difference| from Hugging Face's logits.

Also recorded: how distinct Hugging Face's tokens are and their smallest top-1/top-2
logit gap (a check against a model that repeats one token, or ties, says little).

    PYTHONPATH=. python benchmarks/llm_families.py                      # all families
    PYTHONPATH=. python benchmarks/llm_families.py --families qwen2 phi3  # just these; other rows kept

Writes benchmarks/results/llm_families.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import RESULTS, save

PROMPT = "The quick brown fox jumps over the lazy dog. Every device runs the same bundle, token for token. Hello!"
TARGETS = (("cpu:host", "local-task"), ("vulkan:spirv", "vulkan"))
MAX_CONTEXT = 96


def reference(family: str, new_tokens: int) -> dict:
    """Hugging Face's greedy tokens after PROMPT, and how much they say."""
    import torch

    from hxc.examples.llm import tiny_lm

    model, tokenizer = tiny_lm(family)
    model.generation_config.eos_token_id = None  # random weights: the full length
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    top2 = torch.stack(out.logits)[:, 0].topk(2).values
    tokens = out.sequences[0, len(ids):].tolist()
    return {"model_class": type(model).__name__, "prompt_token_ids": ids, "token_ids": tokens,
            "distinct_tokens": len(set(tokens)), "min_top2_gap": round(float((top2[:, 0] - top2[:, 1]).min()), 6)}  # fmt: skip


def generate(bundle: Path, device: str, new_tokens: int) -> dict:
    argv = [sys.executable, "-m", "hxc.cli", "generate", str(bundle), PROMPT, "-n", str(new_tokens), "--device", device,
            "--ignore-eos", "--json"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.stdout)


def family_rows(family: str, new_tokens: int, work: Path) -> list[dict]:
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions
    from hxc.verify import verify_bundle

    print(f"{family}: building", file=sys.stderr, flush=True)
    t = time.perf_counter()
    built = build_bundle(f"hxc.examples.llm:tiny_{family}", work / f"{family}.hxc", ",".join(a for a, _ in TARGETS),
                         use_cache=False, options=ImportOptions(max_context=MAX_CONTEXT))  # fmt: skip
    compile_s = round(time.perf_counter() - t, 1)
    ref = reference(family, new_tokens)
    if not built.written:
        return [{"family": family, "target": a, "device": d, "error": "; ".join(str(r.error) for r in built.failed)[:300]}
                for a, d in TARGETS]  # fmt: skip
    print(f"{family}: verifying", file=sys.stderr, flush=True)
    checked = {r.artifact: r for r in verify_bundle(built.output).results}
    rows = []
    for artifact, device in TARGETS:
        print(f"{family}: generating on {device}", file=sys.stderr, flush=True)
        got = generate(built.output, device, new_tokens)
        tokens = got.get("token_ids")
        diverge = None
        if tokens is not None and tokens != ref["token_ids"]:
            diverge = next((i for i, (a, b) in enumerate(zip(tokens, ref["token_ids"])) if a != b),
                           min(len(tokens), len(ref["token_ids"])))  # fmt: skip
        v = checked.get(artifact)
        rows.append({
            "family": family, "model_class": ref["model_class"], "target": artifact, "device": got.get("device", device),
            "artifact_run": got.get("artifact"), "tokens": len(ref["token_ids"]),
            "tokens_equal": tokens == ref["token_ids"], "first_divergence": diverge,
            "max_abs_logit_diff": None if v is None or v.max_abs is None else float(f"{v.max_abs:.3g}"),
            "verify_ok": None if v is None else v.ok, "verify_error": None if v is None else v.error,
            "hf_distinct_tokens": ref["distinct_tokens"], "hf_min_top2_gap": ref["min_top2_gap"],
            "compile_s": compile_s, "error": got.get("error"),
        })  # fmt: skip
    return rows


def main() -> None:
    from hxc.compiler.causal_lm import SUPPORTED_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=SUPPORTED_FAMILIES, default=list(SUPPORTED_FAMILIES))
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hxc-llm-families-"))
    rows = [row for family in args.families for row in family_rows(family, args.new_tokens, work)]
    previous = RESULTS / "llm_families.json"
    if previous.is_file() and set(args.families) != set(SUPPORTED_FAMILIES):
        kept = [r for r in json.loads(previous.read_text())["rows"] if r["family"] not in args.families]
        rows = sorted(kept + rows, key=lambda r: (SUPPORTED_FAMILIES.index(r["family"]), r["target"]))
    import iree.compiler
    import torch
    import transformers

    path = save("llm_families", {"prompt": PROMPT, "max_context": MAX_CONTEXT, "new_tokens": args.new_tokens,
                                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                              "iree": iree.compiler.version.VERSION},
                                 "rows": rows})  # fmt: skip
    for r in rows:
        print(f"{r['family']:8} {r['target']:13} {str(r['device'])[:28]:28} equal={r.get('tokens_equal')} "
              f"diverge={r.get('first_divergence')} max|dlogit|={r.get('max_abs_logit_diff')} {r.get('error') or ''}")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
