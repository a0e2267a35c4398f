"""Any Vulkan 1.3 device through IREE's SPIR-V backend, run by the vulkan driver.

The portable variant targets IREE's baseline profile (vp_android_baseline_2022) and
runs on any conformant Vulkan device, including Mesa's software driver lavapipe
(device type `cpu`), which is how this project tests Vulkan without a GPU. The tuned
variants use one vendor's subgroup sizes and cooperative-matrix extensions and are
picked only on that vendor's devices.
"""

from __future__ import annotations

import re

from hxc.manifests.schema import Artifact, Requirements
from hxc.targets.base import Device, TargetFamily, Variant, device_uri

# Vulkan vendor IDs, as the driver reports them.
VENDORS = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel", 0x13B5: "arm", 0x5143: "qualcomm", 0x10005: "mesa"}


def _spirv(name: str, summary: str, default: bool, target: str | None, vendor: str | None) -> Variant:
    flags = ("--iree-hal-target-device=vulkan",) + ((f"--iree-vulkan-target={target}",) if target else ())
    return Variant("vulkan", name, summary, default, flags, Requirements(vendor=vendor), "spirv")


class VulkanFamily(TargetFamily):
    name = "vulkan"
    summary = "Any Vulkan 1.3 GPU (or Mesa lavapipe), through IREE's SPIR-V backend"
    backend = "vulkan-spirv"
    drivers = ("vulkan",)
    # Reduced precision is not offered: bf16 fails to compile for SPIR-V (`vector.bitcast`
    # of bf16), and fp16 code for the portable profile compiled but returned wrong
    # numbers on lavapipe (max abs error 0.46 against PyTorch on the example CNN).
    precisions = ("fp32",)
    variants = (
        _spirv("spirv", "portable SPIR-V for any Vulkan 1.3 device (IREE baseline profile)", True, None, None),
        _spirv("rdna3", "SPIR-V tuned for AMD RDNA3", False, "rdna3", "amd"),
        _spirv("ampere", "SPIR-V tuned for NVIDIA Ampere", False, "ampere", "nvidia"),
        _spirv("ada", "SPIR-V tuned for NVIDIA Ada", False, "ada", "nvidia"),
    )

    def describe_devices(self, driver: str, devices: list[dict], dump_info) -> list[Device]:
        out = []
        for d in devices:
            info = dump_info(d["device_id"])
            fields = dict(re.findall(r"^(\w+):\s*(.*)$", info, flags=re.MULTILINE))
            vendor_id = int(fields.get("vendor_id", "0"), 16) if fields.get("vendor_id", "").startswith("0x") else 0
            out.append(Device(
                driver, device_uri(driver, d), fields.get("name") or d.get("name") or "Vulkan device",
                fields.get("type", "other"), arch=fields.get("driver"), vendor=VENDORS.get(vendor_id, hex(vendor_id)),
                driver_version=" ".join(x for x in (fields.get("driver_info"), fields.get("api")) if x) or None,
            ))  # fmt: skip
        return out

    def cannot_run(self, artifact: Artifact, device: Device) -> str | None:
        if reason := self.wrong_driver(device):
            return reason
        want = artifact.requires.vendor
        if want and device.vendor != want:
            return f"SPIR-V tuned for {want} GPUs; this device is {device.vendor}"
        return None

    def rank(self, artifact: Artifact, device: Device) -> int:
        # Without measurements, a real GPU beats CPU code, and CPU code beats a software
        # Vulkan device (lavapipe reports type `cpu` and is ~35x slower than llvm-cpu).
        base = {"discrete-gpu": 80, "integrated-gpu": 45, "virtual-gpu": 40}.get(device.kind, 10)
        return base + (5 if artifact.requires.vendor else 0)


FAMILY = VulkanFamily()
