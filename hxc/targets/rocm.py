"""AMD GPUs through IREE's ROCm backend, run by the hip driver.

A HSACO code object is built for one gfx architecture and loads only on that one, so
matching is exact (feature suffixes such as `:sramecc+:xnack-` are ignored).
IREE 3.13 compiles gfx908/90a/942/950/1100/1101/1103/1150/1151/1200/1201; it rejects
gfx1030, gfx1102 and gfx906, which are therefore not offered.
"""

from __future__ import annotations

import re

from hxc.manifests.schema import Artifact, Requirements
from hxc.targets.base import KEEP_F64, Device, TargetFamily, Variant, device_uri


def _gfx(arch: str, summary: str, default: bool, aliases=()) -> Variant:
    return Variant("rocm", arch, summary, default, ("--iree-hal-target-device=hip", KEEP_F64, f"--iree-rocm-target={arch}"),
                   Requirements(gpu_archs=(arch,)), "hsaco", tuple(aliases))  # fmt: skip


class RocmFamily(TargetFamily):
    name = "rocm"
    summary = "AMD GPUs, through IREE's ROCm backend (HIP driver)"
    backend = "rocm"
    drivers = ("hip",)
    variants = (
        _gfx("gfx908", "CDNA1: Instinct MI100", False, ["mi100"]),
        _gfx("gfx90a", "CDNA2: Instinct MI210, MI250(X)", True, ["mi250", "mi210"]),
        _gfx("gfx942", "CDNA3: Instinct MI300X, MI300A, MI325X", True, ["mi300x", "mi300"]),
        _gfx("gfx950", "CDNA4: Instinct MI350X, MI355X", False, ["mi355x"]),
        _gfx("gfx1100", "RDNA3: Radeon RX 7900 XTX/XT, Radeon PRO W7900", True, ["rx7900xtx"]),
        _gfx("gfx1201", "RDNA4: Radeon RX 9070 (XT)", False, ["rx9070"]),
    )

    def describe_devices(self, driver: str, devices: list[dict], dump_info) -> list[Device]:
        out = []
        for d in devices:
            m = re.search(r"gpu-arch-name:\s*(gfx[0-9a-f]+)", dump_info(d["device_id"]))
            out.append(Device(driver, device_uri(driver, d), d.get("name") or "AMD GPU", "discrete-gpu",
                              m.group(1) if m else None, vendor="amd"))  # fmt: skip
        return out

    def cannot_run(self, artifact: Artifact, device: Device) -> str | None:
        if reason := self.wrong_driver(device):
            return reason
        if device.arch is None:
            return "the HIP driver did not report this GPU's architecture"
        if device.arch.split(":")[0] not in artifact.requires.gpu_archs:
            return f"code for {', '.join(artifact.requires.gpu_archs)} cannot run on {device.arch}"
        return None

    def rank(self, artifact: Artifact, device: Device) -> int:
        return 100


FAMILY = RocmFamily()
