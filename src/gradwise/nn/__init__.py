"""Built-in models. Each is stem -> blocks -> head, with `blocks` an `nn.ModuleList`
of shape-preserving-or-not units that later features (residual variants,
activation checkpointing) wrap one at a time."""

from gradwise.nn.blocks import ResidualBlock, combine
from gradwise.nn.models import CNN1D, MLP, CharTransformer, build_model

__all__ = ["MLP", "CNN1D", "CharTransformer", "ResidualBlock", "build_model", "combine"]
