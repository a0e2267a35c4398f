"""Shared fixtures: real model files of every supported format, bundles compiled once
per session with the real IREE compiler (artifacts are cached across tests in a
session-private cache, never the user's), and synthetic hosts and manifests for
selection tests that must hold on any machine, GPU runners included."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hxc.cli import main


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["HXC_CACHE_DIR"] = str(tmp_path_factory.mktemp("hxc-cache"))
    os.environ.pop("HXC_DEVICE", None)


FACTORY_SOURCE = textwrap.dedent(
    '''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x)).mean(dim=(2, 3))
            return self.fc(y)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(6, 2)

        def forward(self, x, scale):
            h = torch.tanh(self.a(x))
            return {"features": h * scale, "logits": (self.b(x), h.sum(dim=-1))}

    class IntMod(nn.Module):
        def forward(self, x):
            q = torch.remainder(x, 3)
            return q * 4294967296 + 1  # needs 64-bit integers

    def make_model():
        torch.manual_seed(0)
        return Net().eval(), (torch.randn(2, 3, 8, 8),)

    def two_heads():
        torch.manual_seed(1)
        return TwoHeads().eval(), (torch.randn(3, 6), torch.randn(3, 1))

    def int_mod():
        return IntMod(), (torch.randint(0, 100, (4, 8)),)

    def bare_module():
        torch.manual_seed(0)
        return Net().eval()

    def broken():
        raise RuntimeError("factory exploded")
    '''
)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model files of every format hxc reads, all holding the same small CNN."""
    d = tmp_path_factory.mktemp("models")
    factory = d / "hxc_test_models.py"
    factory.write_text(FACTORY_SOURCE)
    # Importable by name, so a pickled module can be unpickled (in this process, and in
    # subprocesses that put `d` on PYTHONPATH).
    sys.path.insert(0, str(d))
    namespace = importlib.import_module("hxc_test_models")
    model, args = namespace.make_model()

    paths = {"factory": factory}
    paths["pt2"] = d / "net.pt2"
    torch.export.save(torch.export.export(model, args), str(paths["pt2"]))
    paths["pt2_dynamic"] = d / "net_dynamic.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(model, args, dynamic_shapes=({0: batch},)), str(paths["pt2_dynamic"]))
    paths["pt_holding_pt2"] = d / "net_export.pt"
    paths["pt_holding_pt2"].write_bytes(paths["pt2"].read_bytes())
    paths["torchscript"] = d / "net_ts.pt"
    torch.jit.trace(model, args).save(str(paths["torchscript"]))
    paths["pickle"] = d / "net_pickle.pt"
    torch.save(model, str(paths["pickle"]))
    paths["state_dict"] = d / "net_weights.pt"
    torch.save(model.state_dict(), str(paths["state_dict"]))
    paths["truncated"] = d / "truncated.pt2"
    paths["truncated"].write_bytes(paths["pt2"].read_bytes()[:2000])
    paths["garbage"] = d / "garbage.pt"
    paths["garbage"].write_bytes(os.urandom(4096))
    return paths


@pytest.fixture(scope="session")
def reference(models: dict[str, Path]):
    """The module of factories the model files were made from: eager PyTorch references."""
    return importlib.import_module("hxc_test_models")


@pytest.fixture(scope="session")
def example_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in example compiled for a CPU level this host has, aarch64, the
    portable Vulkan variant, and one CUDA and one ROCm variant."""
    from hxc.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "convnet.hxc"
    result = build_bundle(
        "hxc.examples:convnet", out, "cpu:host,cpu:x86-64-v3,cpu:aarch64,vulkan:spirv,cuda:sm_90,rocm:gfx942"
    )
    assert result.written, [r.error for r in result.failed]
    return out


@pytest.fixture
def bundle(example_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the example bundle, free to modify."""
    import shutil

    return Path(shutil.copytree(example_bundle, tmp_path / "b.hxc"))


