"""The bundle's manifest: typed records, the bundle layout, and the schema version.

This is the one place that defines what a bundle is. The writer (compiler) and the
reader (runtime, bench) both import it. JSON exists only at the edge: `to_json` and
`from_json` turn records into plain data and back, checking types on the way in.

Versioning follows torch.export's serde schema: the major number changes when an
old reader could misread a new bundle (a field renamed, removed or given a new
meaning); the minor number changes when fields are added with defaults. A reader
refuses a bundle with a newer major version. `tests/data/manifest_schema.json` is a
checked-in copy of the schema; a test fails when the two drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import reprlib
import types
import typing
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

# Profiles record latency statistics; the record is defined with its arithmetic.
from hxc.errors import SignatureError
from hxc.stats import P99_MIN_ITERATIONS, LatencyStats  # noqa: F401  (re-exported)

FORMAT = "hxc-bundle"
PROFILES_FORMAT = "hxc-profiles"
# 2.0: every file written at build time has a sha256 and size in `files`, checked
# before use; profiles moved out of manifest.json into profiles.json, so the manifest
# is never rewritten after the build. A 1.x bundle has no hashes for its program and
# golden sample, so this reader refuses it instead of trusting those files.
# 3.0: Artifact.engine (ONNX Runtime and AOTInductor artifacts beside IREE's),
# Artifact.interface_casts (Vulkan's portable variant takes 32-bit types at its
# interface) and Requirements.vulkan_features. A 2.x reader would misread all three
# (load an .onnx as a .vmfb, call a cast artifact with the model's own types, skip the
# Vulkan feature check), hence the major bump. This reader still reads 2.x bundles:
# their fields' defaults (engine "iree", no casts, no features) are what they meant.
# 4.0: `functions` replaces `signature`: an artifact has one or more named entry points
# (`main` for a plain model; `init` and `step`, `prefill` and `decode`...), each with its
# signature and the device-resident state it reads and writes. A 3.x reader would find
# no signature; this reader reads 3.x and 2.x bundles as one function, `main`.
# 4.1: `language_model` (optional): a causal LM's shape, KV-cache layout, special tokens
# and tokenizer files (under `tokenizer/`, hashed in `files` like every build-time
# file): what `generate` needs beyond the `prefill` and `decode` functions. A 4.0
# reader ignores the field and can still call the functions by name.
# 4.2: `language_model.greedy_reference` (optional): a prompt and Hugging Face's greedy
# tokens for it, their logits in the golden sample (GREEDY_LOGITS) in place of each
# function's sample with its full KV caches. A 4.1 reader ignores the field, and its
# `hxc verify` finds no function samples in such a bundle's golden.npz.
# 5.0: a language model's `prefill` and `decode` take `span` (a dynamic length: how
# many cache rows the call reads) and its KV cache is one key and one value state per
# layer (`k_cache_0`, `v_cache_0`, ...), written in place and read to the filled
# length. A 4.x reader would call them with the old arguments; this reader refuses a
# 4.x language model (rebuild it) and reads every other 2.x-4.x bundle as before.
# 5.1: `Artifact.quantization` (optional): a language model's weight-only int8/int4
# artifact (precision "int8", "int4"): how its weights are stored and how far its greedy
# tokens and logits stray from float32. A 5.0 reader ignores the field; it never picks
# such an artifact unasked (its precision is not fp32), and when allowed it loads and
# runs it like any other (the archive is weights-int8.irpa).
# 5.2: `language_model.prefill_chunks` (optional): several prefill functions, one per
# chunk size (`prefill` for the smallest, `prefill_<n>` for the others). A 5.1 reader
# ignores the field and prefills with `prefill` alone, as before.
# 5.3: a language model of several slots may have a third function, `mixed` (a decode
# step and a prefill chunk of the smallest size in one call, `hxc.lm_calls`). A 5.2
# reader ignores it and steps with `prefill` and `decode`, as before.
# 6.0: `stages` (optional) and `Artifact.stage`, `Weights.stage`: a model cut into
# consecutive stages (`hxc compile --stages`), each stage compiled as an artifact of its
# own per target (`cpu:host#s0`, `cpu:host#s1`, ...) with its own weights archive
# (`weights-s0.irpa`), so that whoever runs stage k loads stage k's weights alone. A 5.x
# reader knows neither field: it would take stage 0's artifact for the whole model and
# return stage 0's outputs as the model's, hence the major bump. This reader reads every
# 2.x-5.x bundle as before (no stages), and picks a staged bundle's artifacts only as
# the complete chain of one target's stages, never one stage as the model. Only a staged
# bundle is written as 6.0: one without stages means what it meant, and is written as
# 5.3 (`UNSTAGED_SCHEMA_VERSION`), so a 5.x hxc still reads it.
# 6.1: `Stage.functions` (optional): a language model cut into stages at its decoder
# layers, each stage's artifacts exposing the model's functions (`prefill`, `decode`,
# `mixed`) over the hidden states and over its own layers' KV caches. A 6.0 reader
# refuses such a bundle in one line (its stages are not of one stateless `main`). Only
# a language model's staged bundle is written as 6.1; a tensor model's stays 6.0.
SCHEMA_VERSION: tuple[int, int] = (6, 1)
UNSTAGED_SCHEMA_VERSION: tuple[int, int] = (5, 3)
TENSOR_STAGES_SCHEMA_VERSION: tuple[int, int] = (6, 0)
# profiles.json is versioned on its own: nothing in it changed meaning in 3.0, so a
# 2.x hxc can still read the profiles a newer hxc bench adds to its bundles.
# 2.1: Profile.conditions (what else ran during a measurement).
# 2.2: Profile.generation (optional): what a language-model profile timed (time to the
# first token of a prompt, or per output token); a 2.1 reader ignores it and sees
# single-stream profiles at batch 1.
# 2.3: GenerationTiming.weights_bytes and .kv_bytes_per_token (optional): the memory the
# artifact needs, beside its timings; and decode profiles at batch B > 1 (scenario
# "offline": one decode call steps B sequences, `latency` per call, `items_per_second`
# tokens per second), as a 2.2 reader already reads any offline profile. A 2.2 reader
# ignores the new fields.
# 2.4: Profile.stage (optional): a staged bundle's profile of one stage alone (its own
# artifact, on tensors of the shapes that cross into it), for placing stages on devices;
# None: the whole model (a staged bundle's whole chain, whose `candidate` is now the
# target's id, `cpu:host`). A 2.3 reader would take stage 0's own profile for the
# chain's; only the hxc that introduced staged bundles (6.0) reads them with 2.3.
PROFILES_SCHEMA_VERSION: tuple[int, int] = (2, 4)

# Bundle layout, relative to the bundle directory.
MANIFEST_FILE = "manifest.json"  # written once by `hxc compile`, never changed after
PROFILES_FILE = "profiles.json"  # measurements added later by `hxc bench` / `profiles merge`
SIGNATURE_FILE = "manifest.sig"  # Ed25519 signatures over manifest.json, added by `hxc sign`
PROFILES_SIGNATURE_FILE = "profiles.sig"  # signatures over profiles.json, added by `hxc sign --profiles`
GOLDEN_FILE = "golden.npz"
PROGRAM_PT2 = "program.pt2"  # the program a PyTorch model's artifacts were built from
PROGRAM_ONNX = "model.onnx"  # the ONNX model, for ONNX bundles
WEIGHTS_FILE = "weights.irpa"  # weights-fp16.irpa etc. for reduced-precision variants
ARTIFACTS_DIR = "artifacts"
LOCK_FILE = ".lock"

Dim = int | str  # a static size, or the name of a dynamic dimension


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor. A dynamic dimension is a name instead of a size."""

    name: str
    dtype: str  # an hxc dtype name (hxc.dtypes): f32, i64, bf16, ...
    shape: tuple[Dim, ...]

    def format(self) -> str:
        """The `--input` spelling: `?x3x224x224xf32`."""
        dims = ["?" if isinstance(d, str) else str(d) for d in self.shape]
        return "x".join([*dims, self.dtype])


