"""`hxc compile` as a library call: model in, bundle out.

load (frontend) -> lower (torch-mlir IR) -> golden sample (PyTorch) -> compile per
target (driver) -> write the bundle (manifests). The bundle is staged and swapped in
only when complete; with failed targets it is published only if partial bundles are
allowed, and the failures are recorded in its manifest.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from hxc import __version__
from hxc.compiler.cache import CompileCache, default_cache_dir
from hxc.compiler.driver import CompileEvent, CompileResult, compile_all
from hxc.compiler.frontend import load_model
from hxc.compiler.lower import lower
from hxc.errors import LoweringError
from hxc.manifests import ARTIFACTS_DIR, GOLDEN_FILE, Artifact, Manifest, ModelInfo, Toolchain, staged_bundle
from hxc.manifests.bundle import file_sha256, write_manifest
from hxc.targets import Variant, family, resolve

PROGRAM_FILE = "program.pt2"


@dataclass
class BuildResult:
    output: Path
    written: bool  # False when failed targets kept the bundle from being published
    manifest: Manifest
    results: list[CompileResult]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[CompileResult]:
        return [r for r in self.results if r.status == "failed"]


def build_bundle(
    source: str,
    output: str | Path,
    targets: str | Sequence[str] | Sequence[Variant] = "cpu",
    *,
    inputs: Sequence[str] = (),
    dynamic_batch: bool = False,
    allow_pickle: bool = False,
    allow_partial: bool = False,
    jobs: int | None = None,
    cache_dir: Path | None | bool = True,
    on_event: Callable[[CompileEvent], None] = lambda e: None,
    on_stage: Callable[[str], None] = lambda s: None,
) -> BuildResult:
    """Compile `source` for `targets` into the bundle directory `output`.

    Raises HxcError for problems before compiling (bad model, bad target name, export
    failure). Compile failures are returned in the result, not raised.
    """
    variants = list(targets) if targets and isinstance(list(targets)[0], Variant) else resolve(targets)  # type: ignore[arg-type]
    cache = CompileCache(default_cache_dir() if cache_dir is True else (cache_dir or None))
    timings: dict[str, float] = {}

    t = time.perf_counter()
    on_stage("loading model")
    model = load_model(source, inputs=inputs, dynamic_batch=dynamic_batch, allow_pickle=allow_pickle)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    on_stage("lowering to IREE input IR")
    lowered = lower(model.program)
    ir_sha = hashlib.sha256(lowered.mlir).hexdigest()
    timings["lower"] = time.perf_counter() - t

    t = time.perf_counter()
    on_stage("running PyTorch for the golden sample")
    golden = golden_sample(model.reference, model.example_args, len(lowered.signature.outputs))
    timings["golden"] = time.perf_counter() - t

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".work", dir=out.parent) as work_dir:
        work = Path(work_dir)
        ir_path = work / "model.mlirbc"
        ir_path.write_bytes(lowered.mlir)
        t = time.perf_counter()
        on_stage("compiling")
        results = compile_all(ir_path, ir_sha, variants, workdir=work, jobs=jobs, cache=cache, on_event=on_event)
        results = [_name_source_operator(r, lowered.operators_at) for r in results]
        timings["compile"] = time.perf_counter() - t

        manifest = Manifest(
            model=ModelInfo(
                name=model.name,
                source=model.source,
                source_format=model.source_format,
                source_sha256=model.source_sha256,
                program_file=PROGRAM_FILE,
                ir_sha256=ir_sha,
            ),
            signature=lowered.signature,
            toolchain=toolchain(),
            artifacts=tuple(_artifact_entry(r) for r in results),
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        failed = [r for r in results if r.status == "failed"]
        if failed and not (allow_partial and len(failed) < len(results)):
            # Nothing is published; an existing bundle at `out` stays as it was.
            return BuildResult(out, False, manifest, results, timings)

        on_stage("writing bundle")
        with staged_bundle(out) as stage:
            (stage / ARTIFACTS_DIR).mkdir()
            for r, a in zip(results, manifest.artifacts):
                if a.file is not None and r.vmfb is not None:
                    shutil.copyfile(r.vmfb, stage / a.file)
            torch.export.save(model.program, str(stage / PROGRAM_FILE))
            np.savez(stage / GOLDEN_FILE, **golden)
            write_manifest(stage, manifest)
    return BuildResult(out, True, manifest, results, timings)


def _name_source_operator(r: CompileResult, operators_at: dict[str, tuple[str, ...]]) -> CompileResult:
    """A backend names its own internal op (`vector.broadcast`); the user needs the
    PyTorch operator and the line of their model it came from."""
    if r.status != "failed" or r.location not in operators_at or (r.operator or "").startswith("aten."):
        return r
    ops = ", ".join(operators_at[r.location])
    where = f"{Path(r.location).name}"
    return replace(r, operator=ops, error=f"cannot lower {ops} (at {where}): {r.error}")


def _artifact_entry(r: CompileResult) -> Artifact:
    v = r.plan.variant
    fam = family(v.family)
    common = dict(
        id=v.id,
        family=v.family,
        variant=v.name,
        backend=fam.backend,
        driver=fam.drivers[0],
        binary=r.plan.binary,
        flags=r.plan.flags,
        requires=r.plan.requires,
        compile_seconds=round(r.seconds, 3),
        cached=r.cached,
    )
    if r.status == "failed" or r.vmfb is None:
        return Artifact(status="failed", error=r.error, operator=r.operator, **common)
    return Artifact(
        status="ok",
        file=f"{ARTIFACTS_DIR}/{v.family}-{v.name}.vmfb",
        sha256=file_sha256(r.vmfb),
        size=r.vmfb.stat().st_size,
        verified=r.verified,
        **common,
    )


def golden_sample(reference: Callable, args: tuple, n_outputs: int) -> dict[str, np.ndarray]:
    """Inputs and PyTorch's own outputs, flattened in the artifact's order."""
    import torch.utils._pytree as pytree

    with torch.no_grad():
        outputs = reference(*args)
    flat = [x for x in pytree.tree_leaves(outputs)]
    if len(flat) != n_outputs or not all(isinstance(x, torch.Tensor) for x in flat):
        raise LoweringError(
            f"PyTorch returned {len(flat)} values where the exported program has {n_outputs} tensor outputs"
        )
    sample = {f"input_{i}": to_numpy(a) for i, a in enumerate(args)}
    sample.update({f"output_{i}": to_numpy(o) for i, o in enumerate(flat)})
    return sample


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)  # bf16 travels as raw bits
    return t.numpy()


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
