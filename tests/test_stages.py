"""`hxc compile --stages`: a model cut into consecutive stages, each compiled as an
artifact of its own per target with its own weights, recorded in the manifest's
`stages`, and run in order by the runtime to PyTorch's own outputs. Tiny models, CPU
(local-task) only."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hxc.compiler.stages import node_flops, parse_stages, split_program
from hxc.errors import BundleError, ExitCode, UsageError
from hxc.golden import compare
from hxc.manifests import read_manifest
from hxc.manifests.bundle import parse_manifest
from hxc.manifests.schema import WEIGHTS_FILE

SOURCE = textwrap.dedent(
    '''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))) + x

    class SkipNet(nn.Module):
        """The stem's output is added back after every block: a skip across every cut."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.ModuleList([Block(8) for _ in range(4)])
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.stem(x)
            skip = x
            for b in self.blocks:
                x = b(x)
            return self.head((x + skip).mean(dim=(2, 3)))

    class Attention(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            w = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            return self.proj((w @ v).transpose(1, 2).reshape(b, t, d))

    class EncoderBlock(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(d), Attention(d, 2)
            self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class Encoder(nn.Module):
        def __init__(self, d=16, depth=4):
            super().__init__()
            self.embed = nn.Linear(6, d)
            self.blocks = nn.ModuleList([EncoderBlock(d) for _ in range(depth)])
            self.norm = nn.LayerNorm(d)

        def forward(self, x):
            x = self.embed(x)
            for b in self.blocks:
                x = b(x)
            return self.norm(x), x.mean(dim=1)

    def skipnet():
        torch.manual_seed(0)
        return SkipNet().eval(), (torch.randn(2, 3, 8, 8),)

    def mlp():
        torch.manual_seed(1)
        blocks = [nn.Sequential(nn.Linear(12, 12), nn.ReLU()) for _ in range(4)]
        return nn.Sequential(*blocks, nn.Sequential(nn.Linear(12, 3))).eval(), (torch.randn(4, 12),)

    def encoder():
        torch.manual_seed(2)
        return Encoder().eval(), (torch.randn(2, 5, 6),)

    class Plain(nn.Module):
        """No submodules: only cuts between operations."""

        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 16))
            self.w2 = nn.Parameter(torch.randn(16, 16))
            self.w3 = nn.Parameter(torch.randn(16, 4))

        def forward(self, x):
            h = torch.tanh(x @ self.w1)
            return torch.relu(h @ self.w2 + h) @ self.w3

    def plain():
        torch.manual_seed(3)
        return Plain().eval(), (torch.randn(3, 8),)
    '''
)


@pytest.fixture(scope="module")
def staged_models(tmp_path_factory):
    """The module of the factories above, importable, and its file."""
    import importlib

    d = tmp_path_factory.mktemp("staged_models")
    (d / "hxc_staged_models.py").write_text(SOURCE)
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("hxc_staged_models"), d / "hxc_staged_models.py"
    finally:
        sys.path.remove(str(d))


def _torch_outputs(factory) -> tuple[list[np.ndarray], tuple[torch.Tensor, ...], torch.nn.Module]:
    module, args = factory()
    with torch.no_grad():
        out = module(*args)
    flat = list(out) if isinstance(out, tuple) else [out]
    return [o.numpy() for o in flat], args, module


def _assert_close(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        c = compare(g, e, "f32")
        assert c.ok, (c.max_abs, c.max_rel)


def _build(source: str, out: Path, stages: str | None, **options):
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    result = build_bundle(source, out, "cpu:host", options=ImportOptions(stages=stages, **options))
    assert result.written, [b.error for b in result.failed]
    return result


def _chained(manifest) -> None:
    """Each stage's inputs are exactly the previous stage's outputs, sized by their shapes."""
    for before, after in zip(manifest.stages, manifest.stages[1:]):
        assert after.inputs == before.outputs
    for s in manifest.stages:
        for t in (*s.inputs, *s.outputs):
            assert t.bytes == int(np.prod(t.shape)) * 4 and t.dtype == "f32"


# --- compiled and run --------------------------------------------------------------


def test_cnn_in_three_stages_carries_the_skip_and_runs_like_pytorch(staged_models, cli, tmp_path):
    module, path = staged_models
    out = tmp_path / "skip.hxc"
    result = cli("compile", f"{path}:skipnet", "-o", out, "-t", "cpu:host", "--stages", "3", "--weights", "shared", "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    assert [s["name"] for s in reported["stages"]] == ["s0", "s1", "s2"]

    m = read_manifest(out)
    assert m.schema_version == "6.0"
    assert [a.id for a in m.artifacts] == ["cpu:host#s0", "cpu:host#s1", "cpu:host#s2"]
    assert [a.stage for a in m.artifacts] == [0, 1, 2] and all(a.file for a in m.ok_artifacts)
    assert [s.artifacts for s in m.stages] == [("cpu:host#s0",), ("cpu:host#s1",), ("cpu:host#s2",)]
    _chained(m)
    # The stem's output (`conv2d`, used after the last block) crosses both cuts.
    assert m.stages[0].first_module == "stem" and m.stages[-1].last_module == "head"
    assert "conv2d" in [t.name for t in m.stages[1].inputs] and "conv2d" in [t.name for t in m.stages[2].inputs]
    assert m.stages[0].inputs[0].name == "x" and m.stages[0].inputs[0].shape == (2, 3, 8, 8)
    assert m.stages[-1].outputs[0].shape == (2, 5)
    assert all(s.flops > 0 and s.kv_bytes_per_token == 0 for s in m.stages)

    # Each stage's weights are its own archive, hashed like every file, with its own
    # parameters only; together they are the model's.
    model, _ = module.skipnet()
    # What the eval graph reads: BatchNorm's batch counter is not.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sum(s.weights_bytes for s in m.stages) == sum(t.numel() * t.element_size() for t in state.values())
    assert [w.file for w in m.weights] == [WEIGHTS_FILE.replace(".irpa", f"-s{k}.irpa") for k in range(3)]
    assert all(w.file in m.files and m.files[w.file].sha256 == w.sha256 for w in m.weights)
    from hxc.compiler.torch_program import archive_tensors

    held = [set(archive_tensors(out / w.file)) for w in m.weights]
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1:])
    assert set().union(*held) == set(state)

    expected, args, _ = _torch_outputs(module.skipnet)
    np.savez(tmp_path / "x.npz", input_0=args[0].numpy())
    result = cli("run", out, "-i", tmp_path / "x.npz", "-o", tmp_path / "y.npz", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["artifact"] == "cpu:host"
    with np.load(tmp_path / "y.npz") as y:
        _assert_close([y["output_0"]], expected)

    result = cli("verify", out, "--json")
    assert result.exit_code == 0, result.output
    verdicts = json.loads(result.stdout)
    assert verdicts["ok"] and [r["artifact"] for r in verdicts["results"]] == ["cpu:host"], verdicts

    # The bundle's program.pt2 keeps no weights; the stages' archives restore them (the
    # reference `hxc verify --shapes` and bench baselines run).
    from hxc.reference import reference_outputs

    [again] = reference_outputs(out, m, [[args[0].numpy()]])
    _assert_close(again, expected)


def test_sequential_mlp_in_two_stages_at_its_blocks(staged_models, tmp_path):
    import hxc.runtime

    module, path = staged_models
    out = tmp_path / "mlp.hxc"
    _build(f"{path}:mlp", out, "2")
    m = read_manifest(out)
    assert len(m.stages) == 2 and m.weights == ()  # tiny: weights inside each artifact
    # The blocks of the Sequential are the units: every cut falls between two of them.
    assert m.stages[0].first_module == "0" and m.stages[1].last_module == "4"
    assert int(m.stages[0].last_module) + 1 == int(m.stages[1].first_module)
    _chained(m)
    expected, args, _ = _torch_outputs(module.mlp)
    model = hxc.runtime.load(out, device="cpu")
    assert model.candidate.id == "cpu:host" and len(model.candidate.stages) == 2
    _assert_close([model(args[0].numpy())], expected)
    assert isinstance(model(args[0]), torch.Tensor)  # torch in, torch out, as for any bundle


def test_encoder_cut_before_named_blocks(staged_models, tmp_path):
    import hxc.runtime

    module, path = staged_models
    out = tmp_path / "enc.hxc"
    _build(f"{path}:encoder", out, "at:blocks.1,blocks.3")
    m = read_manifest(out)
    assert [(s.first_module, s.last_module) for s in m.stages] == [("embed", "blocks.0"), ("blocks.1", "blocks.2"),
                                                                    ("blocks.3", "norm")]  # fmt: skip
    _chained(m)
    assert [t.shape for t in m.stages[1].inputs] == [(2, 5, 16)]
    expected, args, _ = _torch_outputs(module.encoder)
    model = hxc.runtime.load(out, device="cpu")
    _assert_close(list(model(args[0].numpy())), expected)


def test_an_unsplit_bundle_has_no_stages(staged_models, tmp_path):
    _, path = staged_models
    out = tmp_path / "whole.hxc"
    _build(f"{path}:skipnet", out, None)
    m = read_manifest(out)
    assert m.stages == () and [a.id for a in m.artifacts] == ["cpu:host"] and m.artifacts[0].stage is None
    assert json.loads((out / "manifest.json").read_text())["stages"] == []


# --- the runtime never takes a stage for the model -------------------------------------


def test_selection_offers_whole_chains_only(staged_models, tmp_path):
    from hxc.runtime import probe_host, select

    _, path = staged_models
    out = tmp_path / "mlp.hxc"
    _build(f"{path}:mlp", out, "2")
    m = read_manifest(out)
    probe = probe_host()
    sel = select(m, probe, device="cpu")
    assert [(c.id, [a.id for a in c.artifacts]) for c in sel.candidates] == [("cpu:host", ["cpu:host#s0", "cpu:host#s1"])]
    assert "cpu:host (2 stages)" in sel.explain()
    # A later stage is never a candidate on its own, even when asked for by id.
    assert select(m, probe, device="cpu:host#s1").candidates == ()
    # A chain with a stage that failed is no candidate, and says which stage.
    broken = dataclasses.replace(m, artifacts=(m.artifacts[0], dataclasses.replace(m.artifacts[1], status="failed",
                                                                                   error="boom")))  # fmt: skip
    sel = select(broken, probe, device="cpu")
    assert sel.candidates == () and "stage 1 failed to compile: boom" in sel.rejected[0].reason


def test_a_staged_manifest_that_does_not_chain_is_refused(staged_models, tmp_path):
    _, path = staged_models
    out = tmp_path / "mlp.hxc"
    _build(f"{path}:mlp", out, "2")
    data = json.loads((out / "manifest.json").read_text())
    no_stages = {**data, "stages": []}
    with pytest.raises(BundleError, match="belongs to a stage, and the manifest lists no stages"):
        parse_manifest(no_stages)
    broken = json.loads(json.dumps(data))
    broken["stages"][1]["inputs"][0]["shape"] = [4, 13]
    with pytest.raises(BundleError, match="stage 1's inputs are not stage 0's outputs"):
        parse_manifest(broken)


# --- where the cuts go (PyTorch only) ------------------------------------------------------


def test_a_graph_without_blocks_is_cut_between_operations(staged_models):
    module, _ = staged_models
    model, args = module.plain()
    program = torch.export.export(model, args)
    parts = split_program(program, args, parse_stages("3"), "plain")
    assert len(parts) == 3 and all(p.first_module is None for p in parts)
    x = args
    for p in parts:
        x = tuple(p.module(*x))
    torch.testing.assert_close(x[0], model(*args))
    # Each stage holds only the parameters its operations read.
    assert sum(p.weights_bytes for p in parts) == sum(t.numel() * 4 for t in model.parameters())


def test_flops_count_matmuls_by_their_shapes(staged_models):
    module, _ = staged_models
    model, args = module.skipnet()
    program = torch.export.export(model, args)
    by_name = {n.name: node_flops(n) for n in program.module().graph.nodes if n.op == "call_function"}
    assert by_name["conv2d"] == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)  # 2 x outputs x (Cin x kh x kw)
    assert by_name["linear"] == 2 * (2 * 5) * 8 + 2 * 5  # and the bias
    assert by_name["relu"] == 2 * 8 * 8 * 8  # any other op: one per output element


def test_auto_is_two_stages_for_now():
    assert parse_stages("auto").count == 2 and parse_stages("at:a, b.c").at == ("a", "b.c")


@pytest.mark.parametrize(
    "stages, fragment",
    [
        ("0", "--stages 0: a model is cut into 2 to 64 stages"),
        ("1", "--stages 1: a model is cut into 2 to 64 stages"),
        ("two", "--stages 'two': expected auto, a number of stages or at:NAME[,NAME...]"),
        ("at:", "--stages at:: name the submodules to cut before"),
        ("at:nope", "hxc_staged_models.py:skipnet has no submodule 'nope' that runs in its exported graph"),
        ("at:blocks.2,blocks.1", "name the submodules in the order they run"),
        ("at:stem", "stem is where the model starts"),
        ("9", "hxc_staged_models.py:skipnet has 6 block(s) at its module boundaries; it can be cut into at most 6"),
    ],
)
def test_bad_stages_are_one_line_usage_errors(staged_models, cli, tmp_path, stages, fragment):
    _, path = staged_models
    result = cli("compile", f"{path}:skipnet", "-o", tmp_path / "b.hxc", "-t", "cpu:host", "--stages", stages)
    assert result.exit_code == ExitCode.USAGE, result.output
    # Progress lines aside (those that got that far loaded the model), one line says why.
    errors = [line for line in result.stderr.splitlines() if not line.endswith("…")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and fragment in errors[0], result.stderr
    assert not (tmp_path / "b.hxc").exists()


def test_stages_refuse_other_engines_before_any_work(staged_models, tmp_path):
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    _, path = staged_models
    with pytest.raises(UsageError, match="--stages builds IREE artifacts only; not onnxruntime"):
        build_bundle(f"{path}:skipnet", tmp_path / "b.hxc", "cpu:host", backends="iree,onnxruntime",
                     options=ImportOptions(stages="2"))  # fmt: skip
