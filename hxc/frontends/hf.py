"""Hugging Face model directories: `config.json` and `*.safetensors` (with the
tokenizer's files and `generation_config.json` beside them), as `save_pretrained`
writes them. The model is a causal LM of a family hxc supports
(`hxc.compiler.causal_lm.SUPPORTED_FAMILIES`), compiled as `prefill` and `decode` over
a KV cache kept on the device; the bundle carries its tokenizer.

Nothing in the directory runs: weights load from safetensors only (a directory of
pickled weights is refused), and a config that needs `trust_remote_code` is refused
too. Their size is checked against free memory before they load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from hxc.frontends.base import Frontend, Source, through_torch_export

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportOptions
    from hxc.compiler.torch_export import ExportedModel

CONFIG = "config.json"
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _recognise(source: Source) -> bool:
    return source.directory is not None and CONFIG in source.dir_names


def _model_name(source: str) -> str:
    return Path(source).resolve().name


def _digest(path: Path) -> str:
    """Every file of the directory, by name and contents (the weights included)."""
    from hxc.manifests.bundle import file_sha256

    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def check_directory(directory: Path) -> dict:
    """The directory's config, after the refusals that need no torch: unreadable
    config, code to trust, no safetensors weights, an unsupported family, weights
    larger than the free memory."""
    from hxc.errors import ModelLoadError, UsageError

    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{directory / CONFIG}: not a readable JSON config ({e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{directory / CONFIG}: not a JSON object")
    if "auto_map" in config:
        raise UsageError(f"{directory}: the model needs trust_remote_code (its config names code to run); "
                         "hxc does not run code from model directories")  # fmt: skip
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLED)
        what = f"only pickled weights ({', '.join(pickled[:3])})" if pickled else "no *.safetensors weights"
        raise ModelLoadError(f"{directory}: holds {what}; hxc loads safetensors only",
                             hint="convert them with transformers: model.save_pretrained(dir, safe_serialization=True)")  # fmt: skip
    from hxc.compiler.causal_lm import SUPPORTED_FAMILIES

    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise UsageError(f"{directory}: model type {family!r} is not supported; hxc compiles {', '.join(SUPPORTED_FAMILIES)}")
    size = sum(p.stat().st_size for p in weights)
    from hxc.runtime.loader import _available_host_memory

    free = _available_host_memory()
    if free is not None and size > free:
        raise UsageError(f"{directory}: its weights take {size / 2**30:.1f} GiB; this host has {free / 2**30:.1f} GiB free")
    return config


def _export(source: str, options: ImportOptions) -> ExportedModel:
    import torch

    from hxc.compiler.causal_lm import language_model
    from hxc.compiler.torch_export import ExportedModel
    from hxc.errors import ModelLoadError, first_line
    from hxc.extras import require

    require("llm", "compiling a Hugging Face model directory", ("transformers", "safetensors"))
    directory = Path(source)
    check_directory(directory)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False,
                                                     use_safetensors=True, dtype=torch.float32)  # fmt: skip
    except Exception as e:
        raise ModelLoadError(f"{source}: transformers cannot load it ({type(e).__name__}: {first_line(e)})") from None
    lm = language_model(model, directory, max_context=options.max_context, slots=options.slots,
                        prefill_chunk=options.prefill_chunk, mixed_step=options.mixed_step)  # fmt: skip
    return ExportedModel(_model_name(source), source, FRONTEND.name, _digest(directory), None, (), lm, functions_module=lm)


FRONTEND = Frontend(
    name="huggingface",
    summary="a Hugging Face model directory (config.json, *.safetensors)",
    recognise=_recognise,
    import_model=through_torch_export(_export),
    export=_export,
    digest=_digest,
    # The import carries the tokenizer's files and the language-model record, which the
    # import cache does not hold; the compile cache still reuses identical IR.
    cacheable=False,
    # fp16 / bf16: the causal LM wrapper computes and caches in float32 only.
    precisions=("fp32", "int8", "int4"),
    model_name=_model_name,
    order=10,
)
