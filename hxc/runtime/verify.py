"""Check artifacts' numbers against the bundle's golden sample: the reference outputs
recorded at compile time, PyTorch's own for PyTorch models and ONNX Runtime's for ONNX
models.

The same tolerances (`hxc.dtypes`) serve `hxc verify`, `hxc compile --tune` and the
test suite, so "matches the reference" means one thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hxc.arrays import ArrayFileError, read_npz
from hxc.dtypes import compute_dtype, dtype, from_storage
from hxc.errors import BundleError, ExitCode, HxcError, NothingToCompareError, first_line
from hxc.manifests import Manifest, Signature
from hxc.manifests.bundle import TrustedKeys, check_all_files, open_checked, read_bundle, trust_policy
from hxc.manifests.signing import TrustPolicy
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.select import select

@dataclass(frozen=True)
class Comparison:
    max_abs: float
    max_rel: float
    ok: bool


def compare(actual: np.ndarray, expected: np.ndarray, name: str) -> Comparison:
    """Outputs of hxc dtype `name` against the reference, at that dtype's tolerance
    (`hxc.dtypes`); integers and booleans must match exactly."""
    if actual.shape != expected.shape:
        return Comparison(float("inf"), float("inf"), False)
    tolerance = dtype(name).tolerance
    if tolerance is None:
        diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        worst = float(diff.max()) if diff.size else 0.0
        return Comparison(worst, worst, worst == 0)
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    if not e.size:
        return Comparison(0.0, 0.0, True)
    atol, rtol = tolerance
    # Equal values match (infinities included), and NaN where the reference has NaN;
    # otherwise both must be finite and close. An infinite reference is not "close" to
    # anything else: +inf against -inf is off by infinity, whatever rtol * inf says.
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same, 0.0, np.abs(a - e))
        diff = np.where(np.isnan(diff), np.inf, diff)
        close = np.isfinite(a) & np.isfinite(e) & (diff <= atol + rtol * np.abs(e))
        rel = np.where(np.isfinite(e), diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny), diff)
    ok = bool(np.all(same | close))
    # Relative error is reported where the reference is not within atol of zero.
    return Comparison(float(diff.max()), float(np.where(np.abs(e) > atol, rel, 0.0).max()), ok)


def load_golden(bundle: Path, manifest: Manifest) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The golden inputs and outputs, as host arrays of the signature's dtypes, read
    from the checked bytes of the bundle's golden sample."""
    if not manifest.golden_file:
        raise BundleError(f"{bundle}: this bundle has no golden sample to compare against")
    checked = open_checked(bundle, manifest, manifest.golden_file)
    try:
        arrays = read_npz(checked.buffer, str(checked.path))
    except ArrayFileError as e:
        raise BundleError(e.message) from None
    finally:
        checked.close()
    return golden_arrays(arrays, manifest.signature, str(checked.path))


