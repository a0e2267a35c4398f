"""The serving image's start command, tested where an image cannot be built: a fresh
virtual environment with the same runtime-only install deploy/Dockerfile makes (hxc
without torch or the IREE compiler, plus the serving extra), running `hxc serve` on a
bundle made by the full install, answering tritonclient with PyTorch's numbers.

When the runtime-only extra of issue 14 lands, `_install` becomes
`pip install '<repo>[serve]'`, as the Dockerfile's install line does."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import torch

from hxc.examples import convnet
from hxc.runtime.verify import compare
from test_serve import Server

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 600


def _install(env_dir: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    requirements = env_dir / "runtime.txt"
    with requirements.open("w") as f:
        subprocess.run([sys.executable, str(ROOT / "deploy" / "runtime_requirements.py")], stdout=f, check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for args in ([*pip, "--no-deps", str(ROOT)], [*pip, "-r", str(requirements)]):
        done = subprocess.run(args, capture_output=True, text=True, timeout=PIP_TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
    return py


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> Path:
    return _install(tmp_path_factory.mktemp("runtime-venv") / "env")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    from hxc.compiler.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    out = tmp_path_factory.mktemp("deploy") / "models" / "cnn.hxcb"  # a single-file bundle
    result = build_bundle("hxc.examples:convnet", out, "cpu:host", options=ImportOptions(dynamic_batch=True))
    assert result.written, [r.error for r in result.failed]
    return out


def test_the_runtime_only_install_has_no_compiler_and_serves(runtime_env, cnn):
    py = runtime_env
    probe = "import importlib.util as u; print(bool(u.find_spec('torch')), bool(u.find_spec('iree.compiler')), bool(u.find_spec('iree.runtime')))"
    assert subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True).stdout.split() == ["False", "False", "True"]
    # The image's command: `hxc serve /mnt/models --host ... --port ...` on a directory of bundles.
    server = Server(cnn.parent)
    server.args[:4] = [str(py.parent / "hxc"), "serve"]
    with server as s:
        client = s.client()
        assert client.is_server_ready() and client.get_model_metadata("convnet")["inputs"][0]["shape"] == [-1, 3, 32, 32]
        import tritonclient.http as th

        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
        t = th.InferInput("x", [2, 3, 32, 32], "FP32")
        t.set_data_from_numpy(x)
        y = client.infer("convnet", [t]).as_numpy("output_0")
        model, _ = convnet()
        with torch.no_grad():
            assert compare(y, model(torch.from_numpy(x)).numpy(), "f32").ok
    assert s.process.returncode == 0
