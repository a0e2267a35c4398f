"""What every frontend provides: one record per model format.

A frontend (torch.export archive, TorchScript, pickled module, Python factory, ONNX) is
one module in this package exposing `FRONTEND`, a `Frontend` record: how a source is
recognised from its contents, how it is digested for the import cache, how it is
imported into IREE's input IR, which precisions it can build, and what `hxc bench`
times it against. Nothing outside this package branches on a model format.

Recognising is cheap and needs neither torch nor onnx (a runtime-only install can still
tell what a file is); everything heavier is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hxc.errors import ModelLoadError
from hxc.manifests.bundle import file_sha256
from hxc.manifests.schema import PROGRAM_PT2

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportedModel, ImportOptions
    from hxc.compiler.torch_export import ExportedModel

ImportFn = Callable[[str, "ImportOptions", Path, Callable[[str], None]], "ImportedModel"]
ExportFn = Callable[[str, "ImportOptions"], "ExportedModel"]


@dataclass(frozen=True)
class Source:
    """What `hxc compile` was given, as far as recognising it needs: the text, and for
    an existing file its first bytes and, for a zip, its member names."""

    text: str
    path: Path | None = None  # the file, when `text` names one
    head: bytes = b""
    zip_names: tuple[str, ...] = ()
    # When `text` names a directory (a Hugging Face model directory): it, and the names in it.
    directory: Path | None = None
    dir_names: tuple[str, ...] = ()

    @classmethod
    def of(cls, text: str) -> Source:
        path = Path(text)
        if path.is_dir():
            try:
                names = tuple(sorted(p.name for p in path.iterdir()))
            except OSError as e:
                raise ModelLoadError(f"{path}: cannot list the directory ({e.strerror or e})") from None
            return cls(text, directory=path, dir_names=names)
        if not path.is_file():
            return cls(text)
        with open(path, "rb") as f:
            head = f.read(16)
        names: tuple[str, ...] = ()
        if head.startswith(b"PK"):
            try:
                with zipfile.ZipFile(path) as z:
                    names = tuple(z.namelist())
            except (zipfile.BadZipFile, OSError) as e:
                raise ModelLoadError(f"{path}: corrupt or truncated archive ({e})") from None
        return cls(text, path, head, names)

    def read_member(self, suffix: str) -> bytes | None:
        """The first zip member whose name ends with `suffix`, or None."""
        name = next((n for n in self.zip_names if n.endswith(suffix)), None)
        if name is None or self.path is None:
            return None
        try:
            with zipfile.ZipFile(self.path) as z:
                return z.read(name)
        except (zipfile.BadZipFile, OSError, KeyError) as e:
            raise ModelLoadError(f"{self.path}: corrupt or truncated archive ({e})") from None


def file_stem(source: str) -> str:
    return Path(source).stem


@dataclass(frozen=True)
class Frontend:
    name: str  # recorded in the manifest as the model's source_format
    summary: str  # what the user gives, in words ("a torch.export archive (.pt2)")
    recognise: Callable[[Source], bool]  # from the contents; torch- and onnx-free
    import_model: ImportFn  # -> IREE input IR, golden sample, program and weights
    order: int = 50  # recognition order, lowest first: a .pt2 is also a zip TorchScript could claim
    # PyTorch frontends: the source as a torch.export program, the step before lowering.
    export: ExportFn | None = None
    digest: Callable[[Path], str] = file_sha256  # the source's identity for the import cache
    cacheable: bool = True  # False: imported afresh every time (code that can change anywhere)
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")  # what it can build
    baseline: str = "torch"  # what `hxc bench` times the artifacts against by default
    program_file: str = PROGRAM_PT2  # the program it stores in the bundle
    extra: str = "compile"  # the hxc extra that installs what importing needs (hxc.extras)
    model_name: Callable[[str], str] = file_stem  # the model's name, from the source


# The exports of the build in progress (`one_export_per_build`), by source and options.
_EXPORTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hxc_exports", default=None)


@contextlib.contextmanager
def one_export_per_build() -> Iterator[None]:
    """Within this block every import of a PyTorch source (each precision, each cast
    interface) starts from one export: a factory run twice may build different weights
    (a module created with unseeded randomness), and exporting again costs time."""
    token = _EXPORTS.set({})
    try:
        yield
    finally:
        _EXPORTS.reset(token)


def through_torch_export(export: ExportFn) -> ImportFn:
    """The import step of every PyTorch frontend: its `export`, then hxc's PyTorch
    pipeline (golden sample, precision, weights, lowering)."""

    def exported(source: str, options: ImportOptions) -> ExportedModel:
        memo = _EXPORTS.get()
        key = (source, options.inputs, options.dynamic_batch, options.allow_pickle, options.example)
        if memo is not None and key in memo:
            return memo[key]
        model = _export_with_example_shapes(export, source, options)
        if memo is not None:
            memo[key] = model
        return model

    @functools.wraps(export)
    def import_model(source: str, options: ImportOptions, workdir: Path, on_stage: Callable[[str], None]) -> ImportedModel:
        from hxc.compiler.torch_import import import_torch

        return import_torch(lambda: exported(source, options), options, workdir, on_stage)

    return import_model


def _export_with_example_shapes(export: ExportFn, source: str, options: ImportOptions) -> ExportedModel:
    """`export`; a format that carries no shapes (TorchScript, pickles) and got no
    `--input` takes its input specs from the `--example` file's arrays."""
    from dataclasses import replace

    from hxc.errors import UsageError

    try:
        return export(source, options)
    except UsageError:
        if not options.example or options.inputs:
            raise
    from hxc.compiler.examples import read_example
    from hxc.dtypes import from_numpy
    from hxc.manifests.schema import TensorSpec

    example = read_example(options.example)
    specs = []
    for name, a in zip(example.names, example.inputs):
        found = from_numpy(a.dtype)
        if found is None:
            raise UsageError(f"{example.path}: array {name!r} has dtype {a.dtype}, which hxc does not support")
        specs.append(TensorSpec(name, found.name, a.shape).format())
    return export(source, replace(options, inputs=tuple(specs)))