@dataclass(frozen=True)
class OutputTree:
    """How flat outputs are put back into the structure the model returned.

    kind "leaf" points at flat output `index`; "tuple"/"list" hold `items` in
    order; "dict" pairs `keys` with `items`.
    """

    kind: Literal["leaf", "tuple", "list", "dict"]
    index: int | None = None
    keys: tuple[str, ...] = ()
    items: tuple[OutputTree, ...] = ()


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_tree: OutputTree


MAIN = "main"  # the entry point of a plain model: what `model(...)` calls


@dataclass(frozen=True)
class StateSpec:
    """A named value the runtime keeps on the device between calls (a recurrent hidden
    state, a KV cache): allocated by whoever holds the session, zero at first, passed
    into the functions that read it and replaced by those that write it. Its leading
    dimension holds `slots` independent slots (one per sequence of a batched cache)."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # static: a state is allocated before its first call
    bytes: int  # shape x dtype size: what it holds on the device
    slots: int = 1

    def tensor(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


@dataclass(frozen=True)
class FunctionSpec:
    """One entry point of the artifacts. The caller passes `signature.inputs` and gets
    `signature.outputs`; the state named in `reads` follows the inputs into the
    artifact's function, and the state in `writes` follows its outputs out."""

    signature: Signature
    reads: tuple[StateSpec, ...] = ()
    writes: tuple[StateSpec, ...] = ()

    @property
    def states(self) -> tuple[StateSpec, ...]:
        """Every state it touches, once each."""
        return tuple({s.name: s for s in (*self.reads, *self.writes)}.values())

    @property
    def call_signature(self) -> Signature:
        """What the artifact's function itself takes and returns: inputs then the state it
        reads; outputs then the state it writes (the output tree covers the outputs only)."""
        if not self.reads and not self.writes:
            return self.signature
        return Signature(inputs=(*self.signature.inputs, *(s.tensor() for s in self.reads)),
                         outputs=(*self.signature.outputs, *(s.tensor() for s in self.writes)),
                         output_tree=self.signature.output_tree)  # fmt: skip


