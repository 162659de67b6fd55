"""What a run prints about pairs: one line each, and never a file name's control characters raw."""

from __future__ import annotations

import io

from rich.console import Console

from nst_batch.run.progress import Display, LiveDisplay

HOSTILE = "\x1b[2J\x1b]0;owned\x07photo.png"  # would clear the screen and retitle the terminal


def _console(buf: io.StringIO, terminal: bool) -> Console:
    return Console(file=buf, force_terminal=terminal, width=60, color_system=None)


def test_plain_lines_escape_control_characters_in_names_and_notes():
    buf = io.StringIO()
    d = Display(_console(buf, terminal=False))
    d.start(2, 0)
    d.pair_end(f"s.png × {HOSTILE}", True, 1.5)
    d.pair_end(f"s.png × {HOSTILE}", False, 0.5, f"unreadable: {HOSTILE}: not an image")
    d.note(f"skipped {HOSTILE}")
    text = buf.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert text.count("\\x1b[2J\\x1b]0;owned\\x07photo.png") == 4
    assert len(text.splitlines()) == 3  # one line each, whatever the width


def test_live_display_escapes_control_characters():
    buf = io.StringIO()
    d = LiveDisplay(_console(buf, terminal=True))
    d.start(1, 0)
    d.pair_start(f"s.png × {HOSTILE}", 10)
    d.pair_end(f"s.png × {HOSTILE}", False, 0.5, f"unreadable: {HOSTILE}")
    d.note(HOSTILE)
    d.close()
    text = buf.getvalue()
    # The live display draws with its own cursor-movement escapes; the name's own sequences must not appear.
    assert "\x1b[2J" not in text and "\x1b]0;owned" not in text and "\x07" not in text
    assert "\\x1b[2J" in text
