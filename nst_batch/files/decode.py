"""Finding and decoding images: files in, upright sRGB pixels (and what an output keeps of them) out.

Decisions a user may care about:
- Files are found by content: anything Pillow recognises, plus files with an image
  extension that Pillow cannot read (so a corrupt `.jpg` shows up as a failed pair
  instead of silently vanishing). Everything else in the folders is skipped *and listed*
  (`scan`), with the reason: hidden, not an image, HEIC without the `heif` extra, the output
  folder... so a photo never vanishes without a word.
- HEIC/HEIF (iPhone photos) are read through pillow-heif when the optional extra
  `nst-batch[heif]` is installed; AVIF through Pillow itself (its wheels read AVIF since 11.3).
- EXIF orientation is applied before anything else.
- Colours are sRGB from decoding on: an embedded ICC profile (Display P3 from phones, Adobe RGB
  from cameras, a CMYK or grey profile) is converted to sRGB, relative colorimetric; an unreadable
  profile leaves the pixels as they are, taken as sRGB, with a note (`PhotoMeta.note`).
- What an output keeps of its photo (capture date, camera, GPS) is read once, at decoding, into a
  `PhotoMeta` that travels with the decoded image (`photo_meta`); outputs carry an sRGB profile.
- Transparency is composited over white, the colour a transparent PNG shows on a page.
- 16-bit greyscale is scaled (not clipped) to 8 bits; CMYK, palette and greyscale become RGB.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError, features

from ..errors import PairError
from .layout import is_output_folder
from .names import Skipped
from ..config.objective import MIN_SIDE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
HEIF_SUFFIXES = {".heic", ".heif", ".hif", ".heics", ".heifs"}
AVIF_SUFFIXES = {".avif", ".avifs"}
# ISO-BMFF major brands of HEVC-coded HEIF files (an iPhone photo says 'heic'): how a HEIC
# photo renamed to .jpg is still recognised, to say what it needs instead of "not an image".
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


@functools.cache
def heif_support() -> bool:
    """Teach Pillow HEIC/HEIF through pillow-heif (the `heif` extra), once per process; False without it.

    Lazy: only runs that meet a HEIC file, or decode one, pay for the import. pillow-heif 1.x reads
    HEIF only: its AVIF support was dropped once Pillow gained its own.
    """
    try:
        import pillow_heif
    except Exception:  # not installed, or installed but broken (a libheif it cannot load): as good as absent
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def avif_support() -> bool:
    """Pillow's own AVIF plugin: in its wheels from 11.3 on (not Windows arm64), in builds with libavif."""
    return bool(features.check("avif"))