def golden_prefix(function: str) -> str:
    """Keys of a function's golden sample in golden.npz: `input_0` for `main` (as before
    functions), `step.input_0` for the others."""
    return "" if function == MAIN else f"{function}."


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str  # what the user passed to `hxc compile`
    source_format: str  # torch.export | torchscript | python | pickle | onnx
    source_sha256: str
    program_file: str | None  # the exported program the IR came from, in the bundle
    ir_sha256: str  # the IREE input IR every artifact was compiled from


@dataclass(frozen=True)
class Toolchain:
    hxc: str
    iree_compiler: str
    iree_turbine: str | None
    torch: str | None
    python: str


@dataclass(frozen=True)
class Requirements:
    """What a device must have to execute an artifact; each family reads its own fields."""

    isa: str | None = None  # x86_64 | aarch64, for CPU code
    cpu_features: tuple[str, ...] = ()  # /proc/cpuinfo flag names, all required
    gpu_archs: tuple[str, ...] = ()  # exact architectures that load the binary
    min_gpu_arch: str | None = None  # for forward-compatible code (PTX): this or newer
    vendor: str | None = None  # Vulkan vendor, when the SPIR-V is tuned for one
    # Vulkan device features the SPIR-V needs (from the capabilities it declares):
    # shaderInt64, shaderFloat16, storageBuffer8BitAccess, subgroup:arithmetic, ...
    vulkan_features: tuple[str, ...] = ()
    # Python distributions the artifact's engine needs at run time, `name==version`
    # when the artifact is tied to that exact build (AOTInductor code and its torch).
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class TuningTrial:
    """One flag configuration tried by `hxc compile --tune` on the compile host."""

    config: str
    flags: tuple[str, ...]
    p50_ms: float | None  # None when it failed to compile or run
    chosen: bool
    error: str | None = None


@dataclass(frozen=True)
class Quantization:
    """A weight-only quantised artifact (`hxc compile --precision int8,int4`,
    `hxc.compiler.quantize`): its Linear weights are `bits`-bit integers with one float32
    scale per `group_size` input features (symmetric: w = q * scale), and so are the
    token embedding's rows when `embeddings`; activations and the KV cache stay
    float32. Its error is measured in PyTorch at
    compile time against the float32 model over `greedy_prompts` prompts, each continued
    greedily by the float32 model for `greedy_tokens / greedy_prompts` tokens: each step
    given float32's tokens before it, the share whose greedy token is float32's, and the
    largest logit difference (`Artifact.precision_error` is that difference relative to
    the largest float32 logit)."""

    bits: int  # 8 or 4 (two weights per byte)
    group_size: int  # input features per scale (a narrower layer: the largest divisor of its width below this)
    modules: int  # modules quantised: Linear layers, and the embedding when `embeddings`
    lm_head: bool  # whether the LM head is among them
    embeddings: bool  # whether the token embedding is (a tied one shares the head's integers)
    greedy_agreement: float  # 0..1
    greedy_tokens: int
    greedy_prompts: int
    max_logit_diff: float
    scale_dtype: str = "f32"


