"""`hxc serve` for a language model under load, through the real `openai` client on
loopback: continuous batching against hxc without it, and (if installed) llama.cpp's
OpenAI-compatible server, on the same model and machine, in one run.

    PYTHONPATH=. python benchmarks/llm_serve.py                      # a 7M-parameter Llama: minutes on 2 cores
    PYTHONPATH=. python benchmarks/llm_serve.py --size 100m --rates 0.25,0.5,1 --requests 24
    PYTHONPATH=. python benchmarks/llm_serve.py --llama-cpp          # adds llama-cpp-python[server] (F32 GGUF)

The model is a random-weight Llama (nothing downloaded) with a word-level tokenizer
whose every token is a whole word, so each generated token is one streamed chunk and
the client sees every inter-token gap. It is compiled twice with `hxc compile`'s own
path (cpu:host): with `--slots` batch slots, and with one (the baseline "continuous
batching off": one sequence at a time per device, its decode no wider than one row).

Phases, per contender (a server process each, started in turn):
1. **sequential**: `--sequential` requests one at a time; the p50 inter-token latency
   against `generate`'s time per output token in this process on the same bundle: the
   server's overhead per streamed token (hxc only).
2. **load**: at each request rate of `--rates` (Poisson arrivals), `--requests`
   streamed completions of a `--prompt-tokens` prompt (random token ids) and exactly
   `--output-tokens` tokens (`ignore_eos`), from concurrent asyncio tasks of one
   AsyncOpenAI client: TTFT and ITL p50/p99, TPOT, output tokens/s, and goodput, the
   requests per second that met both `--slo-ttft-ms` and `--slo-tpot-ms`.
3. **long prompt** (hxc batched, on a bundle of its own whose context holds the
   prompt): one stream runs alone, then again while a `--long-prompt`-token prompt
   arrives: the running stream's ITL p99 with it against its p50 without (chunked
   prefill at work).

Writes benchmarks/results/llm_serve.json (llm_serve_100m.json for --size 100m). The client shares the machine's cores with
the servers: on this 2-core VM, everything is one loopback system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

SIZES = {  # layers, hidden, heads, kv heads, intermediate, vocab
    "7m": (4, 256, 8, 4, 688, 8192),
    "100m": (12, 768, 12, 4, 2048, 8192),  # ~98 M parameters
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="7m")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-context", type=int, default=256, help="the context of the bundles the load runs on")
    ap.add_argument("--rates", default="0.5,1,2,4", help="request rates (requests/s), comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=10)
    ap.add_argument("--long-prompt", type=int, default=2000, help="0: skip phase 3 (it compiles a bundle of its own "
                    "with room for this prompt)")
    ap.add_argument("--long-prefill-chunk", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                    help="prefill chunk sizes of phase 3's bundle, e.g. 8,128 (hxc compile --prefill-chunk; default: hxc's, 32)")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=200.0)
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's server (needs llama-cpp-python[server], gguf)")
    ap.add_argument("--work", type=Path, default=None, help="keep the models here (and reuse them)")
    ap.add_argument("--only-long-prompt", type=int, default=0, metavar="ROUNDS",
                    help="run phase 3 alone, this many times (medians), into llm_serve[_SIZE]_long_prompt.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hxc-llm-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = save_model(work / f"llama-{args.size}", args.size)
    if args.only_long_prompt:
        only_long_prompt(args, work, hf_dir)
        return
    batched = compile_bundle(hf_dir, work / f"llama-{args.size}-s{args.slots}.hxc", args.slots, args.max_context)
    single = compile_bundle(hf_dir, work / f"llama-{args.size}-s1.hxc", 1, args.max_context)
    long_bundle = long_bundle_of(args, work, hf_dir) if args.long_prompt else None
    rates = [float(r) for r in args.rates.split(",")]
    vocab = SIZES[args.size][5]
    results: dict = {"config": {**vars(args), "work": str(work)}, "contenders": {}}

    contenders = {"hxc": ("hxc", batched), "hxc_no_batching": ("hxc", single)}
    if args.llama_cpp:
        contenders["llama_cpp"] = ("llama_cpp", hf_dir)
    for name, (kind, model) in contenders.items():
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            server_of = HxcServer(model) if kind == "hxc" else LlamaCppServer(model, args.slots, args.max_context, work)
            server = server_of.__enter__()
        except Exception as e:  # noqa: BLE001  (a peer that cannot start is reported, the others kept)
            results["contenders"][name] = {"skipped": f"{type(e).__name__}: {e}"}
            print(f"  skipped {name}: {e}", file=sys.stderr, flush=True)
            continue
        try:
            out: dict = {}
            if kind == "hxc":
                out["sequential"] = asyncio.run(sequential(server, model, args, vocab))
            out["load"] = {}
            for rate in rates:
                out["load"][str(rate)] = asyncio.run(load(server, rate, args, vocab))
                print(f"  rate {rate:g}/s: {json.dumps(out['load'][str(rate)]['summary'])}", file=sys.stderr, flush=True)
            results["contenders"][name] = out
        finally:
            server_of.__exit__(None, None, None)
    if long_bundle is not None:
        with HxcServer(long_bundle) as server:
            results["contenders"]["hxc"]["long_prompt"] = asyncio.run(long_prompt(server, args, vocab))
            print(f"  long prompt: {json.dumps(results['contenders']['hxc']['long_prompt'])}", file=sys.stderr, flush=True)
    results["summary"] = summarise(results["contenders"], rates)
    results["load_average_1min_at_end"] = os.getloadavg()[0]
    path = save("llm_serve" if args.size == "7m" else f"llm_serve_{args.size}", results)
    print(json.dumps(results["summary"], indent=2))
    print(f"wrote {path}", file=sys.stderr)


# --- the model ------------------------------------------------------------------------------------


def save_model(directory: Path, size: str) -> Path:
    """A random-weight Llama and a word-level tokenizer (token k is the word "wk")."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    layers, hidden, heads, kv_heads, inter, vocab = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    words = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False)
    model.save_pretrained(str(directory), safe_serialization=True)
    fast.save_pretrained(str(directory))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f} M parameters", file=sys.stderr)
    return directory


