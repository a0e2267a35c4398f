"""Real architectures with random weights, for tests and benchmarks:
`hxc compile hxc.examples.zoo:bert`.

Transformer models come from `transformers` configs (install it with
`pip install transformers`); sizes here are small so the test suite stays fast.
`*_base` variants are the real sizes, for benchmarks.
"""

from __future__ import annotations

import torch
from torch import nn

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


class _FirstOutput(nn.Module):
    """A transformers model returning only its main tensor (last hidden state)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        # No KV cache: its objects are not tensors, and inference here is one pass.
        extra = {"use_cache": False} if getattr(self.model.config, "use_cache", None) is not None else {}
        return self.model(*args, return_dict=False, **extra)[0]


def _hf(model: nn.Module, *inputs: torch.Tensor) -> Example:
    return _FirstOutput(model.eval()), inputs


def _ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def bert(layers: int = 2, hidden: int = 64, seq: int = 32, batch: int = 1) -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=4 * hidden, max_position_embeddings=512)  # fmt: skip
    return _hf(T.BertModel(cfg), _ids(batch, seq, 1000))


def bert_base() -> Example:
    """BERT-base sized encoder (12 layers, 768 hidden), sequence 128."""
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.BertModel(T.BertConfig()), _ids(1, 128, 30522))


def gpt2(layers: int = 2, hidden: int = 64, seq: int = 32) -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=1000, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    return _hf(T.GPT2Model(cfg), _ids(1, seq, 1000))


def gpt2_small() -> Example:
    """GPT-2 small sized decoder (12 layers, 768 hidden), sequence 128."""
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.GPT2Model(T.GPT2Config()), _ids(1, 128, 50257))


def llama() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)  # fmt: skip
    return _hf(T.LlamaModel(cfg), _ids(1, 32, 1000))


def t5_encoder() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.T5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    return _hf(T.T5EncoderModel(cfg), _ids(1, 32, 1000))


def vit() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=32, patch_size=8)  # fmt: skip
    return _hf(T.ViTModel(cfg), torch.randn(1, 3, 32, 32))


def whisper_encoder() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                          max_source_positions=100)  # fmt: skip
    return _hf(T.WhisperModel(cfg).get_encoder(), torch.randn(1, 80, 200))


class _Recurrent(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, state = self.rnn(x)
        return (out, *state) if isinstance(state, tuple) else (out, state)


def lstm() -> Example:
    torch.manual_seed(0)
    return _Recurrent(nn.LSTM(16, 32, num_layers=2, batch_first=True)).eval(), (torch.randn(2, 7, 16),)


def gru() -> Example:
    torch.manual_seed(0)
    return _Recurrent(nn.GRU(16, 32, batch_first=True)).eval(), (torch.randn(2, 7, 16),)


def resnet18(batch: int = 1) -> Example:
    """ResNet-18 (torchvision's layout, written out so torchvision is not needed)."""
    torch.manual_seed(0)
    model = _ResNet18().eval()
    from hxc.examples import _randomize_norms

    _randomize_norms(model)
    return model, (torch.randn(batch, 3, 224, 224),)


def resnet18_b8() -> Example:
    return resnet18(batch=8)


def mlp_large() -> Example:
    """4 layers of 512 (IREE_NOTES' MLP), batch 8."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers).eval(), (torch.randn(8, 512),)


def cnn_f16() -> Example:
    from hxc.examples import convnet

    model, (x,) = convnet()
    return model.half(), (x.half(),)


def mlp_bf16() -> Example:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)).eval().to(torch.bfloat16)
    return model, (torch.randn(4, 64).to(torch.bfloat16),)


# --- more families, for the coverage benchmark (benchmarks/model_coverage.py) ---------


def resnet18_64() -> Example:
    """ResNet-18 on a 64x64 image: the architecture at a size lavapipe runs quickly."""
    model, (x,) = resnet18()
    return model, (x[:, :, :64, :64].contiguous(),)


def mobilenet() -> Example:
    """MobileNetV2-style inverted residuals: depthwise 3x3, ReLU6, batch norm."""
    torch.manual_seed(0)

    def inverted(cin: int, cout: int, stride: int) -> nn.Module:
        mid = cin * 4
        return nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        inverted(16, 24, 2), inverted(24, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    from hxc.examples import _randomize_norms

    _randomize_norms(model)
    return model, (torch.randn(1, 3, 64, 64),)


class _UNet(nn.Module):
    """A diffusion-style UNet block: group norm, SiLU, downsample, nearest upsample, skip."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(4, 32, 3, padding=1)
        self.down = nn.Sequential(nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1))
        self.mid = nn.Sequential(nn.GroupNorm(8, 64), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1))
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(64, 32, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(8, 64), nn.SiLU(), nn.Conv2d(64, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        u = self.up(self.mid(self.down(h)))
        return self.out(torch.cat([h, u], dim=1))


def unet() -> Example:
    torch.manual_seed(0)
    return _UNet().eval(), (torch.randn(1, 4, 32, 32),)


def torch_transformer() -> Example:
    """PyTorch's own nn.TransformerEncoder (fused multi-head attention), with a padding mask."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            return self.enc(x, src_key_padding_mask=pad)

    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 12:] = True
    return Encoder().eval(), (torch.randn(2, 16, 64), pad)


# --- dynamic shapes: checked at several sizes (benchmarks/model_coverage.py) ---------


def _dynamic(model: nn.Module, args: tuple[torch.Tensor, ...], dims: tuple) -> torch.export.ExportedProgram:
    """`model` exported on `args`, with `dims` as torch.export's dynamic_shapes."""
    with torch.no_grad():
        return torch.export.export(model.eval(), args, dynamic_shapes=dims)


class _PreNormEncoder(nn.Module):
    """Issue 33's model: a pre-norm nn.TransformerEncoder with a learned position table
    sliced to the input's length."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.pos = nn.Parameter(torch.randn(1, 512, 64) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x + self.pos[:, : x.shape[1]])


def prenorm_encoder() -> torch.export.ExportedProgram:
    """Batch 2, dynamic sequence length (2..512). On Vulkan its LayerNorm is fused with
    the transpose nn.MultiheadAttention applies, which IREE 3.13 distributed wrongly
    (Inf from length 8 on lavapipe) until hxc serialised such dispatches."""
    torch.manual_seed(0)
    return _dynamic(_PreNormEncoder(), (torch.randn(2, 16, 64),), ({1: torch.export.Dim("seq", min=2, max=512)},))


class _AttentionPool(nn.Module):
    """A sequence classifier that reduces over the sequence, not the last dimension: the
    features are centred over it and pooled by a softmax over it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.score, self.head = nn.Linear(32, 32), nn.Linear(32, 1), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        h = h - h.mean(1, keepdim=True)
        w = torch.softmax(self.score(h), dim=1)
        return self.head((w * h).sum(1))


def attention_pool() -> torch.export.ExportedProgram:
    """Batch 2, dynamic sequence length (2..4096)."""
    torch.manual_seed(0)
    return _dynamic(_AttentionPool(), (torch.randn(2, 16, 32),), ({1: torch.export.Dim("seq", min=2, max=4096)},))


def bert_dynamic() -> torch.export.ExportedProgram:
    """The zoo's BERT at batch 2 with a dynamic sequence length (2..512)."""
    model, _ = bert(batch=2)
    # _FirstOutput takes *args: their shapes nest one level deeper.
    return _dynamic(model, (_ids(2, 16, 1000),), (({1: torch.export.Dim("seq", min=2, max=512)},),))


class _Recommender(nn.Module):
    """DLRM-style: embedding bags over integer ids, a bottom MLP, pairwise dot interactions."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(100, 16, mode="sum") for _ in range(3))
        self.bottom = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(16 + 6, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        feats = [self.bottom(dense)] + [t(ids[:, i]) for i, t in enumerate(self.tables)]
        z = torch.stack(feats, dim=1)
        dots = torch.bmm(z, z.transpose(1, 2))
        i, j = torch.triu_indices(4, 4, offset=1)
        return torch.sigmoid(self.top(torch.cat([feats[0], dots[:, i, j]], dim=1)))


def recommender() -> Example:
    torch.manual_seed(0)
    return _Recommender().eval(), (torch.randn(4, 8), torch.randint(0, 100, (4, 3, 5)))


def convnext() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32)
    return _hf(T.ConvNextModel(cfg), torch.randn(1, 3, 32, 32))


def swin() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    return _hf(T.SwinModel(cfg), torch.randn(1, 3, 32, 32))


def clip_text() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    return _hf(T.CLIPTextModel(cfg), _ids(1, 16, 1000))


def wav2vec2() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=4)  # fmt: skip
    return _hf(T.Wav2Vec2Model(cfg), torch.randn(1, 1600))


def bloom() -> Example:
    """ALiBi attention (slopes from the head count), no position embeddings."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BloomConfig(vocab_size=1000, hidden_size=64, n_layer=2, n_head=4)
    return _hf(T.BloomModel(cfg), _ids(1, 16, 1000))


def deberta() -> Example:
    """Disentangled attention with log-bucketed relative positions."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.DebertaV2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=128, relative_attention=True,
                            position_buckets=16, pos_att_type=["p2c", "c2p"])  # fmt: skip
    return _hf(T.DebertaV2Model(cfg), _ids(1, 16, 1000))


def segformer() -> Example:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])  # fmt: skip
    return _hf(T.SegformerModel(cfg), torch.randn(1, 3, 32, 32))


def mamba() -> Example:
    """A selective state-space model (Mamba), without the CUDA kernels: the sequential scan."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MambaConfig(vocab_size=1000, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
    return _hf(T.MambaModel(cfg), _ids(1, 16, 1000))


def qwen2() -> Example:
    """Grouped-query attention with a sliding window and biased QKV projections."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return _hf(T.Qwen2Model(cfg), _ids(1, 16, 1000))


class _TokenShift(nn.Module):
    """Mixing by shifting (RWKV's token shift, Swin's shifted windows): torch.roll along
    the features, and along the batch and features at once."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.roll(x, 3, -1) + torch.roll(x, (1, -5), (0, 1)))


def roll() -> Example:
    torch.manual_seed(0)
    return _TokenShift().eval(), (torch.randn(2, 128),)


class _DecoderBlock(nn.Module):
    """A pre-norm decoder block on scaled_dot_product_attention with an additive mask
    built in forward, in the input's dtype, from a causal mask and a 0/1 attention mask
    (as transformers builds it)."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        lowest = torch.finfo(x.dtype).min
        causal = torch.full((s, s), lowest, dtype=x.dtype, device=x.device).triu(1)
        mask = causal.masked_fill(attention_mask[:, None, None, :] == 0, lowest)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.ln2(x))


def bf16_decoder_block() -> Example:
    """_DecoderBlock in bfloat16; the last 4 of 16 positions of the second sequence are padding."""
    torch.manual_seed(0)
    attention_mask = torch.ones(2, 16, dtype=torch.int64)
    attention_mask[1, 12:] = 0
    return _DecoderBlock().eval().to(torch.bfloat16), (torch.randn(2, 16, 64).to(torch.bfloat16), attention_mask)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.down(x))


class _ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))
