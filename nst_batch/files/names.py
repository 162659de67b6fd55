"""User file names as they are shown: safe for a terminal, and the account of input files left out.

Torch-free on purpose: `status` and `report` use it and must start fast.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass

# Bidirectional overrides and isolates reorder what follows them on screen ("Trojan source"):
# a name could display as another name. They are not category Cc, so they are listed here.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: object) -> str:
    """`text` with every control character written as a visible escape (ESC -> \\x1b).

    A file may be called "\\x1b[31mred.png" or hold a BEL or a newline: printed raw, such a name
    recolours, clears or retitles the terminal, or forges a line of output. C0, DEL and C1 controls
    (0x9b is CSI on 8-bit terminals), bidi overrides, and the surrogates Python uses for file
    name bytes that are not UTF-8 (which a console may refuse to encode) are all escaped.
    """
    s = str(text)
    if s.isprintable():  # the usual case, fast: False for all of the above (and for harmless
        return s         # spaces such as U+00A0, which the loop below keeps)
    out = []
    for ch in s:
        cat = unicodedata.category(ch)
        if cat == "Cs":  # a byte of a non-UTF-8 name, held as U+DC80..U+DCFF
            out.append(f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"\\u{ord(ch):04x}")
        elif cat == "Cc" or ch in _BIDI:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


# -- input files left out of the plan --------------------------------------------------------------

# reason -> (label for one, label for several), as the summary line counts them.
SKIP_REASONS: dict[str, tuple[str, str]] = {
    "hidden": ("hidden", "hidden"),
    "hidden_folder": ("hidden folder", "hidden folders"),
    "not_image": ("not an image", "not images"),
    "needs_heif": ("HEIC/HEIF (install nst-batch[heif])", "HEIC/HEIF (install nst-batch[heif])"),
    "no_avif": ("AVIF (this Pillow cannot read AVIF: install Pillow >= 11.3)",
                "AVIF (this Pillow cannot read AVIF: install Pillow >= 11.3)"),
    "not_file": ("not a regular file", "not regular files"),
    "bad_name": ("name not valid UTF-8 (rename it)", "names not valid UTF-8 (rename them)"),
    "folder_link": ("link to a folder (not followed)", "links to folders (not followed)"),
    "output_folder": ("output folder", "output folders"),
}
FOLDER_REASONS = {"hidden_folder", "folder_link", "output_folder"}


@dataclass(frozen=True)
class Skipped:
    """One entry of an input folder that is not used, and why."""
    key: str  # 'content' or 'styles': which folder
    path: str  # relative to that folder, '/'-separated; a folder ends with '/'
    reason: str  # a key of SKIP_REASONS

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def why(self) -> str:
        return SKIP_REASONS[self.reason][0]


def skipped_from(records: object) -> list[Skipped]:
    """The skipped list as stored in the ledger (a list of dicts); anything unreadable reads as none."""
    if not isinstance(records, list):
        return []
    out = []
    for r in records:
        if isinstance(r, dict) and r.get("reason") in SKIP_REASONS:
            out.append(Skipped(str(r.get("key", "")), str(r.get("path", "")), r["reason"]))
    return out


def skipped_line(skipped: list[Skipped]) -> str:
    """One line: '3 input files skipped: 2 not images, 1 hidden'; '' when nothing was skipped."""
    if not skipped:
        return ""
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    order = list(SKIP_REASONS)
    parts = [f"{n} {SKIP_REASONS[r][0 if n == 1 else 1]}"
             for r, n in sorted(counts.items(), key=lambda rn: (-rn[1], order.index(rn[0])))]
    n = len(skipped)
    folders = sum(c for r, c in counts.items() if r in FOLDER_REASONS)
    what = ("folder" if n == 1 else "folders") if folders == n else ("file" if n == 1 else "files") if not folders \
        else "files and folders"
    return f"{n} input {what} skipped: {', '.join(parts)}"
