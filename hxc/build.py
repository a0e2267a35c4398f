"""`hxc compile` as a library call: model in, bundle out.

import (a frontend: PyTorch or ONNX) -> compile per target (driver, in parallel,
through the cache) -> write the bundle. The bundle is staged and swapped in only when
complete; with failed targets it is published only if partial bundles are allowed,
and then the failures are recorded in its manifest.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from hxc import __version__, frontends
from hxc.compiler.cache import CompileCache, ImportCache, default_cache_dir
from hxc.compiler.driver import CompileResult
from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel, ImportOptions
from hxc.manifests import ARTIFACTS_DIR, GOLDEN_FILE, Artifact, Manifest, ModelInfo, Toolchain, staged_bundle
from hxc.dtypes import WEIGHT_BITS
from hxc.engines import DEFAULT_ENGINE, Engine, resolve_backends
from hxc.engines.base import BuildContext, Built, BuildJob
from hxc.errors import ExitCode, HxcError, UsageError, first_line
from hxc.extras import require
from hxc.frontends import Frontend
from hxc.frontends.base import one_export_per_build
from hxc.manifests.bundle import (copy_hashed, file_hash, file_sha256, name_write_errors, private_dir, remove_stale,
                                  write_manifest)
from hxc.manifests.schema import (PROGRAM_PT2, WEIGHTS_FILE, FileHash, Quantization, Signature, Weights, from_json,
                                  schema_version_written, to_json)
from hxc.targets import Variant, extra_flags_for, family, resolve


# (built artifact, the job it came from, the build's context) -> the same artifact with
# its fastest options, whatever its engine (`hxc.bench.tune.tune`)
Tuner = Callable[[Built, BuildJob, BuildContext], Built]


@dataclass(frozen=True)
class Skipped:
    """A (target, precision) that was asked for but not built, and why."""

    target: str  # the variant id: vulkan:spirv
    precision: str
    reason: str


@dataclass(frozen=True)
class BuildResult:
    output: Path
    written: bool  # False when failed targets kept the bundle from being published
    manifest: Manifest
    built: list[Built]  # every artifact of every engine, as the manifest lists them
    timings: dict[str, float] = field(default_factory=dict)
    skipped: tuple[Skipped, ...] = ()
    notes: list[str] = field(default_factory=list)  # e.g. backends `all` skipped, and why
    optional: frozenset[str] = frozenset()  # engines asked for only through `all`

    @property
    def results(self) -> list[CompileResult]:
        """IREE's compile results, for their details (argv, stderr, plan)."""
        return [b.record for b in self.built if isinstance(b.record, CompileResult)]

    @property
    def failed(self) -> list[Built]:
        return [b for b in self.built if b.status == "failed"]

    @property
    def blocking(self) -> list[Built]:
        """Failures that keep a bundle from being written (unless --allow-partial):
        those of backends asked for by name."""
        return [b for b in self.failed if b.engine not in self.optional]

    @property
    def total(self) -> int:
        return len(self.built)

    @property
    def exit_code(self) -> ExitCode:
        """OK when a bundle was written; else PARTIAL when only some targets failed
        (--allow-partial would have written the rest), ERROR when all did."""
        failed = self.failed
        if self.written or not failed:
            return ExitCode.OK
        return ExitCode.PARTIAL if len(failed) < self.total else ExitCode.ERROR


