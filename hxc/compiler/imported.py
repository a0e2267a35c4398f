"""What every frontend hands to the compile driver: the IREE input IR plus what the
bundle needs to describe and check it. Frontends (PyTorch, ONNX) differ in how they
get here; everything after this point is the same for all of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from hxc.manifests.schema import MAIN, FunctionSpec, LanguageModel, Quantization, Signature, Stage

WeightsMode = Literal["auto", "inline", "shared"]
# With `auto`, parameters at least this large are stored once per bundle (in an IREE
# parameter archive) instead of inside every artifact.
SHARED_WEIGHTS_THRESHOLD = 16 * 1024 * 1024
PARAMETER_SCOPE = "model"


@dataclass
class ImportOptions:
    inputs: tuple[str, ...] = ()  # --input specs
    dynamic_batch: bool = False
    allow_pickle: bool = False
    weights: WeightsMode = "auto"
    precision: str = "fp32"  # compute precision; the interface stays as the model's
    example: str | None = None  # --example inputs.npz: the golden sample's inputs (and maybe outputs)
    # (model dtype, artifact dtype) pairs: build the IR with these element types at the
    # interface instead of the model's (a variant whose code generator lacks them);
    # such an import carries its weights inline.
    interface_casts: tuple[tuple[str, str], ...] = ()
    # Language models (a Hugging Face directory, or a factory returning a transformers
    # causal LM): tokens one sequence may hold (None: min(the model's maximum, 4096, its sliding window)),
    # sequences decoded at once, prompt tokens per prefill call (None: 32).
    max_context: int | None = None
    slots: int = 1
    prefill_chunk: int | tuple[int, ...] | None = None  # language models: one prefill function per size
    # Language models of several slots: also `mixed` (a decode step carrying a prefill chunk).
    mixed_step: bool = True
    # Weight-only int8 / int4: input features per scale (None: the quantiser's default).
    group_size: int | None = None
    # `--stages`: auto, N or at:NAME,... (hxc.compiler.stages.parse_stages); None: whole.
    stages: str | None = None


@dataclass
class ImportedModel:
    name: str
    source: str  # what the user passed
    source_format: str  # torch.export | torchscript | python | pickle | onnx
    source_sha256: str
    mlir: Path  # IREE input IR (MLIR bytecode or text), function `main`
    signature: Signature
    golden: dict[str, np.ndarray]  # input_i / output_i (outputs absent when no reference ran); bf16 as raw uint16
    program: Path | None  # the program the IR came from, copied into the bundle
    program_name: str | None  # its file name in the bundle
    weights: Path | None = None  # IREE parameter archive (.irpa), when weights are shared
    precision: str = "fp32"
    precision_error: float | None = None  # vs the fp32 reference, for reduced precision
    operators_at: dict[str, tuple[str, ...]] = field(default_factory=dict)
    golden_reference: str | None = "pytorch"  # who computed the golden outputs: pytorch, onnxruntime, user
    golden_note: str | None = None  # why the golden sample has no outputs
    weight_dtypes: tuple[str, ...] = ()  # element types of the model's parameters and buffers
    # The IR holds int64 constants that IREE's i64->i32 demotion cannot rewrite as
    # they are stored; a variant that demotes needs its own import (ImportOptions.interface_casts).
    int64_constants: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    # A model of several entry points (or with state): each function, its IR function of
    # the same name. Empty for a plain model: one function, `main`, of `signature`.
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    # A causal language model: its manifest record, and files the bundle carries for
    # it (bundle path -> the file to copy: the tokenizer's).
    language_model: LanguageModel | None = None
    files: dict[str, Path] = field(default_factory=dict)
    quantization: Quantization | None = None  # a weight-only int8 / int4 import
    # A model cut into stages (`--stages`): each stage imported as a model of its own
    # (its IR, golden sample and weights archive), in order. The model itself then has
    # no IR of its own: `mlir` is stage 0's.
    stages: tuple[ImportedModel, ...] = ()
    stage: Stage | None = None  # a stage's record (its artifacts not yet listed)

    @property
    def parts(self) -> tuple[tuple[int | None, ImportedModel], ...]:
        """What is compiled per target: each stage with its index, or the model whole."""
        return tuple(enumerate(self.stages)) if self.stages else ((None, self),)

    @property
    def function_specs(self) -> dict[str, FunctionSpec]:
        return self.functions or {MAIN: FunctionSpec(self.signature)}

    @property
    def interface(self) -> Signature:
        """Every tensor that crosses the artifact's interface, over all its functions
        (state included): what decides a variant's interface casts."""
        if self.stages:  # what crosses any stage's interface, the values between stages included
            calls = [s.interface for s in self.stages]
        else:
            calls = [f.call_signature for f in self.function_specs.values()]
        if len(calls) == 1:
            return calls[0]
        return Signature(inputs=tuple(s for c in calls for s in c.inputs), outputs=tuple(s for c in calls for s in c.outputs),
                         output_tree=self.signature.output_tree)  # fmt: skip


def wants_shared_weights(mode: str, total_bytes: int, has_bf16: bool) -> bool:
    if mode == "shared":
        return True
    if mode == "inline":
        return False
    # iree-turbine cannot inline bf16 parameters ("unsupported ScalarType BFloat16"
    # from np.array), so they always go to the parameter archive.
    return has_bf16 or total_bytes >= SHARED_WEIGHTS_THRESHOLD
