"""Which real architectures does hxc carry to every default target?

For each model of a fixed zoo (below: written down before measuring; a model that
fails stays in) this compiles `hxc compile hxc.examples.zoo:NAME --targets all
--allow-partial`, then runs every artifact this machine can run — CPU code on
local-task, SPIR-V on lavapipe — with `hxc verify --device ARTIFACT` in a child
process with a time limit (lavapipe can hang inside IREE), which compares the
artifact's outputs with PyTorch's (the golden sample). A model with dynamic
dimensions is also checked at every size of DYNAMIC_SIZES (`hxc verify --shapes`, every
dynamic dimension at that size; PyTorch's outputs computed from the bundle's program):
it matches only if it matches at all of them. CUDA, ROCm and aarch64 artifacts are
compiled (CUDA PTX also assembled by ptxas when it is installed) but there is no device
here to run them.

    python benchmarks/model_coverage.py [--only REGEX] [--targets all] [--timeout 600] [--jobs 2] [--resume]

Writes benchmarks/results/model_coverage.json after every model (`"complete": false`
until the whole zoo is done; `--resume` carries on from such a file, keeping its
models) and prints a table: per model and target, compiled / ran / matched, with the
failing operator for each miss.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The zoo: every architecture of tests/test_model_zoo.py, then more families.
ZOO: dict[str, str] = {
    # in today's model-zoo tests
    "bert": "BERT encoder (transformers)",
    "gpt2": "GPT-2 decoder (transformers)",
    "llama": "Llama decoder: RoPE, RMSNorm, GQA (transformers)",
    "t5_encoder": "T5 encoder: relative position buckets (transformers)",
    "vit": "ViT image encoder (transformers)",
    "whisper_encoder": "Whisper audio encoder: conv1d + transformer (transformers)",
    "lstm": "2-layer LSTM",
    "gru": "GRU",
    "cnn_f16": "small CNN in float16",
    "mlp_bf16": "MLP in bfloat16",
    # more families
    "resnet18_64": "ResNet-18 (batch norm, residuals), 64x64 input",
    "mobilenet": "MobileNetV2-style depthwise-separable CNN, ReLU6",
    "convnext": "ConvNeXt: depthwise 7x7, channel LayerNorm, GELU (transformers)",
    "swin": "Swin: shifted-window attention, relative position index (transformers)",
    "segformer": "SegFormer: efficient attention with spatial reduction (transformers)",
    "unet": "diffusion-style UNet block: GroupNorm, SiLU, nearest upsampling, skip",
    "clip_text": "CLIP text encoder: causal mask, argmax pooling (transformers)",
    "deberta": "DeBERTa-v2: disentangled attention, log-bucketed positions (transformers)",
    "bloom": "BLOOM decoder: ALiBi attention (transformers)",
    "qwen2": "Qwen2 decoder: GQA, biased QKV (transformers)",
    "mamba": "Mamba selective state-space model (transformers)",
    "wav2vec2": "wav2vec 2.0: conv feature extractor, grouped positional conv (transformers)",
    "torch_transformer": "torch.nn.TransformerEncoder with a padding mask",
    "recommender": "DLRM-style recommender: EmbeddingBag over int64 ids, dot interactions",
    "roll": "token shift: torch.roll along the features and the batch",
    "bf16_decoder_block": "bfloat16 decoder block: SDPA with an additive mask built in forward",
    # dynamic shapes, checked at every size of DYNAMIC_SIZES
    "prenorm_encoder": "pre-norm nn.TransformerEncoder, position table sliced to a dynamic length (issue 33)",
    "attention_pool": "attention pooling: softmax and mean over a dynamic sequence (not the last dimension)",
    "bert_dynamic": "BERT encoder with a dynamic sequence length (transformers)",
}
# Sizes every dynamic dimension is checked at besides the golden sample's: not powers of
# two, below and above 32 (IREE's SPIR-V code once went wrong from row 8 on).
DYNAMIC_SIZES = (7, 33, 100)
# Devices this machine has: CPU code runs on local-task, SPIR-V on lavapipe.
RUNNABLE_FAMILIES = ("cpu", "vulkan")


def cover(name: str, work: Path, timeout: float, jobs: int, targets: str = "all") -> dict:
    from hxc.build import build_bundle
    from hxc.errors import HxcError

    out = work / f"{name}.hxc"
    t0 = time.perf_counter()
    try:
        result = build_bundle(f"hxc.examples.zoo:{name}", out, targets, allow_partial=True, jobs=jobs)
    except HxcError as e:  # the model did not even export
        return {"model": name, "error": e.message, "targets": {}}
    cells = {}
    for art in result.manifest.artifacts:
        cells[art.id] = {"compiled": art.status == "ok", "error": art.error, "operator": art.operator,
                         "fallback": art.fallback, "verified": art.verified, "ran": None, "matched": None}  # fmt: skip
    shapes = dynamic_shapes(result.manifest.signature, DYNAMIC_SIZES)
    if result.written:
        for art in result.manifest.ok_artifacts:
            if art.family in RUNNABLE_FAMILIES and _runs_here(out, art.id):
                cells[art.id].update(_verify(out, art.id, timeout * (1 + len(shapes)), shapes))
    return {"model": name, "error": None, "targets": cells, "sizes": list(DYNAMIC_SIZES) if shapes else [],
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def dynamic_shapes(signature, sizes: tuple[int, ...]) -> list[str]:
    """`hxc verify --shapes` texts setting every dynamic dimension to each size in turn;
    none for a model without dynamic dimensions."""
    if not any(isinstance(d, str) for s in signature.inputs for d in s.shape):
        return []
    return [",".join(f"{s.name}=" + "x".join(str(n if isinstance(d, str) else d) for d in s.shape) for s in signature.inputs
                     if s.shape) for n in sizes]  # fmt: skip


def _runs_here(bundle: Path, artifact: str) -> bool:
    from hxc.manifests import read_manifest
    from hxc.runtime import probe_host, select

    sel = select(read_manifest(bundle), probe_host(), device=artifact)
    return any(c.artifact.id == artifact for c in sel.candidates)


def _verify(bundle: Path, artifact: str, timeout: float, shapes: list[str]) -> dict:
    argv = [sys.executable, "-m", "hxc.cli", "verify", str(bundle), "--device", artifact, "--json",
            *(a for s in shapes for a in ("--shapes", s))]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ran": False, "matched": None, "run_error": f"no result after {timeout:.0f}s"}
    try:
        results = [r for r in json.loads(proc.stdout)["results"] if r["artifact"] == artifact]
        assert results
    except (ValueError, KeyError, AssertionError):
        return {"ran": False, "matched": None, "run_error": proc.stderr.strip()[-300:]}
    if errors := [r["error"] for r in results if r["error"]]:
        return {"ran": False, "matched": None, "run_error": errors[0]}
    worst = [r["max_abs"] for r in results if r["max_abs"] is not None]
    return {"ran": True, "matched": all(r["ok"] for r in results), "max_abs": max(worst) if worst else float("inf"),
            "samples": {r["sample"]: r["ok"] for r in results}}  # fmt: skip


def cell(t: dict | None) -> str:
    if t is None:
        return "-"
    if not t["compiled"]:
        return f"✗ compile ({t['operator'] or 'error'})"
    if t["ran"] is None:
        return "compiled"
    if not t["ran"]:
        return "✗ run"
    if t["matched"]:
        return "✓ matched"
    failed = [k for k, ok in (t.get("samples") or {}).items() if not ok]
    return f"✗ mismatch ({t.get('max_abs', 0):.2g}" + (f" at {'; '.join(failed)})" if failed else ")")


def table(results: list[dict], targets: list[str]) -> str:
    lines = ["| model | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for r in results:
        if r["error"]:
            lines.append(f"| {r['model']} | " + " | ".join(["✗ export"] * len(targets)) + " |")
            continue
        lines.append(f"| {r['model']} | " + " | ".join(cell(r["targets"].get(t)) for t in targets) + " |")
    return "\n".join(lines)


def summarize(results: list[dict], targets: list[str]) -> dict:
    per_target = {}
    for t in targets:
        cells = [r["targets"].get(t) for r in results if not r["error"]]
        per_target[t] = {
            "compiled": sum(1 for c in cells if c and c["compiled"]),
            "ran": sum(1 for c in cells if c and c["ran"]),
            "matched": sum(1 for c in cells if c and c["matched"]),
        }
    cpu_ok = [r["model"] for r in results if not r["error"] and (r["targets"].get("cpu:host") or {}).get("matched")]
    everywhere = []
    for r in results:
        if r["model"] not in cpu_ok:
            continue
        ts = r["targets"]
        gpu_compiled = all(ts.get(t, {}).get("compiled") for t in targets if t.split(":")[0] in ("cuda", "rocm", "vulkan"))
        vulkan_matched = all(ts.get(t, {}).get("matched") for t in targets if t.startswith("vulkan:"))
        if gpu_compiled and vulkan_matched:
            everywhere.append(r["model"])
    return {"models": len(results), "per_target": per_target, "cpu_matched": cpu_ok,
            "cpu_matched_and_every_gpu_target": everywhere}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="models whose name matches this regular expression")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per artifact run")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="targets compiled at once")
    ap.add_argument("--resume", action="store_true", help="keep the models an unfinished results file holds")
    ap.add_argument("--targets", default="all",
                    help="targets to build (hxc compile --targets); other than all, results go to model_coverage_partial")  # fmt: skip
    args = ap.parse_args()
    from hxc.targets import resolve

    names = [n for n in ZOO if not args.only or re.search(args.only, n)]
    targets = [v.id for v in resolve(args.targets)]
    # model_coverage.json describes the whole zoo on every target; a run on some targets
    # is kept apart; a run of some models on every target is not recorded.
    record = "model_coverage_partial" if args.targets != "all" else None if args.only else "model_coverage"
    sys.path.insert(0, str(Path(__file__).parent))
    from _harness import RESULTS, save

    results: list[dict] = []
    if args.resume and record and (RESULTS / f"{record}.json").exists():
        previous = json.loads((RESULTS / f"{record}.json").read_text())
        if previous.get("targets") == targets:
            results = [r for r in previous["results"] if r["model"] in names]
    done = {r["model"] for r in results}
    t0 = time.perf_counter() - sum(r.get("seconds", 0) for r in results)

    def summary(complete: bool) -> dict:
        ordered = sorted(results, key=lambda r: names.index(r["model"]))
        return {"zoo": ZOO, "targets": targets, "complete": complete, **summarize(ordered, targets),
                "results": ordered, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="hxc-coverage-") as work:
        for i, name in enumerate(names):
            if name in done:
                continue
            r = cover(name, Path(work), args.timeout, args.jobs, args.targets)
            results.append(r)
            good = sum(1 for t in r["targets"].values() if t["matched"] or (t["compiled"] and t["ran"] is None))
            print(f"[{i + 1}/{len(names)}] {name}: {good}/{len(targets)} targets ok ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            if record:  # what ran so far
                save(record, summary(complete=False))
    s = summary(complete=True)
    print(table(s["results"], targets))
    gpu = [t for t in targets if t.split(":")[0] in ("cuda", "rocm", "vulkan")]
    print(f"\n{len(s['cpu_matched'])}/{s['models']} match PyTorch on cpu:host; "
          f"{len(s['cpu_matched_and_every_gpu_target'])} of those also compile for every GPU target built "
          f"({', '.join(gpu) or 'none'}) and match on lavapipe")  # fmt: skip
    if record:
        print(f"wrote {save(record, s)}", file=sys.stderr)


if __name__ == "__main__":
    main()
