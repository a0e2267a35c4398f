"""The PyTorch-level rewrite of convolutions into NHWC im2col-by-slices + matmul
(`hxc.compiler.conv_matmul`): same numbers as the convolutions it replaces, in PyTorch
and compiled by IREE, and grouped/depthwise convolutions left alone."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from torch import nn

import hxc.runtime
from hxc.compiler.build import build_bundle
from hxc.compiler.conv_matmul import ConvAsMatmul, convs_as_matmuls

CNN_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Cnn(nn.Module):
        '''Stride, padding, dilation, bias, non-square kernels, 1x1, grouped, depthwise.'''

        def __init__(self):
            super().__init__()
            self.convs = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 16, 5, stride=2, padding=2, bias=False),
                nn.Conv2d(16, 16, 3, padding=2, dilation=2),
                nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: kept
                nn.Conv2d(16, 12, (3, 1), stride=(2, 1), padding=(1, 0)),
                nn.Conv2d(12, 12, 3, padding=1, groups=3),  # grouped: kept
                nn.Conv2d(12, 10, 1, stride=2),
            )

        def forward(self, x):
            return self.convs(x).mean(dim=(2, 3))

    def make_model():
        torch.manual_seed(0)
        return Cnn().eval(), (torch.randn(2, 3, 17, 15),)

    def make_rewritten():
        from hxc.compiler.conv_matmul import convs_as_matmuls

        model, args = make_model()
        return convs_as_matmuls(model), args
    """
)


@pytest.fixture
def cnn_module(tmp_path, monkeypatch):
    (tmp_path / "cnn_for_rewrite.py").write_text(CNN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import cnn_for_rewrite

    return importlib.reload(cnn_for_rewrite)


def test_rewrite_matches_the_convolutions_it_replaces(cnn_module):
    model, (x,) = cnn_module.make_model()
    rewritten = convs_as_matmuls(copy.deepcopy(model))
    kinds = [type(m).__name__ for m in rewritten.convs]
    assert kinds == ["ConvAsMatmul", "ReLU", "ConvAsMatmul", "ConvAsMatmul", "Conv2d",
                     "ConvAsMatmul", "Conv2d", "ConvAsMatmul"]  # fmt: skip
    assert [m.groups for m in rewritten.convs if isinstance(m, nn.Conv2d)] == [16, 3]
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x), atol=1e-5, rtol=1e-5)
        for concat in (True, False):  # one matmul over the concatenation, or one per kernel position
            conv = model.convs[2]
            torch.testing.assert_close(ConvAsMatmul(conv, concat)(x[:, :1].repeat(1, 8, 1, 1)),
                                       conv(x[:, :1].repeat(1, 8, 1, 1)), atol=1e-5, rtol=1e-5)  # fmt: skip


def test_refuses_what_it_cannot_rewrite():
    with pytest.raises(ValueError, match="groups=1"):
        ConvAsMatmul(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1"):
        ConvAsMatmul(nn.Conv2d(4, 4, 3, padding="same"))
    same = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    assert all(type(m) is nn.Conv2d for m in convs_as_matmuls(same))


def test_rewritten_model_compiled_by_iree_matches_pytorch(cnn_module, tmp_path):
    result = build_bundle("cnn_for_rewrite:make_rewritten", tmp_path / "cnn.hxc", "cpu:host")
    assert result.written, [r.error for r in result.failed]
    model = hxc.runtime.load(tmp_path / "cnn.hxc")
    original, (x,) = cnn_module.make_model()
    fresh = torch.randn_like(x)
    with torch.no_grad():
        want = original(fresh)
    torch.testing.assert_close(torch.as_tensor(model(fresh)), want, atol=1e-4, rtol=1e-4)
