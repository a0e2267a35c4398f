"""IREE: the portable core. Builds for every target family (through the compile
driver, one iree-compile per target variant) and runs on IREE's HAL devices."""

from __future__ import annotations

from typing import Any

from hxc.engines.base import Engine, Session
from hxc.manifests.schema import Artifact
from hxc.targets import Device, family_names


class IreeEngine(Engine):
    name = "iree"
    summary = "IREE: one artifact per target variant (CPU, CUDA, ROCm, Vulkan), from the project's own compiler"
    families = family_names()
    precisions = ("fp32", "fp16", "bf16")
    build_needs = ("iree.compiler",)
    run_needs = ("iree.runtime",)
    install_hint = "pip install 'hxc[compile]'"  # the runtime is in every install; the compiler is the extra

    def open(self, artifact: Artifact, file: Any, device: Device, weights: tuple[Any, str] | None) -> Session:
        from hxc.runtime.loader import Session as IreeSession

        return IreeSession.open(file, device, weights)


ENGINE = IreeEngine()
