"""Model inputs: every supported format loads into an exported program whose lowered
artifact matches PyTorch; everything else is refused with a one-line reason."""

from __future__ import annotations

import pytest
import torch

from hxc.compiler.specs import parse_input_spec
from hxc.errors import LoweringError, ModelLoadError, UsageError
from hxc.frontends import export_program
from hxc.frontends import recognise


@pytest.mark.parametrize(
    "text, name, dtype, shape",
    [
        ("1x3x224x224xf32", "input_0", "f32", (1, 3, 224, 224)),
        ("?x128xi64", "input_0", "i64", ("d0_0", 128)),
        ("ids=2x16xi32", "ids", "i32", (2, 16)),
        ("f16", "input_0", "f16", ()),
        ("4x?xbf16", "input_0", "bf16", (4, "d0_1")),
    ],
)
def test_input_specs(text, name, dtype, shape):
    spec = parse_input_spec(text)
    assert (spec.name, spec.dtype, spec.shape) == (name, dtype, shape)


@pytest.mark.parametrize("text", ["1x3x224", "1x3xf31", "axbxf32", "1x3x224x224", "1,3,224,224xf32", "?"])
def test_malformed_input_specs(text):
    with pytest.raises(UsageError, match="malformed --input"):
        parse_input_spec(text)


def test_formats_are_detected_from_contents(models):
    def fmt(key: str) -> str:
        return recognise(str(models[key])).name

    assert fmt("pt2") == "torch.export"
    assert fmt("pt_holding_pt2") == "torch.export"  # a .pt that holds a torch.export archive
    assert fmt("torchscript") == "torchscript"
    assert fmt("pickle") == "pickle" and fmt("state_dict") == "pickle"
    assert recognise(f"{models['factory']}:make_model").name == "python"
    with pytest.raises(ModelLoadError, match="not a model hxc can read"):
        recognise(str(models["garbage"]))
    with pytest.raises(UsageError, match="a Python file needs a factory"):
        recognise(str(models["factory"]))


@pytest.mark.parametrize("fmt", ["pt2", "pt_holding_pt2", "torchscript", "factory", "pickle"])
def test_every_format_exports_the_same_model(fmt, models, reference):
    source = f"{models['factory']}:make_model" if fmt == "factory" else str(models[fmt])
    extra = {"allow_pickle": True} if fmt == "pickle" else {}
    inputs = ("2x3x8x8xf32",) if fmt in ("torchscript", "pickle") else ()
    loaded = export_program(source, inputs=inputs, **extra)
    model, (x,) = reference.make_model()
    with torch.no_grad():
        want = model(x)
        got = loaded.program.module()(x)
    torch.testing.assert_close(got, want)
    assert len(loaded.source_sha256) == 64


def test_module_reference_imports_a_package(reference):
    loaded = export_program("hxc.examples:mlp")
    assert loaded.name == "mlp" and loaded.source_format == "python"
    assert loaded.example_args[0].shape == (4, 64)


def test_shapes_come_from_input_specs_when_the_factory_gives_none(models):
    loaded = export_program(f"{models['factory']}:bare_module", inputs=["1x3x16x16xf32"])
    assert loaded.example_args[0].shape == (1, 3, 16, 16)
    with pytest.raises(UsageError, match="no example inputs"):
        export_program(f"{models['factory']}:bare_module")


def test_pickle_needs_opt_in_and_names_the_flag(models):
    with pytest.raises(UsageError, match="--allow-pickle"):
        export_program(str(models["pickle"]), inputs=["2x3x8x8xf32"])


def test_state_dict_is_explained(models):
    with pytest.raises(ModelLoadError, match="state_dict"):
        export_program(str(models["state_dict"]))


def test_torchscript_needs_shapes(models):
    with pytest.raises(UsageError, match="--input"):
        export_program(str(models["torchscript"]))


@pytest.mark.parametrize(
    "source, error, fragment",
    [
        ("does/not/exist.pt2", ModelLoadError, "no such file"),
        ("TRUNCATED", ModelLoadError, "corrupt or truncated archive"),
        ("GARBAGE", ModelLoadError, "not a model hxc can read"),
        ("FACTORY:nope", ModelLoadError, "has no callable 'nope'"),
        ("FACTORY:broken", ModelLoadError, "factory raised RuntimeError: factory exploded"),
        ("no_such_pkg_xyz:make", ModelLoadError, "cannot import module"),
    ],
)
def test_bad_sources(source, error, fragment, models):
    source = source.replace("TRUNCATED", str(models["truncated"])).replace("GARBAGE", str(models["garbage"]))
    source = source.replace("FACTORY", str(models["factory"]))
    with pytest.raises(error, match=fragment):
        export_program(source)


def test_dynamic_dims_from_specs_and_flag(models):
    from hxc.compiler.lower import program_signature

    by_spec = export_program(f"{models['factory']}:bare_module", inputs=["?x3x8x8xf32"])
    assert isinstance(program_signature(by_spec.program).inputs[0].shape[0], str)
    by_flag = export_program(f"{models['factory']}:make_model", dynamic_batch=True)
    assert isinstance(program_signature(by_flag.program).inputs[0].shape[0], str)
    from_program = export_program(str(models["pt2_dynamic"]))
    assert isinstance(program_signature(from_program.program).inputs[0].shape[0], str)


def test_a_dimension_the_model_fixes_cannot_be_dynamic(models):
    with pytest.raises(LoweringError, match="torch.export failed"):
        export_program(f"{models['factory']}:bare_module", inputs=["1x?x8x8xf32"])
