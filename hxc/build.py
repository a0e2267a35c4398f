"""`hxc compile` as a library call: model in, bundle out.

import (a frontend: PyTorch or ONNX) -> compile per target (driver, in parallel,
through the cache) -> write the bundle. The bundle is staged and swapped in only when
complete; with failed targets it is published only if partial bundles are allowed,
and then the failures are recorded in its manifest.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from hxc import __version__, frontends
from hxc.compiler.cache import CompileCache, ImportCache, default_cache_dir
from hxc.compiler.driver import CompileEvent, CompileJob, CompileResult, compile_all, f64_interface
from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel, ImportOptions
from hxc.manifests import ARTIFACTS_DIR, GOLDEN_FILE, Artifact, Manifest, ModelInfo, Toolchain, staged_bundle
from hxc.engines import DEFAULT_ENGINE, Engine, resolve_backends
from hxc.engines.base import Built, BuildJob, artifact_id
from hxc.errors import ExitCode, HxcError, UsageError, first_line
from hxc.extras import require
from hxc.frontends import Frontend
from hxc.frontends.base import one_export_per_build
from hxc.manifests.bundle import (copy_hashed, file_hash, file_sha256, name_write_errors, private_dir, remove_stale,
                                  write_manifest)
from hxc.manifests.schema import WEIGHTS_FILE, FileHash, Requirements, Signature, Weights, from_json, to_json
from hxc.targets import Variant, extra_flags_for, family, resolve


# (results, imports by precision, work dir, cache, progress callback) -> results
Tuner = Callable[[list[CompileResult], dict[str, ImportedModel], Path, CompileCache, Callable[[CompileEvent], None]],
                 list[CompileResult]]  # fmt: skip


# (built artifact, the job it came from) -> the same artifact with its fastest options
EngineTuner = Callable[[Built, BuildJob], Built]


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
    results: list[CompileResult]
    timings: dict[str, float] = field(default_factory=dict)
    skipped: tuple[Skipped, ...] = ()
    built: list[Built] = field(default_factory=list)  # artifacts of engines other than IREE
    notes: list[str] = field(default_factory=list)  # e.g. backends `all` skipped, and why
    optional: frozenset[str] = frozenset()  # engines asked for only through `all`

    @property
    def failed(self) -> list[CompileResult | Built]:
        return [r for r in (*self.results, *self.built) if r.status == "failed"]

    @property
    def blocking(self) -> list[CompileResult | Built]:
        """Failures that keep a bundle from being written (unless --allow-partial):
        those of backends asked for by name."""
        return [r for r in self.failed if not (isinstance(r, Built) and r.engine in self.optional)]

    @property
    def total(self) -> int:
        return len(self.results) + len(self.built)

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
    on_event: Callable[[CompileEvent], None] = lambda e: None,
    on_stage: Callable[[str], None] = lambda s: None,
    tune: Tuner | None = None,
    extra_flags: Sequence[tuple[str, str]] = (),
    tune_engine: EngineTuner | None = None,
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
    when given (`hxc.bench.tune.tune`), may replace results with faster builds it
    measured; `tune_engine` does the same for other engines' artifacts.
    """
    variants = resolve(targets) if isinstance(targets, str) else list(targets)
    options = options or ImportOptions()
    frontend = frontends.recognise(source)  # before any slow work: what the source is, or a one-line error
    require(frontend.extra, f"compiling {frontend.summary}")
    engines, optional, notes = resolve_backends(backends)
    wanted = list(dict.fromkeys(precisions))
    if unsupported := [p for p in wanted if p not in frontend.precisions]:
        raise UsageError(f"--precision {', '.join(unsupported)} is not supported for {frontend.summary}",
                         hint=f"it builds {', '.join(frontend.precisions)}; convert the model itself")  # fmt: skip
    iree = any(e.name == DEFAULT_ENGINE for e in engines)
    builds = [(p, v) for p in wanted for v in variants if p in family(v.family).precisions] if iree else []
    skipped = [Skipped(v.id, p, f"the {v.family} backend cannot generate {p} code")
               for p in wanted for v in variants if iree and p not in family(v.family).precisions]  # fmt: skip
    others = [e for e in engines if e.name != DEFAULT_ENGINE]
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
            ir_sha: dict[tuple[str, tuple], str] = {("fp32", ()): file_sha256(reference.mlir)}
            compile_jobs: list[CompileJob] = []
            cast_errors: dict[tuple[str, tuple], str] = {}
            unbuildable: list[CompileJob] = []  # variants whose cast interface the model cannot have
            order: list[str] = []  # artifact ids as requested
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
                if key in cast_errors:
                    unbuildable.append(CompileJob(reference.mlir, ir_sha[("fp32", ())], v, precision, casts=casts))
                    order.append(unbuildable[-1].id)
                    continue
                if key not in ir_sha:
                    ir_sha[key] = file_sha256(irs[key].mlir)
                compile_jobs.append(CompileJob(irs[key].mlir, ir_sha[key], v, precision, extra=extra_flags_for(v, extra_flags),
                                       casts=casts, f64=f64_interface(irs[key].interface)))  # fmt: skip
                order.append(compile_jobs[-1].id)
        t = time.perf_counter()
        on_stage("compiling")
        results = compile_all(compile_jobs, workdir=work, jobs=jobs, cache=cache, on_event=on_event)
        for job in unbuildable:
            plan = family(job.variant.family).plan(job.variant)
            failed = CompileResult(job, plan, "failed", 0.0, (), error=cast_errors[(job.precision, job.casts)],
                                   operator=_operator_of(cast_errors[(job.precision, job.casts)]))  # fmt: skip
            on_event(CompileEvent("done", job, failed))
            results.append(failed)
        results.sort(key=lambda r: order.index(r.job.id))
        results = [_name_source_operator(r, irs.get((r.job.precision, r.job.casts), reference).operators_at)
                   for r in results]  # fmt: skip
        timings["compile"] = time.perf_counter() - t
        if tune is not None:
            t = time.perf_counter()
            on_stage("tuning")
            results = tune(results, imports, work, cache, on_event)
            timings["tune"] = time.perf_counter() - t
        built: list[Built] = []
        if others:
            t = time.perf_counter()
            on_stage("building other backends")
            built = build_engines(others, variants, wanted, reference, work, on_event, skipped, tune_engine)
            timings["other backends"] = time.perf_counter() - t

        manifest = _manifest(imports, [p for p in wanted if p in imports], ir_sha[("fp32", ())], results, built)
        result = BuildResult(out, False, manifest, results, timings, tuple(skipped), built, notes, optional)
        if result.blocking and not (allow_partial and len(result.failed) < result.total):
            return result  # nothing is published; an existing bundle at `out` stays as it was

        on_stage("writing bundle")
        with staged_bundle(out) as stage:
            manifest = _write_files(stage, manifest, results, imports, built)
            write_manifest(stage, manifest)
    return replace(result, manifest=manifest, written=True)


