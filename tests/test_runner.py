"""The runner's own machinery: photos decoded ahead on the I/O thread while the previous pair computes."""

from __future__ import annotations

import threading

from rich.console import Console

from nst_batch import images, runner
from nst_batch.progress import Display


def test_next_photo_is_decoded_on_the_io_thread(fast_settings, monkeypatch):
    threads: list[str] = []
    real = images.load_rgb

    def spy(path, *a, **kw):
        threads.append(threading.current_thread().name)
        return real(path, *a, **kw)

    monkeypatch.setattr(images, "load_rgb", spy)
    result = runner.run(fast_settings.replace(steps=3), Display(Console(quiet=True)))  # 1 step: no_progress
    assert result.made == 6
    content_loads = len(threads) - 2  # each of the 2 styles is decoded once, on the main thread
    prefetched = sum(name.startswith("nst-io") for name in threads)
    # All but the first photo come from the look-ahead (the first has nothing before it to overlap with).
    assert content_loads == 6 and prefetched == 5, threads
