"""Real architectures, exported, decomposed, compiled for the CPU and checked against
PyTorch: transformers models built from configs, RNNs, reduced-precision models."""

from __future__ import annotations

import pytest
import torch

import hxc.runtime
from hxc.build import build_bundle
from hxc.dtypes import dtype

pytest.importorskip("transformers")

ZOO = ["bert", "gpt2", "llama", "t5_encoder", "vit", "whisper_encoder", "lstm", "gru", "cnn_f16", "mlp_bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_architecture_lowers_and_matches_pytorch(name, tmp_path):
    from hxc.examples import zoo

    result = build_bundle(f"hxc.examples.zoo:{name}", tmp_path / f"{name}.hxc", "cpu:host")
    assert result.written, [r.error for r in result.failed]
    model = hxc.runtime.load(tmp_path / f"{name}.hxc")

    eager, args = getattr(zoo, name)()
    fresh = tuple(torch.randint_like(a, 0, 1000) if not a.is_floating_point() else torch.randn_like(a) for a in args)
    with torch.no_grad():
        want = eager(*fresh)
    got = model(*fresh)
    atol, rtol = dtype(result.manifest.signature.outputs[0].dtype).tolerance
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
