"""Turning arbitrary image files into 8-bit RGB arrays and HR training crops.

Anything that cannot become a usable image raises ``RejectedImage`` with a reason that the
synthesis job writes to its quarantine table.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps


class RejectedImage(Exception):
    """The file cannot be used; ``str(error)`` is the quarantine reason."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the given parts, the same on every machine and Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def decode_rgb(data: bytes, max_pixels: int, min_side: int) -> np.ndarray:
    """Image file bytes -> uint8 (H, W, 3) RGB with EXIF orientation applied."""
    if not data:
        raise RejectedImage("empty file")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit replaces Pillow's DecompressionBomb warning/error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise RejectedImage(f"too many pixels: {width}x{height} exceeds max_pixels {max_pixels}")
            if min(width, height) < min_side:
                raise RejectedImage(f"too small: {width}x{height}, shorter side below min_side {min_side}")
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb8(image, data)
    except RejectedImage:
        raise
    except Image.DecompressionBombError as error:
        raise RejectedImage(f"too many pixels: {error}") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as error:
        message = str(error) or type(error).__name__
        if "truncated" in message:
            raise RejectedImage(f"truncated image: {message}") from None
        raise RejectedImage(f"not a decodable image: {message}") from None
    return rgb


def _to_rgb8(image: Image.Image, data: bytes) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grey: scale the full range into 8 bits.
        grey = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or grey.max() > 255 else 255.0
        grey8 = np.clip(np.rint(grey / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        grey8 = np.clip(np.rint(grey * 255.0 if grey.max() <= 1.0 else grey), 0, 255).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    if mode in ("RGB;16", "RGBA;16") or image.format == "TIFF" and _is_16bit_colour(image):
        return _decode_16bit_colour(data, image)
    if mode in ("P", "PA", "LA", "RGBA", "La"):
        # Transparent pixels have no defined colour: composite on white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _is_16bit_colour(image: Image.Image) -> bool:
    bits = image.tag_v2.get(258) if hasattr(image, "tag_v2") else None
    return isinstance(bits, tuple) and len(bits) >= 3 and bits[0] == 16


def _decode_16bit_colour(data: bytes, image: Image.Image) -> np.ndarray:
    # Pillow has no 48-bit RGB mode; OpenCV decodes it (BGR order, orientation not applied).
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if array is None or array.ndim != 3:
        raise RejectedImage("not a decodable image: 16-bit colour data could not be read")
    rgb = array[..., 2::-1] if array.shape[2] >= 3 else array
    return np.clip(np.rint(rgb.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad bottom/right so both sides are at least ``size`` (as the authors pad)."""
    pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if not pad_h and not pad_w:
        return image
    # numpy's reflect is OpenCV's BORDER_REFLECT_101 and, unlike it, repeats for pads wider than the image.
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")


def random_crops(image: np.ndarray, count: int, size: int, seed: int) -> list[tuple[int, int, np.ndarray]]:
    """``count`` crops of ``size`` at positions drawn from ``seed``: (x, y, crop) each.

    Sides shorter than ``size`` are reflect-padded first; (x, y) index the padded image, whose
    top-left part is the original.
    """
    padded = pad_to(image, size)
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        y = int(rng.integers(0, padded.shape[0] - size + 1))
        x = int(rng.integers(0, padded.shape[1] - size + 1))
        crops.append((x, y, np.ascontiguousarray(padded[y:y + size, x:x + size])))
    return crops


def degraded_centre_crop(photo: np.ndarray, side: int, degradation, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR): the largest centred square of ``photo`` up to ``side`` pixels (a multiple of 64, so
    that every scale and tiling divides it) and its degradation under ``degradation`` (a
    ``DegradationConfig``) drawn from ``seed``: one fixed LR for a whole photograph."""
    from degradations import Degrader, sample  # torch: only the callers that degrade pay for it

    crop = min(side, *photo.shape[:2]) // 64 * 64
    if crop < 64:
        raise ValueError(f"a photograph of {photo.shape[1]}x{photo.shape[0]} has no 64x64 centre square")
    top, left = (photo.shape[0] - crop) // 2, (photo.shape[1] - crop) // 2
    hr = np.ascontiguousarray(photo[top:top + crop, left:left + crop])
    lr = Degrader(degradation.primitives, degradation.device).apply(hr[None], [sample(seed, degradation)])[0]
    return lr, hr


def encode_png(image: np.ndarray, compression: int) -> bytes:
    """uint8 RGB -> PNG bytes (deterministic for a given OpenCV build and compression level).

    Paeth-filtered rows with zlib's run-length strategy: on photographs that is both faster and
    smaller than zlib's default strategy at any level, because LZ77 matches are rare in
    natural images (256x256 crops, measured here: 4.3 ms / 107 kB against 5.5 ms / 113 kB at
    level 1 and 14 ms / 108 kB at level 6). With this strategy levels 1-9 write the same
    bytes; level 0 stores the rows uncompressed (1.5 ms / 197 kB).
    """
    ok, encoded = cv2.imencode(".png", image[..., ::-1], [
        cv2.IMWRITE_PNG_COMPRESSION, compression, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH,
        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes written by ``encode_png`` -> uint8 RGB."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if array is None:
        raise ValueError("not a PNG image")
    return np.ascontiguousarray(array[..., ::-1])