STAGE_MARK = "#s"  # a stage's artifact id: the target's id, then this and the stage's index (`cpu:host#s1`)


@dataclass(frozen=True)
class Artifact:
    # family:variant[@precision][#sK], unique in a bundle (variant is the engine for
    # non-IREE engines; #sK for stage K of a staged bundle)
    id: str
    family: str
    variant: str
    # Within the engine, what executes it: IREE's compiler backend (llvm-cpu, cuda, rocm,
    # vulkan-spirv), ONNX Runtime's execution provider, Inductor's code generator (cpp).
    backend: str
    driver: str  # what loads it: IREE's HAL driver (local-task, cuda, hip, vulkan), onnxruntime, torch
    binary: str  # what the file carries: elf-x86_64, cubin, ptx, hsaco, spirv; onnx; aoti-x86_64
    flags: tuple[str, ...]  # the exact iree-compile flags (input and output omitted), or the engine's options
    requires: Requirements
    status: Literal["ok", "failed"]
    file: str | None = None  # relative to the bundle
    sha256: str | None = None
    size: int | None = None
    compile_seconds: float | None = None
    cached: bool = False
    verified: str | None = None  # e.g. how a CUDA binary was proven to assemble
    error: str | None = None
    operator: str | None = None  # the operator a failed compile could not lower
    # fp32 | fp16 | bf16: the precision it computes in; int8 | int4: float32 compute over
    # quantised weights (`quantization`)
    precision: str = "fp32"
    # For reduced precision: max |y - y_fp32| / max |y_fp32| of PyTorch at this precision
    # against the fp32 reference, on the golden sample (for int8 / int4: on the logits of
    # the quantisation's greedy measurement).
    precision_error: float | None = None
    tuning: tuple[TuningTrial, ...] = ()  # the search that chose `flags`, when tuned
    # Set when the family's default flags failed and `flags` are its safer fallback
    # (e.g. CPU without data tiling): the default flags' error.
    fallback: str | None = None
    # Element types this artifact takes and returns in place of the model's, as
    # (model dtype, artifact dtype) pairs, e.g. ("i64", "i32") for portable SPIR-V
    # without 64-bit integers. The loader converts at the boundary (refusing integer
    # inputs that do not fit), so callers see the model's own signature.
    interface_casts: tuple[tuple[str, str], ...] = ()
    # The backend that built it and runs it (`hxc compile --backends`): iree, onnxruntime,
    # inductor. A reader that predates this field would take any artifact for IREE's.
    engine: str = "iree"
    quantization: Quantization | None = None  # precision int8 / int4 (5.1)
    # Which stage of a staged bundle it computes (`Manifest.stages`); None: the whole model (6.0).
    stage: int | None = None

    @property
    def target_id(self) -> str:
        """The id without its stage: what every stage of one target and precision shares."""
        return self.id.partition(STAGE_MARK)[0]


@dataclass(frozen=True)
class Host:
    """A machine that recorded profiles. `id` is a hash of everything else, so the
    same hardware with the same software stack always gets the same id."""

    id: str
    hostname: str
    cpu_model: str
    cpu_cores: int
    cpu_features: tuple[str, ...]
    devices: tuple[str, ...]  # "vulkan: llvmpipe (...) [Mesa 22.3.6]", one per device
    versions: dict[str, str]  # hxc, iree-base-runtime, torch




@dataclass(frozen=True)
class Conditions:
    """What else was running while a profile was measured. `hxc bench` times each
    device's candidates in a phase of their own; within it they are interleaved."""

    interleaved_with: tuple[str, ...]  # the other candidates of the phase, all on the same device
    isolated: bool  # True: no other device computed during the phase
    other_load: float | None = None  # cores' worth of CPU time other processes used meanwhile


@dataclass(frozen=True)
class GenerationTiming:
    """What a language model's profile timed: `prefill`, a prompt of `prompt_tokens`
    in to its first token chosen (time to first token); or `decode`, one more token
    each call after a prompt of `prompt_tokens` (time per output token) for each of the
    profile's `batch` sequences. With the memory the artifact needs, which is what
    sizes a device for it: its weights, and the KV cache per token of context (2.3;
    None when recorded before)."""

    phase: Literal["prefill", "decode"]
    prompt_tokens: int
    weights_bytes: int | None = None
    kv_bytes_per_token: int | None = None