def build_bundle(
    source: str,
    output: str | Path,
    targets: str | Sequence[Variant] = "all",
    *,
    backends: str = DEFAULT_ENGINE,
    options: ImportOptions | None = None,
    precisions: Sequence[str] = ("fp32",),
    allow_partial: bool = False,
    jobs: int | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    on_event: Callable[[Any], None] = lambda e: None,
    on_stage: Callable[[str], None] = lambda s: None,
    tune: Tuner | None = None,
    extra_flags: Sequence[tuple[str, str]] = (),
) -> BuildResult:
    """Compile `source` for `targets` into the bundle directory `output`, with every
    engine in `backends` (`iree,onnxruntime,inductor`, or `all` for those this host can
    build; failures of engines asked for only through `all` never block the bundle).

    `extra_flags` are expert IREE flags as (family or variant id, flag) pairs
    (`hxc.targets.parse_extra_flags`), appended to the chosen variants' own.

    Raises HxcError for problems before compiling (bad model, bad target name, export
    failure). Compile failures are returned in the result, not raised. `jobs` compiles
    run at once (default: one per core). Imports and artifacts are cached in
    `cache_dir` (default: `default_cache_dir()`) unless `use_cache` is False. `tune`,
    when given (`hxc.bench.tune.tune`), may replace artifacts with faster builds it
    measured. `on_event` gets each artifact's start and end (CompileEvent for IREE's
    compiles, EngineEvent for the others').

    Every engine builds its artifacts through one call (`Engine.build_all`), and every
    artifact is recorded from what it returns (`_artifact_entry`).
    """
    variants = resolve(targets) if isinstance(targets, str) else list(targets)
    options = options or ImportOptions()
    frontend = frontends.recognise(source)  # before any slow work: what the source is, or a one-line error
    require(frontend.extra, f"compiling {frontend.summary}")
    engines, optional, notes = resolve_backends(backends)
    wanted = list(dict.fromkeys(precisions))
    if unsupported := [p for p in wanted if p not in frontend.precisions]:
        quantised = all(p in WEIGHT_BITS for p in unsupported)
        raise UsageError(f"--precision {', '.join(unsupported)} is not supported for {frontend.summary}"
                         + (": int8 and int4 quantise the weights of language models only" if quantised else ""),
                         hint=f"it builds {', '.join(frontend.precisions)}"
                              + ("" if quantised else "; convert the model itself"))  # fmt: skip
    iree = any(e.name == DEFAULT_ENGINE for e in engines)
    builds = [(p, v) for p in wanted for v in variants if p in family(v.family).precisions] if iree else []
    skipped = [Skipped(v.id, p, f"the {v.family} backend cannot generate {p} code")
               for p in wanted for v in variants if iree and p not in family(v.family).precisions]  # fmt: skip
    others = [e for e in engines if e.name != DEFAULT_ENGINE]
    if options.stages:
        _check_stages_request(options.stages, frontend, others, wanted)
    families = {v.family for v in variants}
    other_builds = [(p, e) for e in others for p in wanted if p in e.precisions and families & set(e.families)]
    if not builds and not other_builds:
        # Checked before any slow work: a bundle without artifacts is no result.
        raise UsageError(
            f"nothing to build: {', '.join(f'{s.target}@{s.precision}' for s in skipped) or 'no targets'} cannot be generated",
            hint="add fp32, or a family that generates reduced precision (see `hxc targets`)",
        )
    cache_root = (cache_dir or default_cache_dir()) if use_cache else None
    cache = CompileCache(cache_root)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # what killed runs to this path left behind
    with private_dir(out, ".work") as work:
        imports: dict[str, ImportedModel] = {}
        # Every import of this build derives from one exported model: a factory run twice
        # may build different weights (a module created with unseeded randomness).
        with one_export_per_build():
            for precision in dict.fromkeys(["fp32", *(p for p, _ in (*builds, *other_builds))]):  # fp32 first: it is the reference
                sub = work / precision
                sub.mkdir()
                imports[precision] = import_model(frontend, source, replace(options, precision=precision), sub, on_stage,
                                                  cache_root)  # fmt: skip
            reference = imports["fp32"]
            timings = dict(reference.timings)

            irs: dict[tuple[str, tuple], ImportedModel] = {(p, ()): imp for p, imp in imports.items()}
            # IR can be hundreds of MB: hash each once (the reference's goes into the manifest).
            ir_sha = functools.cache(lambda mlir: file_sha256(mlir))
            cast_errors: dict[tuple[str, tuple], str] = {}
            jobs_of: dict[str, list[BuildJob]] = {e.name: [] for e in engines}  # per engine, in the order asked
            for precision, v in builds:
                casts = _casts_needed(v, imports[precision])
                key = (precision, casts)
                if key not in irs and key not in cast_errors:
                    sub = work / f"{precision}-{'-'.join(f'{a}{b}' for a, b in casts)}"
                    sub.mkdir()
                    try:
                        irs[key] = import_model(frontend, source, replace(options, precision=precision, interface_casts=casts),
                                                sub, on_stage, cache_root)  # fmt: skip
                    except HxcError as e:  # this variant cannot carry the model; the others still can
                        cast_errors[key] = e.message
                # A variant whose cast interface the model cannot have fails alone, with the reason.
                ir = irs.get(key, reference)
                for (stage, part), (_, ir_part) in zip(imports[precision].parts, ir.parts):  # each stage, or the model
                    jobs_of[DEFAULT_ENGINE].append(replace(
                        _job(part, v.family, precision, work), variant=v, ir=ir_part, ir_sha256=ir_sha(ir_part.mlir),
                        casts=casts, flags=extra_flags_for(v, extra_flags) if key in irs else (),
                        error=cast_errors.get(key), stage=stage))  # fmt: skip
            for eng in others:
                for precision in wanted:
                    for fam in (f for f in dict.fromkeys(v.family for v in variants) if f in eng.families):
                        if precision not in eng.precisions:
                            skipped.append(Skipped(f"{fam}:{eng.name}", precision, f"the {eng.name} backend does not build {precision}"))
                            continue
                        # Other engines build from the model's own program at fp32, converted as they go.
                        jobs_of[eng.name].append(replace(_job(reference, fam, precision, work),
                                                         functions=tuple(reference.functions)))  # fmt: skip
        built, tuned = _build_all(engines, jobs_of, BuildContext(work, cache, jobs, on_event, _check_golden), tune,
                                  on_stage)  # fmt: skip
        timings.update(tuned)

        manifest = _manifest(imports, [p for p in wanted if p in imports], _model_ir_sha256(reference, ir_sha), built)
        result = BuildResult(out, False, manifest, built, timings, tuple(skipped), notes, optional)
        if result.blocking and not (allow_partial and len(result.failed) < result.total):
            return result  # nothing is published; an existing bundle at `out` stays as it was

        on_stage("writing bundle")
        with staged_bundle(out) as stage:
            manifest = _write_files(stage, manifest, imports, built)
            write_manifest(stage, manifest)
    return replace(result, manifest=manifest, written=True)


