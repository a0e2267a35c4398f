"""The loaded model's call path. What a call checks and converts is worked out once
per model (`CallPlan`, and `Transfers` for IREE), so the common call costs a few
comparisons; these tests hold those shortcuts to what the full path does: the same
errors, word for word, and the same values as PyTorch, for every kind of input, on
the IREE and the ONNX Runtime artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.errors import SignatureError
from hxc.examples import mlp
from hxc.runtime.loader import check_inputs

ARTIFACTS = ("cpu:host", "cpu:onnxruntime")


def _build(source: str, out: Path) -> Path:
    from hxc.build import build_bundle

    result = build_bundle(source, out, "cpu:host", backends="iree,onnxruntime")
    assert result.written, [(r.id, r.error) for r in result.failed]
    return out


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example MLP (4x64 f32 in, 4x10 out), static shapes: the fast path's case."""
    return _build("hxc.examples:mlp", tmp_path_factory.mktemp("call") / "mlp.hxc")


@pytest.fixture(scope="module", params=ARTIFACTS)
def loaded(mlp_bundle: Path, request: pytest.FixtureRequest):
    return hxc.runtime.load(mlp_bundle, device=request.param, strict=True)


def _eager(x: torch.Tensor) -> torch.Tensor:
    model, _ = mlp()
    with torch.no_grad():
        return model(x)


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 64), dtype=np.float32)


