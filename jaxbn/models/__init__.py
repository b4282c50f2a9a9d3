"""The tutorial's networks as Flax modules with an explicit ``train`` flag, a norm choice (a
string or a module factory) and Flax's ``dtype``/``param_dtype``."""

from jaxbn.models.convnet import ConvNet
from jaxbn.models.mlp import MLP
from jaxbn.models.norms import NORM_KINDS, NormalizedModel, NormFactory, NormKind
from jaxbn.models.resnet import ResidualBlock, ResNet, resnet18

__all__ = [
    "MLP",
    "NORM_KINDS",
    "ConvNet",
    "NormFactory",
    "NormKind",
    "NormalizedModel",
    "ResNet",
    "ResidualBlock",
    "resnet18",
]
