"""The frontend registry: every module in this package (except `base`) is one model
format, found by file name like the target families, so adding a format means adding
one file here (and its tests).

    fe = frontends.recognise("model.pt2")   # by the file's contents; torch- and onnx-free
    imported = fe.import_model(source, options, workdir, on_stage)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hxc.errors import ModelLoadError, UsageError
from hxc.frontends.base import Frontend, Source
from hxc.registry import member_names

if TYPE_CHECKING:
    from hxc.compiler.torch_export import ExportedModel

__all__ = ["Frontend", "Source", "by_format", "frontend", "frontend_names", "frontends", "export_program", "recognise"]

@functools.cache
def frontend_names() -> tuple[str, ...]:
    return member_names(__file__)


@functools.cache
def frontend(module: str) -> Frontend:
    return importlib.import_module(f"hxc.frontends.{module}").FRONTEND


@functools.cache
def frontends() -> tuple[Frontend, ...]:
    """Every frontend, in the order sources are offered to them."""
    return tuple(sorted((frontend(n) for n in frontend_names()), key=lambda f: f.order))


def by_format(source_format: str) -> Frontend:
    """The frontend a bundle was built with, from its manifest's `source_format`."""
    for f in frontends():
        if f.name == source_format:
            return f
    raise KeyError(source_format)


def recognise(text: str) -> Frontend:
    """The frontend for what the user gave `hxc compile`, from its contents. Raises a
    one-line ModelLoadError (or UsageError) when no frontend takes it."""
    path = Path(text)
    source = Source.of(text)
    for f in frontends():
        if f.recognise(source):
            return f
    if source.directory is not None:
        raise ModelLoadError(f"{text}: is a directory, not a model file",
                             hint="a Hugging Face model directory holds config.json and *.safetensors")  # fmt: skip
    if source.path is None:
        raise ModelLoadError(f"{text}: no such file")
    if path.suffix == ".py":
        raise UsageError(f"{text}: a Python file needs a factory", hint=f"write {text}:make_model")
    raise ModelLoadError(
        f"{text}: not a model hxc can read", hint="expected " + ", ".join(f.summary for f in frontends())
    )


def export_program(
    source: str, *, inputs: Sequence[str] = (), dynamic_batch: bool = False, allow_pickle: bool = False
) -> ExportedModel:
    """A PyTorch model source as a torch.export program, before lowering."""
    from hxc.compiler.imported import ImportOptions

    f = recognise(source)
    if f.export is None:
        raise ModelLoadError(f"{source}: is {f.summary}, not a PyTorch model", hint="compile it with `hxc compile`")
    return f.export(source, ImportOptions(inputs=tuple(inputs), dynamic_batch=dynamic_batch, allow_pickle=allow_pickle))