def _operator_of(message: str) -> str | None:
    m = re.search(r"\b(aten\.[\w.]+)", message)
    return m.group(1) if m else None


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


def _write_files(
    stage: Path, manifest: Manifest, results: list[CompileResult], imports: dict[str, ImportedModel],
    built: Sequence[Built] = (),
) -> Manifest:
    """Copy every build-time file into the staged bundle and record the hash of the
    bytes written, checked against the hash each was produced with."""
    reference = imports["fp32"]
    sources: dict[str, tuple[Path, FileHash | None]] = {}
    for r, a in zip(results, manifest.artifacts):
        if a.file is not None and r.vmfb is not None:
            sources[a.file] = (r.vmfb, r.hash)
    for b in built:  # several artifacts may share one file (ONNX Runtime's execution providers)
        if b.status == "ok" and b.file is not None and b.bundle_name is not None and not b.in_bundle:
            sources[b.bundle_name] = (b.file, None)
    if reference.program is not None and reference.program_name:
        sources[reference.program_name] = (reference.program, None)
    for rel, src in reference.files.items():  # a language model's tokenizer
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        sources[rel] = (src, None)
    for w in manifest.weights:
        sources[w.file] = (imports[w.precision].weights, FileHash(w.sha256, w.size))  # type: ignore[assignment]
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
    cache = ImportCache(cache_root if frontend.cacheable else None)
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
        timings={"import (cached)": 0.0},
    )