@dataclass(frozen=True)
class Profile:
    """One measurement of one artifact (or the PyTorch baseline) on one host."""

    host_id: str
    candidate: str  # an artifact id, or torch:eager / torch:compile for baselines
    artifact_sha256: str | None  # None for baselines
    device: str  # the device label it ran on
    scenario: Literal["single-stream", "offline"]
    batch: int
    latency: LatencyStats
    throughput: float  # inferences per second
    items_per_second: float  # throughput x batch
    load_ms: float | None
    first_call_ms: float | None
    memory_mb: float | None  # resident memory added by loading it and its first call
    device_time_only: bool  # True when host<->device copies are outside the timed region
    recorded: str  # ISO 8601, UTC
    threads: int | None = None  # CPU threads it ran with, where that applies
    # None: recorded by an hxc that interleaved every device in one run
    # (a software Vulkan device then slowed the CPU candidates it ran beside).
    conditions: Conditions | None = None
    # What a caller paid beyond `latency` when the artifact ran in a pool worker process
    # (input checks, shared-memory copies, the process hop), measured by `hxc bench --pool`;
    # SLO checks add it to the device time. None: not measured.
    caller_overhead: LatencyStats | None = None
    # A language model's profile (`hxc bench` on an LLM bundle): what `latency` timed;
    # `throughput` is then calls per second (tokens per second for decode). None: a plain call.
    generation: GenerationTiming | None = None
    # A staged bundle's profile of this stage alone (`candidate` its artifact, `cpu:host#s1`);
    # None: of the whole model (2.4).
    stage: int | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """A language model's profile as tokens per second (None for any other): prompt
        tokens through prefill, or tokens decoded (one per sequence of the batch), over
        the mean call time."""
        g = self.generation
        if g is None or not self.latency.mean_ms:
            return None
        return (g.prompt_tokens if g.phase == "prefill" else self.batch) * 1000.0 / self.latency.mean_ms


@dataclass(frozen=True)
class Weights:
    """Parameters stored once per bundle, as an IREE parameter archive that every
    artifact references by name within `scope`."""

    file: str
    scope: str
    sha256: str
    size: int
    precision: str = "fp32"  # the artifacts of this precision reference this archive
    stage: int | None = None  # of a staged bundle: the artifacts of this stage alone reference it (6.0)


@dataclass(frozen=True)
class StageTensor:
    """A tensor that crosses into or out of a stage. `bytes` at the golden sample's
    shape (a dynamic dimension counted at its example size)."""

    name: str  # the value's name in the exported graph (`conv2d`, `add_3`); the model's input names at stage 0
    dtype: str
    shape: tuple[Dim, ...]
    bytes: int

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


@dataclass(frozen=True)
class StageFunction:
    """One function of a language model's stage (6.1): its artifacts' function of the
    model function's name takes `inputs` (what the stage before returned; none at stage
    0), then the model function's own arguments named in `args`, then the state in
    `state` (its layers' KV caches, in the model function's order), and returns
    `outputs` (what the next stage takes: the hidden states; the last stage returns the
    model function's outputs), then that state."""

    inputs: tuple[StageTensor, ...]
    args: tuple[str, ...]
    outputs: tuple[StageTensor, ...]
    state: tuple[str, ...]

    def spec(self, model: FunctionSpec) -> FunctionSpec:
        """The function as its artifacts take it, from the model's function `model`."""
        by_name = {t.name: t for t in model.signature.inputs}
        outputs = tuple(t.spec() for t in self.outputs)
        tree = (OutputTree("leaf", 0) if len(outputs) == 1
                else OutputTree("tuple", items=tuple(OutputTree("leaf", i) for i in range(len(outputs)))))  # fmt: skip
        signature = Signature((*(t.spec() for t in self.inputs), *(by_name[a] for a in self.args)), outputs, tree)
        held = set(self.state)
        return FunctionSpec(signature, reads=tuple(s for s in model.reads if s.name in held),
                            writes=tuple(s for s in model.writes if s.name in held))  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """One of a model's consecutive stages (`hxc compile --stages`): its artifacts (one
    per target and precision, each exposing `function`) take `inputs` and return
    `outputs`. Stage 0 takes the model's inputs; each later stage takes exactly the
    outputs of the stage before it (a tensor needed further on passes through); the last
    returns the model's outputs, flat, in the order of `main`'s signature.

    A language model's stage (6.1) runs a range of its decoder layers and has every
    function of the model (`functions`); `function`, `inputs` and `outputs` are then
    `decode`'s (the step generation repeats: what a placement weighs), and `signature`
    is not what its artifacts take (`StageFunction.spec` is)."""

    index: int
    name: str  # s0, s1, ...: its artifacts' id suffix after STAGE_MARK's `#`
    function: str  # the entry point of its artifacts
    artifacts: tuple[str, ...]  # ids of this stage's artifacts
    first_module: str | None  # qualified names of the first and last module it runs (None: none named)
    last_module: str | None
    inputs: tuple[StageTensor, ...]
    outputs: tuple[StageTensor, ...]
    weights_bytes: int  # the parameters and buffers its artifacts hold or load
    flops: int  # estimated from the exported graph's shapes (hxc.compiler.stages.node_flops)
    kv_bytes_per_token: int = 0  # a language model's KV cache per token in its layers; 0 for tensor models
    # A language model's stage: each of the model's functions as this stage runs it (6.1).
    functions: dict[str, StageFunction] = dataclasses.field(default_factory=dict)

    @property
    def signature(self) -> Signature:
        """What its artifacts' function takes and returns, outputs flat."""
        outputs = tuple(t.spec() for t in self.outputs)
        tree = OutputTree("tuple", items=tuple(OutputTree("leaf", i) for i in range(len(outputs))))
        return Signature(tuple(t.spec() for t in self.inputs), outputs, tree)


