"""Whole pickled modules (`torch.save(model)`): a zip with `data.pkl` and no code, or a
legacy pickle. Unpickling runs code from the file, so it needs `--allow-pickle`; a
file that holds only weights (a state_dict) is explained, not loaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hxc.frontends.base import Frontend, Source, through_torch_export

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportOptions
    from hxc.compiler.torch_export import ExportedModel

_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")


def _recognise(source: Source) -> bool:
    if source.zip_names:
        return any(n.endswith("data.pkl") for n in source.zip_names)
    return source.head[:1] == b"\x80" and source.head[1:2] in _PICKLE_PROTOCOLS


def _export(source: str, options: ImportOptions) -> ExportedModel:
    import torch

    from hxc.compiler.torch_export import ExportedModel, export_with, input_specs
    from hxc.errors import ModelLoadError, UsageError, first_line
    from hxc.manifests.bundle import file_sha256

    if not options.allow_pickle:
        # A weights-only load is safe; if it succeeds the file holds tensors, not a model.
        try:
            torch.load(source, map_location="cpu", weights_only=True)
        except Exception:
            raise UsageError(
                f"{source}: is a pickled model; loading it runs code from the file",
                hint="pass --allow-pickle if you trust its source, or save it with torch.export.save",
            ) from None
        raise ModelLoadError(
            f"{source}: holds only weights (a state_dict), not a model",
            hint="write a factory file.py:make_model that builds the module and loads these weights",
        )
    try:
        module = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"{source}: cannot unpickle ({first_line(e)})") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{source}: holds a {type(module).__name__}, not a torch.nn.Module")
    specs = input_specs(options.inputs)
    if not specs:
        raise UsageError(f"{source}: a pickled module carries no input shapes", hint="pass --input 1x3x224x224xf32")
    module.eval()
    program, args = export_with(module, (), specs, options.dynamic_batch, source)
    return ExportedModel(FRONTEND.model_name(source), source, FRONTEND.name, file_sha256(source), program, args, module)


FRONTEND = Frontend(
    name="pickle",
    summary="a pickled nn.Module (torch.save(model), with --allow-pickle)",
    recognise=_recognise,
    import_model=through_torch_export(_export),
    export=_export,
    order=30,  # after TorchScript and torch.export archives, which hold pickles too
)
