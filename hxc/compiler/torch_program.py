"""The model's PyTorch program as engines other than IREE take it: the bundle's
exported program with its weights back in place (with shared weights the saved program
holds stride-0 placeholders), at the precision an artifact computes in."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def program_with_weights(program_file: Path, weights_file: Path | None) -> Any:
    """The exported program a build wrote, with the parameters stored in the archive."""
    import torch

    program = torch.export.load(str(program_file))
    if weights_file is not None:
        from iree.turbine.aot import ParameterArchive

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable NumPy array": we copy right away
            stored = {name: entry.as_tensor().clone() for name, entry in ParameterArchive(weights_file).items()}
        restore_weights(program, stored)
    return program


def restore_weights(program: Any, stored: dict[str, Any]) -> None:
    """Put `stored` tensors in place of the program's weights of the same names."""
    import torch

    for name, old in list(program.state_dict.items()):
        if name in stored:
            new = stored[name].reshape(old.shape)
            program.state_dict[name] = torch.nn.Parameter(new, requires_grad=False) if isinstance(old, torch.nn.Parameter) else new


def program_at_precision(program: Any, example_args: tuple, precision: str) -> Any:
    """`program` computing in `precision` behind its fp32 interface: the same wrapper
    and export IREE's precision variants come from."""
    if precision == "fp32":
        return program
    from hxc.compiler.torch_import import export_at_precision

    return export_at_precision(program, example_args, precision, "program")[0]