@dataclass(frozen=True)
class FileHash:
    """What a build-time file must be: checked (size first, then sha256) before use."""

    sha256: str
    size: int


TOKENIZER_DIR = "tokenizer"  # a language model's tokenizer files, in the bundle
# A language model's golden sample: Hugging Face's logits at each step of the greedy
# reference ([steps, vocab], f32), under this key of golden.npz.
GREEDY_LOGITS = "greedy.logits"


@dataclass(frozen=True)
class GreedyReference:
    """A prompt and the tokens Hugging Face's `generate(do_sample=False)` continued it
    with at compile time (end-of-sequence tokens did not stop it); the logits of each
    step are in the golden sample (GREEDY_LOGITS). `hxc verify` checks every artifact
    against both."""

    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class LanguageModel:
    """A causal language model compiled as `prefill` and `decode` over a KV cache kept
    on the device as state (`k_cache`, `v_cache`): what generating text needs."""

    family: str  # the transformers model type (causal_lm.SUPPORTED_FAMILIES): llama, gpt2, qwen2, ...
    vocab_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_context: int  # tokens one sequence may hold: prompt and generated together
    slots: int  # sequences the cache holds at once (decode runs one token for each)
    prefill_chunk: int  # prompt tokens per `prefill` call (the smallest chunk); a longer prompt takes several calls
    kv_bytes_per_token: int  # KV-cache bytes one token of context takes (keys and values, all layers)
    cache_dtype: str = "f32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these (and returns it)
    # Bundle paths of the tokenizer's files (tokenizer.json, its config), or none: the
    # caller then passes token ids.
    tokenizer_files: tuple[str, ...] = ()
    # What `hxc verify` checks generation against; None (bundles built before it): the
    # functions' own golden samples.
    greedy_reference: GreedyReference | None = None
    # Every chunk size a prefill function takes, ascending (`hxc.lm_calls.prefill_function`
    # names them); empty: `prefill_chunk` alone (bundles before 5.2, or one size).
    prefill_chunks: tuple[int, ...] = ()

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.prefill_chunks or (self.prefill_chunk,)

    @property
    def tokenizer_file(self) -> str | None:
        return next((f for f in self.tokenizer_files if f.endswith("/tokenizer.json")), None)


def schema_version_written(stages: tuple[Any, ...]) -> str:
    """The schema version a bundle is written with: 6.1 for a language model's stages,
    6.0 for a tensor model's, else 5.3 (see SCHEMA_VERSION's notes: nothing else in 6.0
    or 6.1 changed meaning)."""
    if not stages:
        major, minor = UNSTAGED_SCHEMA_VERSION
    else:
        major, minor = SCHEMA_VERSION if any(s.functions for s in stages) else TENSOR_STAGES_SCHEMA_VERSION
    return f"{major}.{minor}"


