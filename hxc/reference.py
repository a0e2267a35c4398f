"""The reference a bundle's golden sample came from, rebuilt from the bundle itself, for
inputs the golden sample does not cover (`hxc verify --shapes`, `--example` files
without expected outputs): PyTorch on the bundle's exported program (weights restored
from its parameter archive) for PyTorch models, ONNX Runtime on its model.onnx for
ONNX models. The frontend a bundle was built with names which (`Frontend.baseline`,
the same reference `hxc bench` times against).

A runtime-only install (`pip install hxc`) has neither: asking for reference outputs
there is a one-line error naming the extra to install, and expected outputs given in
an `--example` file (output_0, ...) need no reference at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hxc.dtypes import to_numpy, to_torch
from hxc.errors import BundleError, HxcError, UsageError, first_line
from hxc.extras import require
from hxc.manifests.schema import Manifest

WHAT = "computing reference outputs for inputs the golden sample does not cover"


def reference_outputs(bundle: Path, manifest: Manifest, input_sets: Sequence[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """The reference's outputs, flattened in the signature's order, for each input set
    (host arrays of the signature's dtypes)."""
    from hxc.bench.baselines import baseline
    from hxc.frontends import by_format

    chosen = baseline(by_format(manifest.model.source_format).baseline)
    if chosen.program != manifest.model.program_file:
        raise UsageError(f"{bundle}: holds no {chosen.program} for {WHAT}",
                         hint="give --example files that hold the expected outputs (output_0, ...)")  # fmt: skip
    require(chosen.extra, WHAT, chosen.requires)  # a runtime-only install: one line naming the extra
    run = _torch if chosen.name == "torch" else _onnxruntime
    try:
        outputs = run(bundle, manifest, input_sets)
    except HxcError:
        raise
    except Exception as e:  # the reference itself failed on these inputs
        raise BundleError(f"{bundle}: the reference ({chosen.summary}) failed on these inputs: {first_line(e)}") from None
    for outs in outputs:
        if len(outs) != len(manifest.signature.outputs):
            raise BundleError(f"{bundle}: the reference returned {len(outs)} outputs; the bundle's signature has "
                              f"{len(manifest.signature.outputs)}")  # fmt: skip
    return outputs


def _torch(bundle: Path, manifest: Manifest, input_sets: Sequence[list[np.ndarray]]) -> list[list[np.ndarray]]:
    import torch
    from torch.utils import _pytree as pytree

    from hxc.bench.contenders import load_torch_module

    module = load_torch_module(bundle, manifest)
    specs = manifest.signature.inputs
    out = []
    for inputs in input_sets:
        with torch.inference_mode():
            result = module(*(to_torch(a, s.dtype) for a, s in zip(inputs, specs)))
        out.append([to_numpy(t) for t in pytree.tree_leaves(result)])
    return out


def _onnxruntime(bundle: Path, manifest: Manifest, input_sets: Sequence[list[np.ndarray]]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    # The file's bytes were checked against the manifest by verify before this runs.
    session = ort.InferenceSession(str(bundle / manifest.model.program_file), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [[np.asarray(o) for o in session.run(None, dict(zip(names, inputs)))] for inputs in input_sets]