def _check_stages_request(stages: str, frontend: Frontend, others: Sequence[Engine], precisions: Sequence[str]) -> None:
    """`--stages` is refused before any slow work where it cannot be honoured."""
    from hxc.compiler.stages import parse_stages

    parse_stages(stages)
    if quantised := [p for p in precisions if p in WEIGHT_BITS]:
        raise UsageError(f"--stages and --precision {', '.join(quantised)}: a language model's quantised stages are not "
                         "built yet", hint="build the stages in fp32, or the quantised model whole")  # fmt: skip
    if frontend.program_file != PROGRAM_PT2:
        raise UsageError(f"--stages cuts PyTorch programs; {frontend.summary} is not one")
    if others:
        raise UsageError(f"--stages builds IREE artifacts only; not {', '.join(e.name for e in others)}",
                         hint="leave out --backends, or compile the model whole for the other engines")  # fmt: skip


def _model_ir_sha256(reference: ImportedModel, ir_sha: Callable[[Path], str]) -> str:
    """What identifies the model's IR (profiles are matched to it): its IR's sha256;
    for a staged model, the sha256 of its stages' IR sha256s, in order."""
    if not reference.stages:
        return ir_sha(reference.mlir)
    return hashlib.sha256("\n".join(ir_sha(s.mlir) for s in reference.stages).encode()).hexdigest()


def _job(imported: ImportedModel, fam: str, precision: str, work: Path) -> BuildJob:
    return BuildJob(fam, precision, imported.program, imported.program_name, imported.source_format, imported.weights,
                    imported.golden, imported.signature, work)  # fmt: skip


def _build_all(engines: Sequence[Engine], jobs_of: dict[str, list[BuildJob]], ctx: BuildContext, tune: Tuner | None,
               on_stage: Callable[[str], None]) -> tuple[list[Built], dict[str, float]]:  # fmt: skip
    """Every engine's artifacts, engine by engine, and the wall time spent building
    (`compile`) and, with `tune`, tuning."""
    spent = {"tune": 0.0}

    def timed(b: Built, job: BuildJob, c: BuildContext) -> Built:
        assert tune is not None
        t = time.perf_counter()
        on_stage("tuning")
        try:
            return tune(b, job, c)
        finally:
            spent["tune"] += time.perf_counter() - t
            on_stage("compiling")

    ctx = replace(ctx, tune=timed if tune is not None else None)
    t = time.perf_counter()
    on_stage("compiling")
    built = [b for eng in engines if jobs_of[eng.name] for b in eng.build_all(jobs_of[eng.name], ctx)]
    timings = {"compile": time.perf_counter() - t - spent["tune"]}
    return built, timings | (spent if tune is not None else {})


def _casts_needed(variant: Variant, imported: ImportedModel) -> tuple[tuple[str, str], ...]:
    """The variant's interface casts that this model needs: for element types in its
    signature, or in its weights when they live in a shared archive (whose bytes the
    variant could not read as another type), or i64 for int64 constants IREE's
    demotion cannot rewrite as they are stored."""
    sig = imported.interface
    present = {s.dtype for s in (*sig.inputs, *sig.outputs)}
    if imported.weights is not None:
        present |= set(imported.weight_dtypes)
    if imported.int64_constants:
        present.add("i64")
    return tuple(c for c in variant.interface_casts if c[0] in present)


