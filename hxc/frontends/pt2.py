"""torch.export archives (`torch.export.save`): a zip whose `archive_format` entry says
"pt2", whatever the file is called (.pt2, or a .pt holding one). Shapes, dtypes and
dynamic dimensions come from the program."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hxc.frontends.base import Frontend, Source, through_torch_export

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportOptions
    from hxc.compiler.torch_export import ExportedModel


def _recognise(source: Source) -> bool:
    return bool(source.zip_names) and (source.read_member("archive_format") or b"").strip() == b"pt2"


def _export(source: str, options: ImportOptions) -> ExportedModel:
    import torch

    from hxc.compiler.torch_export import ExportedModel, input_specs, reexport
    from hxc.errors import ModelLoadError, first_line
    from hxc.manifests.bundle import file_sha256

    try:
        program = torch.export.load(source)
    except Exception as e:  # torch raises many types for a damaged archive
        raise ModelLoadError(f"{source}: cannot read torch.export archive ({first_line(e)})") from None
    program, args = reexport(program, input_specs(options.inputs), options.dynamic_batch, source)
    return ExportedModel(FRONTEND.model_name(source), source, FRONTEND.name, file_sha256(source), program, args,
                         program.module())  # fmt: skip


FRONTEND = Frontend(
    name="torch.export",
    summary="a torch.export archive (.pt2)",
    recognise=_recognise,
    import_model=through_torch_export(_export),
    export=_export,
    order=10,
)