@dataclass(frozen=True)
class Manifest:
    """A bundle's description. `hosts` and `profiles` live in PROFILES_FILE on disk
    (measurements that change after the build); everything else in MANIFEST_FILE."""

    model: ModelInfo
    functions: dict[str, FunctionSpec]  # entry points by name: `main` alone for a plain model
    toolchain: Toolchain
    artifacts: tuple[Artifact, ...]
    created: str  # ISO 8601, UTC
    golden_file: str | None = GOLDEN_FILE
    # Whether the golden sample holds expected outputs (it always holds inputs), who
    # computed them (pytorch, onnxruntime, or user: from `--example`), and if it holds
    # none, why (the reference could not run on the example inputs).
    golden_outputs: bool = True
    golden_reference: str | None = None
    golden_note: str | None = None
    weights: tuple[Weights, ...] = ()  # empty: each artifact carries its own weights
    # Every file written at build time, by path relative to the bundle. Files that
    # change afterwards (profiles, lock) are deliberately not here.
    files: dict[str, FileHash] = dataclasses.field(default_factory=dict)
    hosts: tuple[Host, ...] = ()
    profiles: tuple[Profile, ...] = ()
    language_model: LanguageModel | None = None  # a causal LM: what `generate` needs (4.1)
    # A model cut into stages, in order; empty: every artifact computes the whole model (6.0).
    stages: tuple[Stage, ...] = ()
    format: str = FORMAT
    schema_version: str = f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}"

    @property
    def signature(self) -> Signature:
        """The signature of `main`, what `model(...)` takes; a bundle without `main` (a
        model of several functions: `model.call(name, ...)`) has none."""
        main = self.functions.get(MAIN)
        if main is None:
            raise SignatureError(f"this model has no {MAIN!r} function; its functions are {', '.join(self.functions)}",
                                 hint="call one by name: model.call(name, ...)")  # fmt: skip
        return main.signature

    @property
    def stateless_main(self) -> bool:
        """Whether the model is one function, `main`, without state: what everything that
        predates functions (pools, the server, bench, verify) runs."""
        return list(self.functions) == [MAIN] and not self.functions[MAIN].states

    def artifact(self, artifact_id: str) -> Artifact:
        for a in self.artifacts:
            if a.id == artifact_id:
                return a
        raise KeyError(artifact_id)

    @property
    def ok_artifacts(self) -> tuple[Artifact, ...]:
        return tuple(a for a in self.artifacts if a.status == "ok")

    def weights_for(self, precision: str, stage: int | None = None) -> Weights | None:
        return next((w for w in self.weights if w.precision == precision and w.stage == stage), None)

    def stage_artifacts(self, artifact: Artifact) -> tuple[Artifact, ...]:
        """Every stage's artifact of `artifact`'s target and precision, in stage order
        (fewer than the stages when some are missing); `(artifact,)` for an unstaged one."""
        if artifact.stage is None:
            return (artifact,)
        found = {a.stage: a for a in self.artifacts if a.stage is not None and a.target_id == artifact.target_id}
        return tuple(found[s.index] for s in self.stages if s.index in found)

    def referenced_files(self) -> list[tuple[str, str]]:
        """(path, what) for every file another record names: each must be in `files`."""
        out = [(a.file, f"artifact {a.id}") for a in self.ok_artifacts if a.file is not None]
        out += [(w.file, f"{w.precision} weights") for w in self.weights]
        if self.model.program_file:
            out.append((self.model.program_file, "the source program"))
        if self.golden_file:
            out.append((self.golden_file, "the golden sample"))
        if self.language_model is not None:
            out += [(f, "the tokenizer") for f in self.language_model.tokenizer_files]
        return out


# --- JSON at the edge -------------------------------------------------------------


def to_json(record: Any) -> Any:
    """A record as plain JSON data (dicts, lists, strings, numbers, None)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_json(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, (list, tuple)):
        return [to_json(x) for x in record]
    if isinstance(record, dict):
        return {str(k): to_json(v) for k, v in record.items()}
    return record


class SchemaError(ValueError):
    """Plain data that does not fit a record's declared types."""


def from_json(cls: type, data: Any, where: str = "manifest") -> Any:
    """Build record `cls` from plain data, checking every field against its type.

    Unknown keys are ignored so that a reader accepts bundles written by a newer
    minor version; missing keys fall back to the field's default.
    """
    return _converter(cls)(data, where)


