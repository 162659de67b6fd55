"""The runner's own machinery: photos decoded ahead on the I/O thread while the previous pair computes,
the bounded style cache, and the loss log."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from rich.console import Console

from nst_batch.core import targets
from nst_batch.files import losslog, stage
from nst_batch.run import local
from nst_batch.core.optimize import LogRow
from nst_batch.run.progress import Display

from conftest import engine_of, make_image, path_job


def test_each_photo_is_decoded_once_and_ahead_on_the_io_thread(fast_settings, monkeypatch):
    threads: list[str] = []
    real = stage.load_rgb

    def spy(path, *a, **kw):
        threads.append(threading.current_thread().name)
        return real(path, *a, **kw)

    monkeypatch.setattr(stage, "load_rgb", spy)  # the I/O stage's decoding, of photos and of styles
    result = local.run(fast_settings.replace(steps=3), Display(Console(quiet=True)))  # 1 step: no_progress
    assert result.made == 6
    content_loads = len(threads) - 2  # each of the 2 styles is decoded once, on the main thread
    prefetched = sum(name.startswith("nst-io") for name in threads)
    # 3 photos x 2 styles, photo by photo: each photo decoded once for both its styles, and all
    # but the first from the look-ahead (the first has nothing before it to overlap with).
    assert content_loads == 3 and prefetched == 2, threads


def test_with_batches_the_next_calls_photos_are_decoded_while_a_batch_computes(fast_settings, tmp_path, monkeypatch):
    """batch 2: a second call is queued behind the one computing, and all its photos decode on the I/O
    threads meanwhile; only the first call's photos, with nothing before them, decode on the main thread."""
    threads: dict[str, str] = {}
    real = stage.load_rgb

    def spy(path, *a, **kw):
        threads[Path(path).name] = threading.current_thread().name
        return real(path, *a, **kw)

    monkeypatch.setattr(stage, "load_rgb", spy)
    content = tmp_path / "six"
    for i in range(6):
        make_image(content / f"p{i}.png", 48, 32, 40 + i)
    one = tmp_path / "one"
    make_image(one / "s.png", 48, 48, 50)
    s = fast_settings.replace(content=content, styles=one, steps=2, batch=2, out=tmp_path / "out6")
    result = local.run(s, Display(Console(quiet=True)))
    assert result.made == 6
    on_main = sorted(name for name, thread in threads.items() if name.startswith("p") and thread == "MainThread")
    assert len(on_main) == 2 and all(threads[f"p{i}.png"].startswith("nst-io") for i in range(6)
                                     if f"p{i}.png" not in on_main), threads


# -- the style cache is bounded, the loss log needs no hard link ------------------------------------


def test_style_cache_keeps_at_most_its_bound_and_every_pair_gets_its_own_style(fast_settings, tmp_path, monkeypatch):
    """More styles than the bound, in an order that makes evicted styles come back: the cache never holds
    more than STYLE_CACHE styles, and a style made again after eviction gives the very same image."""
    monkeypatch.setattr(targets, "STYLE_CACHE", 2)
    monkeypatch.setattr(stage, "STYLE_IMAGES", 2)
    s = fast_settings.replace(steps=2, layers={"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]})
    styles = [make_image(tmp_path / "many" / f"s{i}.png", 40, 40, 200 + i) for i in range(3)]
    engine = engine_of(s.replace(size=32))
    photo = stage.load_photo(s.content / "square.png", 32, s.max_megapixels)[0]
    made: dict[str, list[torch.Tensor]] = {}
    order = [0, 1, 2, 0, 1, 0]
    for i in order:
        (res,) = engine.make([path_job(engine, s.content / "square.png", styles[i], photo=photo)])
        made.setdefault(styles[i].name, []).append(res.image)
        held = set(engine.styles.keys())
        images_held = engine.style_pixels.held()
        assert len(images_held) <= 2 and len(held) <= 2 and held <= set(images_held)
    # s0 and s1 were dropped and made again (2 and 1 times); s0's last use found it still held.
    assert engine.style_passes == 5
    for name, outs in made.items():
        assert all(torch.equal(outs[0], o) for o in outs[1:]), name
    firsts = [made[p.name][0] for p in styles]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])


def _fat_like(monkeypatch) -> None:
    def no_link(*a, **kw):
        raise PermissionError(errno.EPERM, "Operation not permitted")  # what FAT and exFAT answer

    monkeypatch.setattr(os, "link", no_link)


def _log_lines(out: Path) -> list[str]:
    return (out / losslog.LOSS_LOG).read_text().splitlines()