def _heif_data(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


_LISTED_SUFFIXES = IMAGE_SUFFIXES | HEIF_SUFFIXES | AVIF_SUFFIXES


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in _LISTED_SUFFIXES:
        return True
    try:
        with Image.open(path):
            return True
    except Exception:
        return False


@dataclass(frozen=True)
class Found:
    files: list[Path]  # the images, sorted by relative path
    skipped: list[Skipped]  # everything else in the folder, sorted by relative path


def _file_skip_reason(path: Path) -> str | None:
    """Why a file in an input folder is not an input; None when it is one."""
    suffix = path.suffix.lower()
    if suffix in HEIF_SUFFIXES and not heif_support():
        return "needs_heif"
    if suffix in AVIF_SUFFIXES and not avif_support():
        return "no_avif"
    if _is_image(path):
        return None
    return "needs_heif" if _heif_data(path) and not heif_support() else "not_image"


def _same_folder(a: Path, b_id: tuple[int, int] | None) -> bool:
    if b_id is None:
        return False
    try:
        st = a.stat()
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == b_id


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # Python holds undecodable file-name bytes as lone surrogates
        return False
    return True


def scan(root: Path, key: str = "content", skip: Path | None = None) -> Found:
    """The image files under `root` (recursively) and every entry left out, with why.

    `skip` is the output folder: it is never entered, and neither is any folder holding a run
    ledger (another run's output folder), so nothing nst-batch wrote is read back as an input.
    Folders are compared by identity (device, inode), so a link or a differently cased name on a
    case-insensitive disk cannot get around that. Links to folders are not followed (no loops).
    """
    root = root.resolve()
    skip_id = None
    if skip is not None:
        try:
            st = skip.stat()
            skip_id = (st.st_dev, st.st_ino)
        except OSError:  # not made yet: nothing in it to read
            pass
    found: list[Path] = []
    skipped: list[Skipped] = []

    def rel(p: Path, folder: bool = False) -> str:
        return p.relative_to(root).as_posix() + ("/" if folder else "")

    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        keep = []
        for n in sorted(dirnames):
            p = d / n
            reason = ("hidden_folder" if n.startswith(".") else "folder_link" if p.is_symlink()
                      else "output_folder" if _same_folder(p, skip_id) or is_output_folder(p)
                      else None)
            if reason:
                skipped.append(Skipped(key, rel(p, True), reason))
            else:
                keep.append(n)
        dirnames[:] = keep
        for name in filenames:
            p = d / name
            if name.startswith("."):
                reason = "hidden"
            elif not p.is_file():  # a broken link, a pipe, a socket
                reason = "not_file"
            elif not _utf8(rel(p)):  # e.g. Latin-1 bytes from an old camera or zip: the ledger, the CSV
                reason = "bad_name"  # files and the report all hold names as UTF-8 text
            else:
                reason = _file_skip_reason(p)
            if reason:
                skipped.append(Skipped(key, rel(p), reason))
            else:
                found.append(p)
    return Found(sorted(found, key=lambda p: p.relative_to(root).as_posix()), sorted(skipped, key=lambda s: s.path))


def discover(root: Path, skip: Path | None = None) -> list[Path]:
    """Image files under `root` (recursively), sorted by relative path for a stable order."""
    return scan(root, skip=skip).files


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


# -- colour management and metadata --------------------------------------------------------------

# Relative colorimetric: colours inside sRGB's gamut (most of a P3 photo's) stay exactly what they were,
# those outside are clipped to its edge, as browsers show such a photo; black point compensation maps
# a CMYK profile's paper black to sRGB black. For matrix profiles (Display P3, Adobe RGB) lcms has no
# perceptual tables, so 'perceptual' would mean the same.
INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
_PROFILE_MODE = {"RGB": "RGB", "CMYK": "CMYK", "GRAY": "L"}  # an ICC colour space -> the mode it applies to
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}
META = "nst_batch.meta"  # key of a decoded image's PhotoMeta in its `info`


@functools.cache
def srgb_profile() -> bytes:
    """The ICC profile outputs carry: lcms's own sRGB (v4, 'sRGB built-in', 588 bytes)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@functools.lru_cache(maxsize=8)
def _to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """A transform from an embedded profile to sRGB, built once per profile: a collection of phone
    photos carries the same few profiles."""
    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, "RGB", INTENT,
                                   ImageCms.Flags.BLACKPOINTCOMPENSATION)


def _srgb(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, str | None]:
    """`im` as RGB in sRGB, converted from its embedded ICC profile when it has one; and why the profile
    was not used, when it was not (the pixels are then taken as sRGB: the photo is still usable)."""
    if not icc:
        return _to_rgb(im), None
    try:
        space = ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip()
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        return _to_rgb(im), f"its ICC profile is unreadable ({e}); colours taken as sRGB"
    want = _PROFILE_MODE.get(space)
    if want == "CMYK" and im.mode == "CMYK":
        base = im
    elif want == "L" and im.mode in _GREY_MODES:
        base = _to_rgb(im).convert("L")  # 16-bit scaled, alpha over white, as for any image; grey stays exact
    elif want == "RGB" and im.mode != "CMYK" and im.mode not in _GREY_MODES:
        base = _to_rgb(im)  # alpha composited, palette expanded: still in the profile's colours
    else:
        return _to_rgb(im), f"its ICC profile ({space or '?'}) does not fit a {im.mode} image; colours taken as sRGB"
    try:
        return ImageCms.applyTransform(base, _to_srgb(icc, base.mode)), None
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        return _to_rgb(im), f"its ICC profile cannot be applied ({e}); colours taken as sRGB"


@dataclass(frozen=True)
class PhotoMeta:
    """What an output keeps of its photo, read once when the photo is decoded. The output's EXIF is made
    from it at encoding (`output_exif`), when the output's size is known."""

    taken: str | None = None  # DateTimeOriginal, "YYYY:MM:DD HH:MM:SS"
    offset: str | None = None  # OffsetTimeOriginal, "+02:00": the time zone of `taken`
    make: str | None = None
    model: str | None = None
    gps: tuple[tuple[int, object], ...] = ()  # the GPS IFD's entries; written only with keep_gps
    note: str | None = None  # what could not be done (an unusable ICC profile, unreadable EXIF)