Converter = Callable[[Any, str], Any]


@functools.cache
def _converter(tp: Any) -> Converter:
    """The function that checks and converts data for type `tp`, built once per type.
    Working out a type's shape (`typing.get_type_hints` evaluates every annotation's
    text) cost ~0.2 ms per record read, most of the time of reading thousands of
    profiles; now each value costs a call and its checks."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return lambda data, where: data
    if dataclasses.is_dataclass(tp):
        return _record_converter(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)

        def union(data: Any, where: str) -> Any:
            errors = []
            for option in options:
                try:
                    return _converter(option)(data, where)
                except SchemaError as e:
                    errors.append(str(e))
            raise SchemaError(errors[0] if len(errors) == 1 else f"{where}: {_short(data)} fits none of {tp}")

        return union
    if origin is Literal:
        allowed = typing.get_args(tp)

        def literal(data: Any, where: str) -> Any:
            if data not in allowed:
                raise SchemaError(f"{where}: {_short(data)} is not one of {allowed}")
            return data

        return literal
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = args[0]

            def sequence(data: Any, where: str) -> Any:
                if not isinstance(data, list):
                    raise SchemaError(f"{where}: expected a list, got {type(data).__name__}")
                convert = _converter(item)
                return tuple(convert(x, f"{where}[{i}]") for i, x in enumerate(data))

            return sequence

        def fixed(data: Any, where: str) -> Any:
            if not isinstance(data, list):
                raise SchemaError(f"{where}: expected a list, got {type(data).__name__}")
            if len(args) != len(data):
                raise SchemaError(f"{where}: expected {len(args)} items")
            return tuple(_converter(a)(x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, data)))

        return fixed
    if origin is dict:
        _, value_tp = typing.get_args(tp)

        def mapping(data: Any, where: str) -> Any:
            if not isinstance(data, dict):
                raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
            convert = _converter(value_tp)
            return {k: convert(v, f"{where}.{k}") for k, v in data.items()}

        return mapping
    if tp is type(None):

        def null(data: Any, where: str) -> Any:
            if data is not None:
                raise SchemaError(f"{where}: expected null")
            return None

        return null
    if tp is float:

        def number(data: Any, where: str) -> Any:
            if isinstance(data, bool) or not isinstance(data, (int, float)):
                raise SchemaError(f"{where}: expected a number, got {_short(data)}")
            return float(data)

        return number
    if tp in (int, str, bool):

        def scalar(data: Any, where: str) -> Any:
            if not isinstance(data, tp) or (tp is int and isinstance(data, bool)):
                raise SchemaError(f"{where}: expected {tp.__name__}, got {_short(data)}")
            return data

        return scalar
    raise TypeError(f"no JSON conversion for {tp!r}")  # a bug in the schema, not in the data


def _record_converter(tp: type) -> Converter:
    plan: list[tuple[tuple[str, Converter, bool], ...]] = []

    def record(data: Any, where: str) -> Any:
        if not plan:  # on first use, as a record may contain itself (OutputTree); built whole, then published
            hints = typing.get_type_hints(tp)
            plan.append(tuple((f.name, _converter(hints[f.name]),
                               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                              for f in dataclasses.fields(tp)))  # fmt: skip
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
        kwargs = {}
        for name, convert, required in plan[0]:
            if name in data:
                kwargs[name] = convert(data[name], f"{where}.{name}")
            elif required:
                raise SchemaError(f"{where}: missing field {name!r}")
        return tp(**kwargs)

    return record


def _short(data: Any) -> str:
    # Messages are one line of readable length, whatever a file holds.
    return reprlib.repr(data)


def dumps(record: Any) -> str:
    return json.dumps(to_json(record), indent=2, sort_keys=False) + "\n"


def schema_description(cls: type = Manifest) -> dict[str, Any]:
    """Field names and types of every record reachable from `cls`, for the drift test."""
    out: dict[str, Any] = {}

    def visit(tp: Any) -> None:
        if dataclasses.is_dataclass(tp):
            if tp.__name__ in out:
                return
            hints = typing.get_type_hints(tp)
            out[tp.__name__] = {f.name: _type_name(hints[f.name]) for f in dataclasses.fields(tp)}
            for h in hints.values():
                visit(h)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(cls)
    return {"schema_version": f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}", "records": out}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("hxc.manifests.schema.", "")