@pytest.fixture
def cli():
    """Run the real `hxc` command in-process; returns click's Result."""
    runner = CliRunner()

    def invoke(*args: str):
        # Wide enough that rich never wraps a table cell mid-word.
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "250"})

    return invoke


# --- synthetic hosts -------------------------------------------------------------------
# Selection and ranking are pure functions of a manifest and a HostProbe, so they are
# tested on described hosts, not on whatever this machine happens to have.


def _probe(name: str, isa: str, cpu_model: str, features: tuple[str, ...], devices: tuple = ()):
    from hxc.runtime.probe import DriverStatus, HostProbe
    from hxc.targets import Device, families
    from hxc.targets.cpu import HostCpu

    cpu = HostCpu(isa=isa, model=cpu_model, features=tuple(sorted(features)), cores=32)
    cpu_devices = (Device("local-task", "local-task", cpu_model, "cpu", isa, cpu.features),
                   Device("local-sync", "local-sync", cpu_model, "cpu", isa, cpu.features))  # fmt: skip
    everything = (*cpu_devices, *devices)
    statuses = []
    for fam in families():
        for driver in fam.drivers:
            found = tuple(d for d in everything if d.driver == driver)
            reason = None if found else f"no {driver} device on {name}"
            statuses.append(DriverStatus(driver, fam.name, bool(found), reason, found))
    return HostProbe(hostname=name, os="Linux", cpu=cpu, drivers=tuple(statuses), seconds=0.0)


@pytest.fixture(scope="session")
def hosts() -> dict:
    """Described machines: an Ada workstation (sm_89, no AVX-512), an H100 server, an
    MI300X server (Zen 4), an old Xeon without AVX-512 or GPU, and a Graviton3 (Arm
    Neoverse V1) server, each as the loader's probe would report it."""
    from hxc.targets import Device
    from hxc.targets.cpu import AARCH64_V1, SAPPHIRE_RAPIDS, X86_64_V3, X86_64_V4

    base_x86 = ("sse3", "ssse3", "sse4_1", "sse4_2", "popcnt")
    zen4 = X86_64_V4 + base_x86 + ("avx512_bf16", "avx512vbmi", "avx512_vnni")
    return {
        "ada": _probe("ada-workstation", "x86_64", "Intel Core i9-13900K", X86_64_V3 + base_x86, (
            Device("cuda", "cuda://GPU-0", "NVIDIA GeForce RTX 4090", "discrete-gpu", "sm_89", vendor="nvidia"),
            Device("vulkan", "vulkan://0", "NVIDIA GeForce RTX 4090", "discrete-gpu", "nvidia", vendor="nvidia"),
        )),
        "h100": _probe("h100-server", "x86_64", "Intel Xeon Platinum 8480+", SAPPHIRE_RAPIDS + base_x86, (
            Device("cuda", "cuda://GPU-0", "NVIDIA H100 80GB HBM3", "discrete-gpu", "sm_90", vendor="nvidia"),
        )),
        "mi300": _probe("mi300-server", "x86_64", "AMD EPYC 9654", zen4, (
            Device("hip", "hip://0", "AMD Instinct MI300X", "discrete-gpu", "gfx942:sramecc+:xnack-", vendor="amd"),
            Device("vulkan", "vulkan://0", "AMD Instinct MI300X", "discrete-gpu", "radv", vendor="amd"),
        )),
        "old_xeon": _probe("old-xeon", "x86_64", "Intel Xeon E5-2680 v3", X86_64_V3 + base_x86, (
            Device("vulkan", "vulkan://0", "llvmpipe (LLVM 15.0.6, 256 bits)", "cpu", "llvmpipe", vendor="mesa"),
        )),
        "graviton3": _probe("graviton3", "aarch64", "Neoverse-V1", AARCH64_V1),
    }