def golden_arrays(
    arrays: dict[str, np.ndarray], signature: Signature, where: str = "golden sample"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Golden inputs and outputs in signature order; bf16 and float8, stored as raw
    bits, as their own types. Outputs are empty when the sample has none (the
    reference could not compute them; `Manifest.golden_note` says why)."""

    def typed(key: str, name: str) -> np.ndarray:
        if key not in arrays:
            raise BundleError(f"{where}: golden sample lacks {key}")
        return from_storage(arrays[key], name)

    inputs = [typed(f"input_{i}", s.dtype) for i, s in enumerate(signature.inputs)]
    has_outputs = any(k.startswith("output_") for k in arrays)
    outputs = [typed(f"output_{i}", s.dtype) for i, s in enumerate(signature.outputs)] if has_outputs else []
    return inputs, outputs


def compare_outputs(
    outputs: list[np.ndarray],
    expected: list[np.ndarray],
    signature: Signature,
    precision: str,
    casts: tuple[tuple[str, str], ...] = (),
) -> list[Comparison]:
    """One comparison per output, at the tolerance of the artifact's compute precision
    (and of the narrower type it carries an output as, for f64 computed in f32)."""
    return [compare(o, x, compute_dtype(s.dtype, precision, casts)) for o, x, s in zip(outputs, expected, signature.outputs)]


@dataclass(frozen=True)
class VerifyResult:
    artifact: str
    device: str
    ok: bool
    max_abs: float | None
    max_rel: float | None
    error: str | None = None  # when it could not run at all


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
    results: tuple[VerifyResult, ...]  # one per artifact this host can run
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
    isolate: bool = True,
) -> VerifyReport:
    """Check every build-time file of the bundle against the manifest (whether or not
    this host can run it), then run the golden sample on every artifact this host can
    run. Artifacts whose files fail the check are never run.

    With `isolate` (the default) each artifact runs in its own worker process, so one
    whose code crashes inside IREE (a segfault, an illegal instruction) is reported
    as a failed artifact instead of taking the caller down.

    `trusted_keys` and `min_sequence` are checked as `load()` checks them, here and
    in every worker."""
    from hxc.runtime.loader import load

    path = Path(bundle)
    trust = trust_policy(trusted_keys, min_sequence)
    manifest = read_bundle(path, trust).manifest
    bad = check_all_files(path, manifest)
    integrity = tuple(bad.values())
    if manifest.golden_file in bad:
        return VerifyReport(path, integrity, ())
    if not manifest.golden_outputs:
        raise NothingToCompareError(
            f"{path}: the golden sample has no expected outputs, so there is nothing to compare against: "
            f"{manifest.golden_note or 'no reference ran at compile time'}",
            hint="recompile with --example inputs.npz (inputs the reference can run, or expected outputs as output_0, ...)",
        )
    probe = probe or probe_host()
    inputs, expected = load_golden(path, manifest)
    # Every artifact is checked, reduced-precision ones against their own precision's tolerance.
    selection = select(manifest, probe, device=device, tolerance=float("inf"))
    results = []
    for cand in selection.candidates:
        label = cand.device.label
        if cand.artifact.file in bad or any(w.file in bad for w in manifest.weights if w.precision == cand.artifact.precision):
            results.append(VerifyResult(cand.artifact.id, label, False, None, None, "not run: its files fail the integrity check"))
            continue
        try:
            if isolate:
                outputs = _run_in_worker(path, cand.artifact.id, inputs, trust)
            else:
                model = load(path, device=cand.artifact.id, strict=True, probe=probe, tolerance=float("inf"),
                             trusted_keys=trusted_keys, min_sequence=min_sequence)  # fmt: skip
                outputs = model.run_flat(inputs)
        except HxcError as e:
            results.append(VerifyResult(cand.artifact.id, label, False, None, None, e.message))
            continue
        except Exception as e:  # an IREE runtime failure on this device
            results.append(VerifyResult(cand.artifact.id, label, False, None, None, first_line(e)))
            continue
        comps = compare_outputs(outputs, expected, manifest.signature, cand.artifact.precision, cand.artifact.interface_casts)
        results.append(VerifyResult(
            cand.artifact.id, label, all(c.ok for c in comps),
            max(c.max_abs for c in comps), max(c.max_rel for c in comps),
        ))  # fmt: skip
    ran = {r.artifact for r in results}
    not_run: dict[str, NotRun] = {}
    for r in selection.rejected:
        if r.artifact.id not in ran:
            checked = r.artifact.file not in bad if r.artifact.file else None
            not_run.setdefault(r.artifact.id, NotRun(r.artifact.id, r.reason, checked))
    return VerifyReport(path, integrity, tuple(results), tuple(not_run.values()))


def _run_in_worker(
    bundle: Path, artifact: str, inputs: list[np.ndarray], trust: TrustPolicy | None
) -> list[np.ndarray]:
    from hxc.pool.worker import run_isolated

    env = trust.env() if trust is not None else {}  # the worker checks what this process checked
    return run_isolated(bundle, artifact, inputs, load_options={"tolerance": float("inf")}, env=env).outputs
