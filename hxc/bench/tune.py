"""`hxc compile --tune`: for each artifact this host can run, compile the family's
alternative flag configurations, time them all with the bench harness (interleaved),
keep the fastest, and record the search in the manifest."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from hxc.bench.measure import Budget, Contender, measure
from hxc.compiler.cache import CompileCache
from hxc.compiler.driver import CompileEvent, CompileResult, compile_all
from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel
from hxc.engines import engine
from hxc.engines.base import Built, BuildJob
from hxc.errors import first_line
from hxc.manifests.schema import Artifact, Signature, TuningTrial
from hxc.engines.iree import IreeSession as Session
from hxc.runtime.probe import probe_host
from hxc.golden import compare_outputs, golden_arrays
from hxc.targets import Device, family

TUNE_BUDGET = Budget(warmup=2, min_iterations=10, min_seconds=0.5, max_seconds=20.0)


def tune(
    results: list[CompileResult],
    imports: dict[str, ImportedModel],
    workdir: Path,
    cache: CompileCache,
    on_event: Callable[[CompileEvent], None] = lambda e: None,
    budget: Budget = TUNE_BUDGET,
) -> list[CompileResult]:
    return [_tune_one(r, imports[r.job.precision], workdir, cache, on_event, budget) for r in results]


def _tune_one(r: CompileResult, imported: ImportedModel, workdir: Path, cache: CompileCache,
              on_event: Callable[[CompileEvent], None], budget: Budget) -> CompileResult:  # fmt: skip
    if r.status != "ok" or r.vmfb is None:
        return r
    fam = family(r.job.variant.family)
    configs = fam.tuning_configs(r.plan)
    device = _device_for(r)
    if len(configs) < 2 or device is None:
        return r
    jobs = [dataclasses.replace(r.job, config=name, flags=flags) for name, flags in configs[1:]]
    tried = [r, *compile_all(jobs, workdir=workdir, cache=cache, on_event=on_event)]
    weights = (imported.weights, PARAMETER_SCOPE) if imported.weights is not None else None
    inputs, expected = golden_arrays(imported.golden, imported.signature)
    errors: dict[str, str] = {}
    runnable = []
    for (name, _), t in zip(configs, tried):
        if t.status == "ok" and t.vmfb is not None:
            # A faster build that computes the wrong thing is no candidate.
            if (wrong := _wrong_numbers(t.vmfb, device, weights, imported, inputs, expected)) is None:
                runnable.append((name, t))
            else:
                errors[name] = wrong
    contenders = [_contender(name, t.vmfb, device, weights, imported.signature) for name, t in runnable]  # type: ignore[arg-type]
    p50: dict[str, float] = {}
    try:
        for timing in measure(contenders, inputs, budget):
            p50[timing.contender.id] = timing.stats().p50_ms
    except Exception as e:  # a configuration that compiles but fails to run
        errors["*"] = first_line(e)
    best = min(p50, key=p50.get) if p50 else configs[0][0]
    trials = tuple(
        TuningTrial(config=name, flags=t.plan.flags, p50_ms=p50.get(name), chosen=name == best,
                    error=t.error if t.status == "failed" else errors.get(name, errors.get("*")) if name not in p50 else None)
        for (name, _), t in zip(configs, tried)
    )  # fmt: skip
    chosen = next(t for (name, _), t in zip(configs, tried) if name == best)
    return dataclasses.replace(chosen, job=r.job, tuning=trials)


def tune_built(built: Built, job: BuildJob, budget: Budget = TUNE_BUDGET) -> Built:
    """`--tune` for another engine's artifact (ONNX Runtime's thread and graph
    optimisation options): time each option set here on the golden sample, keep the
    fastest that computes the right numbers, record the search."""
    eng = engine(built.engine)
    configs = eng.tuning_configs(built)
    fam = family(built.family)
    art = built.as_artifact()
    device = next((d for d in probe_host().devices if d.driver in fam.drivers and fam.cannot_run(art, d) is None), None)
    if len(configs) < 2 or device is None or built.file is None:
        return built
    inputs, expected = golden_arrays(job.golden, job.signature)
    weights = (job.weights, PARAMETER_SCOPE) if job.weights is not None and eng.uses_shared_weights(art) else None
    errors: dict[str, str] = {}
    contenders = []
    for name, options in configs:
        variant = dataclasses.replace(art, flags=options)
        try:
            session = eng.open(variant, built.file, device, weights)
            outputs = session.invoke(inputs, job.signature)
        except Exception as e:
            errors[name] = f"failed to run: {first_line(e)}"
            continue
        if not all(c.ok for c in compare_outputs(outputs, expected, job.signature, built.precision)):
            errors[name] = "wrong numbers against the golden sample"
            continue
        contenders.append(Contender(name, device.label, lambda: None,
                                    lambda a, s=session: s.prepare(a, job.signature), device_time_only=True))  # fmt: skip
    p50 = {t.contender.id: t.stats().p50_ms for t in measure(contenders, inputs, budget)} if contenders else {}
    best = min(p50, key=p50.get) if p50 else configs[0][0]  # type: ignore[arg-type]
    trials = tuple(TuningTrial(config=name, flags=options, p50_ms=p50.get(name), chosen=name == best,
                               error=errors.get(name)) for name, options in configs)  # fmt: skip
    return dataclasses.replace(built, options=dict(configs)[best], tuning=trials)


def _wrong_numbers(vmfb: Path, device: Device, weights, imported: ImportedModel, inputs: list,
                   expected: list) -> str | None:  # fmt: skip
    try:
        outputs = Session.open(vmfb, device, weights).invoke(inputs, imported.signature)
    except Exception as e:
        return f"failed to run: {first_line(e)}"
    for i, c in enumerate(compare_outputs(outputs, expected, imported.signature, imported.precision)):
        if not c.ok:
            return f"wrong numbers: output {i} max abs error {c.max_abs:.3g} against the golden sample"
    return None


def _device_for(r: CompileResult) -> Device | None:
    fam = family(r.job.variant.family)
    probe = probe_host()
    art = Artifact(id=r.job.id, family=fam.name, variant=r.job.variant.name, backend=fam.backend, driver=fam.drivers[0],
                   binary=r.plan.binary, flags=r.plan.flags, requires=r.plan.requires, status="ok")  # fmt: skip
    able = [d for d in probe.devices if d.driver in fam.drivers and fam.cannot_run(art, d) is None]
    return min(able, key=lambda d: fam.drivers.index(d.driver)) if able else None


def _contender(name: str, vmfb: Path, device: Device, weights: tuple[Path, str] | None, sig: Signature) -> Contender:
    holder: dict[str, Session] = {}

    def open_() -> None:
        holder["s"] = Session.open(vmfb, device, weights)

    return Contender(name, device.label, open_, lambda inputs: holder["s"].prepare(inputs, sig), device_time_only=True)
