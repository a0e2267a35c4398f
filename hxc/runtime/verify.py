"""Check artifacts' numbers against the golden sample PyTorch produced at compile time.

The same tolerances serve `hxc verify` and the test suite, so "matches PyTorch" means
one thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hxc.errors import BundleError, HxcError, NothingToCompareError, first_line
from hxc.manifests import GOLDEN_FILE, Manifest, Signature, read_manifest
from hxc.runtime.io import from_raw_bits
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.select import select

# (absolute, relative) tolerance per dtype: |actual - expected| <= atol + rtol * |expected|.
# f32 leaves room for reassociated reductions on GPUs; reduced precision is looser.
TOLERANCES: dict[str, tuple[float, float]] = {
    "f64": (1e-6, 1e-5),
    "f32": (1e-4, 1e-3),
    "f16": (1e-2, 1e-2),
    "bf16": (5e-2, 5e-2),
    # float8: one step of the mantissa (3 bits for e4m3, 2 for e5m2) near 1.0.
    "f8e4m3fn": (0.125, 0.125),
    "f8e4m3fnuz": (0.125, 0.125),
    "f8e5m2": (0.25, 0.25),
    "f8e5m2fnuz": (0.25, 0.25),
}


@dataclass(frozen=True)
class Comparison:
    max_abs: float
    max_rel: float
    ok: bool


def compare(actual: np.ndarray, expected: np.ndarray, dtype: str) -> Comparison:
    if actual.shape != expected.shape:
        return Comparison(float("inf"), float("inf"), False)
    if dtype not in TOLERANCES:  # integers and booleans must match exactly
        diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        worst = float(diff.max()) if diff.size else 0.0
        return Comparison(worst, worst, worst == 0)
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    atol, rtol = TOLERANCES[dtype]
    diff = np.abs(a - e)
    if not diff.size:
        return Comparison(0.0, 0.0, True)
    finite = np.isfinite(a) == np.isfinite(e)
    both_nan = np.isnan(a) & np.isnan(e)  # NaN where the reference has NaN is a match
    rel = diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny)
    ok = bool(finite.all() and np.all((diff <= atol + rtol * np.abs(e)) | (a == e) | both_nan))
    return Comparison(float(np.nanmax(diff)), float(np.nanmax(np.where(np.abs(e) > atol, rel, 0.0))), ok)


def load_golden(bundle: Path, manifest: Manifest) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The golden inputs and outputs, as host arrays of the signature's dtypes."""
    path = bundle / (manifest.golden_file or GOLDEN_FILE)
    try:
        with np.load(path) as data:
            arrays = dict(data)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: cannot read the golden sample ({first_line(e)})") from None
    return golden_arrays(arrays, manifest.signature, str(path))


def golden_arrays(
    arrays: dict[str, np.ndarray], signature: Signature, where: str = "golden sample"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Golden inputs and outputs in signature order; bf16 and float8, stored as raw
    bits, as their own types. Outputs are empty when the sample has none (the
    reference could not compute them; `Manifest.golden_note` says why)."""

    def typed(key: str, dtype: str) -> np.ndarray:
        if key not in arrays:
            raise BundleError(f"{where}: golden sample lacks {key}")
        return from_raw_bits(arrays[key], dtype)

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
    return [compare(o, x, effective_dtype(s.dtype, precision, casts)) for o, x, s in zip(outputs, expected, signature.outputs)]


@dataclass(frozen=True)
class VerifyResult:
    artifact: str
    device: str
    ok: bool
    max_abs: float | None
    max_rel: float | None
    error: str | None = None  # when it could not run at all


def verify_bundle(
    bundle: str | Path, *, device: str | None = None, probe: HostProbe | None = None
) -> list[VerifyResult]:
    """Run the golden sample on every artifact this host can run."""
    from hxc.runtime.loader import load

    path = Path(bundle)
    manifest = read_manifest(path)
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
        try:
            model = load(path, device=cand.artifact.id, strict=True, probe=probe, tolerance=float("inf"))
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
    return results


def effective_dtype(dtype: str, precision: str, casts: tuple[tuple[str, str], ...] = ()) -> str:
    """A reduced-precision artifact's f32 outputs carry its compute precision's error;
    an f64 output computed in f32 (Vulkan) carries f32's."""
    if dtype == "f64" and dict(casts).get("f64") == "f32":
        return "f32"
    return {"fp16": "f16", "bf16": "bf16"}.get(precision, dtype) if dtype == "f32" else dtype
