"""Check artifacts' numbers against the bundle's golden sample: the reference outputs
recorded at compile time, PyTorch's own for PyTorch models and ONNX Runtime's for ONNX
models; and, on request, at other input shapes (`--shapes x=1x33x64`: generated inputs,
drawn like the golden sample's) or on other inputs (`--example file.npz`), against
expected outputs the file holds or else the reference rebuilt from the bundle
(`hxc.reference`: needs torch or onnxruntime installed). A model with dynamic
dimensions is only as right as the sizes it was checked at.

A language model is checked by generation instead: the prompt of its greedy reference
(recorded at compile time, `LanguageModel.greedy_reference`) runs through `prefill` and
`decode` as `generate` runs it, and every step's logits must match Hugging Face's
(golden.npz) and every greedy token Hugging Face's, but where Hugging Face's own logits
tie within the tolerance; the first differing token is reported with its position. A
weight-only int8 / int4 artifact's logits may differ from Hugging Face's float32 ones by
the largest difference its quantisation recorded at compile time (`Quantization`), and
its tokens only where that difference could flip them.

The same tolerances (`hxc.dtypes`) serve `hxc verify`, `hxc compile --tune` and the
test suite, so "matches the reference" means one thing everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hxc.arrays import ArrayFileError, max_array_bytes, read_npz
from hxc.dtypes import compute_dtype, dtype, from_storage
from hxc.lm_calls import MIXED, decode_args, mixed_args, prefill_calls
from hxc.golden import Comparison, compare, compare_outputs, golden_arrays  # noqa: F401  (the golden arithmetic, re-exported)
from hxc.errors import BundleError, ExitCode, HxcError, NothingToCompareError, UsageError, first_line
from hxc.manifests import Manifest, Signature, TensorSpec
from hxc.manifests.schema import GREEDY_LOGITS, LanguageModel, Quantization, golden_prefix
from hxc.manifests.bundle import TrustedKeys, check_all_files, open_checked, read_bundle, trust_policy
from hxc.manifests.signing import TrustPolicy
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.select import select

GOLDEN = "golden"
GREEDY = "greedy"  # a language model's sample: its greedy reference
# A quantised artifact's logits against float32: the recorded largest difference (the
# quantised PyTorch model's) times 1 + this, for the compiled code's own rounding.
QUANTIZED_MARGIN = 0.05


def load_golden(bundle: Path, manifest: Manifest) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The golden inputs and outputs, as host arrays of the signature's dtypes, read
    from the checked bytes of the bundle's golden sample."""
    return golden_arrays(_golden_file(bundle, manifest), manifest.signature, f"{bundle}/{manifest.golden_file}")


def function_samples(bundle: Path, manifest: Manifest) -> list[Sample]:
    """The golden sample of each function of a model of several functions (or with
    state): inputs then the state read, outputs then the state written."""
    arrays = _golden_file(bundle, manifest)
    samples = []
    for name, fn in manifest.functions.items():
        prefix = golden_prefix(name)
        inputs, outputs = golden_arrays({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)},
                                        fn.call_signature, f"{bundle}/{manifest.golden_file} ({name})")  # fmt: skip
        samples.append(Sample(f"{GOLDEN} {name}", inputs, outputs, function=name))
    return samples


def greedy_sample(bundle: Path, manifest: Manifest) -> Sample:
    """A language model's greedy reference: the prompt's ids in, Hugging Face's logits
    of each step ([steps, vocab] f32, from the golden sample) out."""
    lm = manifest.language_model
    assert lm is not None and lm.greedy_reference is not None
    ref, where = lm.greedy_reference, f"{bundle}/{manifest.golden_file}"
    steps, prompt = len(ref.token_ids), ref.prompt_token_ids
    if not prompt or not steps or len(prompt) + steps - 1 > lm.max_context:
        raise BundleError(f"{bundle}: its greedy reference ({len(prompt)} prompt tokens, {steps} generated) does not fit "
                          f"its context of {lm.max_context}")  # fmt: skip
    if not all(0 <= t < lm.vocab_size for t in (*prompt, *ref.token_ids)):
        raise BundleError(f"{bundle}: its greedy reference holds token ids outside the vocabulary of {lm.vocab_size}")
    logits = _golden_file(bundle, manifest).get(GREEDY_LOGITS)
    if logits is None or logits.shape != (steps, lm.vocab_size) or logits.dtype != np.float32:
        raise BundleError(f"{where}: holds no {GREEDY_LOGITS} of {steps}x{lm.vocab_size}xf32 for the greedy reference")
    return Sample(GREEDY, [np.asarray(prompt, np.int32)], [logits], language_model=lm)


