"""The runtime-only install: `pip install hxc` with no extras, in a fresh virtual
environment, runs bundles made by the full install — a PyTorch model, a bf16 model
with shared weights, an ONNX model — through load, verify, run and bench, and
generates text with a language-model bundle (its tokenizer and chat template), while
torch, transformers and the IREE compiler are not importable there, and commands that
need them say in one line what to install.

The serving image (deploy/Dockerfile) is the runtime-only install plus the `serve`
extra; it cannot be built here (no container registry), so its install and start
command are tested in a second fresh venv from the same wheel (`serving`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from hxc.build import build_bundle
from hxc.errors import ExitCode
from hxc.extras import EXTRAS

REPO = Path(__file__).resolve().parent.parent
QUICK = ("--min-time", "0.05", "--min-iterations", "3", "--max-time", "5")
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "*.hxc")


@dataclass(frozen=True)
class Env:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def run(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
        # A clean environment: nothing from the full install may leak in through PYTHONPATH.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout, cwd=self.root)

    def hxc(self, *args: str | Path) -> subprocess.CompletedProcess:
        return self.run(self.root / "bin" / "hxc", *args)

    def importable(self, module: str) -> bool:
        code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
        return self.run(self.python, "-c", code).returncode == 0


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout."""
    d = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools builds in the source tree and never removes what a
    # stale build/ holds, so a module deleted since could end up in the wheel.
    source = Path(shutil.copytree(REPO, d / "src", ignore=shutil.ignore_patterns(*NOT_SOURCE)))
    wheels = d / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels, source],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    [built] = wheels.glob("hxc-*.whl")
    return built


def _fresh_venv(root: Path, spec: str) -> Env:
    env = Env(root)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env.root], check=True, timeout=120)
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", env.python, "install", "--quiet", spec],
                               capture_output=True, text=True, timeout=900)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    return env


@pytest.fixture(scope="session")
def thin(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """A fresh venv with hxc installed from a wheel of this checkout, without extras."""
    return _fresh_venv(tmp_path_factory.mktemp("thin") / "venv", str(wheel))


@pytest.fixture(scope="session")
def serving(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """The serving image's install: the runtime-only install plus the `serve` extra."""
    return _fresh_venv(tmp_path_factory.mktemp("serving") / "venv", f"{wheel}[serve]")


@dataclass(frozen=True)
class Built:
    bundle: Path
    inputs: Path  # an .npz of fresh inputs
    expected: list[np.ndarray]  # the reference's outputs on them


@pytest.fixture(scope="session")
def full_built(example_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Bundles made by the full install, with fresh inputs and the reference's outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from hxc.examples import convnet
    from hxc.examples.zoo import mlp_bf16

    d = tmp_path_factory.mktemp("full-built")
    rng = np.random.default_rng(5)
    out: dict[str, Built] = {}

    model, _ = convnet()
    x = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    np.savez(d / "convnet-in.npz", x=x)
    out["pytorch"] = Built(example_bundle, d / "convnet-in.npz", [y])

    bf16 = d / "mlp_bf16.hxc"
    assert build_bundle("hxc.examples.zoo:mlp_bf16", bf16, "cpu:host").written
    model, (example,) = mlp_bf16()
    xb = torch.randn_like(example)
    with torch.no_grad():
        yb = model(xb).float().numpy()
    np.savez(d / "bf16-in.npz", x=xb.view(torch.int16).numpy().view(np.uint16))  # .npz holds bf16 as its bits
    out["bf16"] = Built(bf16, d / "bf16-in.npz", [yb])

    w = rng.standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [8, 4], w.ravel())],
    )  # fmt: skip
    src = d / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    onnx_bundle = d / "mm.hxc"
    assert build_bundle(str(src), onnx_bundle, "cpu:host").written
    xo = rng.standard_normal((3, 8)).astype(np.float32)
    yo = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": xo})[0]
    np.savez(d / "mm-in.npz", x=xo)
    out["onnx"] = Built(onnx_bundle, d / "mm-in.npz", [yo])
    return out


