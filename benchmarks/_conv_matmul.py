"""Convolutions as plain matmuls, rewritten in PyTorch before export.

IREE 3.13 lowers a convolution on CPU through an `im2col` op fused into the data-tiled
matmul's packing, which reaches 39-58% of peak on ResNet-18 here, while its plain
data-tiled matmuls reach ~90% (README "Measurements"). This rewrite hands IREE the
plain form instead: the NCHW input is made NHWC, padded, cut into the kh*kw strided
slices a kernel position sees (each contiguous along channels), concatenated along
channels and multiplied by the weight reshaped to (kh*kw*C, O). IREE sees copies and
one matmul.

Only ordinary 2-D convolutions are rewritten (groups=1, zero padding given as numbers);
depthwise and grouped ones are left as they are: their matmul would be per group, with
too little work per matmul to gain anything.

Not applied by `hxc compile` (yet): measured by `benchmarks/conv_paths.py` on ResNet-18,
it is 1.1x (batch 1) and 1.3x (batch 8) faster than hxc's default but within 7% of IREE's
own channels-last conversion (already a `--tune` alternative), still short of PyTorch
eager, and it needs the model as an `nn.Module`, which `.pt2` and TorchScript inputs are not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvAsMatmul(nn.Module):
    """An `nn.Conv2d` (groups=1) computed as NHWC im2col-by-slices + one matmul; NCHW in
    and out, like the convolution it replaces."""

    def __init__(self, conv: nn.Conv2d, concat: bool = True) -> None:
        super().__init__()
        self.concat = concat
        if not rewritable(conv):
            raise ValueError(f"cannot rewrite {conv}: only groups=1 convolutions with numeric zero padding")
        out_ch, in_ch, kh, kw = conv.weight.shape
        self.kernel, self.stride = (kh, kw), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        # Rows ordered (kernel row, kernel column, channel), as the slices are concatenated.
        weight = conv.weight.detach().permute(2, 3, 1, 0).reshape(kh * kw * in_ch, out_ch)
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        x = x.permute(0, 2, 3, 1)
        if ph or pw:
            x = F.pad(x, (0, 0, pw, pw, ph, ph))
        cols = [x[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw, :]
                for i in range(kh) for j in range(kw)]  # fmt: skip
        if self.concat:
            patches = cols[0] if len(cols) == 1 else torch.cat(cols, dim=3)
            y = patches.reshape(n * ho * wo, kh * kw * c) @ self.weight
        else:  # one matmul per kernel position, summed: no concatenated copy
            y = sum(col.reshape(n * ho * wo, c) @ self.weight[k * c : (k + 1) * c] for k, col in enumerate(cols))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)


def rewritable(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)  # "same"/"valid": left to PyTorch
    )


def convs_as_matmuls(model: nn.Module, concat: bool = True) -> nn.Module:
    """`model` with every rewritable `nn.Conv2d` replaced by a `ConvAsMatmul`, in place
    (returned for chaining). Other modules, grouped and depthwise convolutions included,
    are kept."""
    for name, child in model.named_children():
        if rewritable(child):
            setattr(model, name, ConvAsMatmul(child, concat))
        else:
            convs_as_matmuls(child, concat)
    return model
