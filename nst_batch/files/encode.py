"""Encoding images: the optimiser's tensors in, the bytes of output files and thumbnails out.

Outputs carry the sRGB profile and what their photo's EXIF keeps (`output_exif`, from the PhotoMeta read
at decoding); a 16-bit PNG is made from the floats themselves (`png16`), never through 8 bits.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from ..config.manifest import Settings
from .decode import PhotoMeta, _srgb, srgb_profile
from .layout import write_atomic

THUMB_PX = 240  # a thumbnail's long side: enough to judge a result on a report's card


def output_exif(meta: PhotoMeta | None, size: tuple[int, int], keep_gps: bool) -> bytes | None:
    """The EXIF an output carries: its photo's capture date, camera and (with keep_gps) GPS position,
    Orientation 1 (outputs are upright: load_rgb applied the photo's orientation) and the output's own
    dimensions. None when the photo had none of these to keep."""
    if meta is None or not (meta.taken or meta.make or meta.model or (keep_gps and meta.gps)):
        return None
    B = ExifTags.Base
    exif = Image.Exif()
    for tag, v in ((B.Make, meta.make), (B.Model, meta.model)):
        if v:
            exif[tag] = v
    exif[B.Orientation] = 1
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[B.ExifVersion] = b"0232"
    for tag, v in ((B.DateTimeOriginal, meta.taken), (B.OffsetTimeOriginal, meta.offset)):
        if v:
            sub[tag] = v
    sub[B.ExifImageWidth], sub[B.ExifImageHeight] = size  # PixelXDimension, PixelYDimension
    if keep_gps and meta.gps:
        exif.get_ifd(ExifTags.IFD.GPSInfo).update(dict(meta.gps))
    return exif.tobytes()


# -- encoding --------------------------------------------------------------------------------------

def encode_to(im: Image.Image, f, fmt: str, quality: int = 95, exif: bytes | None = None) -> None:
    """Write the sRGB image `im` to the open binary file `f` as PNG or JPEG (fmt 'png' or 'jpg'), with
    the sRGB profile (PNG iCCP, JPEG APP2) and `exif` (output_exif) when given."""
    extra = {"icc_profile": srgb_profile(), **({"exif": exif} if exif else {})}
    if fmt == "jpg":
        im.save(f, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **extra)
    else:
        im.save(f, "PNG", **extra)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(a: np.ndarray, exif: bytes | None = None) -> bytes:
    """An (H, W, 3) uint16 array as a 16-bit RGB PNG file with the sRGB profile (iCCP) and `exif` (eXIf).

    Pillow holds RGB at 8 bits a channel and cannot write this; a PNG is a few chunks around a zlib
    stream (PNG spec, 3rd edition). Rows use the Paeth filter, computed from the unfiltered bytes, so
    it is one numpy expression for the whole image."""
    h, w, c = a.shape
    if c != 3 or a.dtype != np.uint16:
        raise ValueError(f"png16 takes an (H, W, 3) uint16 array, got {a.shape} {a.dtype}")
    raw = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(h, w * 6).astype(np.int16)
    bpp = 6  # bytes a pixel: the filters predict from the same byte of the pixel to the left
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    upleft = np.zeros_like(raw)
    upleft[1:, bpp:] = raw[:-1, :-bpp]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    rows = np.empty((h, 1 + w * 6), np.uint8)
    rows[:, 0] = 4  # Paeth
    rows[:, 1:] = (raw - pred).astype(np.uint8)  # modulo 256, as the spec says
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, truecolour, deflate, filter 0, no interlace
    parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", ihdr),
             _chunk(b"iCCP", b"sRGB\x00\x00" + zlib.compress(srgb_profile()))]
    if exif:
        parts.append(_chunk(b"eXIf", exif.removeprefix(b"Exif\x00\x00")))  # the chunk holds the TIFF data only
    parts += [_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)), _chunk(b"IEND", b"")]
    return b"".join(parts)


def save_atomic(im: Image.Image, path: Path, fmt: str, quality: int = 95) -> None:
    """Encode `im` as PNG or JPEG and write it atomically (see files.write_atomic)."""
    write_atomic(path, lambda f: encode_to(im, f, fmt, quality))


# -- thumbnails ------------------------------------------------------------------------------------

def shrink(im: Image.Image) -> Image.Image:
    """An RGB copy at most THUMB_PX on its long side, upright, in the pipeline's colours (sRGB, from its
    ICC profile) (`im` may be changed: thumbnail() works in place; pass a copy to keep it)."""
    icc = im.info.get("icc_profile")
    im = ImageOps.exif_transpose(im)
    im.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
    return _srgb(im, icc)[0]


def thumbnail_jpeg(im: Image.Image) -> bytes:
    """The thumbnail of a decoded image as JPEG bytes; `im` is not changed."""
    buf = io.BytesIO()
    shrink(im.copy()).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_thumbnail(dst: Path, im: Image.Image) -> Path:
    """Write an output's thumbnail from the image in memory (the I/O stage does, right after the output), so
    the report never decodes the outputs of a collection again. Written after the output, the thumbnail
    is the newer file, and the report keeps it until the output changes."""
    data = thumbnail_jpeg(im)
    write_atomic(dst, lambda f: f.write(data), durable=False)  # a cache: no fsync
    return dst


# -- tensors to files ------------------------------------------------------------------------------

def to_pil(t: torch.Tensor) -> Image.Image:
    a = t.detach().squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def to_uint16(t: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint16, straight from the optimiser's floats (never through 8 bits)."""
    a = t.detach().squeeze(0).double().clamp(0, 1).mul(65535).round().to(torch.int32).permute(1, 2, 0)
    return a.cpu().numpy().astype(np.uint16)


@dataclass(frozen=True)
class Encoded:
    data: bytes  # the output file: PNG (8 or 16 bits) or JPEG, with the sRGB profile and the photo's EXIF
    thumb: bytes  # its thumbnail for the report (JPEG, thumbnail_jpeg)


def encode(image: torch.Tensor, meta: PhotoMeta | None, settings: Settings) -> Encoded:
    """A made image (1, 3, H, W) in [0, 1] as the bytes of its output file and of its thumbnail: what every
    driver writes (the Ray actor sends these across). The image is converted to 8 bits once, for the
    thumbnail and an 8-bit file; a 16-bit PNG is made from the floats themselves."""
    im = to_pil(image)
    exif = output_exif(meta, im.size, settings.keep_gps)
    if settings.bit_depth == 16:
        data = png16(to_uint16(image), exif)
    else:
        buf = io.BytesIO()
        encode_to(im, buf, settings.format, settings.quality, exif)
        data = buf.getvalue()
    return Encoded(data, thumbnail_jpeg(im))
