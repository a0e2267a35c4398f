"""Zero-size tensors everywhere a tensor goes: `hxc.runtime.load(...)(...)`, `hxc run`,
the pool and the golden sample (the server's are in test_serve.py and
test_serve_protocol.py). An empty batch, an empty set of boxes, a sequence of length 0
are ordinary inputs: IREE's CPU runtime computes them; IREE's Vulkan driver cannot
dispatch over an empty buffer, so the loader answers those calls from the outputs'
shapes where that is possible, and says why in one line where it is not. Outputs are
compared with PyTorch's own (the example MLP) or ONNX Runtime's (small ONNX models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import hxc.runtime
from hxc.errors import HxcError
from hxc.examples import mlp
from hxc.pool import Pool
from hxc.golden import compare
from hxc.verify import verify_bundle
from test_pool import WAIT, _run  # a pool call in a thread, failed (not hung) after a bound
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7 - 0.5


def _onnx_model(path: Path, kind: str) -> Path:
    """`rows`: x [n, 4] -> Relu(x @ W) [n, 3], empty when n is 0. `rowsum`: x [n, m] ->
    its row sums [n]: empty when n is 0, zeros (values) when m is 0."""
    vi = helper.make_tensor_value_info
    if kind == "rows":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
        x, out, inits = vi("x", TensorProto.FLOAT, ["n", 4]), vi("y", TensorProto.FLOAT, ["n", 3]), [numpy_helper.from_array(W, "w")]
    else:
        nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)]
        x, out = vi("x", TensorProto.FLOAT, ["n", "m"]), vi("y", TensorProto.FLOAT, ["n"])
        inits = [numpy_helper.from_array(np.array([1], np.int64), "axes")]
    graph = helper.make_graph(nodes, kind, [x], [out], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The example MLP with a dynamic batch, and the two ONNX models, for the CPU and
    the portable Vulkan target."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    d = tmp_path_factory.mktemp("zero-size")
    sources = {"mlp": ("hxc.examples:mlp", ImportOptions(dynamic_batch=True)),
               "rows": (str(_onnx_model(d / "rows.onnx", "rows")), ImportOptions()),
               "rowsum": (str(_onnx_model(d / "rowsum.onnx", "rowsum")), ImportOptions())}  # fmt: skip
    out = {}
    for name, (source, options) in sources.items():
        result = build_bundle(source, d / f"{name}.hxc", "cpu:host,vulkan:spirv", options=options)
        assert result.written, [r.error for r in result.failed]
        out[name] = d / f"{name}.hxc"
        if source.endswith(".onnx"):
            out[f"{name}.onnx"] = Path(source)
    return out


def _torch_mlp(x: np.ndarray) -> np.ndarray:
    model, _ = mlp()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _rows(n: int, features: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, features), dtype=np.float32)


# --- hxc.runtime.load ------------------------------------------------------------------------


def test_a_zero_row_batch_runs_on_the_cpu_and_equals_pytorch(bundles):
    model = hxc.runtime.load(bundles["mlp"], device="cpu", strict=True)
    y = model(_rows(0))
    expected = _torch_mlp(_rows(0))
    assert y.shape == expected.shape == (0, 10) and y.dtype == np.float32 and compare(y, expected, "f32").ok
    t = model(torch.zeros(0, 64))  # torch in, torch out, empty too
    assert isinstance(t, torch.Tensor) and tuple(t.shape) == (0, 10)
    assert compare(model(_rows(3)), _torch_mlp(_rows(3)), "f32").ok  # and the next call is an ordinary one


@pytest.mark.parametrize(("kind", "shape"), [("rows", (0, 4)), ("rowsum", (0, 4)), ("rowsum", (3, 0))])
def test_zero_size_inputs_of_onnx_models_on_the_cpu_equal_onnx_runtime(bundles, kind, shape):
    model = hxc.runtime.load(bundles[kind], device="cpu", strict=True)
    x = np.zeros(shape, np.float32)
    y, expected = model(x), _ort(bundles[f"{kind}.onnx"], x)
    assert y.shape == expected.shape and compare(y, expected, "f32").ok  # (0, 3), (0,), and sums of nothing: [0, 0, 0]


def test_vulkan_answers_a_zero_row_call_from_the_outputs_shapes(bundles):
    # IREE's Vulkan driver refuses a dispatch over an empty buffer; every output of the
    # MLP is empty when the batch is, so the answer needs no device.
    model = hxc.runtime.load(bundles["mlp"], device="vulkan", strict=True)
    y = model(_rows(0))
    assert y.shape == (0, 10) and y.dtype == np.float32
    assert model.last_device_ms == 0.0  # answered without calling the device
    rows = hxc.runtime.load(bundles["rows"], device="vulkan", strict=True)
    assert rows(np.zeros((0, 4), np.float32)).shape == (0, 3)
    rowsum = hxc.runtime.load(bundles["rowsum"], device="vulkan", strict=True)
    assert rowsum(np.zeros((0, 4), np.float32)).shape == (0,)
    assert compare(model(_rows(2)), _torch_mlp(_rows(2)), "f32").ok


def test_vulkan_says_in_one_line_what_it_cannot_answer_and_keeps_working(bundles):
    # The sums of 3 empty rows are values (zeros), which only the device computes, and it
    # cannot: a one-line error that says why, and the device still runs the next call.
    model = hxc.runtime.load(bundles["rowsum"], device="vulkan", strict=True)
    with pytest.raises(HxcError, match="cannot dispatch over empty buffers") as e:
        model(np.zeros((3, 0), np.float32))
    assert "\n" not in e.value.message and "CPU" in (e.value.hint or "")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert compare(model(x), _ort(bundles["rowsum.onnx"], x), "f32").ok


# --- hxc run ----------------------------------------------------------------------------------


def test_hxc_run_takes_an_empty_input_file(bundles, cli, tmp_path):
    np.save(tmp_path / "x.npy", _rows(0))
    result = cli("run", bundles["mlp"], "-i", tmp_path / "x.npy", "--device", "cpu", "-o", tmp_path / "y.npz", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["outputs"][0]["shape"] == [0, 10]
    with np.load(tmp_path / "y.npz") as saved:
        assert saved["output_0"].shape == (0, 10)
    printed = cli("run", bundles["rowsum"], "-i", _save(tmp_path / "z.npy", np.zeros((3, 0), np.float32)))
    assert printed.exit_code == 0 and "y 3xf32:" in printed.stdout and "[0. 0. 0.]" in printed.stdout


def _save(path: Path, a: np.ndarray) -> Path:
    np.save(path, a)
    return path


# --- pools ------------------------------------------------------------------------------------


def test_a_pool_returns_zero_rows_for_a_zero_row_batch(bundles):
    with Pool(bundles["mlp"], ["cpu", "vulkan"]) as pool:
        assert pool.splittable
        y = _run(lambda: pool(_rows(0)))
        assert y.shape == (0, 10) and y.dtype == np.float32
        items = [_rows(3, seed=1), _rows(0), _rows(5, seed=2), _rows(0)]
        results = _run(lambda: list(pool.map(items, window=4)))
        assert [r.shape for r in results] == [(3, 10), (0, 10), (5, 10), (0, 10)]
        for x, r in zip(items, results):
            assert compare(r, _torch_mlp(x), "f32").ok
        assert pool.stats().items == 8  # the empty ones were never split into chunks


def test_a_pool_runs_a_call_vulkan_cannot_answer_on_a_device_that_can(bundles):
    # Row sums of empty rows are zeros only a device computes, and Vulkan cannot: such
    # a call runs whole on the CPU, whichever device is free; the others are split.
    items = [np.zeros((3, 0), np.float32), _rows(4, features=5), np.zeros((2, 0), np.float32), _rows(0, features=5)]
    with Pool(bundles["rowsum"], ["cpu", "vulkan"]) as pool:
        assert pool.splittable
        results = _run(lambda: list(pool.map(items, window=4)))
    for got, x in zip(results, items):
        assert compare(got, _ort(bundles["rowsum.onnx"], x), "f32").ok
    with Pool(bundles["rowsum"], ["vulkan"]) as alone:
        with pytest.raises(HxcError, match="no ready device of the pool can run such a call"):
            _run(lambda: alone(np.zeros((3, 0), np.float32)))
        assert _run(lambda: alone(_rows(0, features=5))).shape == (0,)  # empty by its shape: answered
        x = _rows(2, features=5)
        assert compare(_run(lambda: alone(x)), _ort(bundles["rowsum.onnx"], x), "f32").ok


def test_the_server_router_sends_a_call_vulkan_cannot_answer_to_the_cpu(bundles):
    # What `hxc serve` routes: each request alone (max_batch_size=1) to the device that
    # should finish it first, but one with empty rows whose sums only a device computes
    # only to a device that runs it; empty outputs can go anywhere.
    from hxc.pool.router import Router

    with Pool(bundles["rowsum"], ["cpu", "vulkan"], judge=False) as pool:
        router = Router(pool, max_batch_size=1)
        try:
            for n in (3, 2, 4, 1):  # one at a time: once the CPU is measured, an unmeasured device is tried next
                routed = router.submit([np.zeros((n, 0), np.float32)]).result(WAIT)
                assert routed.device == "cpu:host" and compare(routed.outputs[0], np.zeros(n, np.float32), "f32").ok
            on_vulkan = router.submit([_rows(0, features=5)], device="vulkan").result(WAIT)
            assert on_vulkan.device == "vulkan:spirv" and on_vulkan.outputs[0].shape == (0,)
        finally:
            router.close()


# --- the golden sample ------------------------------------------------------------------------


def test_a_golden_sample_of_zero_rows_is_verified_on_every_device(bundles, tmp_path):
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    np.savez(tmp_path / "example.npz", x=np.zeros((0, 4), np.float32))
    out = tmp_path / "rows0.hxc"
    result = build_bundle(str(bundles["rows.onnx"]), out, "cpu:host,vulkan:spirv",
                          options=ImportOptions(example=str(tmp_path / "example.npz")))  # fmt: skip
    assert result.written, [r.error for r in result.failed]
    with np.load(out / "golden.npz") as golden:
        assert golden["input_0"].shape == (0, 4) and golden["output_0"].shape == (0, 3)  # ONNX Runtime's outputs
    report = verify_bundle(out)
    assert report.ok and {r.artifact for r in report.results} == {"cpu:host", "vulkan:spirv"}