def build_engines(engines: Sequence[Engine], variants: Sequence[Variant], precisions: Sequence[str],
                  reference: ImportedModel, work: Path, on_event: Callable[[Any], None], skipped: list[Skipped],
                  tune_engine: EngineTuner | None = None) -> list[Built]:  # fmt: skip
    """One artifact per engine, target family it serves, and precision; each checked
    against the golden sample where this host can run it. One failing never stops the
    others."""
    families = list(dict.fromkeys(v.family for v in variants))
    out: list[Built] = []
    for eng in engines:
        for precision in precisions:
            first: Built | None = None
            for fam in (f for f in families if f in eng.families):
                if precision not in eng.precisions:
                    skipped.append(Skipped(f"{fam}:{eng.name}", precision, f"the {eng.name} backend does not build {precision}"))
                    continue
                if reference.functions:  # several functions, or state: IREE's alone for now
                    fns = ", ".join(reference.functions)
                    out.append(Built(eng.name, fam, precision, "failed", 0.0, "", "", "", (), Requirements(),
                                     error=f"the {eng.name} backend builds one stateless function; this model has {fns}"))
                    continue
                job = BuildJob(fam, precision, reference.program, reference.program_name, reference.source_format,
                               reference.weights, reference.golden, reference.signature, work, reuse=first)  # fmt: skip
                label = artifact_id(fam, eng.name, precision)
                on_event(EngineEvent("start", label))
                b = eng.build(job)
                if b.status == "ok":
                    b = _check_golden(eng, b, job)
                if b.status == "ok" and tune_engine is not None and job.reuse is None:
                    b = tune_engine(b, job)
                first = first or (b if b.status == "ok" else None)
                on_event(EngineEvent("done", label, b))
                out.append(b)
    return out


@dataclass(frozen=True)
class EngineEvent:
    """Progress of an engine's build, shaped like CompileEvent for the progress display."""

    kind: str  # start | done
    label: str
    result: Built | None = None


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


def _manifest(
    imports: dict[str, ImportedModel], precisions: list[str], ir_sha256: str, results: list[CompileResult],
    built: Sequence[Built] = (),
) -> Manifest:
    reference = imports["fp32"]
    # The bundle's program (program.pt2 without its weights, or model.onnx pointing into
    # the archive) needs the fp32 archive even when no fp32 artifact is built.
    stored = dict.fromkeys(["fp32", *precisions])
    weights = tuple(
        Weights(
            file=WEIGHTS_FILE if p == "fp32" else WEIGHTS_FILE.replace(".irpa", f"-{p}.irpa"),
            scope=PARAMETER_SCOPE,
            sha256=h.sha256,
            size=h.size,
            precision=p,
        )
        for p in stored
        if imports[p].weights is not None and (h := file_hash(imports[p].weights))  # type: ignore[arg-type]
    )
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
        artifacts=(*(_artifact_entry(r, imports[r.job.precision]) for r in results),
                   *(_built_entry(b, imports[b.precision]) for b in built)),
        weights=weights,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        golden_outputs=reference.golden_note is None,
        golden_reference=reference.golden_reference if reference.golden_note is None else None,
        golden_note=reference.golden_note,
        language_model=reference.language_model,
    )


def _name_source_operator(r: CompileResult, operators_at: dict[str, tuple[str, ...]]) -> CompileResult:
    """A backend names its own internal op (`vector.broadcast`); the user needs the
    model's operator and the line of their model it came from."""
    if r.status != "failed" or r.location not in operators_at or (r.operator or "").startswith("aten."):
        return r
    ops = ", ".join(operators_at[r.location])
    return replace(r, operator=ops, error=f"cannot lower {ops} (at {Path(r.location).name}): {r.error}")


def _artifact_entry(r: CompileResult, imported: ImportedModel) -> Artifact:
    job = r.job
    v = job.variant
    fam = family(v.family)
    common = dict(
        id=job.id,
        family=v.family,
        variant=v.name,
        backend=fam.backend,
        driver=fam.drivers[0],
        binary=r.plan.binary,
        flags=r.plan.flags,
        requires=r.requirements,
        compile_seconds=round(r.seconds, 3),
        cached=r.cached,
        precision=job.precision,
        precision_error=imported.precision_error,
        tuning=r.tuning,
        fallback=r.fallback,
        interface_casts=r.job.casts,
    )
    if r.status == "failed" or r.vmfb is None:
        return Artifact(status="failed", error=r.error, operator=r.operator, **common)
    h = r.hash or file_hash(r.vmfb)
    return Artifact(
        status="ok",
        file=f"{ARTIFACTS_DIR}/{job.file_stem}.vmfb",
        sha256=h.sha256,
        size=h.size,
        verified=r.verified,
        **common,
    )


def _built_entry(b: Built, imported: ImportedModel) -> Artifact:
    error = dict(precision_error=imported.precision_error)
    if b.status == "failed" or b.file is None:
        return b.as_artifact(**error)
    h = file_hash(b.file)
    return b.as_artifact(file=b.bundle_name, sha256=h.sha256, size=h.size, **error)


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
