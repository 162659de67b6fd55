"""`write_report(out)`: what a run made and what went wrong, read from the ledger while workers may
still be going. (The terminal view is `status`.)

It writes the files a person opens later, all inside OUT and linked by relative paths only, so they
keep working once OUT is zipped and moved. Sized for whole collections (200,000 pairs): no page grows
with the collection, and nothing is decoded or read again that the run already recorded.

- report.html (front.py): the pictures first, failures and how to retry them, skipped inputs, settings.
- styles/<k>.html, styles/<k>-<n>.html (pages.py): style k's pairs, PAGE_ROWS photos a page.
- summary.csv (summary.py): one row per pair.
- contact_sheet.jpg, contact_sheets/<k>-<name>.jpg (sheets.py).
- thumbs/ (thumbs.py): 240 px JPEGs of every output and source image.
"""

from __future__ import annotations

from pathlib import Path

from ..files.layout import REPORT_HTML, SUMMARY_CSV, write_text_atomic
from ..files.losslog import LOSS_LOG
from .front import front_context
from .grid import Grid, read_ledger
from . import parallel
from .pages import PageJob, remove_stale, render, style_pages, write_pages
from .sheets import write_sheets
from .status import summarize
from .summary import counts_by_style, summary_csv
from .thumbs import MAX_MEGAPIXELS, make_thumbnails


def write_report(out: Path) -> list[Path]:
    """Write into OUT: report.html (the front page), styles/*.html (a style's pairs, PAGE_ROWS photos
    a page), summary.csv, contact_sheet.jpg (and contact_sheets/*.jpg when one sheet cannot show the
    run readably), thumbs/. Returns report.html first, then the rest."""
    read = read_ledger(out)
    rows, settings = read.rows, read.settings
    limit = settings.get("max_megapixels")
    grid = Grid.of(out, rows)
    thumbs = make_thumbnails(out, rows, grid.on_disk, limit if isinstance(limit, (int, float)) else MAX_MEGAPIXELS)
    written = [out / SUMMARY_CSV]
    write_text_atomic(written[0], summary_csv(rows, read.methods, read.pair_models))
    sheets = write_sheets(out, grid, thumbs)
    written += sheets.written
    pages = style_pages(grid)
    job = PageJob(out, grid, thumbs, pages, sheets.per_style, rows, out / LOSS_LOG, read.methods, read.models,
                  counts_by_style(rows), read.pair_models)
    written += _all_pages(job)
    remove_stale(out, {p.relative_to(out).as_posix() for p in written})
    front = out / REPORT_HTML
    summary = summarize(rows, read.skipped, read.methods)
    write_text_atomic(front, render("front.html", **front_context(out, grid, settings, summary, thumbs,
                                                                  pages[0].pages, sheets, job.counts)))
    return [front, *written]


PAGES_IN_PROCESSES_FROM = 40  # style pages: from this many they are written by forked workers


def _all_pages(job: PageJob) -> list[Path]:
    """Every style page. A collection's 400 pages are half of its first report's time, Python work
    (cards and charts) that threads cannot share out: there, each worker process writes every n-th page."""
    n, which = parallel.workers(), range(len(job.pages))
    if len(job.pages) < PAGES_IN_PROCESSES_FROM or not parallel.can_fork():
        return write_pages(job, which)
    shares = [list(which[k::n]) for k in range(n)]
    written = parallel.fork_map(_pages_part, shares, inherit=job)
    by_index = {i: path for share, paths in zip(shares, written) for i, path in zip(share, paths)}
    return [by_index[i] for i in which]


def _pages_part(indices: list[int]) -> list[Path]:
    return write_pages(parallel.shared(), indices)
