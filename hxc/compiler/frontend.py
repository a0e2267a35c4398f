"""Load a model from whatever the user pointed at, as a torch.export program.

Formats are recognised from the file's contents, not its name:
- a torch.export archive (`torch.export.save`, usually .pt2): a zip whose
  `archive_format` entry says "pt2";
- a TorchScript archive (`torch.jit.save`): a zip with a `code/` tree; converted to an
  exported program with torch's TS2EP converter;
- a whole pickled module (`torch.save(model)`): a zip with `data.pkl` and no code, or a
  legacy pickle. Unpickling runs code from the file, so it needs `allow_pickle`;
- a Python reference `path/to/file.py:factory` or `package.module:factory`, whose
  factory returns a module, `(module, example_inputs)`, or an ExportedProgram.
- an ONNX model (a protobuf ModelProto, any file name), which `hxc compile` hands to
  the ONNX frontend (`hxc.compiler.onnx_import`); `load_model` reads PyTorch formats only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import pickle
import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hxc.arrays import MAX_ARRAY_BYTES_ENV, max_array_bytes
from hxc.compiler.pt2_archive import ALLOW_PICKLE_HINT, UnsafeModelError, inspect_pt2
from hxc.compiler.sniff import looks_like_python_ref as _looks_like_python_ref
from hxc.compiler.sniff import sniff
from hxc.errors import LoweringError, ModelLoadError, UsageError, first_line
from hxc.manifests.bundle import file_sha256
from hxc.manifests.schema import DTYPES, TensorSpec

TORCH_DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "i1": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
# Size used for a dynamic dimension in generated example inputs. torch.export
# specialises sizes 0 and 1, so a dimension meant to stay dynamic must not be 1.
DYNAMIC_EXAMPLE_SIZE = 2
MAX_DIM = 2**31 - 1  # IREE's index arithmetic on every target is 32-bit safe below this

_SPEC_RE = re.compile(r"^(?:(?P<name>[A-Za-z_]\w*)=)?(?P<dims>(?:(?:\d+|\?)x)*)(?P<dtype>[a-z]+\d*)$")


def parse_input_spec(text: str, index: int = 0) -> TensorSpec:
    """`1x3x224x224xf32`, `?x128xi64` (dynamic first dim), `ids=1x128xi64` (named)."""
    m = _SPEC_RE.match(text.strip())
    if not m or m.group("dtype") not in DTYPES:
        raise UsageError(
            f"malformed --input {text!r}",
            hint=f"expected DIMSxDTYPE such as 1x3x224x224xf32 or ?x128xi64; dtypes: {', '.join(DTYPES)}",
        )
    dims: list[int | str] = []
    for j, d in enumerate(x for x in m.group("dims").split("x") if x):
        if d != "?" and not 1 <= int(d) <= MAX_DIM:
            raise UsageError(f"--input {text!r}: dimension {j} is {d}", hint=f"each dimension is 1 to {MAX_DIM}, or ? for dynamic")
        dims.append(f"d{index}_{j}" if d == "?" else int(d))
    elements = 1
    for d in dims:
        elements *= DYNAMIC_EXAMPLE_SIZE if isinstance(d, str) else d
    if elements * TORCH_DTYPES[m.group("dtype")].itemsize > max_array_bytes():
        raise UsageError(f"--input {text!r}: an example input of that shape would not fit in memory",
                         hint=f"the limit is {max_array_bytes()} bytes (${MAX_ARRAY_BYTES_ENV})")  # fmt: skip
    return TensorSpec(name=m.group("name") or f"input_{index}", dtype=m.group("dtype"), shape=tuple(dims))


@dataclass
class LoadedModel:
    """A model ready to lower: its program, the example inputs it was traced with, and
    the eager callable that produces the reference (golden) outputs."""

    name: str
    source: str
    source_format: str
    source_sha256: str
    program: torch.export.ExportedProgram
    example_args: tuple[torch.Tensor, ...]
    reference: Callable[..., Any]


def load_model(
    source: str,
    *,
    inputs: Sequence[str] = (),
    dynamic_batch: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load `source` and export it. `inputs` are `--input` specs; they are required for
    formats that carry no shapes (TorchScript, pickles, factories without inputs)."""
    specs = [parse_input_spec(s, i) for i, s in enumerate(inputs)]
    path = Path(source)
    if not path.exists() and _looks_like_python_ref(source):
        return _from_python_ref(source, specs, dynamic_batch)
    if not path.exists():
        raise ModelLoadError(f"{source}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{source}: is a directory, not a model file")
    kind = sniff(path)
    digest = file_sha256(path)
    if kind == "pt2":
        return _from_pt2(path, digest, specs, dynamic_batch, allow_pickle)
    if kind == "torchscript":
        return _from_torchscript(path, digest, specs, dynamic_batch)
    if kind == "pickle":
        return _from_pickle(path, digest, specs, dynamic_batch, allow_pickle)
    if kind == "onnx":
        raise ModelLoadError(f"{source}: is an ONNX model, not a PyTorch one", hint="compile it with `hxc compile`")
    if kind == "python":
        raise UsageError(f"{source}: a Python file needs a factory", hint=f"write {source}:make_model")
    raise ModelLoadError(
        f"{source}: not a model hxc can read",
        hint="expected a torch.export .pt2, a TorchScript archive, a pickled nn.Module, or file.py:factory",
    )