def test_the_extras_table_matches_pyproject():
    """Every module hxc.extras says an extra provides comes from a distribution that
    extra installs (checked against the installed distributions' own file lists)."""
    import importlib.metadata as md

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in EXTRAS.values():
        dists = [r.split("=")[0].split(">")[0].split("[")[0].strip() for r in extras[extra.name]]
        for module in extra.modules:
            prefix = module.replace(".", "/") + "/"
            providers = [d for d in dists if any(str(f).startswith(prefix) for f in md.files(d) or ())]
            assert providers, f"hxc[{extra.name}] installs nothing that provides {module} ({', '.join(dists)})"
    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(r.startswith(("torch", "iree-base-compiler", "iree-turbine", "onnx", "transformers")) for r in core)
    assert any(r.startswith("tokenizers") for r in core) and any(r.startswith("jinja2") for r in core)


def test_the_runtime_install_has_no_torch_and_no_compiler(thin):
    for module in ("torch", "iree.compiler", "iree.turbine", "onnx", "onnxruntime"):
        assert not thin.importable(module), module
    assert thin.importable("iree.runtime") and thin.importable("hxc.runtime")


@pytest.mark.parametrize("kind", ["pytorch", "bf16", "onnx"])
def test_bundles_from_the_full_install_load_verify_run_and_bench(kind, thin, full_built, tmp_path):
    built = full_built[kind]
    inspected = thin.hxc("inspect", built.bundle, "--json")
    assert inspected.returncode == 0, inspected.stderr
    chosen = json.loads(thin.hxc("select", built.bundle, "--json").stdout)
    assert chosen["ok"] and chosen["choice"]["artifact"].startswith(("cpu:", "vulkan:"))

    verified = thin.hxc("verify", built.bundle, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"]

    # The Python API, and proof that it ran without the compiler or torch loaded.
    code = (
        "import json, sys, numpy as np, hxc.runtime\n"
        "from hxc.dtypes import from_storage\n"
        f"m = hxc.runtime.load({str(built.bundle)!r}, device='cpu')\n"
        f"with np.load({str(built.inputs)!r}) as f:\n"
        "    x = [from_storage(f[k], s.dtype) for k, s in zip(f.files, m.signature.inputs)]\n"
        "[y] = m.run_flat(x)\n"
        "print(json.dumps(np.asarray(y, np.float32).tolist()))\n"
        "print(json.dumps(sorted(k for k in ('torch', 'iree.compiler', 'iree.turbine', 'onnx') if k in sys.modules)))"
    )
    api = thin.run(thin.python, "-c", code)
    assert api.returncode == 0, api.stderr
    values, heavy = api.stdout.strip().splitlines()
    assert json.loads(heavy) == []
    tolerance = {"atol": 5e-2, "rtol": 5e-2} if kind == "bf16" else {"atol": 1e-4, "rtol": 1e-3}
    np.testing.assert_allclose(np.array(json.loads(values), np.float32), built.expected[0], **tolerance)

    if kind != "bf16":  # .npy/.npz files cannot name bf16 for `hxc run`; the API above covers it
        ran = thin.hxc("run", built.bundle, "-i", built.inputs, "-o", tmp_path / "out.npz", "--device", "cpu")
        assert ran.returncode == 0, ran.stderr
        with np.load(tmp_path / "out.npz") as got:
            np.testing.assert_allclose(got["output_0"], built.expected[0], atol=1e-4, rtol=1e-3)

    bench = thin.hxc("bench", built.bundle, *QUICK, "--device", "cpu", "--no-record", "--json")
    assert bench.returncode == 0, bench.stderr
    out = json.loads(bench.stdout)
    assert {r["candidate"] for r in out["results"]} == {a for a in _cpu_artifacts(built.bundle)}
    [skipped] = out["skipped_baselines"]  # the default baseline needs what this install lacks
    assert skipped["baseline"] == ("onnxruntime" if kind == "onnx" else "torch") and "pip install 'hxc[" in skipped["reason"]
    assert "skipped baseline" in thin.hxc("bench", built.bundle, *QUICK, "--device", "cpu", "--no-record").stderr


def test_language_models_generate_runtime_only(thin, tmp_path):
    """A tiny Llama compiled by the full install generates, in the runtime-only install,
    the tokens it generates here: from text, from chat messages (its template), with a
    stop string; transformers is not importable there."""
    import hxc.runtime
    from hxc.compiler.imported import ImportOptions

    bundle = tmp_path / "llm.hxc"
    assert build_bundle("hxc.examples.llm:tiny_llama", bundle, "cpu:host", options=ImportOptions(max_context=64)).written
    here = hxc.runtime.load(bundle, device="cpu")
    for module in ("transformers", "safetensors", "torch"):
        assert not thin.importable(module), module
    for args, kwargs in (
        (["Hello world!"], dict(prompt="Hello world!")),
        (["Hello world!", "--chat"], dict(messages=[{"role": "user", "content": "Hello world!"}])),
    ):
        ran = thin.hxc("generate", bundle, *args, "-n", "6", "--ignore-eos", "--device", "cpu", "--json")
        assert ran.returncode == 0, ran.stderr
        got = json.loads(ran.stdout)
        want = here.generate(max_new_tokens=6, stop_token_ids=[], **kwargs).result()
        assert (got["prompt_token_ids"], got["token_ids"], got["text"]) == (
            list(want.prompt_token_ids), list(want.token_ids), want.text)  # fmt: skip


def _cpu_artifacts(bundle: Path) -> set[str]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {a["id"] for a in manifest["artifacts"] if a["family"] == "cpu" and a["status"] == "ok"
            and (a["requires"]["isa"] in (None, "x86_64"))}  # fmt: skip


@pytest.mark.parametrize(
    "args, extra",
    [
        (["compile", "hxc.examples:mlp", "-t", "cpu:host"], "compile"),
        (["compile", "MODEL.onnx", "-t", "cpu:host"], "onnx"),
        (["bench", "BUNDLE", "--baseline", "torch"], "compile"),
        (["bench", "BUNDLE", "--fail-if-slower-than", "torch"], "compile"),
        (["serve", "BUNDLE"], "serve"),
        # PyTorch's outputs at other shapes come from the bundle's program: torch is needed.
        (["verify", "BUNDLE", "--shapes", "x=1x3x32x32", "--device", "cpu"], "compile"),
        (["verify", "ONNX_BUNDLE", "--shapes", "x=5x8"], "onnx"),
    ],
)
def test_commands_that_need_an_extra_name_it_in_one_line(args, extra, thin, full_built, tmp_path):
    args = [str(full_built["onnx"].bundle.parent / "mm.onnx") if a == "MODEL.onnx" else a for a in args]
    args = [str(full_built["pytorch"].bundle) if a == "BUNDLE" else a for a in args]
    args = [str(full_built["onnx"].bundle) if a == "ONNX_BUNDLE" else a for a in args]
    result = thin.hxc(*args, "-o", tmp_path / "x.hxc") if args[0] == "compile" else thin.hxc(*args)
    assert result.returncode == ExitCode.ERROR, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'hxc[{extra}]'" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "x.hxc").exists()


def test_verify_takes_examples_with_expected_outputs_runtime_only(thin, full_built, tmp_path):
    # No reference can run here, but an example that holds its expected outputs needs none.
    built = full_built["onnx"]
    with np.load(built.inputs) as f:
        np.savez(tmp_path / "with-outputs.npz", **f, output_0=built.expected[0])
    checked = thin.hxc("verify", built.bundle, "--example", tmp_path / "with-outputs.npz", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert [r["sample"] for r in json.loads(checked.stdout)["results"] if r["artifact"] == "cpu:host"] == [
        "golden", str(tmp_path / "with-outputs.npz")]  # fmt: skip


def test_doctor_and_targets_work_runtime_only(thin):
    doctor = thin.hxc("doctor", "--json")
    assert doctor.returncode == 0, doctor.stderr
    assert any(d["name"] == "local-task" and d["available"] for d in json.loads(doctor.stdout)["drivers"])
    assert thin.hxc("targets").returncode == 0


def test_the_serving_image_command_serves_without_torch_or_the_compiler(serving, tmp_path):
    """deploy/Dockerfile's install and command, `hxc serve DIR --host ... --port ...`, on a
    directory holding a single-file bundle made by the full install; tritonclient gets
    PyTorch's numbers."""
    import tritonclient.http as th
    from test_serve import Server

    from hxc.compiler.imported import ImportOptions
    from hxc.examples import convnet
    from hxc.golden import compare

    for module in ("torch", "iree.compiler", "iree.turbine", "onnx"):
        assert not serving.importable(module), module
    models = tmp_path / "models"
    assert build_bundle("hxc.examples:convnet", models / "cnn.hxcb", "cpu:host", options=ImportOptions(dynamic_batch=True)).written
    server = Server(models, "--host", "127.0.0.1")
    server.args[:4] = [str(serving.root / "bin" / "hxc"), "serve"]
    server.env = {k: v for k, v in server.env.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    with server as s:
        client = s.client()
        assert client.is_server_ready() and client.get_model_metadata("convnet")["inputs"][0]["shape"] == [-1, 3, 32, 32]
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
        t = th.InferInput("x", [2, 3, 32, 32], "FP32")
        t.set_data_from_numpy(x)
        y = client.infer("convnet", [t]).as_numpy("output_0")
        model, _ = convnet()
        with torch.no_grad():
            assert compare(y, model(torch.from_numpy(x)).numpy(), "f32").ok
    assert s.process.returncode == 0


def test_the_deploy_files_start_hxc_serve_with_options_it_takes():
    """deploy/Dockerfile's command and the InferenceService's arguments parse as `hxc serve`
    arguments, probe the protocol's health routes, and give a drain its time."""
    import click
    import yaml

    from hxc.cli import serve

    docker = (REPO / "deploy" / "Dockerfile").read_text().splitlines()
    entrypoint = json.loads(next(line for line in docker if line.startswith("ENTRYPOINT")).split(None, 1)[1])
    cmd = json.loads(next(line for line in docker if line.startswith("CMD")).split(None, 1)[1])
    assert entrypoint == ["hxc", "serve"]
    predictor = yaml.safe_load((REPO / "deploy" / "inferenceservice.yaml").read_text())["spec"]["predictor"]
    [container] = predictor["containers"]
    for args in (cmd, container["args"]):
        params = serve.make_context("serve", list(args)).params
        assert params["models"] == ("/mnt/models",) and params["host"] == "0.0.0.0" and params["port"] == 8080
    drain = serve.make_context("serve", list(container["args"])).params["drain_timeout"]
    assert predictor["terminationGracePeriodSeconds"] > drain
    scheme = {"scheme": "HTTPS"} if "--ssl-certfile" in container["args"] else {}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080, **scheme}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080, **scheme}
    # Keys come from a mounted Secret, never the command line; certificates from mounted Secrets too.
    assert "--api-key" not in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"] for v in predictor["volumes"] if "secret" in v}
    params = serve.make_context("serve", list(container["args"])).params
    for path in (env["HXC_API_KEY_FILE"], params["ssl_certfile"], params["ssl_keyfile"]):
        assert any(str(path).startswith(mounts[name] + "/") for name in secrets), path
    with pytest.raises(click.UsageError):  # the check can fail: an option hxc serve lacks
        serve.make_context("serve", ["/mnt/models", "--no-such-option"])


def test_the_set_up_says_each_step_and_nothing_else(tmp_path):
    # `make setup` with a stand-in for Python that records what it is asked: the steps
    # run, one line each, in order (the real pip step takes minutes and ~1.5 GB).
    if shutil.which("make") is None or shutil.which("dpkg") is None:
        pytest.skip("needs make and dpkg")
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n'
                    'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi\n'
                    f'echo "$@" >> "{tmp_path}/calls"\n')  # fmt: skip
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "--no-print-directory", "setup", f"VENV={venv}", f"PYTHON={fake}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    if "install-system-deps: installing" in result.stdout:
        pytest.skip("this machine lacks the system packages (the step would install them)")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["install-system-deps", "setup", "setup", "setup"], lines
    assert "creating the virtualenv" in lines[1] and "pinned toolchain" in lines[2] and "~1.5 GB" in lines[2]
    assert lines[3].startswith("setup: done") and not result.stderr
    assert (venv / ".installed").exists() and "pip install --quiet" in (tmp_path / "calls").read_text()