def compile_bundle(hf_dir: Path, out: Path, slots: int, max_context: int, prefill_chunk: tuple[int, ...] | None = None) -> Path:
    if (out / "manifest.json").exists():
        return out
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    t0 = time.perf_counter()
    result = build_bundle(str(hf_dir), out, "cpu:host", options=ImportOptions(max_context=max_context, slots=slots,
                                                                             prefill_chunk=prefill_chunk))
    assert result.written, [r.error for r in result.failed]
    print(f"compiled {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


# --- servers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A server process on a loopback port, serving the OpenAI API under /v1; the
    subclass starts it (`__enter__`); SIGTERM stops it within `stop_s`."""

    port: int
    process: subprocess.Popen
    stop_s = 60

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(self.stop_s)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class HxcServer(_Server):
    stop_s = 120  # it drains the streams in flight first

    def __init__(self, bundle: Path, devices: str = "cpu", *options: str, max_queue: int = 4096) -> None:
        self.port = free_port()
        self.model = "llm"
        self.args = [sys.executable, "-m", "hxc.cli", "serve", f"llm={bundle}", "--devices", devices, *options,
                     "--port", str(self.port), "--json", "--max-queue", str(max_queue)]  # fmt: skip

    def __enter__(self) -> HxcServer:
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        for line in self.process.stdout:  # type: ignore[union-attr]
            if json.loads(line)["event"] == "ready":
                break
        return self


LLAMA_SERVER = Path(os.environ.get("HXC_LLAMA_SERVER", "/work/.cache/llama-server-build/bin/llama-server"))


class LlamaCppServer(_Server):
    """llama.cpp's own OpenAI-compatible server (`llama-server`, built by `make bench-deps`:
    llama-cpp-python's Python server has no parallel slots) on the same weights as an F32
    GGUF, with the same thread count, `-np` = hxc's slots and its continuous batching on,
    each slot with hxc's context."""

    def __init__(self, hf_dir: Path, slots: int, max_context: int, work: Path) -> None:
        if not os.access(LLAMA_SERVER, os.X_OK):
            raise RuntimeError(f"no llama-server at {LLAMA_SERVER}: run `make bench-deps` or set HXC_LLAMA_SERVER")
        self.port = free_port()
        self.model = "llm"
        self.gguf = to_gguf(hf_dir, work / f"{hf_dir.name}-gguf")
        threads = len(os.sched_getaffinity(0))
        self.args = [str(LLAMA_SERVER), "--model", str(self.gguf), "--alias", "llm", "--host", "127.0.0.1",
                     "--port", str(self.port), "--threads", str(threads), "--threads-batch", str(threads),
                     "--ctx-size", str(max_context * slots), "--parallel", str(slots), "--cont-batching"]  # fmt: skip

    def __enter__(self) -> LlamaCppServer:
        import urllib.request

        self.log = self.gguf.parent / "llama-server.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # /health is 503 while the model loads, 200 when ready
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.process.returncode}): {self.log.read_text()[-500:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"llama-server was not ready in 120 s: {self.log.read_text()[-500:]}")


def to_gguf(hf_dir: Path, out: Path) -> Path:
    """The Hugging Face directory as an F32 GGUF, by llama.cpp's own converter, the way
    benchmarks/llm.py makes its files (from llama-cpp-python's source package)."""
    import shutil

    from llm import make_gguf, write_sentencepiece

    # The converter does not know this model's word-level tokenizer: it gets the same
    # weights with a SentencePiece vocabulary of as many words (the load sends token ids;
    # every token streams as text, one event each, as from hxc).
    weights = out / "hf"
    if not (out / "model-F32.gguf").is_file():
        weights.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, weights / name)
        write_sentencepiece(weights, words=json.loads((hf_dir / "config.json").read_text())["vocab_size"])
    return make_gguf(weights, out, ["F32"])["F32"]


