"""Artifacts of several functions with state kept on the device (issue 24): a GRU cell's
`init` and `step` (`hxc.examples:rnn_cell`), compiled for every default target, run
on local-task and lavapipe through `hxc.runtime.load` and through pool workers, checked
against PyTorch over 100 steps with the state never copied to or from the host."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.build import build_bundle
from hxc.engines.base import TRANSFERS
from hxc.errors import HxcError, SignatureError
from hxc.examples import rnn_cell
from hxc.manifests import read_manifest
from hxc.pool import RequestFailed, Worker
from hxc.verify import verify_bundle

STEPS = 100


@pytest.fixture(scope="module")
def rnn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rnn") / "rnn.hxc"
    result = build_bundle("hxc.examples:rnn_cell", out, "all", use_cache=False)  # every default target
    assert result.written, [r.error for r in result.failed]
    return out


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 16)).astype(np.float32)


def _torch_steps(xs: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """PyTorch's own outputs for init(xs[0]) then step(xs[i], h), and the last state."""
    ref = rnn_cell()
    outs = []
    with torch.no_grad():
        y, h = ref.init(torch.from_numpy(xs[0]))
        outs.append(y.numpy())
        for x in xs[1:]:
            y, h = ref.step(torch.from_numpy(x), h)
            outs.append(y.numpy())
    return outs, h.numpy()


def test_the_manifest_records_functions_and_state(rnn):
    m = read_manifest(rnn)
    assert m.schema_version == "5.3"  # unstaged: written as 5.3 (schema.py)
    assert list(m.functions) == ["init", "step"]
    init, step = m.functions["init"], m.functions["step"]
    assert [s.name for s in init.reads] == [] and [s.name for s in init.writes] == ["h"]
    assert [s.name for s in step.reads] == ["h"] and [s.name for s in step.writes] == ["h"]
    h = step.reads[0]
    assert (h.dtype, h.shape, h.bytes, h.slots) == ("f32", (1, 32), 128, 1)
    assert [a.id for a in m.ok_artifacts] and all(a.engine == "iree" for a in m.ok_artifacts)
    data = json.loads((rnn / "manifest.json").read_text())
    assert "signature" not in data and set(data["functions"]) == {"init", "step"}
    with pytest.raises(SignatureError, match="no 'main' function"):
        m.signature  # noqa: B018


@pytest.mark.parametrize("device", ["local-task", "vulkan"])
def test_100_steps_match_pytorch_with_the_state_on_the_device(rnn, device):
    if device == "vulkan":
        # lavapipe in a child process, as every lavapipe run of the suite: its polling threads
        # would stay in the test process and slow every later test.
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_functions as t; "
                f"t.check_100_steps({str(rnn)!r}, 'vulkan')")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return
    check_100_steps(rnn, device)


def check_100_steps(rnn: Path | str, device: str) -> None:
    model = hxc.runtime.load(rnn, device=device, strict=True)
    assert model.device.driver == device
    xs = _inputs(STEPS + 1)
    expected, h_expected = _torch_steps(xs)
    state = model.new_state()
    assert state.nbytes == 128
    outs = [model.call("init", xs[0], state=state)]
    before = TRANSFERS.snapshot()
    outs += [model.call("step", x, state=state) for x in xs[1:]]
    after = TRANSFERS.snapshot()
    # The state crossed 0 times; the inputs and outputs each crossed once per call.
    assert (after.state_to_device - before.state_to_device, after.state_to_host - before.state_to_host) == (0, 0)
    assert (after.to_device - before.to_device, after.to_host - before.to_host) == (STEPS, STEPS)
    for got, want in zip(outs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.to_host()["h"], h_expected, rtol=1e-4, atol=1e-5)
    assert TRANSFERS.state_to_host == after.state_to_host + 1  # asked for: one copy


def test_torch_tensors_in_and_out_and_errors_in_one_line(rnn):
    model = hxc.runtime.load(rnn, device="cpu", strict=True)
    state = model.new_state()
    x = torch.from_numpy(_inputs(1)[0])
    y = model.call("init", x, state=state)
    assert isinstance(y, torch.Tensor)
    with pytest.raises(SignatureError, match="keeps state .h. on the device"):
        model.call("step", x)
    with pytest.raises(SignatureError, match="no function 'decode'; its functions are init, step"):
        model.call("decode", x, state=state)
    with pytest.raises(SignatureError, match="no function 'main'; its functions are init, step"):
        model(x)
    with pytest.raises(SignatureError, match="expected 1 input"):
        model.call("step", x, x, state=state)
    other = hxc.runtime.load(rnn, device="cpu", strict=True)
    with pytest.raises(SignatureError, match="another loaded model"):
        other.call("step", x, state=state)
    with pytest.raises(SignatureError, match="keeps no state g"):
        model.import_state({"g": np.zeros((1, 32), np.float32)})
    with pytest.raises(SignatureError, match="state h must be 1x32xf32"):
        model.import_state({"h": np.zeros((2, 32), np.float32)})


