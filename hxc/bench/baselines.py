"""What `hxc bench` times artifacts against, named once: the names `--baseline` and
`--fail-if-slower-than` take, the candidate ids profiles record, and the bundle file
each baseline runs. A bundle's frontend names its default (`--baseline auto`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hxc.errors import UsageError
from hxc.extras import missing, require
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
    extra: str  # the hxc extra that installs what it needs (hxc.extras)
    requires: tuple[str, ...]  # the modules it imports
    summary: str
    make: MakeContender

    def missing(self) -> list[str]:
        """What this install lacks to run it (nothing: it can run)."""
        return missing(self.requires)

    def require(self) -> None:
        require(self.extra, f"the {self.name} baseline", self.requires)


def _torch(b: Baseline, bundle: Path, manifest: Manifest, cpu_label: str, allow_pickle: bool) -> Contender:
    from hxc.bench.contenders import torch_contender

    return torch_contender(b.candidate, bundle, manifest, cpu_label, compiled=b.name == "torch-compile", allow_pickle=allow_pickle)


def _onnxruntime(b: Baseline, bundle: Path, manifest: Manifest, cpu_label: str, allow_pickle: bool) -> Contender:
    from hxc.bench.contenders import onnxruntime_contender

    return onnxruntime_contender(b.candidate, bundle, manifest, cpu_label)


# The PyTorch baselines restore shared weights with iree-turbine's archive reader.
_TORCH = ("torch", "iree.turbine")
BASELINES: tuple[Baseline, ...] = (
    Baseline("torch", "torch:eager", PROGRAM_PT2, "compile", _TORCH, "PyTorch eager, on the bundle's program", _torch),
    Baseline("torch-compile", "torch:compile", PROGRAM_PT2, "compile", _TORCH, "torch.compile of the bundle's program",
             _torch),
    Baseline("onnxruntime", "onnxruntime", PROGRAM_ONNX, "onnx", ("onnxruntime",),
             "ONNX Runtime (CPU), on the bundle's model.onnx", _onnxruntime),
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


@dataclass(frozen=True)
class SkippedBaseline:
    baseline: str
    reason: str


def resolve(names: Sequence[str], manifest: Manifest) -> tuple[list[Baseline], list[SkippedBaseline]]:
    """The baselines `--baseline` asks for on this bundle, and those left out: `auto` is
    the default of the frontend it was built with, left out with a note where this
    install cannot run it (a runtime-only install has no torch); `none` is nothing. A
    baseline named explicitly that cannot run here is an error naming what to install,
    and one that needs a program the bundle does not hold is a usage error."""
    from hxc.frontends import by_format

    wanted: list[Baseline] = []
    skipped: list[SkippedBaseline] = []
    for name in names:
        if name == "none":
            continue
        chosen = baseline(by_format(manifest.model.source_format).baseline) if name == "auto" else baseline(name)
        if name == "auto" and (absent := chosen.missing()):
            skipped.append(SkippedBaseline(chosen.name, f"{', '.join(absent)} not installed (pip install 'hxc[{chosen.extra}]')"))
            continue
        if chosen.program != manifest.model.program_file:
            raise UsageError(
                f"baseline {chosen.name!r} runs the bundle's {chosen.program}, which this bundle does not hold",
                hint=f"its program is {manifest.model.program_file or 'not stored'}; use "
                + (", ".join(b.name for b in BASELINES if b.program == manifest.model.program_file) or "none"),
            )
        chosen.require()
        if chosen not in wanted:
            wanted.append(chosen)
    return wanted, skipped
