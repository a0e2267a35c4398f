"""Output comparison and compile-error summaries: fast unit tests on hand-made arrays
and real iree-compile stderr lines, no compiler or device needed."""

from __future__ import annotations

import numpy as np
import pytest

from hxc.compiler.driver import summarize_compile_error
from hxc.golden import compare

F32 = np.float32


def test_within_tolerance_matches_and_outside_does_not():
    e = np.array([1.0, -2.0, 100.0], F32)
    assert compare(e + F32(5e-5), e, "f32").ok  # atol 1e-4
    assert compare(e * F32(1 + 5e-4), e, "f32").ok  # rtol 1e-3
    off = compare(e + np.array([0, 0, 1.0], F32), e, "f32")
    assert not off.ok and off.max_abs == pytest.approx(1.0) and off.max_rel == pytest.approx(0.01)
    assert compare(e + F32(5e-3), e, "f16").ok  # reduced precision is looser
    assert not compare(e + F32(5e-3), e, "f32").ok


def test_nan_matches_nan_and_nothing_else():
    e = np.array([np.nan, 1.0], F32)
    assert compare(e.copy(), e, "f32").ok
    assert not compare(np.array([0.0, 1.0], F32), e, "f32").ok
    assert not compare(np.array([np.nan, np.nan], F32), e, "f32").ok


def test_infinities_match_only_themselves():
    e = np.array([np.inf, -np.inf], F32)
    assert compare(e.copy(), e, "f32").ok
    wrong = compare(np.array([np.inf, np.inf], F32), e, "f32")
    assert not wrong.ok and wrong.max_abs == np.inf
    assert not compare(np.array([1e30, -np.inf], F32), e, "f32").ok


def test_integers_and_booleans_must_be_exact():
    e = np.array([1, 2, 3], np.int64)
    assert compare(e.copy(), e, "i64").ok
    off = compare(e + np.array([0, 0, 1]), e, "i64")
    assert not off.ok and off.max_abs == 1
    assert not compare(np.array([True, False]), np.array([True, True]), "i1").ok


def test_shape_mismatch_and_empty_outputs():
    assert not compare(np.zeros((2, 3), F32), np.zeros((3, 2), F32), "f32").ok
    assert compare(np.zeros((0, 3), F32), np.zeros((0, 3), F32), "f32").ok


@pytest.mark.parametrize(
    "stderr, code, summary, operator, location",
    [
        ('model.py:12:0: error: failed to legalize operation \'vector.broadcast\' that was explicitly marked illegal: '
         '%22 = "vector.broadcast"(%21) : (i64) -> vector<1xi64>\n', 1,
         "failed to legalize operation 'vector.broadcast' ((i64) -> vector<1xi64>)", "vector.broadcast", "model.py:12"),
        ('net.py:7:0: error: failed to legalize operation \'torch.operator\' that was explicitly marked illegal: '
         '%0 = "torch.operator"(%arg0) <{name = "torch.aten.fft_fft"}> : (!torch.vtensor) -> !torch.vtensor\n', 1,
         "no IREE lowering for aten.fft_fft", "aten.fft_fft", "net.py:7"),
        ("<unknown>:0: error: 'hal.executable.variant' op missing GPU target in #hal.executable.target\n", 1,
         "'hal.executable.variant' op missing GPU target in #hal.executable.target", "hal.executable.variant", None),
        ("", -11, "iree-compile was killed by signal 11", None, None),
        ("warning: something\nLLVM ERROR: out of memory\n", 1, "LLVM ERROR: out of memory", None, None),
    ],
)  # fmt: skip
def test_compile_errors_are_summarised_in_one_line(stderr, code, summary, operator, location):
    assert summarize_compile_error(stderr, code) == (summary, operator, location)
