"""The parts of hxc that are installed separately, and the one-line error that names
what to install when a command needs a part this install lacks.

`pip install hxc` is the runtime: loading, verifying, running and benchmarking bundles
needs only IREE's runtime (and numpy, click, rich; tokenizers and jinja2 for generating
text). Compiling needs an extra:

    pip install 'hxc[compile]'   # PyTorch models: torch, iree-turbine, iree-base-compiler
    pip install 'hxc[onnx]'      # ONNX models, and the ONNX Runtime baseline: onnx, onnxruntime, iree-base-compiler
    pip install 'hxc[serve]'     # hxc serve (no compiler): starlette, uvicorn, prometheus-client
    pip install 'hxc[llm]'       # compiling language models: transformers, safetensors

The modules each extra provides are listed here once; tests/test_install.py checks them
against pyproject.toml, and builds a runtime-only environment to prove the split holds.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from hxc.errors import ExitCode, HxcError


@dataclass(frozen=True)
class Extra:
    name: str  # pip install 'hxc[NAME]'
    modules: tuple[str, ...]  # top-level import names it provides
    purpose: str


EXTRAS: dict[str, Extra] = {
    e.name: e
    for e in (
        Extra("compile", ("torch", "iree.turbine", "iree.compiler"), "compiling PyTorch models, PyTorch baselines"),
        Extra("onnx", ("onnx", "onnxruntime", "iree.compiler"), "compiling ONNX models, the ONNX Runtime baseline"),
        Extra("serve", ("starlette", "uvicorn", "prometheus_client"), "hxc serve: the inference server"),
        Extra("llm", ("transformers", "safetensors"), "compiling Hugging Face language models"),
    )
}


class MissingExtraError(HxcError):
    """A command needs a part of hxc this install does not have."""

    exit_code = ExitCode.ERROR


def missing(modules: tuple[str, ...]) -> list[str]:
    """The modules that cannot be imported here (found without importing them)."""
    out = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except ModuleNotFoundError:  # its parent package is absent
            found = False
        if not found:
            out.append(m)
    return out


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise a one-line MissingExtraError if `modules` (default: all of the extra's) are
    not installed; `what` says what needs them ("compiling an ONNX model")."""
    needed = EXTRAS[extra].modules if modules is None else modules
    if absent := missing(needed):
        raise MissingExtraError(f"{what} needs {', '.join(absent)}, which this install of hxc lacks",
                                hint=f"pip install 'hxc[{extra}]'")  # fmt: skip
