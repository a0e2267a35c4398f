"""torch.export archives (`torch.export.save`): a zip whose `archive_format` entry says
"pt2", whatever the file is called (.pt2, or a .pt holding one). Shapes, dtypes and
dynamic dimensions come from the program."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hxc.frontends.base import Frontend, Source, through_torch_export

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportOptions
    from hxc.compiler.torch_export import ExportedModel


def _recognise(source: Source) -> bool:
    return bool(source.zip_names) and (source.read_member("archive_format") or b"").strip() == b"pt2"


def _export(source: str, options: ImportOptions) -> ExportedModel:
    from hxc.compiler.torch_export import ExportedModel, input_specs, load_program, reexport
    from hxc.manifests.bundle import file_sha256

    # Inspected without torch first, loaded with code from pickles refused (`--allow-pickle` lifts that).
    program = load_program(Path(source), source, allow_pickle=options.allow_pickle)
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
