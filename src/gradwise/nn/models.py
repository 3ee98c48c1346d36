"""MLP, 1-D CNN (MNIST-1D reference family) and a GPT-style character transformer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.config import ModelConfig
from gradwise.errors import ConfigError
from gradwise.nn.blocks import BlockStack, HighwayGate, ResidualBlock, combine
from gradwise.nn.dropconnect import DropConnectLinear
from gradwise.nn.init import apply_init

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def norm_layer(kind: str, features: int, conv: bool = False) -> nn.Module:
    """BatchNorm1d or LayerNorm over `features` (for conv maps, LayerNorm is GroupNorm with one group)."""
    if kind == "batch":
        return nn.BatchNorm1d(features)
    if kind == "layer":
        return nn.GroupNorm(1, features) if conv else nn.LayerNorm(features)
    return nn.Identity()


def dropout_layers(p: float) -> list[nn.Module]:
    """[nn.Dropout(p)], or nothing when p is 0 (so a model without dropout has no extra modules)."""
    return [nn.Dropout(p)] if p > 0 else []


def hidden_layer(in_features: int, out_features: int, activation: str, norm: str = "none", dropout: float = 0.0,
                 dropconnect: float = 0.0, dropconnect_inference: str = "mean", dropconnect_samples: int = 32
                 ) -> list[nn.Module]:
    """Linear -> norm -> act -> dropout, with a DropConnect linear (owning its activation when no norm
    intervenes, as moment matching needs) when `dropconnect` > 0."""
    act = ACTIVATIONS[activation]
    norms = [norm_layer(norm, out_features)] if norm != "none" else []
    if dropconnect > 0 and not norms:
        layers = [DropConnectLinear(in_features, out_features, dropconnect, act(), dropconnect_inference,
                                    dropconnect_samples)]
    elif dropconnect > 0:
        layers = [DropConnectLinear(in_features, out_features, dropconnect), *norms, act()]
    else:
        layers = [nn.Linear(in_features, out_features), *norms, act()]
    return layers + dropout_layers(dropout)


class MLP(nn.Module):
    """Flatten -> Linear(in, width) -> act -> (depth-1) blocks -> Linear(width, classes).

    A block's branch is Linear(width, width) -> norm -> act -> dropout, combined
    with its input as `residual` says (none, residual, rezero, highway; see
    blocks.py). With `dropconnect` > 0 the hidden linears (stem and blocks) are
    DropConnect layers.
    """

    def __init__(self, in_features: int, num_classes: int, depth: int = 2, width: int = 256, activation: str = "relu",
                 residual: str = "none", norm: str = "none", highway_bias: float = -2.0, dropout: float = 0.0,
                 dropconnect: float = 0.0, dropconnect_inference: str = "mean", dropconnect_samples: int = 32):
        super().__init__()
        regularisers = dict(dropout=dropout, dropconnect=dropconnect, dropconnect_inference=dropconnect_inference,
                            dropconnect_samples=dropconnect_samples)
        self.stem = nn.Sequential(nn.Flatten(), *hidden_layer(in_features, width, activation, **regularisers))
        self.blocks = BlockStack(
            ResidualBlock(nn.Sequential(*hidden_layer(width, width, activation, norm, **regularisers)), residual,
                          gate_features=width, highway_bias=highway_bias)
            for _ in range(depth - 1)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def conv_out_length(length: int, kernel: int, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN1D(nn.Module):
    """Stride-2 Conv1d -> norm -> act (-> dropout) blocks, then a linear head on the flattened features.

    With channels=[25, 25, 25] and kernel_sizes=[5, 3, 3] this is the MNIST-1D
    paper's reference CNN (Greydanus 2020). With a residual variant, convs pad
    by kernel//2 and the shortcut is a stride-2 1x1 conv (ResNet's projection).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: list[int], kernel_sizes: list[int],
                 activation: str = "relu", residual: str = "none", norm: str = "none", highway_bias: float = -2.0,
                 dropout: float = 0.0):
        super().__init__()
        in_channels, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
        act = ACTIVATIONS[activation]
        blocks = []
        for out_channels, kernel in zip(channels, kernel_sizes):
            padding = 1 if residual == "none" else kernel // 2
            new_length = conv_out_length(length, kernel, padding=padding)
            if new_length < 1:
                raise ConfigError(
                    f"config error: model.kernel_sizes={kernel_sizes} shrink an input of length "
                    f"{input_shape[-1]} to nothing; use fewer or smaller kernels"
                )
            branch = nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel, stride=2, padding=padding),
                                   norm_layer(norm, out_channels, conv=True), act(), *dropout_layers(dropout))
            shortcut = None if residual == "none" else nn.Conv1d(in_channels, out_channels, 1, stride=2)
            blocks.append(ResidualBlock(branch, residual, shortcut, gate_features=out_channels,
                                        highway_bias=highway_bias, channel_dim=1))
            in_channels, length = out_channels, new_length
        self.in_channels = 1 if len(input_shape) == 1 else input_shape[0]
        self.blocks = BlockStack(blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * length, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x.view(x.shape[0], self.in_channels, x.shape[-1])))


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the built-in attention computes in: fp32 on CPU (for bf16/fp16 activations too), else `x`'s.

    torch's CPU flash-attention backward is 2-3x slower in bf16 than in fp32 on this machine (AVX-512 BF16,
    no AMX; profile in docs/benchmarks.md), and one cast of the q/k/v projection costs little: fp32 is both
    faster and more exact there.
    """
    return torch.float32 if x.device.type == "cpu" else x.dtype


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x)
        dtype = attention_dtype(qkv)
        q, k, v = qkv.to(dtype).split(c, dim=2)  # one contiguous cast, before the heads' strided views
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        with torch.autocast(x.device.type, enabled=dtype == qkv.dtype and torch.is_autocast_enabled(x.device.type)):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.to(qkv.dtype).transpose(1, 2).reshape(b, t, c)))


class TransformerBlock(nn.Module):
    """Attention then MLP sublayers, each combined with its input as `residual` says.

    norm_position=pre: x -> combine(x, F(LN(x))) (GPT-2); post: x -> LN(combine(x, F(x))) (the original
    Transformer). ReZero shares one alpha between the two sublayers and uses no LayerNorm.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float, activation: str = "gelu",
                 residual: str = "residual", norm: str = "layer", norm_position: str = "pre",
                 highway_bias: float = -2.0, dropconnect: float = 0.0, dropconnect_inference: str = "mean",
                 dropconnect_samples: int = 32):
        super().__init__()
        self.residual = residual
        pre, post = (norm, "none") if norm_position == "pre" else ("none", norm)
        self.ln1, self.ln2 = norm_layer(pre, d_model), norm_layer(pre, d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.mlp = nn.Sequential(
            *hidden_layer(d_model, 4 * d_model, activation, dropconnect=dropconnect,
                          dropconnect_inference=dropconnect_inference, dropconnect_samples=dropconnect_samples),
            nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.post1, self.post2 = norm_layer(post, d_model), norm_layer(post, d_model)
        if residual == "rezero":
            self.alpha = nn.Parameter(torch.zeros(()))
        if residual == "highway":
            self.gate1 = HighwayGate(d_model, highway_bias)
            self.gate2 = HighwayGate(d_model, highway_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = getattr(self, "alpha", None)
        x = self.post1(combine(self.residual, x, self.attn(self.ln1(x)), alpha, getattr(self, "gate1", None)))
        return self.post2(combine(self.residual, x, self.mlp(self.ln2(x)), alpha, getattr(self, "gate2", None)))


class CharTransformer(nn.Module):
    """GPT-style decoder over characters: token + position embeddings, pre-LN blocks, final LN, linear head."""

    def __init__(
        self, vocab_size: int, context: int, n_layer: int = 4, d_model: int = 128, n_head: int = 4,
        dropout: float = 0.0, activation: str = "gelu", residual: str = "residual", norm: str = "layer",
        norm_position: str = "pre", highway_bias: float = -2.0, dropconnect: float = 0.0,
        dropconnect_inference: str = "mean", dropconnect_samples: int = 32,
    ):
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = BlockStack(
            TransformerBlock(d_model, n_head, dropout, activation, residual, norm, norm_position, highway_bias,
                             dropconnect, dropconnect_inference, dropconnect_samples)
            for _ in range(n_layer)
        )
        self.ln_f = norm_layer(norm if norm_position == "pre" else "none", d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, HighwayGate):
            return  # keeps its negative bias
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context of {self.context}")
        pos = torch.arange(t, device=idx.device)
        h = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        return self.head(self.ln_f(self.blocks(h)))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, task: str) -> nn.Module:
    """Build `cfg.name` for data with the given sample shape and classes (or vocabulary)."""
    if task == "language_model" and cfg.name != "transformer":
        raise ConfigError(f"config error: model.name={cfg.name} cannot model text; use model.name=transformer")
    if task != "language_model" and cfg.name == "transformer":
        raise ConfigError("config error: model.name=transformer needs data.name=text (a character corpus)")
    common = dict(residual=cfg.block_residual, norm=cfg.block_norm, highway_bias=cfg.highway_bias, dropout=cfg.dropout)
    dropconnect = dict(dropconnect=cfg.dropconnect, dropconnect_inference=cfg.dropconnect_inference,
                       dropconnect_samples=cfg.dropconnect_samples)
    if cfg.name == "mlp":
        model = MLP(math.prod(input_shape), num_classes, cfg.depth, cfg.width, cfg.activation, **common, **dropconnect)
    elif cfg.name == "cnn":
        if len(input_shape) not in (1, 2):
            raise ConfigError(
                f"config error: model.name=cnn needs samples shaped (length,) or (channels, length), got {input_shape}"
            )
        model = CNN1D(input_shape, num_classes, cfg.channels, cfg.kernel_sizes, cfg.activation, **common)
    else:
        model = CharTransformer(num_classes, cfg.context, cfg.n_layer, cfg.d_model, cfg.n_head,
                                activation=cfg.activation, norm_position=cfg.norm_position, **common, **dropconnect)
    apply_init(model, cfg.init)
    return model
