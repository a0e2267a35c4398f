"""What every PyTorch frontend shares: the exported model it hands to the PyTorch
pipeline (`torch_import`), and the helpers that get it there.

Each PyTorch format is a frontend of its own (`hxc.frontends`: torch.export archive,
TorchScript, pickled module, Python factory); each turns its source into an
`ExportedModel` with the helpers below, so `--input` specs, `--dynamic-batch` and
example inputs mean the same for all of them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hxc.compiler.pt2_archive import ALLOW_PICKLE_HINT, UnsafeModelError, inspect_pt2
from hxc.compiler.specs import example_arrays, parse_input_spec
from hxc.dtypes import from_torch, interface_dtype, to_torch
from hxc.errors import LoweringError, ModelLoadError, first_line
from hxc.manifests.schema import TensorSpec


@dataclass(frozen=True)
class ExportedModel:
    """A PyTorch model ready to lower: its program, the example inputs it was exported
    with, and the eager callable that produces the reference (golden) outputs."""

    name: str
    source: str
    source_format: str
    source_sha256: str
    program: torch.export.ExportedProgram | None  # None for a module of several functions
    example_args: tuple[torch.Tensor, ...]
    reference: Callable[..., Any]
    # A module that declares several functions (`hxc.functions`): exported per function
    # by `hxc.compiler.functions`, not as one program.
    functions_module: torch.nn.Module | None = None


def load_program(
    source: Path | bytes, where: str, *, allow_pickle: bool = False, check_expansion: bool = True
) -> torch.export.ExportedProgram:
    """torch.export.load, made safe: the archive is inspected first (no pickles, no
    compiled code, sizes within limits; see pt2_archive), and the load itself runs
    with unrestricted unpickling disabled, so nothing the inspection missed can run
    code either. With `allow_pickle` the user has said they trust the file."""
    inspect_pt2(source, where, allow_pickle=allow_pickle, check_expansion=check_expansion)
    f = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with contextlib.nullcontext() if allow_pickle else _no_code_from_pickles():
            return torch.export.load(f)
    except _RefusedPickle as e:
        raise UnsafeModelError(f"{where}: loading it would run code from the file ({e})", hint=ALLOW_PICKLE_HINT) from None
    except pickle.UnpicklingError as e:
        raise UnsafeModelError(f"{where}: holds pickled data that is not plain tensors ({first_line(e)})",
                               hint=ALLOW_PICKLE_HINT) from None  # fmt: skip
    except Exception as e:  # torch raises many types for a damaged archive
        raise ModelLoadError(f"{where}: cannot read torch.export archive ({first_line(e)})") from None


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """torch.export.save, made safe on a full disk. Given a path, torch's C++ archive
    writer throws from its destructor when a write fails and the process aborts
    (`terminate called after throwing an instance of 'c10::Error'`). Through a file
    object that never fails toward torch, the archive streams to disk with Python's
    I/O (no copy in memory) and the first OSError (ENOSPC, EFBIG) is raised here,
    once the writer has finished."""
    with open(path, "wb", buffering=0) as f:
        sink = _FailSoftFile(f)
        torch.export.save(program, sink)
        if sink.error is not None:
            raise sink.error


class _FailSoftFile(io.RawIOBase):
    """A file that records its first write error instead of raising it, and discards
    every write after it (see save_program)."""

    def __init__(self, f: io.FileIO) -> None:
        super().__init__()
        self.f = f
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.error is None:
            try:
                while view:  # FileIO may write less than asked (a file size limit reached)
                    written = self.f.write(view)
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
                    view = view[written:]
            except OSError as e:
                self.error = e if e.filename else OSError(e.errno, e.strerror, self.f.name)
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.error is not None:
            return 0
        try:
            return self.f.seek(offset, whence)
        except OSError as e:
            self.error = e
            return 0

    def tell(self) -> int:
        return 0 if self.error is not None else self.f.tell()


class _RefusedPickle(Exception):
    pass


@contextlib.contextmanager
def _no_code_from_pickles() -> Iterator[None]:
    """While torch.export.load runs: every torch.load is weights-only (tensors and
    plain containers, no code), and the unrestricted unpicklers it can reach refuse.
    torch looks these up at call time, so swapping the attributes is enough."""
    from torch.export.pt2_archive import _package

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _RefusedPickle("it asks for an unrestricted unpickler")

    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    saved = [(torch, "load", real_load), (torch._C, "_pickle_load_obj", torch._C._pickle_load_obj),
             (_package, "pickle", _package.pickle)]  # fmt: skip
    torch.load = weights_only_load  # type: ignore[assignment]
    torch._C._pickle_load_obj = refuse  # type: ignore[attr-defined]
    _package.pickle = types.SimpleNamespace(loads=refuse, load=refuse, dumps=pickle.dumps)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def input_specs(inputs: Sequence[str]) -> list[TensorSpec]:
    return [parse_input_spec(s, i) for i, s in enumerate(inputs)]


def example_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic example tensors for specs (`hxc.compiler.specs.example_arrays`)."""
    return tuple(to_torch(a, s.dtype) for a, s in zip(example_arrays(specs, seed), specs))