# --- formats ---------------------------------------------------------------------


def load_program(
    source: Path | bytes, where: str, *, allow_pickle: bool = False, check_expansion: bool = True
) -> torch.export.ExportedProgram:
    """torch.export.load, made safe: the archive is inspected first (no pickles, no
    compiled code, sizes within limits; see pt2_archive), and the load itself runs
    with unrestricted unpickling disabled, so nothing the inspection missed can run
    code either. With `allow_pickle` the user has said they trust the file."""
    inspect_pt2(source, where, allow_pickle=allow_pickle, check_expansion=check_expansion)
    f = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with contextlib.nullcontext() if allow_pickle else _no_code_from_pickles():
            return torch.export.load(f)
    except _RefusedPickle as e:
        raise UnsafeModelError(f"{where}: loading it would run code from the file ({e})", hint=ALLOW_PICKLE_HINT) from None
    except pickle.UnpicklingError as e:
        raise UnsafeModelError(f"{where}: holds pickled data that is not plain tensors ({first_line(e)})",
                               hint=ALLOW_PICKLE_HINT) from None  # fmt: skip
    except Exception as e:  # torch raises many types for a damaged archive
        raise ModelLoadError(f"{where}: cannot read torch.export archive ({first_line(e)})") from None


class _RefusedPickle(Exception):
    pass


@contextlib.contextmanager
def _no_code_from_pickles() -> Iterator[None]:
    """While torch.export.load runs: every torch.load is weights-only (tensors and
    plain containers, no code), and the unrestricted unpicklers it can reach refuse.
    torch looks these up at call time, so swapping the attributes is enough."""
    from torch.export.pt2_archive import _package

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _RefusedPickle("it asks for an unrestricted unpickler")

    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    saved = [(torch, "load", real_load), (torch._C, "_pickle_load_obj", torch._C._pickle_load_obj),
             (_package, "pickle", _package.pickle)]  # fmt: skip
    torch.load = weights_only_load  # type: ignore[assignment]
    torch._C._pickle_load_obj = refuse  # type: ignore[attr-defined]
    _package.pickle = types.SimpleNamespace(loads=refuse, load=refuse, dumps=pickle.dumps)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _from_pt2(path: Path, digest: str, specs: list[TensorSpec], dynamic_batch: bool, allow_pickle: bool) -> LoadedModel:
    program = load_program(path, str(path), allow_pickle=allow_pickle)
    if specs:
        args = example_inputs(specs)
        program = export_module(program.module(), args, _dynamic_shapes(specs, args, dynamic_batch), str(path))
    elif dynamic_batch:
        args = _batch_of_two(_program_example_args(program))
        program = export_module(program.module(), args, _dynamic_shapes([], args, True), str(path))
    else:
        args = _program_example_args(program)
    return LoadedModel(path.stem, str(path), "torch.export", digest, program, args, program.module())


def _from_torchscript(path: Path, digest: str, specs: list[TensorSpec], dynamic_batch: bool) -> LoadedModel:
    try:
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read TorchScript archive ({first_line(e)})") from None
    if not specs:
        raise UsageError(
            f"{path}: TorchScript archives carry no input shapes", hint="pass them, e.g. --input 1x3x224x224xf32"
        )
    args = example_inputs(specs)
    from torch._export.converter import TS2EPConverter

    try:
        program = TS2EPConverter(scripted, args).convert()
    except Exception as e:
        raise LoweringError(f"{path}: cannot convert TorchScript to an exported program ({first_line(e)})") from None
    shapes = _dynamic_shapes(specs, args, dynamic_batch)
    if shapes is not None:
        program = export_module(program.module(), args, shapes, str(path))
    return LoadedModel(path.stem, str(path), "torchscript", digest, program, args, scripted)


