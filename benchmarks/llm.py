"""Language models against llama.cpp (issue 26, item 5): decode tokens/s at batch 1 and
time to first token of a 512-token prompt, hxc's CPU artifact against Hugging Face
eager `generate`, Hugging Face with `torch.compile` and a static cache, and llama.cpp
(`llama-cpp-python`) at F32, Q8_0 and Q4_0, on the same random weights, in one run,
interleaved, medians; each row also as a fraction of the memory-bandwidth roofline.

    make bench-deps                                   # llama-cpp-python (built once, cached), gguf, sentencepiece
    PYTHONPATH=. python benchmarks/llm.py             # Llama, 12 layers, hidden 768, vocab 32000 (~125 M parameters)
    PYTHONPATH=. python benchmarks/llm.py --precisions fp32,int8,int4 --rounds 7
    PYTHONPATH=. python benchmarks/llm.py --layers 2 --hidden 256 --rounds 1   # a quick check of the pipeline

The model: a random-weight `LlamaForCausalLM` from a config (nothing is downloaded),
saved as a Hugging Face directory (safetensors) with a small SentencePiece model as its
`tokenizer.model` (llama.cpp's converter needs a vocabulary; the timings never touch a
tokenizer). From that one directory: `hxc compile`'s own path (cpu:host, the selected
artifact on local-task, one per precision asked for that this hxc can build); the
GGUF files, through `convert_hf_to_gguf.py` from llama-cpp-python's source package
(F32) and `llama_model_quantize` (Q8_0, Q4_0 from the F32 file).

Rows, each in a worker process of its own (one runtime per process, as `hxc bench`
measures; only one computes at a time), all with the same threads (`--threads`,
default one per core; `--threads 1,2` runs every row again at each): hxc with
`--task_topology_max_group_count` (local-task, the selected artifact's driver, also at
1 thread); torch with `set_num_threads` (an unpinned torch collapses under load);
llama.cpp with n_threads and n_threads_batch. On this shared 2-core machine the 2-thread
runs are at the mercy of other processes: runtimes whose threads spin at barriers
(llama.cpp's OpenMP build, torch) slow down many times over when a core is taken away
(llama.cpp F32 alone, 125 M parameters: 16-25 tokens/s at 1 thread, 2-3 at 2).
- hxc: `hxc.runtime.load(bundle).generate(ids, ...)` (its `ttft_ms`, `tpot_ms`);
- HF eager: `model.generate(ids, do_sample=False)` with its DynamicCache;
- HF compile: `model.forward = torch.compile(model.forward)` and `generate` with a
  StaticCache of the same context (Hugging Face's recipe); skipped, with the reason, if
  it fails;
- llama.cpp: `Llama.eval(ids)` then argmax of the last logits (what `generate` does
  with greedy sampling), n_ctx the same context, its defaults otherwise (an f16 KV
  cache: the F32 file's logits differ from Hugging Face's by ~3e-4, so its greedy
  tokens may part from theirs after a near tie; hxc's cache is f32).

What is timed, on token ids (no tokenizer in the timed region):
- TTFT: the prompt's ids in -> its first token chosen (Hugging Face: from the
  `generate` call to the streamer's first token);
- decode: 64 greedy tokens after a 32-token prompt, (last - first) / 63 per token, as
  tokens/s at batch 1.

Roofline: a decode step reads every weight once (the input embedding only one row), so
tokens/s cannot exceed copy bandwidth / weight bytes read per token. The bandwidth is
measured in the same run, between rounds: numpy copies by 2 threads of buffers far
larger than the caches (STREAM's copy: bytes read + bytes written, per second). Weight
bytes per token are counted from each row's own files: the safetensors for Hugging
Face, the GGUF tensors for llama.cpp, the bundle's parameter archive for hxc.

Each round runs every row once per measure, in turn (the order rotating), so load on
this shared machine falls on all of them alike; the first round warms up (compiles,
caches) and is dropped. Results: benchmarks/results/llm.json.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import RESULTS, save  # noqa: E402

DECODE_PROMPT, DECODE_STEPS = 32, 64
TTFT_PROMPT = 512
# Which llama.cpp file each hxc precision is compared with. Q4_0 is reported beside
# int4 but not claimed as like for like (its own block format and scales).
GGUF_OF = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
LIKE_FOR_LIKE = {"fp32", "int8"}
WHEELS = Path(os.environ.get("HXC_WHEELS", "/work/.cache/wheels"))  # where `make bench-deps` keeps the sdist and wheel


# --- the model, its bundle and its GGUF files --------------------------------------------


def make_model(out: Path, layers: int, hidden: int, vocab: int, context: int, seed: int = 0) -> dict:
    """A random-weight Llama saved as a Hugging Face directory (config, safetensors) with
    a SentencePiece `tokenizer.model` for llama.cpp's converter; its shape as a dict."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    shape = {"layers": layers, "hidden": hidden, "intermediate": int(hidden * 8 / 3) // 64 * 64, "heads": heads,
             "kv_heads": max(1, heads // 3), "vocab": vocab, "context": context, "seed": seed}  # fmt: skip
    if (out / "shape.json").is_file() and json.loads((out / "shape.json").read_text()) == shape:
        return shape  # made by an earlier run with the same shape
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=shape["intermediate"],
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=max(2048, context), bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(str(out), safe_serialization=True)
    write_sentencepiece(out)
    (out / "shape.json").write_text(json.dumps(shape))
    return shape


def write_sentencepiece(out: Path, words: int | None = None) -> None:
    """A SentencePiece vocabulary (unk, <s>, </s> at 0-2 as Llama's) as `tokenizer.model`,
    the kind llama.cpp's converter reads: a small one it pads to vocab_size (the rows time
    token ids, so the words do not matter), or with `words` that many pieces, each a word
    (a server then streams text for every token id, as it would for a real vocabulary)."""
    import random

    import sentencepiece as spm

    sentences = ["The quick brown fox jumps over the lazy dog.", "Every device runs the same bundle, token for token."] * 50
    kind, size = "bpe", 64
    if words:
        names = [f"w{i}" for i in range(3, words)]
        rng = random.Random(0)
        sentences = [" ".join(rng.sample(names, 20)) for _ in range(3000)] + [" ".join(names[i:i + 50]) for i in range(0, len(names), 50)]
        kind, size = "word", words
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=size,
                                   hard_vocab_limit=False, model_type=kind, unk_id=0, bos_id=1, eos_id=2,
                                   minloglevel=2)  # fmt: skip
    (out / "tokenizer.model").write_bytes(model.getvalue())


