"""Finding, decoding and writing images. The only module that touches pixels on disk.

Decisions a user may care about:
- Files are found by content: anything Pillow recognises, plus files with an image
  extension that Pillow cannot read (so a corrupt `.jpg` shows up as a failed pair
  instead of silently vanishing). Hidden files/folders and the output folder are skipped.
- EXIF orientation is applied before anything else.
- Transparency is composited over white, the colour a transparent PNG shows on a page.
- 16-bit greyscale is scaled (not clipped) to 8 bits; CMYK, palette and greyscale become RGB.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PairError
from .files import write_atomic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MIN_SIDE = 16  # VGG19 pools 4 times before conv5_1: smaller images have no conv5 features


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with Image.open(path):
            return True
    except Exception:
        return False


def discover(root: Path, skip: Path | None = None) -> list[Path]:
    """Image files under `root` (recursively), sorted by relative path for a stable order."""
    root = root.resolve()
    skip = skip.resolve() if skip is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (skip is None or (d / n).resolve() != skip))
        for name in filenames:
            p = d / name
            if not name.startswith(".") and p.is_file() and _is_image(p):
                found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit PNGs decode to 'I;16' (range 0..65535 whatever the content: a dark photo stays dark);
        # plain 'I' may hold either range, so only there does the data decide.
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if a.max() <= 1.0 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def fit_long_side(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is `long_side`, aspect ratio kept."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_rgb(path: Path, max_megapixels: float = 100.0) -> Image.Image:
    """Decode `path` fully into an upright RGB image, or raise PairError naming the file."""
    try:
        with warnings.catch_warnings():
            # Our own limit, checked right below from the header alone, is the one the user set. Pillow's
            # warning fires at 89.5 MP, under the 100 MP default; only its error (2x that) still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_megapixels * 1e6:
                    raise PairError("too_large", f"{path.name}: {w}x{h} is over the {max_megapixels:g} MP limit "
                                    "(key 'max_megapixels')")
                im = ImageOps.exif_transpose(im)
                im.load()
                rgb = _to_rgb(im)
    except PairError:
        raise
    except Image.DecompressionBombError as e:
        raise PairError("too_large", f"{path.name}: {e} (Pillow's own limit, above 'max_megapixels')") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # OSError covers truncated files and missing files; SyntaxError is how some decoders say "corrupt".
        detail = "not an image Pillow can decode" if isinstance(e, UnidentifiedImageError) else str(e)
        raise PairError("unreadable", f"{path.name}: {detail}") from None
    if min(rgb.size) < MIN_SIDE:
        raise PairError("too_small", f"{path.name}: {rgb.size[0]}x{rgb.size[1]} is smaller than {MIN_SIDE} px")
    return rgb


def to_tensor(im: Image.Image, long_side: int) -> torch.Tensor:
    """RGB image -> float tensor (1, 3, H, W) in [0, 1] with the long side resized to `long_side`."""
    w, h = fit_long_side(*im.size, long_side)
    if min(w, h) < MIN_SIDE:
        raise PairError("too_small", f"{w}x{h} at {long_side} px: the short side would be under {MIN_SIDE} px; "
                        "raise 'size'")
    if (w, h) != im.size:
        im = im.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_pil(t: torch.Tensor) -> Image.Image:
    a = t.detach().squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def save_atomic(im: Image.Image, path: Path, fmt: str, quality: int = 95) -> None:
    """Encode `im` as PNG or JPEG and write it atomically (see files.write_atomic)."""
    if fmt == "jpg":
        write_atomic(path, lambda f: im.save(f, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2))
    else:
        write_atomic(path, lambda f: im.save(f, "PNG"))
