"""The golden sample's arithmetic: its arrays in signature order, and the comparison of
outputs against expected ones at the tolerance of their dtype (`hxc.dtypes`).

One definition of "matches the reference" for `hxc verify`, `hxc compile` (and
`--tune`), the benchmarks and the test suite. Pure numpy: no bundle, no device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hxc.dtypes import compute_dtype, dtype, from_storage
from hxc.errors import BundleError

if TYPE_CHECKING:
    from hxc.manifests.schema import Signature


@dataclass(frozen=True)
class Comparison:
    max_abs: float
    max_rel: float
    ok: bool


def compare(actual: np.ndarray, expected: np.ndarray, name: str,
            tolerance: tuple[float, float] | None = None) -> Comparison:  # fmt: skip
    """Outputs of hxc dtype `name` against the reference, at that dtype's tolerance
    (`hxc.dtypes`) or the (atol, rtol) given; integers and booleans must match exactly."""
    if actual.shape != expected.shape:
        return Comparison(float("inf"), float("inf"), False)
    tolerance = tolerance or dtype(name).tolerance
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