WRONG = {
    "dtype f64": ((np.zeros((4, 64), np.float64),), "input 0 (input) has dtype f64; expected 4x64xf32"),
    "dtype i64": ((np.zeros((4, 64), np.int64),), "has dtype i64; expected 4x64xf32"),
    "dtype torch f16": ((torch.zeros(4, 64, dtype=torch.float16),), "has dtype f16; expected 4x64xf32"),
    "shape": ((np.zeros((4, 63), np.float32),), "has shape 4x63; expected 4x64xf32"),
    "shape torch": ((torch.zeros(5, 64),), "has shape 5x64; expected 4x64xf32"),
    "rank up": ((np.zeros((4, 64, 1), np.float32),), "has shape 4x64x1; expected"),
    "rank down": ((np.zeros(256, np.float32),), "has shape 256; expected"),
    "scalar": ((np.float32(1.0),), "has shape scalar; expected"),
    "empty": ((np.zeros((0, 64), np.float32),), "has shape 0x64; expected"),
    "no inputs": ((), "expected 1 input(s) (input: 4x64xf32), got 0"),
    "two inputs": ((np.zeros((4, 64), np.float32),) * 2, "expected 1 input(s) (input: 4x64xf32), got 2"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_inputs_are_refused_with_the_full_checkers_words(loaded, case):
    inputs, fragment = WRONG[case]
    with pytest.raises(SignatureError) as full:
        check_inputs(loaded.signature, inputs)  # the checker every call used before
    assert fragment in str(full.value)
    for call in (lambda: loaded(*inputs), lambda: loaded.run_flat(list(inputs))):
        with pytest.raises(SignatureError) as fast:
            call()
        assert str(fast.value) == str(full.value) and fast.value.hint == full.value.hint
    # A refused call leaves the model as it was.
    np.testing.assert_allclose(loaded(_x()), _eager(torch.from_numpy(_x())).numpy(), atol=1e-4, rtol=1e-3)


def test_every_kind_of_input_gives_pytorchs_values(loaded):
    x = _x()
    want = _eager(torch.from_numpy(x)).numpy()
    wide = np.random.default_rng(1).standard_normal((4, 128), dtype=np.float32)
    numpy_inputs = {
        "c-contiguous": x,
        "fortran order": np.asfortranarray(x),
        "strided view": wide[:, ::2],
        "read-only": np.frombuffer(x.tobytes(), np.float32).reshape(4, 64),
        "subclass": x.view(np.matrix),
    }
    for name, a in numpy_inputs.items():
        expected = want if name != "strided view" else _eager(torch.from_numpy(np.ascontiguousarray(a))).numpy()
        y = loaded(a)
        assert type(y) is np.ndarray and y.dtype == np.float32 and y.shape == (4, 10), name
        np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-3, err_msg=name)
        np.testing.assert_allclose(loaded.run_flat([a])[0], expected, atol=1e-4, rtol=1e-3, err_msg=name)
    t = torch.from_numpy(x)
    torch_inputs = {
        "tensor": t,
        "requires grad": t.clone().requires_grad_(),
        "non-contiguous": t.T.contiguous().T,
        "inference mode": torch.inference_mode()(lambda: t.clone())(),
    }
    for name, a in torch_inputs.items():
        y = loaded(a)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and not y.requires_grad, name
        torch.testing.assert_close(y, torch.from_numpy(want), atol=1e-4, rtol=1e-3, msg=name)


def test_results_are_the_callers_own(loaded):
    """Outputs are copied out of the engine's buffers: a later call does not change an
    earlier result, and writing to a result changes nothing else."""
    first = loaded(_x(0))
    kept = first.copy()
    second = loaded(_x(1))
    np.testing.assert_array_equal(first, kept)
    first[:] = 0
    np.testing.assert_allclose(loaded(_x(1)), second, atol=0, rtol=0)
    np.testing.assert_allclose(second, _eager(torch.from_numpy(_x(1))).numpy(), atol=1e-4, rtol=1e-3)


def test_borrowed_inputs_give_pytorchs_values_and_stay_untouched(mlp_bundle):
    """A pool worker lets the CPU device read its shared-memory inputs in place
    (`borrow_inputs`): the same values as a copying call and PyTorch, for inputs at
    the worker's 64-byte offsets and at ones IREE may refuse to import (then copied),
    with the inputs unchanged and the results the caller's own."""
    from hxc.pool.channel import ArrayRef, SharedBuffer

    copying = hxc.runtime.load(mlp_bundle, device="cpu:host", strict=True)
    borrowing = hxc.runtime.load(mlp_bundle, device="cpu:host", strict=True)
    borrowing.borrow_inputs()
    shared = SharedBuffer(1 << 20)
    raw = np.zeros(4 * 64 + 1, np.float32)
    inputs = {f"shared memory at {off}": shared.view(ArrayRef(off, (4, 64)), np.dtype(np.float32)) for off in (0, 64, 4096)}
    inputs["4 bytes off alignment"] = raw[1:].reshape(4, 64)
    for i, (name, a) in enumerate(inputs.items()):
        a[...] = _x(i)
        before = a.copy()
        y = borrowing.run_flat([a])[0]
        np.testing.assert_array_equal(y, copying.run_flat([a])[0], err_msg=name)
        np.testing.assert_allclose(y, _eager(torch.from_numpy(before)).numpy(), atol=1e-4, rtol=1e-3, err_msg=name)
        np.testing.assert_array_equal(a, before, err_msg=name)
        a[...] = 0  # the result does not follow its input
        np.testing.assert_allclose(y, _eager(torch.from_numpy(before)).numpy(), atol=1e-4, rtol=1e-3, err_msg=name)


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_nested_outputs_and_integers(models, reference, tmp_path_factory, artifact):
    """Several outputs in a dict and a tuple, and 64-bit integers in and out: what the
    per-output conversions and the structure rebuild must get right."""
    d = tmp_path_factory.mktemp("call-structure")
    heads = hxc.runtime.load(_build(f"{models['factory']}:two_heads", d / "heads.hxc"), device=artifact, strict=True)
    model, (x, s) = reference.two_heads()
    with torch.no_grad():
        want = model(x, s)
    for got in (heads(x, s), heads(x.numpy(), s.numpy())):
        assert set(got) == {"features", "logits"} and isinstance(got["logits"], tuple)
        for g, w in ((got["features"], want["features"]), *zip(got["logits"], want["logits"])):
            torch.testing.assert_close(torch.as_tensor(g), w, atol=1e-4, rtol=1e-3)

    ints = hxc.runtime.load(_build(f"{models['factory']}:int_mod", d / "ints.hxc"), device=artifact, strict=True)
    model, (x,) = reference.int_mod()
    y = ints(x.numpy())
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, model(x).numpy())
    torch.testing.assert_close(ints(x), model(x), atol=0, rtol=0)
    with pytest.raises(SignatureError, match=r"input 0 \(\w+\) has dtype i32; expected 4x8xi64"):
        ints(x.numpy().astype(np.int32))
