"""PyTorch twins of the jaxbn models, written like the tutorial's classes (sizes made
parameters so tests can run small; the defaults are the tutorial's)."""

from __future__ import annotations

import torch
import torch.nn as nn


class NetWithoutBN(nn.Module):
    def __init__(self, in_features=784, hidden=(256, 128), num_classes=10):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x):
        return self.layers(x.flatten(1))


class NetWithBN(nn.Module):
    def __init__(self, in_features=784, hidden=(256, 128), num_classes=10):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden[0]),
            nn.BatchNorm1d(hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.BatchNorm1d(hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x):
        return self.layers(x.flatten(1))


class ConvNetWithBN(nn.Module):
    def __init__(
        self, num_classes=10, in_channels=3, image_size=32, widths=(64, 128, 256), hidden=512
    ):
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            # First conv block
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            # Second conv block
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            # Third conv block
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Linear(c3 * side * side, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Shortcut connection
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        identity = self.shortcut(x)
        out = self.conv1(x)
        out = self.bn1(out)
        out = torch.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out += identity
        out = torch.relu(out)
        return out


class ResNet(nn.Module):
    """CIFAR-style ResNet from the tutorial's ResidualBlock (ResNet-18 by default)."""

    def __init__(
        self, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes=10, in_channels=3
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        for stage, (blocks, width) in enumerate(zip(stage_sizes, widths, strict=True)):
            layers = []
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(ResidualBlock(channels, width, stride))
                channels = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.num_stages = len(stage_sizes)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))
