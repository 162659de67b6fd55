"""The HTML pages and what they share: rendering (Jinja2, autoescaping on), relative links, and
styles/<k>.html, styles/<k>-<n>.html: style k's pairs, PAGE_ROWS photos a page, as a grid of cards
that fills the window's width: the output (240 px thumbnail, lazily loaded, linked to the full image),
the photo, final losses, seconds, loss curve (inline SVG), or the error. No network, no script.

Each page carries a key of what it shows (a comment at its top) and is written again only when that
changes, so a report run again over a finished collection rewrites only what changed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from ..batch.ledger import Row, open_ledgers
from ..files.layout import REPORT_HTML, SHEETS, STYLES, write_atomic
from ..files.losslog import parse_curve
from .cards import Card, cards_html
from .curves import SERIES, Curves, chart, chart_svg
from .grid import Grid
from .status import short_model, when
from .summary import STATE_ORDER
from .thumbs import Thumbs

PAGE_ROWS = 500  # photos on a style's page: about 1.5 MB of HTML with their curves
_LOSSES = (("content", "content_loss"), ("style", "style_loss"), ("tv", "tv_loss"), ("total", "total_loss"))


@functools.lru_cache(maxsize=1)
def _env():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("nst_batch.report", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context) -> str:
    """Render one of the templates with autoescaping on: every value is escaped unless it is marked
    safe, and nothing marks user data safe unescaped (the style pages' cards come escaped: cards.py)."""
    return _env().get_template(template).render(**context)


def href(rel: str, up: int = 0) -> str:
    """A link to OUT/rel from a page `up` folders below OUT: relative, percent-encoded (names may hold
    '#', '?', '%' or spaces); the template escapes it for the attribute."""
    # Most names need no encoding, and the check is a tenth of quote()'s cost (400,000 links a collection).
    return "../" * up + (rel if _URL_SAFE.fullmatch(rel) else quote(rel))


_URL_SAFE = re.compile(r"[A-Za-z0-9_.~/-]*")  # what quote() leaves as it is


def opt_href(rel: str | None, up: int = 0) -> str | None:
    return None if rel is None else href(rel, up)


def num(v: object, fmt: str = "{:.4g}") -> str:
    return "" if v is None else fmt.format(v)


def anchor(pair_id: int) -> str:
    return f"p{pair_id}"


@dataclass(frozen=True)
class StylePage:
    k: int  # the style's number, from 1, in plan order
    style: str
    page: int  # from 1
    pages: int
    contents: list[str]

    @property
    def path(self) -> str:
        return page_path(self.k, self.page)


def page_path(k: int, page: int) -> str:
    return f"{STYLES}/{k}.html" if page == 1 else f"{STYLES}/{k}-{page}.html"


def card_href(k: int, position: int, pair_id: int) -> str:
    """From OUT, the card of style k's pair whose photo is `position`-th (from 0) in plan order."""
    return href(page_path(k, position // PAGE_ROWS + 1)) + "#" + anchor(pair_id)


def style_pages(grid: Grid, rows_per_page: int | None = None) -> list[StylePage]:
    """Each style's photos in plan order, PAGE_ROWS to a page, so no page grows with the collection."""
    rows_per_page = rows_per_page or PAGE_ROWS
    chunks = [grid.contents[i:i + rows_per_page] for i in range(0, len(grid.contents), rows_per_page)] or [[]]
    return [StylePage(k, style, n, len(chunks), chunk) for k, style in enumerate(grid.styles, 1)
            for n, chunk in enumerate(chunks, 1)]


@dataclass(frozen=True)
class PageJob:
    out: Path
    grid: Grid
    thumbs: Thumbs
    pages: list[StylePage]
    sheets: dict[int, str]
    rows: list[Row]
    log: Path
    methods: dict[tuple[str, str], str]
    models: dict[str, dict]
    counts: dict[str, dict[str, int]]  # summary.counts_by_style: counted once, not once a page
    pair_models: dict[tuple[str, str], str]  # (content, style) -> the model that made a done network pair

    @functools.cached_property
    def made(self) -> dict[tuple[str, str], int]:
        """(style, model) -> the pairs that model made: counted once, not once a page."""
        got: dict[tuple[str, str], int] = {}
        for (_, style), model in self.pair_models.items():
            got[(style, model)] = got.get((style, model), 0) + 1
        return got


def write_pages(job: PageJob, which: Iterable[int]) -> list[Path]:
    """Each page unless the page there already shows the same pairs the same way (its key)."""
    ledger = open_ledgers(job.out)
    try:
        curves = Curves(ledger, job.log, job.rows)
        written = []
        for i in which:
            page = job.pages[i]
            rows = [r for c in page.contents if (r := job.grid.cells.get((c, page.style))) is not None]
            stored = curves.stored(rows)
            key = _page_key(job, page, rows, stored, curves.csv_signature(rows, stored))
            path = job.out / page.path
            if key_of(path) != key:
                html = render("style.html", key=key, **_style_context(job, page, rows, curves.of(rows, stored)))
                # No fsync: a page lost to a power cut is written again by the next report (400 fsyncs
                # were seconds of a collection's first report).
                write_atomic(path, lambda f: f.write(html.encode()), durable=False)
            written.append(path)
        return written
    finally:
        ledger.close()


@functools.lru_cache(maxsize=1)
def _code_key() -> bytes:
    """The report's code and templates as they are: a page written by other code is written again."""
    here = Path(__file__).parent
    h = hashlib.sha1()
    for p in sorted([*here.glob("*.py"), *(here / "templates").iterdir()]):
        h.update(p.name.encode() + p.read_bytes())
    return h.digest()


def _page_key(job: PageJob, page: StylePage, rows: list[Row], stored: dict[int, str],
              csv_signature: tuple | None) -> str:
    g, t = job.grid, job.thumbs
    h = hashlib.sha1(_code_key())
    h.update(repr((page, len(g.styles), len(g.contents), job.out.resolve().name, job.sheets.get(page.k),
                   t.style.get(page.style), csv_signature, job.models.get(page.style))).encode())
    model = job.models.get(page.style)
    h.update(repr(job.made.get((page.style, model["recipe"])) if model else None).encode())
    for r in rows:
        h.update(repr((tuple(vars(r).values()), r.id in g.on_disk, t.output.get(r.id), t.content.get(r.content),
                       stored.get(r.id), job.pair_models.get((r.content, r.style)))).encode())
    return h.hexdigest()


_KEY = re.compile(rb"<!-- nst-batch page ([0-9a-f]{40}) -->")


def key_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            m = _KEY.search(f.read(200))
    except OSError:
        return None
    return m.group(1).decode() if m else None


def remove_stale(out: Path, written: set[str]) -> None:
    """Pages and sheets of an earlier report that this one did not write (fewer styles or photos now):
    left there, they would show pairs as they were."""
    for folder, ext in ((STYLES, ".html"), (SHEETS, ".jpg")):
        try:
            entries = list(os.scandir(out / folder))
        except FileNotFoundError:
            continue
        for e in entries:
            if e.name.endswith(ext) and not e.name.startswith(".") and f"{folder}/{e.name}" not in written:
                Path(e.path).unlink(missing_ok=True)


def _card(job: PageJob, r: Row, points: dict[int, list]) -> Card:
    msg = r.error_message or ""
    on_disk = r.id in job.grid.on_disk
    thumb = job.thumbs.output.get(r.id)
    src = job.thumbs.content.get(r.content)
    done = r.state == "done"
    seconds = r.seconds if done or r.state == "failed" else None  # as summary.shown gives them
    model = job.pair_models.get((r.content, r.style)) if done else None
    return Card(
        anchor(r.id), r.content, r.state, f"{r.style} × {r.content}", r.error_kind or "failed", msg,
        msg if len(msg) <= 160 else msg[:157] + "…", href(r.output, 1) if on_disk else None,
        # A source's thumbnail name is ours (hex digits); an output's may be the output itself.
        href(thumb, 1) if on_disk and thumb else None, "../" + src if src else None, r.note,
        (f"{job.methods.get((r.content, r.style), 'optimize')} · " if done else "")
        + f"attempts {r.attempts} · steps {num(r.steps if done else None, '{}') or '-'} · "
        f"{num(seconds, '{:.1f}') or '-'} s" + (f" · model {short_model(model)}" if model else ""),
        " · ".join(f"{name} {v}" for name, col in _LOSSES if (v := num(getattr(r, col)))) if done else "",
        chart_svg(points.get(r.id, [])))


def _style_context(job: PageJob, page: StylePage, rows: list[Row], points: dict[int, list]) -> dict:
    grid, thumbs, model = job.grid, job.thumbs, job.models.get(page.style)
    first = (page.page - 1) * PAGE_ROWS
    return {
        "title": f"{page.style}: nst-batch report: {job.out.resolve().name}", "style": page.style, "k": page.k,
        "n_styles": len(grid.styles), "page": page.page, "pages": page.pages,
        "pager": [(n, href(page_path(page.k, n).split("/", 1)[1])) for n in range(1, page.pages + 1)],
        "prev_style": href(page_path(page.k - 1, 1).split("/", 1)[1]) if page.k > 1 else None,
        "next_style": href(page_path(page.k + 1, 1).split("/", 1)[1]) if page.k < len(grid.styles) else None,
        "front": href(REPORT_HTML, 1), "thumb": opt_href(thumbs.style.get(page.style), 1),
        "sheet": href(job.sheets[page.k], 1) if page.k in job.sheets else None,
        "counts": job.counts[page.style], "states": STATE_ORDER, "first": first + 1,
        "last": first + len(page.contents), "n_contents": len(grid.contents),
        "cards": cards_html([_card(job, r, points) for r in rows]), "series": SERIES,
        "model": None if model is None else _model_context(job, page.style, model),
    }


def _model_context(job: PageJob, style: str, model: dict) -> dict:
    """The style's network (method network): its recipe, how far it trained and when, the photos it trained
    on, the pairs it made, and its training curve (each point the mean of the steps since the one before:
    training.WindowMean), drawn like a pair's."""
    try:
        names = json.loads(model.get("trained_on") or "[]")
        names = [str(n) for n in names] if isinstance(names, list) else []
    except ValueError:  # a damaged record: no list, not a crash
        names = []
    return {"recipe": model["recipe"], "short": short_model(model["recipe"]), "step": model["step"],
            "steps": model["steps"], "when": when(model.get("updated_at")), "photos": model.get("photos"),
            "trained_on": names, "made": job.made.get((style, model["recipe"]), 0),
            "chart": chart(parse_curve(model["curve"]))}