# --- the load -------------------------------------------------------------------------------------


async def stream_one(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: TTFT, the gaps between chunks, e2e (seconds)."""
    t0 = time.perf_counter()
    marks = []
    chunks = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    tokens = 0
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].text:
            marks.append(time.perf_counter())
            tokens += 1
    end = time.perf_counter()
    if not marks:
        return {"ok": False}
    return {"ok": True, "ttft": marks[0] - t0, "itl": [b - a for a, b in zip(marks, marks[1:])], "e2e": end - t0,
            "tokens": tokens, "tpot": (marks[-1] - marks[0]) / max(1, len(marks) - 1)}  # fmt: skip


def prompt_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(2, vocab) for _ in range(n)]


async def load(server, rate: float, args, vocab: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
    rng = random.Random(int(rate * 1000))
    tasks = []
    t0 = time.perf_counter()
    for _ in range(args.requests):
        tasks.append(asyncio.create_task(stream_one(client, server.model, prompt_ids(rng, args.prompt_tokens, vocab),
                                                    args.output_tokens)))  # fmt: skip
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if isinstance(r, dict) and r.get("ok")]
    slo_ttft, slo_tpot = args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000
    good = [r for r in ok if r["ttft"] <= slo_ttft and r["tpot"] <= slo_tpot]
    itl = [x for r in ok for x in r["itl"]]
    summary = {
        "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
        "ttft_p50_ms": pct(ok, "ttft", 50), "ttft_p99_ms": pct(ok, "ttft", 99),
        "itl_p50_ms": quantile(itl, 50) * 1000 if itl else None, "itl_p99_ms": quantile(itl, 99) * 1000 if itl else None,
        "tpot_p50_ms": pct(ok, "tpot", 50), "tpot_p99_ms": pct(ok, "tpot", 99),
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall, "goodput_rps": len(good) / wall,
        "met_slo": len(good),
    }  # fmt: skip
    return {"summary": summary}


async def sequential(server, bundle: Path, args, vocab: int) -> dict:
    """One request at a time: the server's p50 ITL against in-process generate's TPOT."""
    import openai

    import hxc.runtime

    rng = random.Random(1)
    prompts = [prompt_ids(rng, args.prompt_tokens, vocab) for _ in range(args.sequential)]
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
    model = hxc.runtime.load(bundle, device="cpu:host")  # the same artifact the server's worker runs
    served, local = [], []
    for p in prompts:  # interleaved: in process, then through the server
        r = model.generate(p, args.output_tokens, stop_token_ids=[]).result()
        local.append(r.tpot_ms)
        s = await stream_one(client, server.model, p, args.output_tokens)
        served.extend(s["itl"])
    await client.close()
    del model
    in_process = statistics.median(local)
    itl = quantile(served, 50) * 1000
    return {"in_process_tpot_p50_ms": in_process, "server_itl_p50_ms": itl, "overhead_per_token_ms": itl - in_process}


async def long_prompt(server, args, vocab: int) -> dict:
    """A running stream's ITL alone, then while a long prompt is prefilled beside it."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
    rng = random.Random(2)
    n = args.output_tokens * 2
    alone = await stream_one(client, server.model, prompt_ids(rng, args.prompt_tokens, vocab), n)
    running = asyncio.create_task(stream_one(client, server.model, prompt_ids(rng, args.prompt_tokens, vocab), n))
    await asyncio.sleep(alone["ttft"] + 8 * statistics.median(alone["itl"]))  # the stream is running
    long = asyncio.create_task(stream_one(client, server.model, prompt_ids(rng, args.long_prompt, vocab), 8))
    beside, big = await running, await long
    await client.close()
    p50_alone = quantile(alone["itl"], 50) * 1000
    p99_beside = quantile(beside["itl"], 99) * 1000
    return {"itl_p50_alone_ms": p50_alone, "itl_p99_beside_long_prompt_ms": p99_beside, "ratio": p99_beside / p50_alone,
            "long_prompt_ttft_ms": big["ttft"] * 1000, "long_prompt_tokens": args.long_prompt}  # fmt: skip


def long_bundle_of(args, work: Path, hf_dir: Path) -> Path:
    context = args.long_prompt + 2 * args.output_tokens + args.prompt_tokens
    chunk = f"-p{'-'.join(map(str, args.long_prefill_chunk))}" if args.long_prefill_chunk else ""
    return compile_bundle(hf_dir, work / f"llama-{args.size}-s{args.slots}-c{context}{chunk}.hxc", args.slots, context,
                          args.long_prefill_chunk)  # fmt: skip


def only_long_prompt(args, work: Path, hf_dir: Path) -> None:
    """Phase 3 alone, `--only-long-prompt` times on one server: each figure's median."""
    runs = []
    with HxcServer(long_bundle_of(args, work, hf_dir)) as server:
        for r in range(args.only_long_prompt):
            runs.append(asyncio.run(long_prompt(server, args, SIZES[args.size][5])))
            print(f"  round {r + 1}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    summary = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    name = "llm_serve" if args.size == "7m" else f"llm_serve_{args.size}"
    path = save(f"{name}_long_prompt", {"config": {**vars(args), "work": str(work)}, "runs": runs, "summary": summary,
                                        "load_average_1min_at_end": os.getloadavg()[0]})  # fmt: skip
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", file=sys.stderr)


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def pct(rows: list[dict], key: str, q: float) -> float | None:
    values = [r[key] for r in rows]
    return quantile(values, q) * 1000 if values else None


def summarise(contenders: dict, rates: list[float]) -> dict:
    out: dict = {}
    for name, data in contenders.items():
        if "skipped" in data:
            out[name] = data
            continue
        out[name] = {"best_goodput_rps": max(d["summary"]["goodput_rps"] for d in data["load"].values()),
                     "best_output_tokens_per_s": max(d["summary"]["output_tokens_per_s"] for d in data["load"].values())}  # fmt: skip
        for key in ("sequential", "long_prompt"):
            if key in data:
                out[name][key] = data[key]
    base = out.get("hxc_no_batching", {}).get("best_goodput_rps")
    if base:
        out["goodput_vs_no_batching"] = out["hxc"]["best_goodput_rps"] / base
    if out.get("llama_cpp", {}).get("best_goodput_rps"):
        out["goodput_vs_llama_cpp"] = out["hxc"]["best_goodput_rps"] / out["llama_cpp"]["best_goodput_rps"]
    return out


if __name__ == "__main__":
    main()
