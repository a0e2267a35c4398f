"""NVIDIA GPUs through IREE's CUDA backend, run by the cuda driver.

What ships: PTX, JIT-compiled by the NVIDIA driver for the GPU it lands on (the driver
caches the result, so only the first load on a machine pays for it). PTX runs on its
target SM and every newer one. Cubins are not an option with IREE 3.13: it accepts
`--iree-cuda-use-ptxas` but never runs ptxas (checked with a logging ptxas wrapper that
was never called; the vmfb still held PTX), so hxc runs ptxas itself instead:

- every variant's PTX is dumped at compile time and assembled with
  `ptxas --gpu-name=<its SM>`, so PTX that the driver would reject fails here, at
  compile time, not on a user's GPU;
- sm_90 (Hopper: H100, H200): IREE 3.13 has no sm_90 target ("missing GPU target"), so
  this variant carries PTX generated for sm_80 (PTX ISA 7.6), assembled by ptxas for
  sm_90 to prove the Hopper JIT accepts it. It is offered only to compute capability
  9.0 and newer.

Without ptxas the PTX ships unchecked (the artifact's `verified` field stays empty), and
the compile cache keys every artifact by the check it passed (`CompilePlan.checked_by`).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from hxc.manifests.schema import Artifact, Requirements
from hxc.targets.base import KEEP_F64, CheckFailed, CompilePlan, Device, TargetFamily, Variant, device_uri

BASE_FLAGS = ("--iree-hal-target-device=cuda", KEEP_F64)


def _ptx(name: str, codegen_sm: str, summary: str, default: bool, aliases=()) -> Variant:
    # `name` is the oldest GPU the variant is for; `codegen_sm` is what IREE generates PTX for.
    return Variant("cuda", name, summary, default, (*BASE_FLAGS, f"--iree-cuda-target={codegen_sm}"),
                   Requirements(min_gpu_arch=name), "ptx", tuple(aliases))  # fmt: skip


class CudaFamily(TargetFamily):
    name = "cuda"
    summary = "NVIDIA GPUs, through IREE's CUDA backend (PTX, checked by ptxas)"
    backend = "cuda"
    drivers = ("cuda",)
    variants = (
        _ptx("sm_80", "sm_80", "Ampere and newer: A100, A30 (sm_80 PTX)", True, ["ampere", "a100"]),
        _ptx("sm_86", "sm_86", "Ampere consumer and newer: RTX 30xx, A10, A40 (sm_86 PTX)", False, ["rtx3090", "a10"]),
        _ptx("sm_89", "sm_89", "Ada and newer: L4, L40S, RTX 40xx (sm_89 PTX)", True, ["ada", "l4", "rtx4090"]),
        _ptx("sm_90", "sm_80", "Hopper: H100, H200 (sm_80 PTX, assembled by ptxas for sm_90)", True,
             ["hopper", "h100", "h200"]),
        _ptx("sm_120", "sm_120", "Blackwell consumer: RTX 50xx (sm_120 PTX)", False, ["rtx5090"]),
    )  # fmt: skip

    def plan(self, variant: Variant) -> CompilePlan:
        if find_ptxas() is None:
            return CompilePlan(variant, variant.flags, "ptx", variant.requires)  # PTX ships unchecked
        return CompilePlan(variant, variant.flags, "ptx", variant.requires, dump_binaries=True,
                           checked_by=f"ptxas {ptxas_version()}")  # fmt: skip

    def check(self, plan: CompilePlan, binaries: Path | None) -> str | None:
        ptxas = find_ptxas()
        if not plan.dump_binaries or binaries is None or ptxas is None:
            return None
        sm = plan.requires.min_gpu_arch
        ptx_files = sorted(binaries.glob("*.ptx"))
        if not ptx_files:
            raise CheckFailed("no PTX was produced to check")
        for ptx in ptx_files:
            proc = subprocess.run([ptxas, f"--gpu-name={sm}", str(ptx), "-o", os.devnull], capture_output=True, text=True)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
                raise CheckFailed(f"ptxas could not assemble the PTX for {sm}: {first}")
        return f"PTX assembled by ptxas {ptxas_version()} for {sm}"

    def describe_devices(self, driver: str, devices: list[dict], dump_info) -> list[Device]:
        out = []
        for d in devices:
            info = dump_info(d["device_id"])
            m = re.search(r"compute-capability:\s*(\d+)\.(\d+)", info)
            arch = f"sm_{m.group(1)}{m.group(2)}" if m else None
            out.append(Device(driver, device_uri(driver, d), d.get("name") or "CUDA GPU", "discrete-gpu", arch,
                              vendor="nvidia", driver_version=_field(info, "driver-version")))  # fmt: skip
        return out

    def cannot_run(self, artifact: Artifact, device: Device) -> str | None:
        if reason := self.wrong_driver(device):
            return reason
        have = sm_number(device.arch)
        if have is None:
            return "the CUDA driver did not report this GPU's compute capability"
        need = artifact.requires.min_gpu_arch
        if have < (sm_number(need) or 0):
            return f"built for {need} or newer; this GPU is {device.arch}"
        return None

    def rank(self, artifact: Artifact, device: Device) -> int:
        # The most specific compatible SM wins: its PTX may use that SM's instructions.
        # Every SM number counts (sm_89 over sm_86 over sm_80), so no two variants tie.
        return 100 + (sm_number(artifact.requires.min_gpu_arch) or 0)


def sm_number(arch: str | None) -> int | None:
    m = re.fullmatch(r"sm_(\d+)a?", arch or "")
    return int(m.group(1)) if m else None


def _field(info: str, key: str) -> str | None:
    m = re.search(rf"{key}:\s*(\S+)", info)
    return m.group(1) if m else None


@functools.cache
def find_ptxas() -> str | None:
    """ptxas from $HXC_PTXAS, PATH, or $CUDA_HOME/bin."""
    for candidate in (os.environ.get("HXC_PTXAS"), shutil.which("ptxas")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "ptxas"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


@functools.cache
def ptxas_version() -> str:
    ptxas = find_ptxas()
    if ptxas is None:
        return "missing"
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


FAMILY = CudaFamily()