def test_a_state_moves_from_the_cpu_to_lavapipe_between_workers(rnn):
    """Open, call, export, import, drop over the worker protocol: the first half of the
    sequence on local-task, the rest on lavapipe, like PyTorch throughout."""
    functions = read_manifest(rnn).functions
    xs = _inputs(21, seed=3)
    expected, _ = _torch_steps(xs)
    with Worker(rnn, "cpu:host", "cpu", None, functions=functions).start() as cpu, \
         Worker(rnn, "vulkan:spirv", "vulkan", None, functions=functions).start() as vk:  # fmt: skip
        assert cpu.wait_ready(120) and vk.wait_ready(120), (cpu.reason, vk.reason)
        cpu.open_state("seq").result(60)
        assert cpu.state_bytes == 128
        outs = [cpu.submit([xs[0]], function="init", state="seq").result(60).outputs[0]]
        outs += [cpu.submit([x], function="step", state="seq").result(60).outputs[0] for x in xs[1:11]]
        moved = cpu.state_arrays(cpu.export_state("seq").result(60))
        vk.import_state("seq", moved).result(60)
        cpu.drop_state("seq").result(60)
        assert (cpu.state_bytes, vk.state_bytes) == (0, 128)
        outs += [vk.submit([x], function="step", state="seq").result(120).outputs[0] for x in xs[11:]]
        with pytest.raises(RequestFailed, match="holds no state 'seq'"):
            cpu.submit([xs[0]], function="step", state="seq").result(60)
        assert cpu.health.value == "ready"  # a bad request fails alone
    for got, want in zip(outs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_verify_checks_every_function_against_pytorch(rnn):
    report = verify_bundle(rnn)
    assert report.ok, report
    assert {r.artifact for r in report.results} >= {"cpu:host", "vulkan:spirv"}


def test_other_backends_say_which_functions_they_cannot_build(tmp_path):
    result = build_bundle("hxc.examples:rnn_cell", tmp_path / "r.hxc", "cpu:host", backends="iree,onnxruntime",
                          use_cache=False, allow_partial=True)  # fmt: skip
    failed = {b.id: b.error for b in result.built}
    assert "cpu:onnxruntime" in failed and "one stateless function; this model has init, step" in failed["cpu:onnxruntime"]
    assert result.written and [r.job.id for r in result.results if r.status == "ok"] == ["cpu:host"]


def test_a_3x_bundle_reads_as_one_function_main(example_bundle):
    data = json.loads((example_bundle / "manifest.json").read_text())
    data["schema_version"] = "3.0"
    data["signature"] = data.pop("functions")["main"]["signature"]
    from hxc.manifests.bundle import parse_manifest

    m = parse_manifest(data)
    assert list(m.functions) == ["main"] and m.stateless_main and m.signature.inputs


def test_a_state_that_does_not_fit_is_refused_before_allocating(rnn):
    from dataclasses import replace

    from hxc.runtime.loader import check_fits

    model = hxc.runtime.load(rnn, device="cpu", strict=True)
    with pytest.raises(HxcError, match="state needs .* MiB; local-task: .* has .* MiB free"):
        check_fits(1 << 60, model.device)
    check_fits(1 << 60, replace(model.device, driver="cuda", kind="discrete-gpu"))  # unknown: the allocator decides


def test_shared_weights_live_in_one_archive_and_give_the_same_numbers(tmp_path):
    """--weights shared for a model of several functions: the parameters go to the
    bundle's weights.irpa (none inside the vmfb), and init/step still match PyTorch."""
    from hxc.compiler.imported import ImportOptions

    result = build_bundle("hxc.examples:rnn_cell", tmp_path / "r.hxc", "cpu:host", use_cache=False,
                          options=ImportOptions(weights="shared"))  # fmt: skip
    assert result.written, [r.error for r in result.failed]
    m = read_manifest(result.output)
    assert [w.file for w in m.weights] == ["weights.irpa"]
    some_weight = next(iter(rnn_cell().state_dict().values())).detach().numpy().reshape(-1)[:8].tobytes()
    assert some_weight in (result.output / "weights.irpa").read_bytes()
    assert some_weight not in (result.output / m.ok_artifacts[0].file).read_bytes()
    model = hxc.runtime.load(result.output, device="cpu", strict=True)
    xs = _inputs(6, seed=1)
    expected, _ = _torch_steps(xs)
    state = model.new_state()
    outs = [model.call("init", xs[0], state=state)] + [model.call("step", x, state=state) for x in xs[1:]]
    for got, want in zip(outs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert verify_bundle(result.output, isolate=False).ok