@pytest.fixture(scope="session")
def synthetic_manifest():
    """A manifest with one artifact per (variant, precision), as `hxc compile` would
    record them (cpu:host as compiled on a Sapphire Rapids machine), without
    compiling anything. Call it with variant ids, or none for every registered one."""
    import dataclasses

    from hxc.manifests.schema import (Artifact, FunctionSpec, Manifest, ModelInfo, OutputTree, Requirements, Signature,
                                      TensorSpec, Toolchain)
    from hxc.targets import all_variants, family
    from hxc.targets.cpu import SAPPHIRE_RAPIDS

    def make(ids: tuple[str, ...] = (), precisions: dict[str, float] | None = None) -> Manifest:
        variants = [v for v in all_variants() if not ids or v.id in ids]
        artifacts = []
        for precision, error in {"fp32": None, **(precisions or {})}.items():
            for v in variants:
                fam = family(v.family)
                requires = v.requires if v.id != "cpu:host" else Requirements(isa="x86_64", cpu_features=SAPPHIRE_RAPIDS)
                suffix = "" if precision == "fp32" else f"@{precision}"
                artifacts.append(Artifact(
                    id=v.id + suffix, family=v.family, variant=v.name, backend=fam.backend, driver=fam.drivers[0],
                    binary=v.binary, flags=v.flags, requires=requires, status="ok",
                    file=f"artifacts/{v.family}-{v.name}{suffix}.vmfb", sha256=f"{len(artifacts):064x}", size=1,
                    precision=precision, precision_error=error,
                ))  # fmt: skip
        spec = TensorSpec("x", "f32", (1, 8))
        return Manifest(
            model=ModelInfo("m", "m.pt2", "torch.export", "0" * 64, "program.pt2", "1" * 64),
            functions={"main": FunctionSpec(Signature((spec,), (dataclasses.replace(spec, name="output_0"),),
                                                      OutputTree("leaf", 0)))},
            toolchain=Toolchain("0", "3.13.0", "3.9.0", "2.13.0", "3.11"),
            artifacts=tuple(artifacts),
            created="2025-01-01T00:00:00+00:00",
        )

    return make


# lavapipe can hang inside IREE 3.13, and a hung IREE call cannot be interrupted from
# Python: every Vulkan run in the coverage tests happens in a child process with a limit.
VULKAN_TIMEOUT_S = 240


@pytest.fixture
def run_isolated(tmp_path: Path):
    """Run a bundle in a child `hxc run` process on `device`, killed after `timeout`
    seconds; returns the flat outputs (bf16/float8 as their own types)."""
    import subprocess

    import numpy as np

    from hxc.manifests import read_manifest
    from hxc.dtypes import from_storage, to_storage

    def run(bundle: Path, arrays: list, device: str, timeout: float = VULKAN_TIMEOUT_S) -> list:
        inputs, outputs = tmp_path / "isolated-in.npz", tmp_path / "isolated-out.npz"
        np.savez(inputs, **{f"input_{i}": to_storage(np.asarray(a)) for i, a in enumerate(arrays)})
        argv = [sys.executable, "-m", "hxc.cli", "run", str(bundle), "-i", str(inputs), "-o", str(outputs),
                "--device", device, "--strict", "--json"]  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{bundle} on {device}: no result after {timeout}s (hung in the driver)")
        assert proc.returncode == 0, proc.stderr[-2000:]
        signature = read_manifest(bundle).signature
        with np.load(outputs) as got:
            return [from_storage(got[f"output_{i}"], s.dtype) for i, s in enumerate(signature.outputs)]

    return run


@pytest.fixture(scope="session")
def tiny_llm_bundle(tmp_path_factory) -> Path:
    """The tiny random-weight Llama of `hxc.examples.llm` (context 96, 4 batch slots) for
    the CPU and the portable Vulkan target, built once for the serving tests (read only)."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    result = build_bundle("hxc.examples.llm:tiny_llama", tmp_path_factory.mktemp("tiny-llm") / "llama.hxc",
                          "cpu:host,vulkan:spirv", use_cache=False, options=ImportOptions(max_context=96, slots=4))  # fmt: skip
    assert result.written, [r.error for r in result.failed]
    return result.output
