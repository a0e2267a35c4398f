"""Built-in example models, usable as `hxc compile hxc.examples:NAME`.

Each factory returns `(module, example_inputs)` with fixed random weights, so every
run exports the same program (and re-runs hit the compile cache).
"""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A small image classifier: conv + batch norm + residual + pooling + linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x)


def convnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The default example: a residual CNN on 1x3x32x32 images."""
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    _randomize_norms(model)
    return model, (torch.randn(1, 3, 32, 32),)


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A 3-layer MLP on a batch of 4 vectors of 64 features."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)).eval()
    return model, (torch.randn(4, 64),)


class RNNCell(nn.Module):
    """A recurrent cell of two functions sharing its weights, its hidden state kept on
    the device between calls: `init(x0)` starts it, `step(x, h)` advances it. Each
    returns the cell's output, then the new hidden state."""

    def __init__(self, features: int = 16, hidden: int = 32) -> None:
        super().__init__()
        from hxc.functions import Function

        self.encode = nn.Linear(features, hidden)
        self.cell = nn.GRUCell(hidden, hidden)
        self.head = nn.Linear(hidden, features)
        x = torch.randn(1, features)
        self.hxc_state = {"h": torch.randn(1, hidden)}
        self.hxc_functions = {"init": Function(args=(x,), writes=("h",)),
                              "step": Function(args=(x,), reads=("h",), writes=("h",))}  # fmt: skip

    def init(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.encode(x0))
        return self.head(h), h

    def step(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(torch.relu(self.encode(x)), h)
        return self.head(h), h


def rnn_cell() -> nn.Module:
    """Two functions, `init` and `step`, with a hidden state kept on the device."""
    torch.manual_seed(0)
    return RNNCell().eval()


def _randomize_norms(model: nn.Module) -> None:
    # Fresh batch norms are the identity; random statistics make numerical checks mean something.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
