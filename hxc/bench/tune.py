"""`hxc compile --tune`: for each artifact this host can run, build its engine's
alternative configurations (IREE: the family's flag sets, compiled again; ONNX
Runtime: its session options), time them all with the bench harness (interleaved),
keep the fastest that computes the right numbers, and record the search in the
manifest."""

from __future__ import annotations

import dataclasses

from hxc.bench.measure import Budget, Contender, measure
from hxc.compiler.imported import PARAMETER_SCOPE
from hxc.engines import Engine, engine
from hxc.engines.base import BuildContext, Built, BuildJob, Session
from hxc.errors import first_line
from hxc.golden import compare_outputs, golden_arrays
from hxc.manifests.schema import Signature, TuningTrial
from hxc.runtime.probe import probe_host
from hxc.targets import Device, family

TUNE_BUDGET = Budget(warmup=2, min_iterations=10, min_seconds=0.5, max_seconds=20.0)


def tune(built: Built, job: BuildJob, ctx: BuildContext, budget: Budget = TUNE_BUDGET) -> Built:
    """`built` with its fastest configuration, and the search recorded in `tuning`; as
    it was when it has no alternatives or this host cannot run it."""
    eng = engine(built.engine)
    configs = eng.tuning_configs(built)
    device = _device_for(eng, built)
    if len(configs) < 2 or device is None or built.file is None:
        return built
    tried = [built, *eng.alternatives(built, job, configs[1:], ctx)]
    weights = (job.weights, PARAMETER_SCOPE) if job.weights is not None and eng.uses_shared_weights(built.as_artifact()) else None
    inputs, expected = golden_arrays(job.golden, job.signature)
    errors: dict[str, str] = {}
    runnable = []
    for (name, _), t in zip(configs, tried):
        if t.status != "ok" or t.file is None:
            errors[name] = t.error or "failed to build"
        # A faster build that computes the wrong thing is no candidate.
        elif (wrong := _wrong_numbers(eng, t, device, weights, job, inputs, expected)) is None:
            runnable.append((name, t))
        else:
            errors[name] = wrong
    contenders = [_contender(eng, name, t, device, weights, job.signature) for name, t in runnable]
    p50: dict[str, float] = {}
    try:
        for timing in measure(contenders, inputs, budget):
            p50[timing.contender.id] = timing.stats().p50_ms
    except Exception as e:  # a configuration that runs once but fails when timed
        errors["*"] = first_line(e)
    best = min(p50, key=p50.get) if p50 else configs[0][0]  # type: ignore[arg-type]
    trials = tuple(
        TuningTrial(config=name, flags=t.options, p50_ms=p50.get(name), chosen=name == best,
                    error=None if name in p50 else errors.get(name, errors.get("*")))
        for (name, _), t in zip(configs, tried)
    )  # fmt: skip
    chosen = next(t for (name, _), t in zip(configs, tried) if name == best)
    return dataclasses.replace(chosen, tuning=trials)


def _open(eng: Engine, built: Built, device: Device, weights: tuple | None) -> Session:
    return eng.open(built.as_artifact(), built.file, device, weights)


def _wrong_numbers(eng: Engine, built: Built, device: Device, weights: tuple | None, job: BuildJob, inputs: list,
                   expected: list) -> str | None:  # fmt: skip
    try:
        outputs = _open(eng, built, device, weights).invoke(inputs, job.signature)
    except Exception as e:
        return f"failed to run: {first_line(e)}"
    for i, c in enumerate(compare_outputs(outputs, expected, job.signature, built.precision)):
        if not c.ok:
            return f"wrong numbers: output {i} max abs error {c.max_abs:.3g} against the golden sample"
    return None


def _device_for(eng: Engine, built: Built) -> Device | None:
    """The device of this host that runs `built`, its family's preferred driver first."""
    fam = family(built.family)
    art = built.as_artifact()
    able = [d for d in probe_host().devices
            if d.driver in fam.drivers and fam.cannot_run(art, d) is None and eng.cannot_run(art, d) is None]  # fmt: skip
    if able and eng.missing_at_runtime() is None:
        return min(able, key=lambda d: fam.drivers.index(d.driver))
    return None


def _contender(eng: Engine, name: str, built: Built, device: Device, weights: tuple | None, sig: Signature) -> Contender:
    holder: dict[str, Session] = {}

    def open_() -> None:
        holder["s"] = _open(eng, built, device, weights)

    return Contender(name, device.label, open_, lambda inputs: holder["s"].prepare(inputs, sig), device_time_only=True)