def greedy_logits(call: Callable[[str, list[np.ndarray]], Sequence[np.ndarray]], lm: LanguageModel, *,
                  mixed: bool = False) -> np.ndarray:  # fmt: skip
    """Each step's logits, [steps, vocab], for the reference prompt in slot 0 (the other
    slots idle, as `generate` runs one sequence) through `call(function, inputs) ->
    outputs` over a state the caller keeps. Each decode step is fed Hugging Face's token
    of the step before: while the artifact's greedy choices match, this is its own
    greedy generation; after a near-tie that went the other way, the later steps are
    still compared in Hugging Face's context instead of diverging. `mixed`: every call is
    `mixed` (the prompt read by its chunk part while nothing decodes, then each step by
    its decode part beside an empty chunk), so a bundle's third function is checked too."""
    ref = lm.greedy_reference
    assert ref is not None
    prompt = ref.prompt_token_ids
    if mixed:
        chunk, ctx, empty = lm.prefill_chunk, lm.max_context, 1 % lm.slots  # the empty chunk's slot: not slot 0
        for at in range(0, len(prompt), chunk):
            out = call(MIXED, mixed_args({}, lm.slots, prompt[at:at + chunk], at, 0, chunk, ctx))
        steps = [out[1].reshape(-1)]
        for i, token in enumerate(ref.token_ids[:-1]):
            out = call(MIXED, mixed_args({0: (token, len(prompt) + i)}, lm.slots, [], 0, empty, chunk, ctx))
            steps.append(out[0].reshape(lm.slots, -1)[0])
        return np.stack(steps)
    logits = np.zeros(0, np.float32)
    for name, args in prefill_calls(prompt, 0, lm.chunks, lm.max_context):  # the calls generate makes
        logits = call(name, args)[0]
    steps = [logits.reshape(-1)]
    for i, token in enumerate(ref.token_ids[:-1]):
        args = decode_args({0: (token, len(prompt) + i)}, lm.slots, lm.max_context)
        steps.append(call("decode", args)[0].reshape(lm.slots, -1)[0])
    return np.stack(steps)


def greedy_result(artifact: str, device: str, logits: np.ndarray, sample: Sample, precision: str,
                  quantization: Quantization | None = None) -> VerifyResult:  # fmt: skip
    """The artifact's logits at each step against Hugging Face's, and its greedy tokens
    against Hugging Face's: a token may differ only where Hugging Face's own logits for
    the two tokens tie within the tolerance (either could be the maximum). A quantised
    artifact's logits may stray from Hugging Face's float32 ones by the largest
    difference recorded for its quantisation (measured on this prompt among others),
    on top of float32's tolerance."""
    lm = sample.language_model
    assert sample.expected is not None and lm is not None and lm.greedy_reference is not None
    expected, ref = sample.expected[0], lm.greedy_reference
    name = compute_dtype("f32", precision)
    atol, rtol = dtype(name).tolerance or (0.0, 0.0)
    if quantization is not None:
        atol += quantization.max_logit_diff * (1 + QUANTIZED_MARGIN)
    c = compare(logits, expected, name, (atol, rtol))
    if logits.shape == expected.shape:
        for i, (got, want) in enumerate(zip(logits.argmax(-1).tolist(), ref.token_ids)):
            h = expected[i].astype(np.float64)
            if got != want and abs(h[got] - h[want]) > 2 * (atol + rtol * abs(h[want])):
                return VerifyResult(artifact, device, False, c.max_abs, c.max_rel,
                                    f"greedy tokens differ from Hugging Face's at position {i} of {len(ref.token_ids)}: "
                                    f"{got} instead of {want}", GREEDY)  # fmt: skip
    return VerifyResult(artifact, device, c.ok, c.max_abs, c.max_rel, sample=GREEDY)


