"""Finding, decoding and writing images: the names of `decode` and `encode` in one place, for the modules
that read and write image files without caring which side a name is on (the report's thumbnails, the
plan's scan)."""

from .decode import (AVIF_SUFFIXES, HEIF_SUFFIXES, IMAGE_SUFFIXES, INTENT, META, Found, PhotoMeta,  # noqa: F401
                     avif_support, discover, fit_long_side, heif_support, load_rgb, photo_meta, scan,
                     srgb_profile, to_tensor)
from .encode import (THUMB_PX, Encoded, encode, encode_to, output_exif, png16, save_atomic, shrink,  # noqa: F401
                     thumbnail_jpeg, to_pil, to_uint16, write_thumbnail)