def _write_files(stage: Path, manifest: Manifest, imports: dict[str, ImportedModel], built: Sequence[Built]) -> Manifest:
    """Copy every build-time file into the staged bundle and record the hash of the
    bytes written, checked against the hash each was produced with."""
    reference = imports["fp32"]
    sources: dict[str, tuple[Path, FileHash | None]] = {}
    for b in built:  # several artifacts may share one file (ONNX Runtime's execution providers)
        if b.status == "ok" and b.file is not None and b.bundle_name is not None and not b.in_bundle:
            sources[b.bundle_name] = (b.file, b.hash)
    if reference.program is not None and reference.program_name:
        sources[reference.program_name] = (reference.program, None)
    for rel, src in reference.files.items():  # a language model's tokenizer
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        sources[rel] = (src, None)
    for w in manifest.weights:
        part = imports[w.precision] if w.stage is None else imports[w.precision].stages[w.stage]
        sources[w.file] = (part.weights, FileHash(w.sha256, w.size))  # type: ignore[assignment]
    (stage / ARTIFACTS_DIR).mkdir()
    files: dict[str, FileHash] = {}
    for rel, (src, expected) in sources.items():
        files[rel] = copy_hashed(src, stage / rel)
        if expected is not None and files[rel] != expected:
            raise HxcError(f"{src}: changed while it was copied into the bundle; nothing was written")
    with name_write_errors(stage / GOLDEN_FILE):
        np.savez(stage / GOLDEN_FILE, **reference.golden)
    files[GOLDEN_FILE] = file_hash(stage / GOLDEN_FILE)
    return replace(manifest, files=files)



def import_model(
    frontend: Frontend, source: str, options: ImportOptions, workdir: Path, on_stage: Callable[[str], None],
    cache_root: Path | None = None,
) -> ImportedModel:
    """Import the model with its frontend, through the import cache for model files."""
    # A staged import is several imports in one, which the cache's one entry cannot hold.
    cache = ImportCache(cache_root if frontend.cacheable and not options.stages else None)
    key = None
    if cache.root is not None:
        key = ImportCache.key(_source_digest(frontend, Path(source), options), (frontend.name, options),
                              to_json(toolchain()))  # fmt: skip
        if (entry := cache.get(key)) is not None:
            on_stage("reusing the cached import")
            return _imported_from_cache(entry, source)
    imported = frontend.import_model(source, options, workdir, on_stage)
    if key is not None:
        _cache_import(cache, key, imported, workdir)
    return imported


def _source_digest(frontend: Frontend, path: Path, options: ImportOptions) -> str:
    digest = frontend.digest(path)
    if options.example:  # the example file's contents, not just its name, decide the golden sample
        example = Path(options.example)
        digest += ":" + (file_sha256(example) if example.is_file() else "missing")
    return digest


def _cache_import(cache: ImportCache, key: str, m: ImportedModel, workdir: Path) -> None:
    golden = workdir / "golden-cache.npz"
    np.savez(golden, **m.golden)
    files = {"ir": m.mlir, "golden.npz": golden}
    if m.program is not None:
        files["program"] = m.program
    if m.weights is not None:
        files["weights.irpa"] = m.weights
    meta = {
        "name": m.name, "source_format": m.source_format, "source_sha256": m.source_sha256,
        "program_name": m.program_name, "signature": to_json(m.signature), "operators_at": m.operators_at,
        "ir_name": m.mlir.name, "precision": m.precision, "precision_error": m.precision_error,
        "golden_reference": m.golden_reference, "golden_note": m.golden_note, "weight_dtypes": list(m.weight_dtypes),
        "int64_constants": m.int64_constants,
        "quantization": to_json(m.quantization),
    }  # fmt: skip
    cache.put(key, files, meta)


def _imported_from_cache(entry: Path, source: str) -> ImportedModel:
    meta = json.loads((entry / "meta.json").read_text())
    with np.load(entry / "golden.npz") as g:
        golden = dict(g)
    return ImportedModel(
        name=meta["name"],
        source=source,
        source_format=meta["source_format"],
        source_sha256=meta["source_sha256"],
        mlir=entry / "ir",
        signature=from_json(Signature, meta["signature"]),
        golden=golden,
        program=entry / "program" if (entry / "program").is_file() else None,
        program_name=meta["program_name"],
        weights=entry / "weights.irpa" if (entry / "weights.irpa").is_file() else None,
        operators_at={k: tuple(v) for k, v in meta["operators_at"].items()},
        precision=meta["precision"],
        precision_error=meta["precision_error"],
        golden_reference=meta.get("golden_reference", "pytorch"),
        golden_note=meta.get("golden_note"),
        weight_dtypes=tuple(meta.get("weight_dtypes", ())),
        int64_constants=meta.get("int64_constants", False),
        quantization=from_json(Quantization, q) if (q := meta.get("quantization")) is not None else None,
        timings={"import (cached)": 0.0},
    )