def export_module(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], dynamic_shapes: Any, source: str
) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        hint = "a dimension marked dynamic may be fixed by the model" if dynamic_shapes else None
        raise LoweringError(f"{source}: torch.export failed ({type(e).__name__}: {first_line(e)})", hint=hint) from None


def export_with(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], specs: Sequence[TensorSpec], dynamic_batch: bool, source: str
) -> tuple[torch.export.ExportedProgram, tuple[torch.Tensor, ...]]:
    """Export `module` on example `args` (or on generated inputs for `specs`), with the
    dimensions that specs or `dynamic_batch` make dynamic; returns the program and the
    example inputs it was exported with."""
    if specs:
        args = example_inputs(specs)
    elif dynamic_batch:
        args = batch_of_two(args)
    return export_module(module, args, dynamic_shapes(specs, args, dynamic_batch), source), args


def reexport(
    program: torch.export.ExportedProgram, specs: Sequence[TensorSpec], dynamic_batch: bool, source: str
) -> tuple[torch.export.ExportedProgram, tuple[torch.Tensor, ...]]:
    """An exported program as is, or exported again when specs or `dynamic_batch`
    change its input shapes."""
    args = program_example_args(program)
    if not specs and not dynamic_batch:
        return program, args
    return export_with(program.module(), args, specs, dynamic_batch, source)


def batch_of_two(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Example inputs with batch 1 repeated to batch 2: torch.export specialises a
    size-1 dimension, so it could not stay dynamic."""
    return tuple(torch.cat([a, a]) if a.dim() > 0 and a.shape[0] == 1 else a for a in args)


def dynamic_shapes(
    specs: Sequence[TensorSpec], args: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> tuple[dict[int, Any], ...] | None:
    dyn = torch.export.Dim.DYNAMIC
    shapes = []
    for i, a in enumerate(args):
        dims: dict[int, Any] = {}
        if i < len(specs):
            dims = {j: dyn for j, d in enumerate(specs[i].shape) if isinstance(d, str)}
        if dynamic_batch and a.dim() > 0:
            dims[0] = dyn
        shapes.append(dims)
    return tuple(shapes) if any(shapes) else None


def program_example_args(program: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...]:
    """The example inputs stored with a program, or generated from its input shapes."""
    stored = getattr(program, "example_inputs", None)
    if stored:
        args, kwargs = stored
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            return tuple(args)
    specs = []
    for i, node in enumerate(n for n in program.graph.nodes if n.op == "placeholder"):
        if node.name not in program.graph_signature.user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise LoweringError(f"input {node.name!r} is not a tensor; hxc compiles tensor inputs only")
        shape = tuple(d if isinstance(d, int) else f"d{i}" for d in val.shape)
        name = interface_dtype(from_torch(val.dtype), f"input {node.name!r}", f"dtype {val.dtype}")
        specs.append(TensorSpec(node.name, name, shape))
    return example_inputs(specs)
