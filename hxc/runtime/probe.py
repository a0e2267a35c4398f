"""What hardware this process can use, as IREE's runtime sees it.

Probing opens drivers and lists devices; it never creates a device or loads code, so
it is cheap, and it runs once per process (`probe_host()` is cached). A driver that
cannot be opened (no libcuda.so, no Vulkan loader) is recorded as absent with the
driver's own reason; it never raises.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import socket
import time
from dataclasses import dataclass
from importlib import metadata

from hxc import __version__
from hxc.errors import first_line
from hxc.manifests.schema import Host
from hxc.targets import Device, families
from hxc.targets.cpu import HostCpu, host_cpu


@dataclass(frozen=True)
class DriverStatus:
    name: str
    family: str
    available: bool
    reason: str | None  # why it is absent, or None
    devices: tuple[Device, ...]


@dataclass(frozen=True)
class HostProbe:
    hostname: str
    os: str
    cpu: HostCpu
    drivers: tuple[DriverStatus, ...]
    seconds: float

    @property
    def versions(self) -> dict[str, str]:
        # Read on demand: package metadata lookups would add ~5 ms to every probe.
        return _versions()

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(d for s in self.drivers for d in s.devices)

    def driver(self, name: str) -> DriverStatus | None:
        return next((s for s in self.drivers if s.name == name), None)

    def host(self) -> Host:
        """This machine as profiles record it."""
        labels = tuple(sorted(f"{d.label}" + (f" [{d.driver_version}]" if d.driver_version else "")
                              for d in self.devices if d.kind != "cpu" or d.driver == "vulkan"))  # fmt: skip
        fields = (self.cpu.model, str(self.cpu.cores), ",".join(self.cpu.features), *labels,
                  *(f"{k}={v}" for k, v in sorted(self.versions.items())))  # fmt: skip
        host_id = hashlib.sha256("\n".join(fields).encode()).hexdigest()[:16]
        return Host(
            id=host_id,
            hostname=self.hostname,
            cpu_model=self.cpu.model,
            cpu_cores=self.cpu.cores,
            cpu_features=self.cpu.features,
            devices=labels,
            versions=dict(self.versions),
        )


@functools.cache
def probe_host() -> HostProbe:
    t0 = time.perf_counter()
    import iree.runtime as rt

    compiled_in = set(rt.query_available_drivers())
    statuses = []
    for fam in families():
        for name in fam.drivers:
            statuses.append(_probe_driver(rt, fam, name, compiled_in))
    return HostProbe(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        cpu=host_cpu(),
        drivers=tuple(statuses),
        seconds=time.perf_counter() - t0,
    )


def _probe_driver(rt, fam, name: str, compiled_in: set[str]) -> DriverStatus:
    if name not in compiled_in:
        return DriverStatus(name, fam.name, False, "not built into this IREE runtime", ())
    try:
        driver = rt.get_driver(name)
        found = driver.query_available_devices()
    except Exception as e:  # IREE raises RuntimeError with the driver's status text
        return DriverStatus(name, fam.name, False, _driver_reason(e), ())
    if not found:
        return DriverStatus(name, fam.name, False, "driver loaded but reports no devices", ())

    def dump_info(device_id: int) -> str:
        try:
            return driver.dump_device_info(device_id)
        except Exception:
            return ""

    return DriverStatus(name, fam.name, True, None, tuple(fam.describe_devices(name, found, dump_info)))


def _driver_reason(e: Exception) -> str:
    text = first_line(e, limit=400)
    # "Error creating driver: c/runtime/src/...c:66: UNAVAILABLE; CUDA driver library ..."
    if "; " in text:
        text = text.split("; ", 1)[1]
    return text


@functools.cache
def _versions() -> dict[str, str]:
    out = {"hxc": __version__, "python": platform.python_version()}
    for dist in ("iree-base-runtime", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
