"""Example inputs a user supplies (`hxc compile --example inputs.npz`).

Generated inputs (normal floats, integers 0..9) are meaningless for some models: a
shape, an axis list or a scale passed as an input, an index that must stay in range.
An example file gives the real ones. It is a `.npz` (never unpickled) whose arrays are
matched to the model's inputs by name (`np.savez(f, ids=..., mask=...)`), else by the
golden-sample keys `input_0, input_1, ...` (so a bundle's own golden.npz can be reused),
else in the order they were saved. Arrays named `output_0, output_1, ...` are expected
outputs, used as the golden sample's outputs when the reference (ONNX Runtime, PyTorch)
cannot compute them.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hxc.errors import UsageError, first_line

# An example is a handful of tensors; refuse to inflate anything far larger.
MAX_EXAMPLE_BYTES = 4 << 30
_OUTPUT = re.compile(r"^output_(\d+)$")
_INPUT = re.compile(r"^input_(\d+)$")


@dataclass(frozen=True)
class Example:
    path: Path
    names: tuple[str, ...]  # input arrays' keys, in file order
    inputs: tuple[np.ndarray, ...]
    outputs: tuple[np.ndarray, ...] | None  # output_0..N-1, when the file has them

    def ordered(self, input_names: list[str]) -> list[np.ndarray]:
        """The input arrays in the model's input order (see the module docstring)."""
        if len(self.inputs) != len(input_names):
            raise UsageError(
                f"{self.path}: holds {len(self.inputs)} input array(s), but the model has {len(input_names)} input(s)",
                hint=f"the model's inputs: {', '.join(input_names)}",
            )
        by_key = dict(zip(self.names, self.inputs))
        if set(by_key) == set(input_names):
            return [by_key[n] for n in input_names]
        if all(_INPUT.match(k) for k in by_key) and set(by_key) == {f"input_{i}" for i in range(len(input_names))}:
            return [by_key[f"input_{i}"] for i in range(len(input_names))]
        return list(self.inputs)


def read_example(path: str | Path) -> Example:
    """Load an example file; one-line UsageError if it is missing or not a plain .npz."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such example file")
    try:
        with zipfile.ZipFile(p) as z:
            size = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise UsageError(f"{p}: not a .npz file ({first_line(e)})", hint="write it with numpy.savez") from None
    if size > MAX_EXAMPLE_BYTES:
        raise UsageError(f"{p}: example arrays total {size >> 20} MiB; the limit is {MAX_EXAMPLE_BYTES >> 20} MiB")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"{p}: cannot read its arrays ({first_line(e)})", hint="object arrays are not accepted") from None
    outputs = {int(m.group(1)): a for k, a in arrays.items() if (m := _OUTPUT.match(k))}
    inputs = {k: a for k, a in arrays.items() if not _OUTPUT.match(k)}
    if not inputs:
        raise UsageError(f"{p}: holds no input arrays")
    if outputs and sorted(outputs) != list(range(len(outputs))):
        raise UsageError(f"{p}: expected outputs must be output_0 .. output_{len(outputs) - 1}")
    return Example(
        path=p,
        names=tuple(inputs),
        inputs=tuple(inputs.values()),
        outputs=tuple(outputs[i] for i in range(len(outputs))) if outputs else None,
    )
