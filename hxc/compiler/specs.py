"""Input specs and example inputs, shared by every frontend: torch- and onnx-free.

`--input 1x3x224x224xf32` parses into a TensorSpec here, and models that come without
example inputs get deterministic ones drawn here, the same way for every frontend, so
golden samples of PyTorch and ONNX models are made alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from hxc.arrays import MAX_ARRAY_BYTES_ENV, max_array_bytes
from hxc.dtypes import DYNAMIC_EXAMPLE_SIZE, NAMES, dtype
from hxc.errors import UsageError
from hxc.manifests.schema import TensorSpec

MAX_DIM = 2**31 - 1  # IREE's index arithmetic on every target is 32-bit safe below this
_SPEC_RE = re.compile(r"^(?:(?P<name>[A-Za-z_]\w*)=)?(?P<dims>(?:(?:\d+|\?)x)*)(?P<dtype>[a-z][a-z0-9]*)$")


def parse_input_spec(text: str, index: int = 0, *, allow_empty: bool = False) -> TensorSpec:
    """`1x3x224x224xf32`, `?x128xi64` (dynamic first dim), `ids=1x128xi64` (named)."""
    m = _SPEC_RE.match(text.strip())
    if not m or m.group("dtype") not in NAMES:
        raise UsageError(
            f"malformed --input {text!r}",
            hint=f"expected DIMSxDTYPE such as 1x3x224x224xf32 or ?x128xi64; dtypes: {', '.join(NAMES)}",
        )
    dims: list[int | str] = []
    for j, d in enumerate(x for x in m.group("dims").split("x") if x):
        if d != "?" and not (0 if allow_empty else 1) <= int(d) <= MAX_DIM:
            raise UsageError(f"--input {text!r}: dimension {j} is {d}",
                             hint=f"each dimension is {0 if allow_empty else 1} to {MAX_DIM}, or ? for dynamic")  # fmt: skip
        dims.append(f"d{index}_{j}" if d == "?" else int(d))
    elements = 1
    for d in dims:
        elements *= DYNAMIC_EXAMPLE_SIZE if isinstance(d, str) else d
    if elements * dtype(m.group("dtype")).numpy_dtype().itemsize > max_array_bytes():
        raise UsageError(f"--input {text!r}: an example input of that shape would not fit in memory",
                         hint=f"the limit is {max_array_bytes()} bytes (${MAX_ARRAY_BYTES_ENV})")  # fmt: skip
    return TensorSpec(name=m.group("name") or f"input_{index}", dtype=m.group("dtype"), shape=tuple(dims))


def example_arrays(specs: Sequence[TensorSpec], seed: int = 0) -> list[np.ndarray]:
    """Deterministic host arrays for specs: standard-normal floats, small non-negative
    integers (valid token ids and indices for nearly any model), random booleans. A
    dynamic dimension gets DYNAMIC_EXAMPLE_SIZE."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shape = [DYNAMIC_EXAMPLE_SIZE if isinstance(d, str) else d for d in spec.shape]
        d = dtype(spec.dtype)
        if d.is_float:
            out.append(rng.standard_normal(shape, dtype=np.float32).astype(d.numpy_dtype()))
        elif d.name == "i1":
            out.append(rng.integers(0, 2, shape).astype(bool))
        else:
            out.append(rng.integers(0, 10, shape).astype(d.numpy_dtype()))
    return out
