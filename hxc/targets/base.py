"""What every target family provides, and the records it shares with the rest of hxc.

A family (cpu, cuda, rocm, vulkan) is one module in this package exposing `FAMILY`,
an instance of a `TargetFamily` subclass. It owns everything that differs between
hardware vendors: the variants it offers, the exact iree-compile flags for each, how
to prove a binary is sound after compiling, how to describe a device its runtime
driver reports, and whether such a device can execute a given artifact. Nothing
outside this package branches on a family's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hxc.manifests.schema import Artifact, Requirements


@dataclass(frozen=True)
class Variant:
    family: str
    name: str
    summary: str  # the hardware it is for, in words a user recognises
    default: bool  # compiled when the user names only the family
    flags: tuple[str, ...]  # iree-compile flags, before any environment-dependent additions
    requires: Requirements
    binary: str
    aliases: tuple[str, ...] = ()
    # (model dtype, artifact dtype): element types this variant's code generator lacks,
    # carried as another type across the artifact's interface (see Artifact.interface_casts).
    interface_casts: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.family}:{self.name}"


@dataclass(frozen=True)
class CompilePlan:
    """A variant made concrete for this compile host: the flags actually used and what the
    resulting binary will need. `dump_binaries` asks the driver to keep the executable
    binaries so `TargetFamily.check` can inspect them; `dump_configurations` keeps the
    configured executables for `TargetFamily.amend_configurations`. `checked_by` names
    the tool that check runs (with its version): it is part of the compile cache key,
    because a cached binary is only as good as the check it passed (PTX cached before
    ptxas was installed was never assembled)."""

    variant: Variant
    flags: tuple[str, ...]
    binary: str
    requires: Requirements
    dump_binaries: bool = False
    checked_by: str | None = None
    dump_configurations: bool = False


@dataclass(frozen=True)
class Device:
    """One device as the host probe found it, with the facts artifact matching needs."""

    driver: str  # IREE HAL driver: local-task, local-sync, vulkan, cuda, hip
    uri: str  # what iree.runtime.get_device() takes
    name: str
    kind: str  # cpu | integrated-gpu | discrete-gpu | virtual-gpu | other
    arch: str | None = None  # x86_64, aarch64, sm_89, gfx942; None when unknown
    features: tuple[str, ...] = ()
    vendor: str | None = None
    driver_version: str | None = None

    @property
    def label(self) -> str:
        return f"{self.driver}: {self.name}"


# IREE demotes f64 to f32 by default, and then an artifact's f64 inputs and outputs are
# read as f32 ("tensor element type mismatch"). Families whose code generators have f64
# (CPU, CUDA, ROCm) keep it; Vulkan carries f64 across its interface as f32.
KEEP_F64 = "--iree-input-demote-f64-to-f32=false"


def device_uri(driver: str, found: dict) -> str:
    """What iree.runtime.get_device() takes for a device its driver listed: driver://path
    (the numeric device_id is an opaque handle), or the bare driver name."""
    path = found.get("path") or ""
    return f"{driver}://{path}" if path else driver


@dataclass(frozen=True)
class Amendment:
    """A family's verdict on IREE's configured executables (`TargetFamily.amend_configurations`)."""

    note: str  # what was checked and changed, for the artifact's `verified` field
    # The whole configured module (MLIR text, `--compile-to=executable-configurations`) ->
    # the module to compile on from there; None when the configurations are right as they are.
    rewrite: Callable[[str], str] | None = None


class CheckFailed(Exception):
    """A compiled binary failed its family's post-compile check (e.g. ptxas)."""


class TargetFamily:
    name: str
    summary: str
    backend: str  # IREE compiler backend
    drivers: tuple[str, ...]  # HAL drivers that run this family's artifacts, preferred first
    variants: tuple[Variant, ...]
    # What its code generator supports (int8 / int4: float32 code over integer weights).
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4")
    # Whether its IREE driver runs a dispatch whose buffers are empty (a dimension that
    # is 0 at run time). Measured True for the CPU drivers; see vulkan.py for the one
    # that does not. CUDA and HIP are left to the device (not measured: no GPU here).
    empty_dispatch: bool = True

    def plan(self, variant: Variant) -> CompilePlan:
        """The concrete compile for this host. Families whose flags depend on installed
        tools (ptxas) or on the compile host (cpu:host) override this."""
        return CompilePlan(variant, variant.flags, variant.binary, variant.requires)

    def check(self, plan: CompilePlan, binaries: Path | None) -> str | None:
        """Prove the compiled binaries are sound; return how, or None if nothing was
        checked. Raise CheckFailed with a one-line reason if they are not."""
        return None

    def amend_configurations(self, plan: CompilePlan, configs: Path) -> Amendment | None:
        """Check the configured executables IREE dumped into `configs` during a compile
        (`plan.dump_configurations`). Returns what was checked, and a rewrite of the whole
        configured module when some would be compiled wrongly (the driver then compiles
        again through it), or None if the family checks nothing. Raise CheckFailed if the
        configurations cannot be checked."""
        return None

    def describe_devices(self, driver: str, devices: list[dict], dump_info) -> list[Device]:
        """Turn what an IREE driver reports into Devices. `dump_info(device_id)` returns
        the driver's text description of one device."""
        return [
            Device(driver=driver, uri=device_uri(driver, d), name=d.get("name") or driver, kind="other")
            for d in devices
        ]

    def cannot_run(self, artifact: Artifact, device: Device) -> str | None:
        """None if `device` can execute `artifact`, else the reason it cannot."""
        raise NotImplementedError

    def rank(self, artifact: Artifact, device: Device) -> int:
        """Static preference when no benchmark profile decides: higher runs first."""
        return 0

    def binary_requirements(self, plan: CompilePlan, binaries: Path | None) -> Requirements | None:
        """What the compiled binaries need of a device beyond `plan.requires`, read from
        the binaries themselves (e.g. SPIR-V capabilities); None when nothing is added."""
        return None

    def fallback_flags(self, plan: CompilePlan) -> list[tuple[str, ...]]:
        """Flag sets to retry with, in order, when a compile with `plan.flags` fails:
        ending with the plan without the flags the family adds for speed (IREE's own
        defaults). Empty when the family adds none."""
        return []

    def tuning_configs(self, plan: CompilePlan) -> list[tuple[str, tuple[str, ...]]]:
        """Flag configurations `hxc compile --tune` tries, as (name, full flags). The
        first is the default build. Families with nothing to tune return just that."""
        return [("default", plan.flags)]

    def precision_flags(self, precision: str) -> tuple[str, ...]:
        """Flags the family adds for artifacts of `precision` (after the variant's own):
        how its code generator best handles that precision's code."""
        return ()

    # -- shared helpers ------------------------------------------------------------

    def variant(self, name: str) -> Variant | None:
        for v in self.variants:
            if name == v.name or name in v.aliases:
                return v
        return None

    @property
    def default_variants(self) -> tuple[Variant, ...]:
        return tuple(v for v in self.variants if v.default)

    def wrong_driver(self, device: Device) -> str | None:
        if device.driver not in self.drivers:
            return f"{self.name} code runs on the {'/'.join(self.drivers)} driver, not {device.driver}"
        return None

