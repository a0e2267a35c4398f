"""The model's PyTorch program as the bench baselines and engines other than IREE take
it: the bundle's exported program with its weights back in place (with shared weights
the saved program holds stride-0 placeholders), at the precision an artifact computes in."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def program_with_weights(program: Path | bytes, where: str, weights: Path | Any | list[Any] | None, *,
                         allow_pickle: bool = False) -> Any:  # fmt: skip
    """The exported program (a file, or checked bytes), loaded without running code from
    it, with the parameters of the archive `weights` (a file, or checked bytes with a
    `buffer`; a list of them for a staged bundle's archives, one per stage) restored."""
    from hxc.compiler.torch_export import load_program
    from hxc.errors import BundleError

    # With shared weights the saved program holds stride-0 placeholders: their logical
    # size is the model's, not a sign of a bomb.
    loaded = load_program(program, where, allow_pickle=allow_pickle, check_expansion=not weights)
    for archive in weights if isinstance(weights, list) else [weights] if weights is not None else []:
        restore_weights(loaded, archive_tensors(archive))
    # Weights saved as stride-0 placeholders (their values live in an archive) must never
    # run as if they were the model's: that would time and compare garbage.
    placeholders = [n for n, t in loaded.state_dict.items() if t.numel() > 1 and not any(t.stride())]
    if placeholders:
        raise BundleError(f"{where}: the program's weights ({placeholders[0]}, ...) are not in the bundle",
                          hint="recompile it with this hxc")  # fmt: skip
    return loaded


def archive_tensors(weights: Path | Any) -> dict[str, Any]:
    """Every tensor of an IREE parameter archive, copied out of it."""
    import iree.runtime as rt
    from iree.turbine.aot import ParameterArchive

    archive = ParameterArchive()
    if isinstance(weights, Path):
        archive.index.load(str(weights))
    else:
        archive.index.load_from_file_handle(rt.FileHandle.wrap_memory(weights.buffer), "irpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable NumPy array": we copy right away
        return {name: entry.as_tensor().clone() for name, entry in archive.items()}


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
