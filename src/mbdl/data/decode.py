"""Decoding image files for the fast data path: reduced-size JPEG decoding and GPU batches.

- :func:`jpeg_reduction`: the JPEG DCT scaling factor (1, 2, 4 or 8) that libjpeg can apply
  while decoding and still leave the shorter side at least ``min_side``; decoding at 1/2 of
  each side costs about 0.65-0.8 of a full decode (``benchmarks/jpeg_path.py``).
- :func:`read_image_reduced`: :func:`mbdl.data.files.read_image` (the one checked reader: a
  regular file, the header's pixel bound and mode, the decoding table) for images whose shorter
  side is below ``2 * min_side`` (the same image, bit for bit); for larger JPEGs the same checks,
  then PIL's ``draft`` (DCT scaling) before decoding. A reduced decode is not the full decode
  downsampled: after the same resize to ``min_side`` the two differ by a few grey levels (the
  tolerance is measured and stated in docs/benchmarks.md, ``jpeg_path``).
- :func:`decode_jpeg_batch`: the bytes of many JPEG files decoded in one call on a CUDA device
  (``torchvision.io.decode_jpeg(list, device="cuda")``, nvJPEG); files checked first by
  :func:`mbdl.data.files.inspect_image` when the caller has not (datasets check every file when
  they are built); the EXIF orientation is applied as on the CPU (:func:`orient`: torchvision's
  GPU decoder ignores it).

- :func:`read_array`: the same as a ``uint8`` array ``[H, W, C]``; JPEGs stored as colour or
  grey and read as colour (or grey as grey) that need no reduction are decoded by
  ``torchvision.io.decode_jpeg`` (libjpeg-turbo, the same pixels as PIL's decoder bit for bit,
  EXIF orientation applied the same way) after the same checks: it takes about two thirds of
  the CPU time of PIL's reader, whose mode conversions and EXIF handling cost extra
  (``benchmarks/jpeg_path.py``). Every other file goes through the reader, and so does a JPEG
  that torchvision's decoder refuses (truncated, corrupt): the reader refuses it with its own
  message, the one every other path gives.
"""

from __future__ import annotations

import functools
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from mbdl.data import files
from mbdl.errors import terminal_safe

#: libjpeg's DCT scaling factors that PIL's ``draft`` uses
JPEG_REDUCTIONS = (8, 4, 2, 1)