def _check_golden(eng: Engine, b: Built, job: BuildJob) -> Built:
    """Run a fresh artifact on the golden sample here, if this host can run it; a build
    that computes the wrong thing is a failed build."""
    from hxc.runtime.probe import probe_host
    from hxc.golden import compare_outputs, golden_arrays

    art = b.as_artifact()
    fam = family(b.family)
    device = next((d for d in probe_host().devices if d.driver in fam.drivers
                   and fam.cannot_run(art, d) is None and eng.cannot_run(art, d) is None), None)  # fmt: skip
    if device is None or eng.missing_at_runtime() is not None:
        return b
    inputs, expected = golden_arrays(job.golden, job.signature)
    weights = (job.weights, PARAMETER_SCOPE) if job.weights is not None and eng.uses_shared_weights(art) else None
    try:
        outputs = eng.open(art, b.file, device, weights).invoke(inputs, job.signature)
    except Exception as e:
        return replace(b, status="failed", error=f"does not run here: {first_line(e)}")
    comps = compare_outputs(outputs, expected, job.signature, b.precision)
    worst = max((c.max_abs for c in comps), default=0.0)
    if not all(c.ok for c in comps):
        return replace(b, status="failed", error=f"wrong numbers: max abs error {worst:.3g} against the golden sample")
    return replace(b, verified=f"golden sample on {device.label}: max abs error {worst:.2g}")


def _manifest(imports: dict[str, ImportedModel], precisions: list[str], ir_sha256: str, built: Sequence[Built]) -> Manifest:
    reference = imports["fp32"]
    # The bundle's program (program.pt2 without its weights, or model.onnx pointing into
    # the archive) needs the fp32 archive even when no fp32 artifact is built.
    stored = dict.fromkeys(["fp32", *precisions])
    weights = tuple(
        Weights(file=weights_file(p, stage), scope=PARAMETER_SCOPE, sha256=h.sha256, size=h.size, precision=p, stage=stage)
        for p in stored
        for stage, part in imports[p].parts
        if part.weights is not None and (h := file_hash(part.weights))
    )
    artifacts = tuple(_artifact_entry(b, imports[b.precision]) for b in built)
    stages = tuple(replace(s.stage, artifacts=tuple(a.id for a in artifacts if a.stage == k))
                   for k, s in enumerate(reference.stages) if s.stage is not None)  # fmt: skip
    return Manifest(
        model=ModelInfo(
            name=reference.name,
            source=reference.source,
            source_format=reference.source_format,
            source_sha256=reference.source_sha256,
            program_file=reference.program_name,
            ir_sha256=ir_sha256,
        ),
        functions=reference.function_specs,
        toolchain=toolchain(),
        artifacts=artifacts,
        weights=weights,
        stages=stages,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        golden_outputs=reference.golden_note is None,
        golden_reference=reference.golden_reference if reference.golden_note is None else None,
        golden_note=reference.golden_note,
        language_model=reference.language_model,
        schema_version=schema_version_written(stages),
    )


def _artifact_entry(b: Built, imported: ImportedModel) -> Artifact:
    """The manifest's record of any engine's artifact: what the engine recorded, with
    its file in the bundle and how far its precision strays from the reference."""
    if b.stage is not None:
        imported = imported.stages[b.stage]
    recorded: dict[str, Any] = dict(precision_error=imported.precision_error, quantization=imported.quantization)
    if b.status == "ok" and b.file is not None:
        h = b.hash or file_hash(b.file)
        recorded |= dict(file=b.bundle_name, sha256=h.sha256, size=h.size)
    return b.as_artifact(**recorded)


def weights_file(precision: str, stage: int | None) -> str:
    """weights.irpa, weights-fp16.irpa; a stage's weights-s0.irpa, weights-fp16-s1.irpa."""
    suffix = ("" if precision == "fp32" else f"-{precision}") + ("" if stage is None else f"-s{stage}")
    return WEIGHTS_FILE.replace(".irpa", f"{suffix}.irpa")


def toolchain() -> Toolchain:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return Toolchain(
        hxc=__version__,
        iree_compiler=version("iree-base-compiler") or "unknown",
        iree_turbine=version("iree-turbine"),
        torch=version("torch"),
        python=platform.python_version(),
    )
