"""Shared fixtures: real model files of every supported format, and bundles compiled
once per session with the real IREE compiler (artifacts are cached across tests in
a session-private cache, never the user's)."""

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
    from hxc.compiler.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "convnet.hxc"
    result = build_bundle(
        "hxc.examples:convnet", out, "cpu:host,cpu:x86-64-v3,cpu:aarch64,vulkan:spirv,cuda:sm_90,rocm:gfx942"
    )
    assert result.written, [r.error for r in result.failed]
    return out


@pytest.fixture
def cli():
    """Run the real `hxc` command in-process; returns click's Result."""
    runner = CliRunner()

    def invoke(*args: str):
        # Wide enough that rich never wraps a table cell mid-word.
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "250"})

    return invoke


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
    from hxc.runtime.io import from_raw_bits, raw_bits

    def run(bundle: Path, arrays: list, device: str, timeout: float = VULKAN_TIMEOUT_S) -> list:
        inputs, outputs = tmp_path / "isolated-in.npz", tmp_path / "isolated-out.npz"
        np.savez(inputs, **{f"input_{i}": raw_bits(np.asarray(a)) for i, a in enumerate(arrays)})
        argv = [sys.executable, "-m", "hxc.cli", "run", str(bundle), "-i", str(inputs), "-o", str(outputs),
                "--device", device, "--strict", "--json"]  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{bundle} on {device}: no result after {timeout}s (hung in the driver)")
        assert proc.returncode == 0, proc.stderr[-2000:]
        signature = read_manifest(bundle).signature
        with np.load(outputs) as got:
            return [from_raw_bits(got[f"output_{i}"], s.dtype) for i, s in enumerate(signature.outputs)]

    return run