def build_hxc(model_dir: Path, out: Path, precisions: list[str], context: int) -> tuple[dict[str, str], list[str], float]:
    """The bundle (cpu:host, each precision this hxc can build): {precision: artifact
    id}, notes on the precisions it could not, compile seconds."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions
    from hxc.dtypes import PRECISIONS
    from hxc.manifests import read_manifest

    notes = [f"hxc {p}: this hxc has no {p} precision (`hxc compile --precision` takes {', '.join(PRECISIONS)})"
             for p in precisions if p not in PRECISIONS]  # fmt: skip
    wanted = [p for p in precisions if p in PRECISIONS]
    t = time.perf_counter()
    if not (out / "manifest.json").is_file() or (out / "manifest.json").stat().st_mtime < (model_dir / "shape.json").stat().st_mtime:
        built = build_bundle(str(model_dir), out, "cpu:host", options=ImportOptions(max_context=context), precisions=wanted)
        notes += [f"hxc {f.precision}: {f.error}" for f in built.failed]
        notes += [f"hxc {s.precision}: {s.reason}" for s in built.skipped]
    seconds = time.perf_counter() - t  # 0 when an earlier run's bundle of the same model was reused
    manifest = read_manifest(out)
    ids = {a.precision: a.id for a in manifest.ok_artifacts if a.family == "cpu"}
    notes += [f"hxc {p}: no artifact was built" for p in wanted if p not in ids]
    return {p: ids[p] for p in wanted if p in ids}, notes, seconds


def llama_cpp_source(version: str) -> Path:
    """llama.cpp's source inside llama-cpp-python's sdist of `version` (where `make
    bench-deps` left it, else downloaded by pip), extracted once."""
    sdist = WHEELS / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(WHEELS),
                        f"llama-cpp-python=={version}"], check=True, capture_output=True)  # fmt: skip
    src = WHEELS / f"llama_cpp_python-{version}"
    if not (src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(WHEELS, filter="data")
    return src / "vendor" / "llama.cpp"


def make_gguf(model_dir: Path, work: Path, kinds: list[str]) -> dict[str, Path]:
    """The model as GGUF: F32 by llama.cpp's converter, the others quantised from it by
    llama.cpp itself (`llama_model_quantize`, what `llama-quantize` runs)."""
    import llama_cpp

    out = {"F32": work / "model-F32.gguf"}
    if not out["F32"].is_file():
        converter = llama_cpp_source(llama_cpp.__version__) / "convert_hf_to_gguf.py"
        subprocess.run([sys.executable, str(converter), str(model_dir), "--outtype", "f32", "--outfile", str(out["F32"])],
                       check=True, capture_output=True)  # fmt: skip
    for kind in kinds:
        if kind == "F32":
            continue
        path = out[kind] = work / f"model-{kind}.gguf"
        if path.is_file():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(out["F32"]).encode(), str(path).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed")
    return out


# --- weight bytes read per decoded token ------------------------------------------------


def _is_embedding(name: str) -> bool:
    # The input embedding table: a token reads one row of it (the output head is separate: untied).
    return "embed_tokens" in name or name.startswith("token_embd")


def bytes_per_token_safetensors(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        for name in f.keys():
            t = f.get_slice(name)
            n = int(np.prod(t.get_shape())) * 4  # float32
            total += n // t.get_shape()[0] if _is_embedding(name) else n
    return total


def bytes_per_token_gguf(path: Path) -> int:
    from gguf import GGUFReader

    total = 0
    for t in GGUFReader(str(path)).tensors:
        n = int(t.n_bytes)
        total += n // int(t.shape[-1]) if _is_embedding(t.name) else n  # GGUF shapes are innermost first
    return total


def bytes_per_token_irpa(path: Path) -> int:
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(path))
    total = 0
    for name, entry in index.items():
        if _is_embedding(name):
            shape = json.loads(entry.metadata.split(b":", 1)[1]).get("shape", [1]) if entry.metadata else [1]
            total += entry.length // max(int(shape[0]), 1)
        else:
            total += entry.length
    return total


def copy_bandwidth(threads: int = 2, mib_per_thread: int = 512, repeats: int = 3) -> float:
    """Bytes per second that `threads` numpy copies move (read + written, STREAM's copy
    convention), each of a buffer far larger than the caches; the best of `repeats`."""
    n = mib_per_thread * 2**20 // 8
    src = [np.ones(n) for _ in range(threads)]
    dst = [np.zeros(n) for _ in range(threads)]
    for d in dst:
        d[::512] = 1.0  # touch every page: the timed copies take no page faults
    best = 0.0
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)

        def copy(i: int) -> None:
            barrier.wait()
            np.copyto(dst[i], src[i])  # numpy releases the GIL for the copy

        workers = [threading.Thread(target=copy, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        barrier.wait()
        t = time.perf_counter()
        for w in workers:
            w.join()
        best = max(best, 2 * threads * n * 8 / (time.perf_counter() - t))
    return best


# --- the rows, each in its own process --------------------------------------------------


@dataclass
class Row:
    name: str  # hxc fp32, HF eager, llama.cpp Q8_0 ...
    kind: str  # hxc | hf-eager | hf-compile | llama.cpp
    precision: str  # fp32 | int8 | int4: what it is compared as
    spec: dict  # what the worker loads
    bytes_per_token: int
    label: str = ""
    samples: dict[str, dict[int, float]] = field(default_factory=dict)  # measure -> round -> value
    tokens: list[int] = field(default_factory=list)  # its greedy decode tokens (for the agreement check)
    skipped: str | None = None


class Worker:
    """A row's worker process: loads its runtime once, then answers measurements."""

    def __init__(self, row: Row, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(row.kind, row.spec, threads, child), daemon=True)
        self.process.start()
        child.close()

    def ask(self, *message: Any, timeout: float = 1800.0) -> Any:
        self.conn.send(message)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no answer in {timeout:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def _serve(kind: str, spec: dict, threads: int, conn: Any) -> None:
    """A worker's loop: ("ttft", ids) -> ms; ("decode", ids, steps) -> (tokens/s, tokens)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        runner = {"hxc": HxcRunner, "hf-eager": HFRunner, "hf-compile": HFRunner, "llama.cpp": LlamaCppRunner}[kind](
            spec, threads)  # fmt: skip
        conn.send(("ok", runner.label))
    except Exception as e:  # noqa: BLE001 - one line back to the parent, which skips the row
        conn.send(("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        try:
            value = runner.ttft_ms(message[1]) if message[0] == "ttft" else runner.decode(message[1], message[2])
            conn.send(("ok", value))
        except Exception as e:  # noqa: BLE001
            conn.send(("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


class HxcRunner:
    def __init__(self, spec: dict, threads: int) -> None:
        import iree.runtime as rt

        # Before the first local-task device: its workers, as many as torch's and llama.cpp's threads.
        rt.flags.parse_flags(f"--task_topology_max_group_count={threads}")
        import hxc.runtime

        # fp32: the loader's own choice on local-task (fp32 only); another precision: its artifact, by id.
        allow = {} if spec.get("precision", "fp32") == "fp32" else {"precision": spec["precision"]}
        self.model = hxc.runtime.load(spec["bundle"], device=spec["device"], strict=True, **allow)
        self.state = self.model.new_state()
        self.label = f"{self.model.artifact.id} on {self.model.device.driver}"

    def ttft_ms(self, ids: list[int]) -> float:
        return self.model.generate(ids, 1, stop_token_ids=[], state=self.state).result().ttft_ms

    def decode(self, ids: list[int], steps: int) -> tuple[float, list[int]]:
        r = self.model.generate(ids, steps, stop_token_ids=[], state=self.state).result()
        return 1000.0 / r.tpot_ms, list(r.token_ids)


class HFRunner:
    """Hugging Face `generate`, greedy, eager (DynamicCache) or compiled (StaticCache)."""

    def __init__(self, spec: dict, threads: int) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # never stop early: every row makes the same count
        self.model.generation_config.pad_token_id = 0
        self.context = spec["context"]
        self.cache_argument = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
        self.compiled = spec["compile"]
        if self.compiled:
            self.model.forward = torch.compile(self.model.forward, fullgraph=True)
        self.label = f"transformers, torch {torch.__version__}" + (", torch.compile + StaticCache" if self.compiled else "")

    def _generate(self, ids: list[int], new: int) -> tuple[float, list[float], list[int]]:
        from transformers import StaticCache
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.prompt = True

            def put(self, value: Any) -> None:
                if self.prompt:  # generate first puts the prompt
                    self.prompt = False
                    return
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        clock = Clock()
        extra = {}
        if self.compiled:  # transformers 5 names the argument `cache` (4.x: past_key_values)
            cache = StaticCache(config=self.model.config, max_cache_len=self.context)
            extra = {"cache" if self.cache_argument == "cache" else "past_key_values": cache}
        prompt = self.torch.tensor([ids])
        with self.torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock,
                                      **extra)  # fmt: skip
        return start, clock.times, out[0, len(ids):].tolist()

    def ttft_ms(self, ids: list[int]) -> float:
        start, times, _ = self._generate(ids, 1)
        return (times[0] - start) * 1000

    def decode(self, ids: list[int], steps: int) -> tuple[float, list[int]]:
        _, times, tokens = self._generate(ids, steps)
        return (len(times) - 1) / (times[-1] - times[0]), tokens


class LlamaCppRunner:
    def __init__(self, spec: dict, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(spec["gguf"], n_ctx=spec["context"], n_batch=TTFT_PROMPT, n_ubatch=TTFT_PROMPT,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
        self.label = f"llama-cpp-python {llama_cpp.__version__}, {Path(spec['gguf']).stem.split('-')[-1]}"
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        # The last evaluated token's logits, read in place (eval copies none without logits_all).
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))
        return int(np.argmax(logits))

    def _first(self, ids: list[int]) -> int:
        self.llm.reset()  # the cache from position 0 again (eval drops what lies past it)
        self.llm.eval(ids)
        return self._next()

    def ttft_ms(self, ids: list[int]) -> float:
        t = time.perf_counter()
        self._first(ids)
        return (time.perf_counter() - t) * 1000

    def decode(self, ids: list[int], steps: int) -> tuple[float, list[int]]:
        tokens = [self._first(ids)]
        first = time.perf_counter()
        for _ in range(steps - 1):
            self.llm.eval([tokens[-1]])
            tokens.append(self._next())
        return (steps - 1) / (time.perf_counter() - first), tokens


# --- the run ----------------------------------------------------------------------------


def measure(rows: list[Row], threads: int, rounds: int, vocab: int, settle: float = 0.2) -> dict[int, float]:
    """Interleaved rounds over every row (round 0 warms up and is dropped); the copy
    bandwidth once per round, by round. Rows that fail are skipped with their reason."""
    rng = np.random.default_rng(0)
    prompts = {"ttft": rng.integers(3, vocab, TTFT_PROMPT).tolist(), "decode": rng.integers(3, vocab, DECODE_PROMPT).tolist()}
    workers: dict[str, Worker] = {}
    for row in rows:
        w = Worker(row, threads)
        try:
            row.label = _ready(w)
            workers[row.name] = w
        except Exception as e:  # noqa: BLE001
            row.skipped = str(e)
            w.close()
            print(f"  skipped {row.name}: {row.skipped}", file=sys.stderr, flush=True)
    bandwidth: dict[int, float] = {}
    try:
        for r in range(rounds + 1):
            live = [row for row in rows if row.skipped is None]
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for what in ("ttft", "decode"):
                for row in order:
                    if row.skipped is not None:
                        continue
                    time.sleep(settle)  # the previous runtime's threads go idle first
                    try:
                        if what == "ttft":
                            value = workers[row.name].ask("ttft", prompts["ttft"])
                        else:
                            value, row.tokens = workers[row.name].ask("decode", prompts["decode"], DECODE_STEPS)
                    except Exception as e:  # noqa: BLE001
                        row.skipped = f"{what}: {e}"
                        print(f"  skipped {row.name}: {row.skipped}", file=sys.stderr, flush=True)
                        continue
                    if r > 0:
                        row.samples.setdefault(what, {})[r] = value
                    unit = "ms" if what == "ttft" else "tokens/s"
                    print(f"  round {r}/{rounds} {what} {row.name}: {value:.2f} {unit}", file=sys.stderr, flush=True)
            time.sleep(settle)
            bandwidth[r] = copy_bandwidth()
            print(f"  round {r}/{rounds} copy bandwidth: {bandwidth[r] / 1e9:.2f} GB/s", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    return {r: b for r, b in bandwidth.items() if r > 0}


def _ready(w: Worker) -> str:
    if not w.conn.poll(1800):
        raise TimeoutError("the worker did not load in 30 minutes")
    status, value = w.conn.recv()
    if status != "ok":
        raise RuntimeError(value)
    return value


def _agreement(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two rows share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--context", type=int, default=1024, help="max context of every row (hxc's cache, n_ctx, StaticCache)")
    parser.add_argument("--precisions", default="fp32,int8,int4",
                        help="hxc precisions to include, each beside its llama.cpp file (F32, Q8_0, Q4_0); "
                             "ones this hxc cannot build are skipped with a note")  # fmt: skip
    parser.add_argument("--threads", default=str(os.cpu_count() or 1),
                        help="threads every row runs with; a list (1,2) runs the rows again at each")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="leave out HF torch.compile")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hxc-llm-bench"),
                        help="where the model, bundle and GGUF files go (reused when the shape is the same)")  # fmt: skip
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/llm.json")
    parser.add_argument("--name", default="llm", help="results file name: benchmarks/results/NAME.json")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: summarise benchmarks/results/llm.json's samples again and print the tables")
    args = parser.parse_args()
    if args.report:
        data = json.loads((RESULTS / f"{args.name}.json").read_text())
        data["runs"] = [summarise(r) for r in data["runs"]]
        (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        print("\n\n".join(_markdown(data["model"], r) for r in data["runs"]))
        print("\n".join(f"* {n}" for n in data["notes"]))
        return
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.threads = [int(t) for t in args.threads.split(",")]
    if bad := [p for p in precisions if p not in GGUF_OF]:
        parser.error(f"unknown precision {bad[0]!r}: one of {', '.join(GGUF_OF)}")

    import torch

    work = args.work
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    shape = make_model(model_dir, args.layers, args.hidden, args.vocab, args.context)
    print(f"model: {shape} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    bundle = work / f"model-{'-'.join(precisions)}.hxc"
    hxc_ids, notes, compile_s = build_hxc(model_dir, bundle, precisions, args.context)
    print(f"hxc: {hxc_ids} ({compile_s:.0f} s)", file=sys.stderr, flush=True)
    try:
        ggufs = make_gguf(model_dir, work, [GGUF_OF[p] for p in precisions])
    except ImportError:
        ggufs = {}
        notes.append("llama.cpp: llama-cpp-python is not installed (`make bench-deps`)")

    from hxc.manifests import read_manifest

    manifest = read_manifest(bundle)
    fp32_bytes = bytes_per_token_safetensors(model_dir)
    rows = []
    for p, artifact in hxc_ids.items():
        weights = manifest.weights_for(p)
        per_token = bytes_per_token_irpa(bundle / weights.file) if weights is not None else fp32_bytes
        # fp32: the selected artifact (the loader's choice for local-task); others by id.
        device = "local-task" if p == "fp32" else artifact
        rows.append(Row(f"hxc {p}", "hxc", p, {"bundle": str(bundle), "device": device, "precision": p}, per_token))
    hf = {"model": str(model_dir), "context": args.context}
    rows.append(Row("HF eager", "hf-eager", "fp32", {**hf, "compile": False}, fp32_bytes))
    if not args.no_compile:
        rows.append(Row("HF compile", "hf-compile", "fp32", {**hf, "compile": True}, fp32_bytes))
    for p in precisions:
        if GGUF_OF[p] in ggufs:
            path = ggufs[GGUF_OF[p]]
            rows.append(Row(f"llama.cpp {GGUF_OF[p]}", "llama.cpp", p, {"gguf": str(path), "context": args.context},
                            bytes_per_token_gguf(path)))  # fmt: skip

    info = {**shape, "parameters": sum(int(np.prod(s)) for s in _shapes(model_dir)), "rounds": args.rounds,
            "hxc_compile_s": round(compile_s, 1), "torch": torch.__version__,
            "decode": f"{DECODE_STEPS} greedy tokens after a {DECODE_PROMPT}-token prompt, batch 1",
            "ttft": f"a {TTFT_PROMPT}-token prompt to its first token"}  # fmt: skip
    runs = []
    for threads in args.threads:
        print(f"{threads} thread(s) each:", file=sys.stderr, flush=True)
        runs.append(run(copy.deepcopy(rows), threads, args.rounds, args.vocab))
    data = {"model": info, "runs": runs, "notes": notes}
    if not args.no_save:
        print(f"wrote {save(args.name, data)}", file=sys.stderr)
    print("\n\n".join(_markdown(info, r) for r in runs))
    print("\n".join(f"* {n}" for n in notes))


def run(rows: list[Row], threads: int, rounds: int, vocab: int) -> dict:
    """Every row at `threads` threads: each round's measurements, summarised."""
    bandwidth = measure(rows, threads, rounds, vocab)
    reference = next((r for r in rows if r.name == "HF eager" and r.tokens), None)
    results = [{"row": row.name, "label": row.label, "precision": row.precision,
                "weight_bytes_per_token": row.bytes_per_token,
                "tokens_agreeing_with_hf_eager": None if reference is None else _agreement(row.tokens, reference.tokens),
                "decode_samples": {r: round(x, 3) for r, x in row.samples["decode"].items()},
                "ttft_samples": {r: round(x, 2) for r, x in row.samples["ttft"].items()}}
               for row in rows if row.skipped is None and row.samples.get("decode") and row.samples.get("ttft")]  # fmt: skip
    return summarise({"threads": threads, "copy_bandwidth_samples_gb_s": {r: round(b / 1e9, 3) for r, b in bandwidth.items()},
                      "results": results, "skipped": [f"{r.name}: {r.skipped}" for r in rows if r.skipped is not None]})


def summarise(run: dict) -> dict:
    """`run` with what its per-round samples give: each row's medians and best round,
    its fraction of the roofline, and hxc's ratios to each peer (a run read back from
    JSON, whose round keys are strings, too)."""
    bandwidth = {int(r): b * 1e9 for r, b in run["copy_bandwidth_samples_gb_s"].items()}
    bw = statistics.median(bandwidth.values())
    for res in run["results"]:
        decode = {int(r): x for r, x in res["decode_samples"].items()}
        ttft = {int(r): x for r, x in res["ttft_samples"].items()}
        per_token = res["weight_bytes_per_token"]
        res.update({
            "decode_tokens_per_s": round(statistics.median(decode.values()), 2),
            "ttft_512_ms": round(statistics.median(ttft.values()), 1),
            "prefill_tokens_per_s": round(TTFT_PROMPT * 1000 / statistics.median(ttft.values()), 1),
            # The least disturbed round: what the row does when this shared machine leaves it alone.
            "best_decode_tokens_per_s": round(max(decode.values()), 2), "best_ttft_512_ms": round(min(ttft.values()), 1),
            "roofline_tokens_per_s": round(bw / per_token, 2),
            # Each round's tokens/s against that round's bandwidth: load that came and went hits both.
            "roofline_fraction": round(statistics.median(decode[r] * per_token / bandwidth[r] for r in decode if r in bandwidth), 3),
        })  # fmt: skip
    return {**run, "copy_bandwidth_gb_s": round(bw / 1e9, 2), "ratios": _ratios({r["row"]: r for r in run["results"]})}


def _shapes(model_dir: Path) -> list[list[int]]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return [f.get_slice(n).get_shape() for n in f.keys()]


def _paired(ours: dict, theirs: dict, higher_is_better: bool) -> float | None:
    """The median over the rounds both ran in of ours/theirs (theirs/ours for times):
    each round's pair ran back to back, so load that came and went between rounds
    cancels (a ratio of medians would not)."""
    pairs = [ours[r] / theirs[r] if higher_is_better else theirs[r] / ours[r] for r in ours if r in theirs]
    return statistics.median(pairs) if pairs else None


def _ratios(by: dict[str, dict]) -> list[dict]:
    """hxc against each peer, paired by round: decode tokens/s (above 1: hxc is faster)
    and TTFT (above 1: hxc answers first), with the goals the issue sets; and the same
    from each one's best round."""
    pairs = [("hxc fp32", "HF eager", 2.0, True), ("hxc fp32", "HF compile", None, True),
             ("hxc fp32", "llama.cpp F32", 1.0, True), ("hxc int8", "llama.cpp Q8_0", 1.0, True),
             ("hxc int4", "llama.cpp Q4_0", None, False), ("hxc int4", "hxc fp32", 1.5, True)]  # fmt: skip
    out = []
    for ours, theirs, goal, like in pairs:
        a, b = by.get(ours), by.get(theirs)
        if a is None or b is None:
            continue
        decode = _paired(a["decode_samples"], b["decode_samples"], True)
        ttft = _paired(a["ttft_samples"], b["ttft_samples"], False)
        if decode is None or ttft is None:
            continue
        out.append({"hxc": ours, "versus": theirs, "decode_ratio": round(decode, 2), "ttft_ratio": round(ttft, 2),
                    "best_decode_ratio": round(a["best_decode_tokens_per_s"] / b["best_decode_tokens_per_s"], 2),
                    "best_ttft_ratio": round(b["best_ttft_512_ms"] / a["best_ttft_512_ms"], 2),
                    "decode_goal": goal, "like_for_like": like})  # fmt: skip
        r = out[-1]
        r["decode_goal_met"] = None if goal is None else _verdict(decode >= goal, r["best_decode_ratio"] >= goal)
        r["ttft_goal_met"] = _verdict(ttft >= 1.0, r["best_ttft_ratio"] >= 1.0) if theirs == "HF eager" else None
    return out


def _verdict(paired: bool, best: bool) -> str:
    """A goal is met when the paired rounds and the best rounds both say so: on this
    shared machine a peer that collapses under load in some rounds can flatter a ratio."""
    return "met" if paired and best else "not met" if not (paired or best) else "unclear (paired and best rounds disagree)"


def _markdown(info: dict, run: dict) -> str:
    results, ratios = run["results"], run["ratios"]
    lines = [f"Llama, {info['layers']} layers, hidden {info['hidden']}, {info['heads']} heads / {info['kv_heads']} KV heads, "
             f"vocab {info['vocab']} ({info['parameters'] / 1e6:.0f} M parameters, random weights), context {info['context']}; "
             f"{run['threads']} thread(s) each; medians of {info['rounds']} interleaved rounds; copy bandwidth "
             f"{run['copy_bandwidth_gb_s']} GB/s (numpy, 2 threads)", "",
             "| row | decode tokens/s (batch 1) | TTFT 512 (ms) | prefill tokens/s | best round: tokens/s, TTFT | "
             "weight MB read/token | roofline tokens/s | of roofline | greedy tokens = HF eager's |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        agree = "-" if r["tokens_agreeing_with_hf_eager"] is None else f"{r['tokens_agreeing_with_hf_eager']}/{DECODE_STEPS}"
        lines.append(f"| {r['row']} | {r['decode_tokens_per_s']:.1f} | {r['ttft_512_ms']:.0f} | {r['prefill_tokens_per_s']:.0f} "
                     f"| {r['best_decode_tokens_per_s']:.1f}, {r['best_ttft_512_ms']:.0f} ms | {r['weight_bytes_per_token'] / 1e6:.0f} | {r['roofline_tokens_per_s']:.1f} "
                     f"| {100 * r['roofline_fraction']:.0f}% | {agree} |")  # fmt: skip
    lines += ["", "Ratios, each the median over rounds of that round's pair (best rounds' ratio in brackets):", "",
              "| hxc | versus | decode (x, above 1: hxc faster) | TTFT 512 (x, above 1: hxc first) | goal |",
              "|---|---|---|---|---|"]
    for r in ratios:
        goals = [] if r["decode_goal"] is None else [f"decode >= {r['decode_goal']}x: {r['decode_goal_met']}"]
        goals += [] if r["ttft_goal_met"] is None else [f"TTFT <= HF eager's: {r['ttft_goal_met']}"]
        goal = "; ".join(goals) or "-"
        note = "" if r["like_for_like"] else " (not like for like)"
        lines.append(f"| {r['hxc']} | {r['versus']}{note} | {r['decode_ratio']:.2f}x ({r['best_decode_ratio']:.2f}x) "
                     f"| {r['ttft_ratio']:.2f}x ({r['best_ttft_ratio']:.2f}x) | {goal} |")
    lines += [f"* {r['row']}: {100 * r['roofline_fraction']:.0f}% of the roofline at batch 1 (goal >= 60%: "
              f"{'met' if r['roofline_fraction'] >= 0.6 else 'not met'})" for r in results if r["row"].startswith("hxc")]
    lines += [f"* skipped {n}" for n in run["skipped"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
