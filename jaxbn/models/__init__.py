"""The tutorial's networks as Flax modules with an explicit ``train`` flag and a norm choice."""

from jaxbn.models.convnet import ConvNet
from jaxbn.models.mlp import MLP
from jaxbn.models.norms import NORM_KINDS, NormKind
from jaxbn.models.resnet import ResidualBlock, ResNet, resnet18

__all__ = ["MLP", "NORM_KINDS", "ConvNet", "NormKind", "ResNet", "ResidualBlock", "resnet18"]
