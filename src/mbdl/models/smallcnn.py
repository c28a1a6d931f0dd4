"""Small 6-layer CNNs for 32x32 grey or colour images (glyphs, MNIST-style digits).

Six 3x3 convolutions (each followed by BatchNorm and ReLU), then global average pooling to a
128-d feature; any input size of at least 8x8 works. Two shapes (:data:`SMALL_CNNS`):

- ``smallcnn``: widths 16, 32, 64, 64, 128, 128, 2x2 max pooling after the first, second and
  fourth convolution (32 -> 16 -> 8 -> 4 pixels): about 0.29 M parameters and 8.5 M
  multiply-adds per 32x32 image.
- ``smallvgg``: VGG-style stages of two convolutions, widths 32-32, 64-64, 128-128, pooling after
  the first two stages (32 -> 16 -> 8 pixels): about 0.29 M parameters and 38 M multiply-adds per
  32x32 image (4.5x ``smallcnn``): more resolution in the deep layers, which fine glyph strokes
  reward (the default recipe; see docs/benchmarks.md, "default recipe").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

DEFAULT_WIDTHS = (16, 32, 64, 64, 128, 128)
DEFAULT_POOL_AFTER = (0, 1, 3)

#: backbone name -> (widths, positions of the convolutions followed by 2x2 max pooling)
SMALL_CNNS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "smallcnn": (DEFAULT_WIDTHS, DEFAULT_POOL_AFTER),
    "smallvgg": ((32, 32, 64, 64, 128, 128), (1, 3)),
}


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x 6 with max pooling, then global average pooling -> ``feature_dim``."""

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        pool_after: Sequence[int] = DEFAULT_POOL_AFTER,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for position, width in enumerate(widths):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if position in pool_after:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(images)), 1)
