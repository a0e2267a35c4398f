"""TorchScript archives (`torch.jit.save`): a zip with a `code/` tree and constants,
converted to an exported program with torch's TS2EP converter. They carry no input
shapes, so `--input` is required."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hxc.frontends.base import Frontend, Source, through_torch_export

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportOptions
    from hxc.compiler.torch_export import ExportedModel


def _recognise(source: Source) -> bool:
    names = source.zip_names
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _export(source: str, options: ImportOptions) -> ExportedModel:
    import torch
    from torch._export.converter import TS2EPConverter

    from hxc.compiler.torch_export import ExportedModel, dynamic_shapes, example_inputs, export_module, input_specs
    from hxc.errors import LoweringError, ModelLoadError, UsageError, first_line
    from hxc.manifests.bundle import file_sha256

    try:
        scripted = torch.jit.load(source, map_location="cpu").eval()
    except Exception as e:
        raise ModelLoadError(f"{source}: cannot read TorchScript archive ({first_line(e)})") from None
    specs = input_specs(options.inputs)
    if not specs:
        raise UsageError(f"{source}: TorchScript archives carry no input shapes", hint="pass them, e.g. --input 1x3x224x224xf32")
    args = example_inputs(specs)
    try:
        program = TS2EPConverter(scripted, args).convert()
    except Exception as e:
        raise LoweringError(f"{source}: cannot convert TorchScript to an exported program ({first_line(e)})") from None
    shapes = dynamic_shapes(specs, args, options.dynamic_batch)
    if shapes is not None:
        program = export_module(program.module(), args, shapes, source)
    return ExportedModel(FRONTEND.model_name(source), source, FRONTEND.name, file_sha256(source), program, args, scripted)


FRONTEND = Frontend(
    name="torchscript",
    summary="a TorchScript archive (torch.jit.save)",
    recognise=_recognise,
    import_model=through_torch_export(_export),
    export=_export,
    order=20,
)