def test_loss_log_needs_no_hard_link(fast_settings, monkeypatch):
    _fat_like(monkeypatch)
    result = local.run(fast_settings.replace(steps=3), Display(Console(quiet=True)))  # 1 step: no_progress
    assert result.made == 6 and result.failed == 0
    lines = _log_lines(fast_settings.out)
    assert lines[0] == ",".join(losslog.LOSS_COLUMNS) and len(lines) > 6
    assert not list(fast_settings.out.rglob("*.tmp"))


def test_loss_log_header_comes_first_whoever_opens_it_first(tmp_path, monkeypatch):
    """A worker that finds losses.csv created but still empty (its creator not yet at the header, or
    killed right there) writes the header itself before any row; the creator's header changes nothing."""
    _fat_like(monkeypatch)
    header = ",".join(losslog.LOSS_COLUMNS)
    row = SimpleNamespace(content="c.png", style="s.png")
    step = LogRow(step=1, content=1.0, style=2.0, tv=0.5, total=3.5, elapsed_s=0.1, px=32)
    (tmp_path / losslog.LOSS_LOG).write_bytes(b"")  # created, header not written yet
    second = losslog.LossLog(tmp_path)
    second.write(row, 1, [step])
    first = losslog.LossLog(tmp_path)  # the creator gets to its header only now
    first.write(row, 2, [step])
    second.write(row, 1, [step])
    for log in (first, second):
        log.close()
    lines = _log_lines(tmp_path)
    assert lines[0] == header and header not in lines[1:]
    assert [line.split(",")[-2] for line in lines[1:]] == ["1", "2", "1"]  # the attempt column: no row lost


def test_style_targets_outlive_their_decoded_images(fast_settings, tmp_path, monkeypatch):
    """Photo by photo, every style comes back once per photo: its targets stay (up to STYLE_CACHE styles)
    even when its decoded image was dropped, so no style is decoded or passed through VGG twice."""
    monkeypatch.setattr(stage, "STYLE_IMAGES", 1)
    s = fast_settings.replace(steps=2, size=32, layers={"content": ["relu2_1"], "style": ["relu1_1", "relu2_1"]})
    styles = [make_image(tmp_path / "many" / f"s{i}.png", 40, 40, 300 + i) for i in range(3)]
    engine = engine_of(s)
    for name in ("square.png", "wide.png"):  # two photos, each with the three styles
        photo = stage.load_photo(s.content / name, s.size, s.max_megapixels)[0]
        engine.make([path_job(engine, s.content / name, st, photo=photo) for st in styles])
    assert len(engine.style_pixels.held()) == 1 and len(engine.styles.keys()) == 3
    # square is 32x32, wide 32x20 at full size: the same long side, so one pass per style.
    assert engine.style_passes == 3


def test_a_run_leaves_each_outputs_thumbnail_and_curve_for_the_report(fast_settings):
    """At 200,000 pairs the report must not decode outputs or read losses.csv again: the runner writes
    each output's thumbnail from the image in memory and stores its thinned loss curve in the ledger."""
    from nst_batch.files import losslog
    from nst_batch.files.layout import thumb_path
    from nst_batch.batch.ledger import Ledger

    s = fast_settings.replace(steps=3)
    assert local.run(s, Display(Console(quiet=True))).made == 6
    with Ledger(s.out, readonly=True) as ledger:
        rows = ledger.rows()
        curves = ledger.curves([r.id for r in rows])
    for r in rows:
        thumb = s.out / thumb_path("o", r.output)
        assert thumb.stat().st_mtime >= (s.out / r.output).stat().st_mtime  # newer: the report keeps it
        with Image.open(thumb) as im, Image.open(s.out / r.output) as full:
            assert im.size == full.size  # a 48 px output is under the thumbnail size: not enlarged
        points = losslog.parse_curve(curves[r.id])
        assert points and points[-1][0] == r.steps and abs(points[-1][4] - r.total_loss) <= 1e-3 * r.total_loss


def test_a_pair_that_would_not_fit_in_memory_fails_as_oom_and_writes_nothing(fast_settings, monkeypatch):
    """Print sizes: the memory check fails each pair before it starts, naming a size that fits
    (with this little free, 32 px), and no image, thumbnail or temporary is written for it."""
    from nst_batch.core import memory

    free = memory.need(32, 32, 1, "lbfgs", fast_settings.steps).bytes  # a 32 px square fits, 48 px does not
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    s = fast_settings
    result = local.run(s, Display(Console(quiet=True)))
    assert result.made == 0 and result.failed == 6
    assert {kind for _, kind, _ in result.failures} == {"oom"}
    assert all(msg.endswith("32 px would fit; lower 'size'") for _, _, msg in result.failures), result.failures
    written = [p.relative_to(s.out).as_posix() for p in s.out.rglob("*") if p.is_file()]
    assert not [p for p in written if p.endswith((".png", ".jpg", ".tmp"))], written