def jpeg_reduction(width: int, height: int, min_side: int) -> int:
    """The largest factor ``r`` in 1, 2, 4, 8 with ``ceil(min(width, height) / r) >= min_side``
    (libjpeg rounds scaled sizes up)."""
    short = min(width, height)
    for factor in JPEG_REDUCTIONS:
        if -(-short // factor) >= min_side:
            return factor
    return 1


def read_image_reduced(
    path: str | Path, mode: str = "RGB", min_side: int | None = None
) -> Image.Image:
    """``path`` decoded as ``mode``, its shorter side at least ``min_side`` (see the module
    docstring); :func:`mbdl.data.files.read_image` itself when no reduction applies. Raises
    :class:`mbdl.data.files.ImageReadError` naming the file, as ``read_image`` does."""
    if min_side is None:
        return files.read_image(path, mode)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise files.ImageReadError(
                f"cannot read image {terminal_safe(path)}: not a regular file"
            )
        with Image.open(path) as image:
            files.check_header(image)
            factor = jpeg_reduction(image.width, image.height, min_side)
            if image.format != "JPEG" or factor == 1:
                reduced = None
            else:
                size = (-(-image.width // factor), -(-image.height // factor))
                image.draft(image.mode, size)
                image.load()
                reduced = files.to_mode(image, mode)
    except FileNotFoundError:
        raise files.ImageReadError(f"image file not found: {terminal_safe(path)}") from None
    except files.PIL_ERRORS as error:
        if isinstance(error, files.ImageReadError):
            raise
        raise files.ImageReadError(
            f"cannot read image {terminal_safe(path)}: {files.read_error_reason(error, path)}"
        ) from None
    return files.read_image(path, mode) if reduced is None else reduced


@functools.cache
def _torchvision_decoder() -> tuple[Any, Any] | None:
    """``(decode_jpeg, ImageReadMode)`` of ``torchvision.io``, or None where it is missing
    (torchvision 0.29 deprecates its decoders in favour of TorchCodec: then PIL decodes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            return None

    def decode(data: Any, **options: Any) -> Any:
        with warnings.catch_warnings():  # torchvision warns at every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, **options)

    return decode, ImageReadMode


#: (mode stored in the JPEG, mode wanted) pairs that torchvision's decoder gives exactly as PIL
TORCHVISION_JPEG_MODES = {("RGB", "RGB"), ("L", "L"), ("L", "RGB")}


def read_array(path: str | Path, mode: str = "RGB", min_side: int | None = None) -> np.ndarray:
    """``uint8 [H, W, C]`` (``C`` 3 for ``"RGB"``, 1 for ``"L"``): the pixels
    :func:`read_image_reduced` gives, from ``torchvision.io.decode_jpeg`` where that is exact (see
    the module docstring). Raises :class:`mbdl.data.files.ImageReadError` naming the file."""
    import torch

    decoder = _torchvision_decoder()
    if decoder is not None:
        try:
            with files.open_image_file(path) as image:  # a regular file, not blocking
                files.check_header(image)
                reducible = min_side is not None and (
                    jpeg_reduction(image.width, image.height, min_side) > 1
                )
                # EXIF orientation tag (0x0112): torchvision applies it only when asked (a cost)
                rotated = image.getexif().get(0x0112, 1) != 1
                source = image.fp if isinstance(image, ImageFile.ImageFile) else None
                fast = (
                    image.format == "JPEG"
                    and not reducible
                    and (image.mode, mode) in TORCHVISION_JPEG_MODES
                    and source is not None
                )
                if fast and source is not None:
                    source.seek(0)  # the file checked, read once more from its start
                    data = torch.frombuffer(bytearray(source.read()), dtype=torch.uint8)
            if fast:
                decode_jpeg, modes = decoder
                wanted = modes.RGB if mode == "RGB" else modes.GRAY
                decoded = decode_jpeg(data, mode=wanted, apply_exif_orientation=rotated)
                return decoded.permute(1, 2, 0).numpy()
        except (RuntimeError, *files.PIL_ERRORS):
            pass  # the reader below refuses it in its own words: the message every path gives
    array = np.asarray(read_image_reduced(path, mode, min_side), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode_jpeg_batch(
    paths: Sequence[str | Path], device: str = "cuda", *, checked: bool = True
) -> list:
    """The JPEG files ``paths`` decoded on ``device`` in one call (``uint8 [3, H, W]`` tensors,
    RGB, EXIF orientation applied); ``checked=False`` runs :func:`mbdl.data.files.inspect_image`
    on each first and raises :class:`~mbdl.data.files.ImageReadError` naming the first bad one."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not checked:
        for path in paths:
            reason = files.inspect_image(path)
            if reason is not None:
                raise files.ImageReadError(f"cannot read image {terminal_safe(path)}: {reason}")
    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    if torch.device(device).type != "cuda":
        return list(decoded)
    # torchvision's GPU decoder ignores apply_exif_orientation: applied here, as on the CPU
    return [
        orient(image, exif_orientation(path)) for image, path in zip(decoded, paths, strict=True)
    ]


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation (tag 0x0112, 1 to 8) of the image file ``path``; 1 when it has none."""
    with Image.open(path) as image:
        value = image.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orient(image: Any, orientation: int) -> Any:
    """``[..., H, W]`` tensor shown as EXIF ``orientation`` asks: what PIL's
    ``ImageOps.exif_transpose`` does to the image (2 mirror, 3 half turn, 4 flip, 5 transpose,
    6 quarter turn clockwise, 7 transverse, 8 quarter turn anticlockwise)."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image