def _from_pickle(
    path: Path, digest: str, specs: list[TensorSpec], dynamic_batch: bool, allow_pickle: bool
) -> LoadedModel:
    if not allow_pickle:
        # A weights-only load is safe; if it succeeds the file holds tensors, not a model.
        try:
            torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise UsageError(
                f"{path}: is a pickled model; loading it runs code from the file",
                hint="pass --allow-pickle if you trust its source, or save it with torch.export.save",
            ) from None
        raise ModelLoadError(
            f"{path}: holds only weights (a state_dict), not a model",
            hint="write a factory file.py:make_model that builds the module and loads these weights",
        )
    try:
        module = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot unpickle ({first_line(e)})") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{path}: holds a {type(module).__name__}, not a torch.nn.Module")
    if not specs:
        raise UsageError(f"{path}: a pickled module carries no input shapes", hint="pass --input 1x3x224x224xf32")
    module.eval()
    args = example_inputs(specs)
    program = export_module(module, args, _dynamic_shapes(specs, args, dynamic_batch), str(path))
    return LoadedModel(path.stem, str(path), "pickle", digest, program, args, module)


def _from_python_ref(source: str, specs: list[TensorSpec], dynamic_batch: bool) -> LoadedModel:
    target, _, attr = source.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
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
        file = path
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelLoadError(f"{source}: cannot import module {target!r} ({first_line(e)})") from None
        file = Path(module.__file__ or "")
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{source}: {target} has no callable {attr!r}")
    try:
        made = factory()
    except Exception as e:
        raise ModelLoadError(f"{source}: the factory raised {type(e).__name__}: {first_line(e)}") from None
    digest = file_sha256(file) if file.is_file() else hashlib.sha256(source.encode()).hexdigest()
    name = attr if attr not in ("make_model", "model", "factory", "build") else file.stem

    if isinstance(made, torch.export.ExportedProgram):
        args = example_inputs(specs) if specs else _program_example_args(made)
        if specs or dynamic_batch:
            made = export_module(made.module(), args, _dynamic_shapes(specs, args, dynamic_batch), source)
        return LoadedModel(name, source, "python", digest, made, args, made.module())
    if isinstance(made, torch.nn.Module):
        model, given = made, None
    elif isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, given = made
    else:
        raise ModelLoadError(
            f"{source}: the factory returned {type(made).__name__}",
            hint="return an nn.Module, (module, example_inputs), or an ExportedProgram",
        )
    model.eval()
    if specs:
        args = example_inputs(specs)
    elif given is not None:
        args = (given,) if isinstance(given, torch.Tensor) else tuple(given)
        if not all(isinstance(a, torch.Tensor) for a in args):
            raise ModelLoadError(f"{source}: example inputs must be tensors")
    else:
        raise UsageError(f"{source}: the factory returned no example inputs", hint="pass --input 1x3x224x224xf32")
    if dynamic_batch and not specs:
        args = _batch_of_two(args)
    program = export_module(model, args, _dynamic_shapes(specs, args, dynamic_batch), source)
    return LoadedModel(name, source, "python", digest, program, args, model)


# --- helpers ---------------------------------------------------------------------


def example_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs for specs: normal floats, small non-negative integers
    (valid token ids and indices for nearly any model), random booleans."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        shape = [DYNAMIC_EXAMPLE_SIZE if isinstance(d, str) else d for d in spec.shape]
        dtype = TORCH_DTYPES[spec.dtype]
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, 10, shape, generator=gen).to(dtype))
    return tuple(out)


def _batch_of_two(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Example inputs with batch 1 repeated to batch 2: torch.export specialises a
    size-1 dimension, so it could not stay dynamic."""
    return tuple(torch.cat([a, a]) if a.dim() > 0 and a.shape[0] == 1 else a for a in args)


def _dynamic_shapes(
    specs: Sequence[TensorSpec], args: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> tuple[dict[int, Any], ...] | None:
    dyn = torch.export.Dim.DYNAMIC
    shapes = []
    for i, a in enumerate(args):
        dims: dict[int, Any] = {}
        if i < len(specs):
            dims = {j: dyn for j, d in enumerate(specs[i].shape) if isinstance(d, str)}
        if dynamic_batch and a.dim() > 0:
            dims[0] = dyn
        shapes.append(dims)
    return tuple(shapes) if any(shapes) else None


def export_module(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], dynamic_shapes: Any, source: str
) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        hint = "a dimension marked dynamic may be fixed by the model" if dynamic_shapes else None
        raise LoweringError(f"{source}: torch.export failed ({type(e).__name__}: {first_line(e)})", hint=hint) from None


def _program_example_args(program: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...]:
    stored = getattr(program, "example_inputs", None)
    if stored:
        args, kwargs = stored
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            return tuple(args)
    specs = []
    for i, node in enumerate(n for n in program.graph.nodes if n.op == "placeholder"):
        if node.name not in program.graph_signature.user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise LoweringError(f"input {node.name!r} is not a tensor; hxc compiles tensor inputs only")
        shape = tuple(d if isinstance(d, int) else f"d{i}" for d in val.shape)
        specs.append(TensorSpec(node.name, DTYPE_NAMES[val.dtype], shape))
    return example_inputs(specs)