def _golden_file(bundle: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    if not manifest.golden_file:
        raise BundleError(f"{bundle}: this bundle has no golden sample to compare against")
    checked = open_checked(bundle, manifest, manifest.golden_file)
    try:
        return read_npz(checked.buffer, str(checked.path))
    except ArrayFileError as e:
        raise BundleError(e.message) from None
    finally:
        checked.close()



@dataclass(frozen=True)
class Sample:
    """Inputs to check artifacts on and the outputs they must give."""

    label: str  # "golden", "x=1x33x64" (--shapes), or the --example file
    inputs: list[np.ndarray]
    expected: list[np.ndarray] | None  # None until the reference computes them
    # A model of several functions, or with state: the function the sample calls. Its
    # inputs and outputs are the function's call signature's (state read, state written).
    function: str | None = None
    # A language model, for its greedy reference (`language_model.greedy_reference`):
    # the prompt's ids in ([n] i32), Hugging Face's logits of each step out ([steps,
    # vocab]); the sample calls prefill and decode.
    language_model: LanguageModel | None = None


def shaped_sample(signature: Signature, text: str) -> Sample:
    """Generated inputs (drawn like the golden sample's) at the shapes `text` gives:
    `NAME=DIMS,...` (`x=1x33x64`; names as the signature has them, or input_0, ...),
    or bare `DIMS` in input order. Inputs left out take their static shape, their
    dynamic dimensions bound by the inputs given (dimensions with one name are one
    size)."""
    from hxc.compiler.specs import MAX_DIM, example_arrays

    specs = signature.inputs
    given: dict[int, tuple[int, ...]] = {}
    for k, part in enumerate(p.strip() for p in text.split(",")):
        name, sep, dims = part.rpartition("=")
        index = _input_index(signature, name) if sep else k
        if index is None or index >= len(specs):
            raise UsageError(f"--shapes {text!r}: no input {name or k!r}",
                             hint=f"the model's inputs: {', '.join(s.format() for s in specs)}")  # fmt: skip
        if not re.fullmatch(r"\d+(x\d+)*", dims) or not all(1 <= int(d) <= MAX_DIM for d in dims.split("x")):
            raise UsageError(f"--shapes {text!r}: {dims!r} is not a shape", hint="dimensions joined by x, e.g. x=1x33x64")
        given[index] = tuple(int(d) for d in dims.split("x"))
    bound: dict[str, int] = {}
    for i, shape in given.items():
        spec = specs[i]
        if len(shape) != len(spec.shape):
            raise UsageError(f"--shapes {text!r}: input {spec.name} has {len(spec.shape)} dimensions ({spec.format()})")
        for want, got in zip(spec.shape, shape):
            if isinstance(want, str) and bound.setdefault(want, got) != got:
                raise UsageError(f"--shapes {text!r}: dimension {want} is {bound[want]} in one input and {got} in another")
            if isinstance(want, int) and want != got:
                raise UsageError(f"--shapes {text!r}: input {spec.name} is {spec.format()}; only its dynamic dimensions can change")
    shapes = []
    for i, spec in enumerate(specs):
        shape = given.get(i) or tuple(bound.get(d, d) if isinstance(d, str) else d for d in spec.shape)
        if free := [d for d in shape if isinstance(d, str)]:
            raise UsageError(f"--shapes {text!r}: says nothing of {spec.name}'s dynamic dimension {free[0]}",
                             hint=f"give its shape too: {spec.name}=DIMS")  # fmt: skip
        shapes.append(tuple(int(d) for d in shape))
    size = sum(int(np.prod(sh)) * dtype(s.dtype).numpy_dtype().itemsize for sh, s in zip(shapes, specs))
    if size > max_array_bytes():
        raise UsageError(f"--shapes {text!r}: the inputs would take {size} bytes; the limit is {max_array_bytes()}")
    arrays = example_arrays([TensorSpec(s.name, s.dtype, sh) for s, sh in zip(specs, shapes)])
    return Sample(text, arrays, None)


def _input_index(signature: Signature, name: str) -> int | None:
    names = [s.name for s in signature.inputs]
    if name in names:
        return names.index(name)
    if m := re.fullmatch(r"input_(\d+)", name):
        return int(m.group(1))
    return None


def example_sample(signature: Signature, path: str | Path) -> Sample:
    """Inputs from an example file (`hxc.compiler.examples`), checked against the
    signature as a call's would be, with its expected outputs when it holds them."""
    from hxc.compiler.examples import read_example
    from hxc.runtime.loader import check_inputs

    example = read_example(path)
    arrays = [from_storage(a, s.dtype) for a, s in zip(example.ordered([s.name for s in signature.inputs]), signature.inputs)]
    try:
        arrays = check_inputs(signature, arrays)
    except HxcError as e:
        raise UsageError(f"{path}: {e.message}") from None
    expected = None
    if example.outputs is not None:
        if len(example.outputs) != len(signature.outputs):
            raise UsageError(f"{path}: holds {len(example.outputs)} expected outputs; the model has {len(signature.outputs)}")
        expected = [from_storage(a, s.dtype) for a, s in zip(example.outputs, signature.outputs)]
    return Sample(str(path), arrays, expected)


@dataclass(frozen=True)
class VerifyResult:
    artifact: str
    device: str
    ok: bool
    max_abs: float | None
    max_rel: float | None
    error: str | None = None  # when it could not run at all, or its greedy tokens differ
    sample: str = GOLDEN  # which inputs (Sample.label)


@dataclass(frozen=True)
class NotRun:
    """An artifact this host cannot run (or that `device` left out): why, and whether
    its file was still checked against the manifest's sha256 and matched."""

    artifact: str
    reason: str
    sha256_ok: bool | None  # None: it has no file to check (it failed to compile)


@dataclass(frozen=True)
class VerifyReport:
    bundle: Path
    integrity: tuple[str, ...]  # every build-time file whose bytes do not match the manifest
    results: tuple[VerifyResult, ...]  # one per artifact this host can run and sample
    not_run: tuple[NotRun, ...] = ()  # every other artifact

    @property
    def ok(self) -> bool:
        return not self.integrity and bool(self.results) and all(r.ok for r in self.results)

    @property
    def exit_code(self) -> ExitCode:
        if self.integrity:
            return ExitCode.INTEGRITY
        if not self.results:
            return ExitCode.NO_COMPATIBLE_ARTIFACT
        return ExitCode.OK if self.ok else ExitCode.MISMATCH


def verify_bundle(
    bundle: str | Path,
    *,
    device: str | None = None,
    probe: HostProbe | None = None,
    trusted_keys: TrustedKeys = None,
    min_sequence: int | None = None,
    trust: TrustPolicy | None = None,
    isolate: bool = True,
    shapes: Sequence[str] = (),
    examples: Sequence[str | Path] = (),
    timeout_s: float = 120.0,
) -> VerifyReport:
    """Check every build-time file of the bundle against the manifest (whether or not
    this host can run it), then run the golden sample, and a sample per `shapes` text
    and `examples` file, on every artifact this host can run. Artifacts whose files
    fail the check are never run.

    With `isolate` (the default) each artifact runs in its own worker process, so one
    whose code crashes inside IREE (a segfault, an illegal instruction) is reported
    as a failed artifact instead of taking the caller down; each run there gets
    `timeout_s`.

    `trusted_keys` and `min_sequence` are checked as `load()` checks them, here and
    in every worker (handed to it explicitly); `trust`, a resolved policy (the CLI's),
    replaces both."""
    path = Path(bundle)
    trust = trust if trust is not None else trust_policy(trusted_keys, min_sequence)
    manifest = read_bundle(path, trust).manifest
    bad = check_all_files(path, manifest)
    integrity = tuple(bad.values())
    if manifest.golden_file in bad:
        return VerifyReport(path, integrity, ())
    if not manifest.stateless_main:
        if shapes or examples:
            raise UsageError(f"{path}: --shapes and --example check models of one stateless function; this one has "
                             f"{', '.join(manifest.functions)}")  # fmt: skip
    # Inputs are read (and bad ones refused) before anything runs.
    extra = [] if not manifest.stateless_main else [shaped_sample(manifest.signature, t) for t in shapes] + [example_sample(manifest.signature, e) for e in examples]
    if not manifest.golden_outputs:
        samples = []
    elif manifest.stateless_main:
        samples = [Sample(GOLDEN, *load_golden(path, manifest))]
    elif manifest.language_model is not None and manifest.language_model.greedy_reference is not None:
        samples = [greedy_sample(path, manifest)]
    else:
        samples = function_samples(path, manifest)
    if not samples and not extra:
        raise NothingToCompareError(
            f"{path}: the golden sample has no expected outputs, so there is nothing to compare against: "
            f"{manifest.golden_note or 'no reference ran at compile time'}",
            hint="recompile with --example inputs.npz (inputs the reference can run, or expected outputs as output_0, ...), "
            "or check inputs of your own: hxc verify --example FILE.npz",
        )
    if unknown := [s for s in extra if s.expected is None]:
        if program := manifest.model.program_file:
            if program in bad:
                raise BundleError(f"{path}: its {program} fails the integrity check; it cannot compute reference outputs")
        from hxc.reference import reference_outputs

        computed = iter(reference_outputs(path, manifest, [s.inputs for s in unknown]))
        extra = [s if s.expected is not None else Sample(s.label, s.inputs, next(computed)) for s in extra]
    samples += extra
    probe = probe or probe_host()
    # Every artifact is checked, reduced-precision ones against their own precision's tolerance.
    selection = select(manifest, probe, device=device, tolerance=float("inf"))
    results = []
    for cand in selection.candidates:
        art, label, run_id = cand.artifact, cand.device.label, cand.id  # a staged bundle's: every stage of one target
        if any(a.file in bad for a in cand.artifacts) or any(w.file in bad for w in manifest.weights if w.precision == art.precision):
            results += [VerifyResult(run_id, label, False, None, None, "not run: its files fail the integrity check", s.label)
                        for s in samples]  # fmt: skip
            continue
        runs = _run_samples(path, run_id, samples, isolate, probe, trust, timeout_s)
        for s, run in zip(samples, runs):
            if isinstance(run, str):
                results.append(VerifyResult(run_id, label, False, None, None, run, s.label))
                continue
            assert s.expected is not None
            if s.language_model is not None:  # through prefill and decode, then (if it has it) mixed
                checks = [greedy_result(run_id, label, logits, s, art.precision, art.quantization) for logits in run]
                result = next((r for r in checks if not r.ok), None) or max(checks, key=lambda r: r.max_abs or 0.0)
                if not result.ok and len(checks) > 1 and result is checks[1]:
                    result = replace(result, error=f"through `{MIXED}`: {result.error or 'logits beyond the tolerance'}")
                results.append(result)
                continue
            signature = manifest.functions[s.function].call_signature if s.function else manifest.signature
            # A type any stage carries narrower (f64 as f32) bounds the whole run's precision.
            casts = tuple(dict.fromkeys(c for a in cand.artifacts for c in a.interface_casts))
            comps = compare_outputs(run, s.expected, signature, art.precision, casts)
            results.append(VerifyResult(run_id, label, all(c.ok for c in comps), max(c.max_abs for c in comps),
                                        max(c.max_rel for c in comps), sample=s.label))  # fmt: skip
    ran = {r.artifact for r in results}
    not_run: dict[str, NotRun] = {}
    for r in selection.rejected:
        if r.artifact.id not in ran:
            checked = r.artifact.file not in bad if r.artifact.file else None
            not_run.setdefault(r.artifact.id, NotRun(r.artifact.id, r.reason, checked))
    return VerifyReport(path, integrity, tuple(results), tuple(not_run.values()))


def _run_samples(bundle: Path, artifact: str, samples: list[Sample], isolate: bool, probe: HostProbe,
                 trust: TrustPolicy | None, timeout_s: float) -> list[list[np.ndarray] | str]:  # fmt: skip
    """Each sample's outputs on one artifact, loaded once, or the one-line reason it
    could not run."""
    from hxc.runtime.loader import load

    runs: list[list[np.ndarray] | str] = []
    try:
        if isolate:
            from hxc.pool.worker import isolated_worker
            from hxc.pool.workers import load_options

            with isolated_worker(bundle, artifact, timeout_s=timeout_s,
                                 load_options={"tolerance": float("inf"), **load_options(trust)}) as worker:  # fmt: skip
                runs = [_one(lambda s: _in_worker(worker, s), s) for s in samples]
        else:
            keys = trust.keys if trust is not None else False  # None: the caller checked nothing
            model = load(bundle, device=artifact, strict=True, probe=probe, tolerance=float("inf"), trusted_keys=keys,
                         min_sequence=trust.min_sequence if trust is not None else None)  # fmt: skip
            runs = [_one(lambda s: _in_process(model, s), s) for s in samples]
    except HxcError as e:  # it did not load
        return [e.message] * len(samples)
    except Exception as e:  # an IREE runtime failure on this device
        return [first_line(e)] * len(samples)
    return runs


def _in_process(model: Any, s: Sample) -> list[np.ndarray]:
    if s.language_model is not None:
        def run(mixed: bool) -> np.ndarray:
            state = model.new_state()
            return greedy_logits(lambda f, inputs: model.call_flat(f, inputs, state=state), s.language_model, mixed=mixed)

        return [run(False), *([run(True)] if MIXED in model.functions else [])]
    if s.function is None:
        return model.run_flat(s.inputs)
    fn = model.functions[s.function]
    n = len(fn.signature.inputs)
    state = model.import_state({r.name: a for r, a in zip(fn.reads, s.inputs[n:])})
    outputs = model.call_flat(s.function, s.inputs[:n], state=state)
    written = state.to_host()
    return [*outputs, *(written[w.name] for w in fn.writes)]


def _in_worker(worker: Any, s: Sample) -> list[np.ndarray]:
    """A function's sample over the worker protocol: its state imported from the sample,
    the call, then the state exported to compare what it wrote. A greedy reference runs
    over a state opened zero on the worker's device and never copied."""
    if s.language_model is not None:
        def run(mixed: bool) -> np.ndarray:
            worker.open_state("verify").result()
            try:
                return greedy_logits(lambda f, inputs: worker.submit(inputs, function=f, state="verify").result().outputs,
                                     s.language_model, mixed=mixed)  # fmt: skip
            finally:
                worker.drop_state("verify").result()

        return [run(False), *([run(True)] if MIXED in worker.functions else [])]
    if s.function is None:
        return worker.run(s.inputs)
    fn = worker.functions[s.function]
    n = len(fn.signature.inputs)
    worker.import_state("verify", {r.name: a for r, a in zip(fn.reads, s.inputs[n:])}).result()
    try:
        outputs = worker.submit(s.inputs[:n], function=s.function, state="verify").result().outputs
        written = worker.state_arrays(worker.export_state("verify").result())
    finally:
        worker.drop_state("verify").result()
    return [*outputs, *(written[w.name] for w in fn.writes)]


def _one(run: Any, sample: Sample) -> list[np.ndarray] | str:
    try:
        return run(sample)
    except HxcError as e:
        return e.message
    except Exception as e:  # an IREE runtime failure at these inputs
        return first_line(e)

