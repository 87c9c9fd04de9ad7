"""One image file or blob -> a uint8 tensor [C, H, W], prepared the way diffusers' training
scripts prepare images.

- Channels: an image's *native* channel count is 1 for the grey modes (``1``, ``L``, ``LA``,
  ``I``, ``I;16*``, ``F``) and 3 for every colour mode (``RGB``, ``RGBA``, ``P``, ``CMYK``,
  ``YCbCr``, ...). Alpha is dropped, palettes are expanded, 16-bit grey is scaled from 0..65535.
- Size: with ``center_crop`` the image is resized (bicubic) so that it covers the target, i.e.
  its shorter side becomes the resolution, then cropped at the centre; without it, a plain
  bicubic resize to (H, W). An image already at the target size is left alone.
- EXIF orientation is applied first, as ``ImageOps.exif_transpose`` does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 degrees: width and height swap


def native_channels(mode: str) -> int:
    """1 for a grey PIL mode, 3 for a colour one."""
    return 1 if mode in GREY_MODES or mode.startswith("I;16") else 3


def unreadable_reason(exc: BaseException) -> str:
    """A short reason for a file PIL cannot read (without the path PIL puts in some messages)."""
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def read_header(source, verify: bool) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height) after EXIF orientation) from the header only; with ``verify``
    also PIL's ``verify()`` (chunk checksums for PNG; no pixel decoding). Raises what PIL raises."""
    with Image.open(source) as image:
        mode, (width, height) = image.mode, image.size
        orientation = _orientation(image.info.get("exif"))  # raw EXIF bytes PIL read with the header
        if verify:
            image.verify()
    return mode, ((height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height))


def _orientation(exif_bytes) -> int | None:
    if not exif_bytes:
        return None
    exif = Image.Exif()
    exif.load(exif_bytes)
    return exif.get(_EXIF_ORIENTATION)


def decode(source, channels: int, size: tuple[int, int], center_crop: bool) -> torch.Tensor:
    """The image at ``source`` (a path or a file object) as uint8 [channels, H, W] at ``size``
    = (H, W). Raises what PIL raises for an unreadable or truncated image."""
    with Image.open(source) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        image = resize_and_crop(to_channels(image, channels), size, center_crop)
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """``L`` (channels 1) or ``RGB`` (channels 3)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.round(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(grey)
    elif image.mode == "P":
        image = image.convert("RGBA")  # honours palette transparency before alpha is dropped
    return image.convert("L" if channels == 1 else "RGB")


def resize_and_crop(image: Image.Image, size: tuple[int, int], center_crop: bool) -> Image.Image:
    """Resize to ``size`` = (H, W): cover + centre crop, or a plain resize (bicubic)."""
    height, width = size
    if image.size == (width, height):
        return image
    if not center_crop:
        return image.resize((width, height), Image.BICUBIC)
    scale = max(width / image.width, height / image.height)
    new_width = max(width, round(image.width * scale))
    new_height = max(height, round(image.height * scale))
    image = image.resize((new_width, new_height), Image.BICUBIC)
    left = int(round((new_width - width) / 2.0))
    top = int(round((new_height - height) / 2.0))
    return image.crop((left, top, left + width, top + height))
