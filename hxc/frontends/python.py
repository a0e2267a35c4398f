"""Python factories: `path/to/file.py:factory` or `package.module:factory`. The factory
returns a module, `(module, example_inputs)`, or an ExportedProgram; or a transformers
causal LM, alone or as `(model, tokenizer)`, compiled as a language model. Never
import-cached: its code can change anywhere on the import path, so it is exported
afresh on every compile (and still hits the compile cache when the IR is the same)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from hxc.frontends.base import Frontend, Source, through_torch_export

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportOptions
    from hxc.compiler.torch_export import ExportedModel

# Factory names that say nothing about the model: it is named after its file instead.
_GENERIC = ("make_model", "model", "factory", "build")


def is_reference(text: str) -> bool:
    target, sep, attr = text.rpartition(":")
    return bool(sep and target and attr.isidentifier())


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _recognise(source: Source) -> bool:
    return source.path is None and is_reference(source.text)


def _model_name(source: str) -> str:
    target, _, attr = source.rpartition(":")
    if attr not in _GENERIC:
        return attr
    return Path(target).stem if _is_path(target) else target.rpartition(".")[2]


def _digest(source: str) -> str:
    target = source.rpartition(":")[0]
    path = Path(target) if _is_path(target) else None
    if path is None:
        import importlib.util

        spec = importlib.util.find_spec(target)
        path = Path(spec.origin) if spec is not None and spec.origin else None
    if path is not None and path.is_file():
        from hxc.manifests.bundle import file_sha256

        return file_sha256(path)
    return hashlib.sha256(source.encode()).hexdigest()


def _load_factory(source: str):
    import importlib
    import importlib.util
    import sys

    from hxc.errors import ModelLoadError, first_line

    target, _, attr = source.rpartition(":")
    if _is_path(target):
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"{target}: no such file")
        spec = importlib.util.spec_from_file_location(f"hxc_user_model_{path.stem}", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ModelLoadError(f"{target}: failed to import ({type(e).__name__}: {first_line(e)})") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelLoadError(f"{source}: cannot import module {target!r} ({first_line(e)})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{source}: {target} has no callable {attr!r}")
    return factory


def _export(source: str, options: ImportOptions) -> ExportedModel:
    import torch

    from hxc.compiler.torch_export import ExportedModel, export_with, input_specs, reexport
    from hxc.errors import ModelLoadError, UsageError, first_line

    factory = _load_factory(source)
    try:
        made = factory()
    except Exception as e:
        raise ModelLoadError(f"{source}: the factory raised {type(e).__name__}: {first_line(e)}") from None
    specs = input_specs(options.inputs)
    name, digest = _model_name(source), _digest(source)
    from hxc.compiler.causal_lm import is_causal_lm, language_model

    # A transformers causal LM, alone or with its tokenizer: prefill and decode over a KV cache.
    lm_pair = isinstance(made, tuple) and len(made) == 2 and is_causal_lm(made[0]) and not isinstance(made[1], torch.Tensor)
    if is_causal_lm(made) or lm_pair:
        model, tokenizer = made if lm_pair else (made, None)
        lm = language_model(model, tokenizer, max_context=options.max_context, slots=options.slots,
                            prefill_chunk=options.prefill_chunk, mixed_step=options.mixed_step)  # fmt: skip
        return ExportedModel(name, source, FRONTEND.name, digest, None, (), lm, functions_module=lm)
    if isinstance(made, torch.export.ExportedProgram):
        program, args = reexport(made, specs, options.dynamic_batch, source)
        return ExportedModel(name, source, FRONTEND.name, digest, program, args, program.module())
    if isinstance(made, torch.nn.Module):
        model, given = made, None
    elif isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, given = made
    else:
        raise ModelLoadError(
            f"{source}: the factory returned {type(made).__name__}",
            hint="return an nn.Module, (module, example_inputs), an ExportedProgram, or a transformers causal LM "
                 "(or (model, tokenizer))",
        )
    model.eval()
    if getattr(model, "hxc_functions", None):  # several entry points: exported one by one
        return ExportedModel(name, source, FRONTEND.name, digest, None, (), model, functions_module=model)
    args: tuple = ()
    if given is not None:
        args = (given,) if isinstance(given, torch.Tensor) else tuple(given)
        if not all(isinstance(a, torch.Tensor) for a in args):
            raise ModelLoadError(f"{source}: example inputs must be tensors")
    elif not specs:
        raise UsageError(f"{source}: the factory returned no example inputs", hint="pass --input 1x3x224x224xf32")
    program, args = export_with(model, args, specs, options.dynamic_batch, source)
    return ExportedModel(name, source, FRONTEND.name, digest, program, args, model)


FRONTEND = Frontend(
    name="python",
    summary="a Python factory (file.py:make_model or package.module:make_model)",
    recognise=_recognise,
    import_model=through_torch_export(_export),
    export=_export,
    cacheable=False,
    # int8 / int4 when the factory returns a language model (others are refused at import).
    precisions=("fp32", "fp16", "bf16", "int8", "int4"),
    model_name=_model_name,
    order=90,
)
