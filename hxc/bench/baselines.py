"""What `hxc bench` times artifacts against, named once: the names `--baseline` and
`--fail-if-slower-than` take, the candidate ids profiles record, and the bundle file
each baseline runs. A bundle's frontend names its default (`--baseline auto`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hxc.errors import UsageError
from hxc.manifests.schema import PROGRAM_ONNX, PROGRAM_PT2, Manifest

if TYPE_CHECKING:
    from hxc.bench.measure import Contender

# (baseline, bundle, manifest, CPU device label, allow_pickle) -> the contender that times it
MakeContender = Callable[["Baseline", Path, Manifest, str, bool], "Contender"]


@dataclass(frozen=True)
class Baseline:
    name: str  # what --baseline takes
    candidate: str  # what its profiles are recorded as
    program: str  # the bundle file it runs
    requires: str  # the module it needs
    summary: str
    make: MakeContender


def _torch(b: Baseline, bundle: Path, manifest: Manifest, cpu_label: str, allow_pickle: bool) -> Contender:
    from hxc.bench.contenders import torch_contender

    return torch_contender(b.candidate, bundle, manifest, cpu_label, compiled=b.name == "torch-compile", allow_pickle=allow_pickle)


def _onnxruntime(b: Baseline, bundle: Path, manifest: Manifest, cpu_label: str, allow_pickle: bool) -> Contender:
    from hxc.bench.contenders import onnxruntime_contender

    return onnxruntime_contender(b.candidate, bundle, manifest, cpu_label)


BASELINES: tuple[Baseline, ...] = (
    Baseline("torch", "torch:eager", PROGRAM_PT2, "torch", "PyTorch eager, on the bundle's program", _torch),
    Baseline("torch-compile", "torch:compile", PROGRAM_PT2, "torch", "torch.compile of the bundle's program", _torch),
    Baseline("onnxruntime", "onnxruntime", PROGRAM_ONNX, "onnxruntime", "ONNX Runtime (CPU), on the bundle's model.onnx",
             _onnxruntime),
)
NAMES: tuple[str, ...] = tuple(b.name for b in BASELINES)
# Speed-ups in reports are relative to this one.
REFERENCE = BASELINES[0]


def baseline(name: str) -> Baseline:
    for b in BASELINES:
        if b.name == name:
            return b
    raise UsageError(f"unknown baseline {name!r}", hint=f"choose from: {', '.join(NAMES)}, auto, none")


def is_baseline(candidate: str) -> bool:
    """True for a profile of a baseline, False for one of an artifact."""
    return any(b.candidate == candidate for b in BASELINES)


def resolve(names: Sequence[str], manifest: Manifest) -> list[Baseline]:
    """The baselines `--baseline` asks for on this bundle: `auto` is the default of the
    frontend it was built with, `none` is nothing. A baseline that needs a program the
    bundle does not hold is a usage error."""
    from hxc.frontends import by_format

    wanted: list[Baseline] = []
    for name in names:
        if name == "none":
            continue
        chosen = baseline(by_format(manifest.model.source_format).baseline) if name == "auto" else baseline(name)
        if chosen.program != manifest.model.program_file:
            raise UsageError(
                f"baseline {chosen.name!r} runs the bundle's {chosen.program}, which this bundle does not hold",
                hint=f"its program is {manifest.model.program_file or 'not stored'}; use "
                + (", ".join(b.name for b in BASELINES if b.program == manifest.model.program_file) or "none"),
            )
        if chosen not in wanted:
            wanted.append(chosen)
    return wanted
