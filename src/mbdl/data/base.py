"""The dataset contract every data source implements, and the class-disjoint splits it yields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """Images with integer labels ``0..C-1``; ``dataset[i] -> (transform(image), label)``.

    Subclasses set ``labels`` (``int64`` array), ``class_names`` (indexed by label) and implement
    :meth:`load_image` (the untransformed PIL image) and :meth:`describe` (a path or readable name).
    """

    labels: np.ndarray
    class_names: list[str]
    transform: Callable[[Image.Image], Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.load_image(index)
        if self.transform is None:
            raise RuntimeError(
                f"{type(self).__name__} has no transform set; see mbdl.data.build_transforms"
            )
        return self.transform(image), int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError


@dataclass
class Splits:
    """Class-disjoint splits of one source: train, validation (carved from the training classes),
    test (the literature's test classes), and for In-Shop style sources a query and a gallery."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    channels: int
    image_size: int
    source: str
    query: ImageDataset | None = None
    gallery: ImageDataset | None = None
    info: dict[str, Any] | None = None


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
