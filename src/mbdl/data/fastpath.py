"""The evaluation transform by whole batches: image files to embeddings at the loader's speed.

:class:`EvaluationImages` does the image part of the evaluation transform
(:func:`mbdl.model.preprocessing.transform_from_spec`: colour mode, shorter side resized to
``resize``, centre crop ``crop``) in the loader and hands ``uint8 [C, crop, crop]`` tensors on;
:func:`normalise_batch` does the rest (``/ 255``, then ``(x - mean) / std``) on the whole batch on
the model's device, with the same floating-point operations in the same order as ``ToTensor`` +
``Normalize``, so the network sees the same tensors bit for bit. A batch of ``uint8`` crosses the
process boundary and the host-to-device copy at a quarter of the bytes of ``float32``, from
pinned memory with asynchronous copies on a GPU (:func:`model_input`, :func:`embed_images`).
``mbdl embed --images`` (:class:`mbdl.embedstore.FolderImages`) and ``mbdl index build/add``
(:mod:`mbdl.catalog.build`) read their image files through this class and :func:`model_input`.

``exact=False`` trades bit-identity for speed: JPEGs whose shorter side is at least twice
``resize`` are decoded with DCT scaling (:func:`mbdl.data.decode.read_image_reduced`), and the
resize is torch's ``uint8`` antialiased bilinear (:func:`resize_crop_uint8`, a fifth of PIL's
time on one core) instead of PIL's. Without DCT scaling the two resizes differ by at most one grey
level on about 0.1% of the values; with it by a few levels (docs/benchmarks.md, ``jpeg_path``,
states the measured tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mbdl.data.decode import read_array


def resize_crop_uint8(array: np.ndarray, resize: int, crop: int) -> Tensor:
    """``uint8 [H, W]`` or ``[H, W, C]`` -> ``uint8 [C, crop, crop]``: the shorter side resized to
    ``resize`` (torch's antialiased bilinear on ``uint8``, the output size torchvision's
    ``Resize(resize)`` computes), then the centre ``crop`` (torchvision's ``CenterCrop`` offsets)."""
    from torchvision.transforms.v2 import functional as F

    if array.ndim == 2:
        array = array[:, :, None]
    if not array.flags.writeable:  # a PIL image's buffer: torch wants a writable array
        array = array.copy()
    image = torch.from_numpy(array).permute(2, 0, 1)
    resized = F.resize(image, [resize], antialias=True)
    return F.center_crop(resized, [crop, crop]).contiguous()


class EvaluationImages(Dataset[tuple[Tensor, int]]):
    """``dataset[i] = (uint8 [C, crop, crop] of image i, label i)``: the evaluation transform of
    ``spec`` (``color_mode``, ``resize``, ``crop``; :func:`mbdl.model.preprocessing.preprocessing_spec`)
    before its ``ToTensor``."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        spec: dict[str, Any],
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        exact: bool = True,
    ) -> None:
        from torchvision import transforms as T

        from mbdl.data.transforms import interpolation_mode
        from mbdl.model.preprocessing import check_spec

        spec = check_spec(spec)
        self.paths = [str(p) for p in paths]
        self.labels = (
            np.zeros(len(self.paths), dtype=np.int64)
            if labels is None
            else np.asarray(labels, dtype=np.int64)
        )
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.mode = str(spec["color_mode"])
        self.resize, self.crop = int(spec["resize"]), int(spec["crop"])
        self.mean, self.std = list(spec["mean"]), list(spec["std"])
        name = str(spec.get("interpolation", "bilinear"))
        interpolation = interpolation_mode(name)
        self.exact = exact or name != "bilinear"  # the fast resize is bilinear only
        self.steps = T.Compose(
            [T.Resize(self.resize, interpolation=interpolation), T.CenterCrop(self.crop)]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Tensor:
        """The ``uint8 [C, crop, crop]`` tensor of item ``index``."""
        if not self.exact:
            array = read_array(self.paths[index], self.mode, self.resize)
            return resize_crop_uint8(array, self.resize, self.crop)
        decoded = read_array(self.paths[index], self.mode)  # PIL's pixels, bit for bit
        image = self.steps(Image.fromarray(decoded[:, :, 0] if self.mode == "L" else decoded))
        array = np.array(image, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def normalised(self, index: int) -> Tensor:
        """The ``float32 [C, crop, crop]`` tensor of item ``index``: with ``exact``, the tensor
        ``transform_from_spec(spec)(read_image(path))`` gives, bit for bit (a drop-in for
        per-item datasets; batches normalised on the device with :func:`normalise_batch` save
        the float copies between processes)."""
        return normalise_batch(self.image(index)[None], self.mean, self.std)[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.image(index), int(self.labels[index])

    def model_input(self, images: Tensor, device: str | torch.device) -> Tensor:
        """A batch of :meth:`image` tensors as the model's input on ``device``
        (:func:`model_input` with this dataset's ``mean`` and ``std``)."""
        return model_input(images, self.mean, self.std, device)

    def describe(self, index: int) -> str:
        return self.paths[index]


def normalise_batch(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``uint8 [B, C, H, W]`` -> ``float32``: ``ToTensor`` (``x / 255``) then ``Normalize``
    (``(x - mean) / std``), the same operations in the same order, on ``images.device``."""
    out = images.to(torch.float32).div(255)
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(list(mean), dtype=out.dtype, device=out.device).view(shape)
    std_t = torch.as_tensor(list(std), dtype=out.dtype, device=out.device).view(shape)
    return out.sub_(mean_t).div_(std_t)


def model_input(
    images: Tensor, mean: Sequence[float], std: Sequence[float], device: str | torch.device
) -> Tensor:
    """``uint8 [B, C, H, W]`` -> the model's ``float32`` input on ``device``: copied there
    (asynchronously from pinned memory on a GPU), :func:`normalise_batch` on the device, in
    channels-last memory format on a GPU."""
    device = torch.device(device)
    batch = normalise_batch(images.to(device, non_blocking=True), mean, std)
    if device.type == "cuda":
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def evaluation_loader(
    dataset: EvaluationImages, *, batch_size: int = 256, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Batches ``(uint8 [B, C, crop, crop], labels [B])`` of ``dataset`` in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def embed_images(
    model: nn.Module,
    dataset: EvaluationImages,
    spec: dict[str, Any],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 [N, d] embeddings, int64 [N] labels)`` of ``dataset`` in order: batches of
    ``uint8`` from ``workers`` loader processes, pinned and copied asynchronously to a CUDA
    ``device``, normalised there (:func:`normalise_batch`), channels-last on a GPU; the model in
    eval mode under ``inference_mode`` (its previous mode restored), under autocast to
    ``amp_dtype`` when given."""
    import contextlib

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    loader = evaluation_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=on_gpu)
    was_training = model.training
    model.eval()
    chunks: list[Tensor] = []
    try:
        autocast = (
            torch.autocast(device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            for images, _ in loader:
                batch = model_input(images, spec["mean"], spec["std"], device)
                chunks.append(model(batch).float().to("cpu", non_blocking=on_gpu))
            if on_gpu:
                torch.cuda.synchronize(device)
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks).numpy(), dataset.labels.copy()
