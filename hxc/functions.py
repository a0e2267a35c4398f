"""What a model of several functions declares about itself (`hxc.compiler.functions`
builds it): one record per entry point, torch-free, so a model file can import it
without pulling in the compiler.

    from hxc.functions import Function

    class Cell(nn.Module):
        hxc_state = {"h": torch.zeros(1, 32)}                  # name -> example (shape, dtype)
        hxc_functions = {
            "init": Function(args=(x0,), writes=("h",)),       # init(x0) -> (y, h)
            "step": Function(args=(x,), reads=("h",), writes=("h",)),  # step(x, h) -> (y, h)
        }
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DynamicDim:
    """Axis `axis` of argument `arg` takes any length in min..max at run time (the
    manifest names it `name`); every other dimension is static."""

    arg: int
    axis: int
    name: str
    min: int
    max: int


@dataclass(frozen=True)
class Function:
    """One entry point: its method takes `args`, then the state it `reads`, in order,
    and returns its outputs, then the state it `writes`, in order."""

    args: tuple[Any, ...] = ()  # example input tensors, state excluded
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    method: str | None = None  # the module's method; default: the function's name
    arg_names: tuple[str, ...] = ()  # names of `args` in the manifest; default input_0, input_1, ...
    dynamic: tuple[DynamicDim, ...] = ()