def _text(v: object) -> str | None:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        return None
    v = v.replace("\x00", "").strip()
    return v or None


def _read_meta(im: Image.Image, note: str | None) -> PhotoMeta:
    notes = [note] if note else []
    try:
        exif = im.getexif()
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        gps = tuple(sorted(exif.get_ifd(ExifTags.IFD.GPSInfo).items()))
        B = ExifTags.Base
        taken, offset = _text(sub.get(B.DateTimeOriginal)), _text(sub.get(B.OffsetTimeOriginal))
        make, model = _text(exif.get(B.Make)), _text(exif.get(B.Model))
    except Exception as e:  # metadata is a courtesy: a photo with broken EXIF is still a photo
        return PhotoMeta(note="; ".join(notes + [f"its EXIF is unreadable ({e}); none copied"]))
    if gps:
        try:  # written back here, once, so that a value Pillow reads but cannot write never fails the pair
            probe = Image.Exif()
            probe.get_ifd(ExifTags.IFD.GPSInfo).update(dict(gps))
            probe.tobytes()
        except Exception as e:
            gps = ()
            notes.append(f"its GPS data cannot be copied ({type(e).__name__})")
    return PhotoMeta(taken, offset, make, model, gps, "; ".join(notes) or None)


def photo_meta(im: Image.Image) -> PhotoMeta:
    """The PhotoMeta load_rgb attached to a decoded image (an empty one for an image made otherwise)."""
    meta = im.info.get(META)
    return meta if isinstance(meta, PhotoMeta) else PhotoMeta()


# -- decoding --------------------------------------------------------------------------------------

def load_rgb(path: Path, max_megapixels: float = 100.0) -> Image.Image:
    """Decode `path` fully into an upright RGB image in sRGB, or raise PairError naming the file. The
    image's info[META] holds its PhotoMeta (see `photo_meta`)."""
    heif_support()  # a HEIC photo is decoded by pillow-heif's opener, when the extra is installed
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
                icc = im.info.get("icc_profile")
                upright = ImageOps.exif_transpose(im)
                upright.load()
                rgb, note = _srgb(upright, icc)
                meta = _read_meta(im, note)
    except PairError:
        raise
    except Image.DecompressionBombError as e:
        raise PairError("too_large", f"{path.name}: {e} (Pillow's own limit, above 'max_megapixels')") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # OSError covers truncated files and missing files; SyntaxError is how some decoders say "corrupt".
        detail = "not an image Pillow can decode" if isinstance(e, UnidentifiedImageError) else str(e)
        if isinstance(e, UnidentifiedImageError) and _heif_data(path) and not heif_support():
            detail = "HEIC/HEIF data, which needs pillow-heif: install nst-batch[heif]"
        raise PairError("unreadable", f"{path.name}: {detail}") from None
    if min(rgb.size) < MIN_SIDE:
        raise PairError("too_small", f"{path.name}: {rgb.size[0]}x{rgb.size[1]} is smaller than {MIN_SIDE} px")
    rgb.info = {META: meta}  # nothing else of the file's: its profile no longer applies, its EXIF is in meta
    return rgb


def working_shape(path: Path, long_side: int) -> tuple[int, int] | None:
    """(H, W) of `path` once decoded upright and fitted to `long_side`, as `load_photo` makes it, from the
    header alone (no pixels decoded: a fraction of a millisecond). None when the header cannot be read;
    the pair's own decoding then says why."""
    heif_support()
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # turned a quarter when upright
                w, h = h, w
    except Exception:  # any reason at all: the decode that matters is the pair's own
        return None
    fw, fh = fit_long_side(w, h, long_side)
    return fh, fw


def to_tensor(im: Image.Image, long_side: int) -> torch.Tensor:
    """RGB image -> float tensor (1, 3, H, W) in [0, 1] with the long side resized to `long_side`: a photo
    at its working size, or a style image at the size its targets are computed at."""
    w, h = fit_long_side(*im.size, long_side)
    if min(w, h) < MIN_SIDE:
        raise PairError("too_small", f"{w}x{h} at {long_side} px: the short side would be under {MIN_SIDE} px; "
                        "raise 'size'")
    if (w, h) != im.size:
        im = im.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
