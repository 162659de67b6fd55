"""The report files, built from a hand-made ledger (no VGG): done, failed, running and pending pairs."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image
from rich.console import Console

from nst_batch.files import encode, losslog
from nst_batch.report import build, cards, parallel, curves, front, pages, sheets, status, summary, thumbs
from nst_batch.files.layout import thumb_path
from nst_batch.errors import ConfigError
from nst_batch.batch.plan import Pair
from nst_batch.batch.ledger import Finished, Ledger
from nst_batch.files.losslog import LOSS_COLUMNS, LOSS_LOG

from conftest import make_image

WORKER = "test-host:1"
ODD = 'a b#1 & <x> "q".png'  # a content name that needs escaping in HTML and quoting in URLs
LOSS_HEADER = ",".join(LOSS_COLUMNS) + "\n"


def _loss_rows(content: str, style: str, attempt: int, steps: list[tuple[int, int]], scale: float) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for step, px in steps:
        w.writerow([content, style, step, 0.5 * scale / step, 2.0 * scale / step, 0.01, 2.51 * scale / step,
                    step * 0.1, attempt, px])
    return buf.getvalue()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """3 contents × 2 styles. s1: c1 done, odd-name done with its output gone, broken failed.
    s2: c1 done on its 2nd attempt (the 1st was abandoned), odd-name running, broken pending."""
    src, out = tmp_path / "src", tmp_path / "out"
    c1 = make_image(src / "c" / "c1.png", 64, 40, 1)
    odd = make_image(src / "c" / ODD, 36, 60, 2)
    broken = src / "c" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    s1, s2 = make_image(src / "s" / "s1.png", 48, 48, 10), make_image(src / "s" / "s2.jpg", 56, 40, 11)
    pairs = [Pair(c.name, s.name, c, s, f"{s.stem}/{Path(c.name).stem}.png", "r", "") for s in (s1, s2)
             for c in (c1, odd, broken)]
    ledger = Ledger(out)
    try:
        ledger.sync(pairs, out, lease_s=60)
        ledger.set_meta("settings", {"size": 64, "steps": 20, "scales": [0.5, 1.0], "out": str(out)})
        ids = {(r.content, r.style): r.id for r in ledger.rows()}

        def finish(content: str, style: str, total: float, write: bool = True) -> None:
            row = ledger.claim(WORKER, 60, only={ids[(content, style)]})
            if write:  # larger than a thumbnail: the report makes one (see the large run for small ones)
                make_image(out / row.output, 320, 256, row.id)
            ledger.done(Finished(row.id, WORKER, 40, 0.5, 0.2, 0.01, total))

        finish("c1.png", "s1.png", 0.7)
        finish(ODD, "s1.png", 0.9, write=False)
        ledger.claim(WORKER, 60, only={ids[("broken.jpg", "s1.png")]})
        ledger.fail(ids[("broken.jpg", "s1.png")], WORKER, "unreadable", "broken.jpg: not an image <Pillow> can decode")
        ledger.claim(WORKER, 60, only={ids[("c1.png", "s2.jpg")]})
        ledger.release(ids[("c1.png", "s2.jpg")], WORKER)  # attempt 1 abandoned
        finish("c1.png", "s2.jpg", 1.2)  # attempt 2
        ledger.claim(WORKER, 60, only={ids[(ODD, "s2.jpg")]})
    finally:
        ledger.close()
    (out / LOSS_LOG).write_text(
        LOSS_HEADER
        + _loss_rows("c1.png", "s1.png", 1, [(10, 32), (20, 32), (30, 64), (40, 64), (40, 64)], 1.0)
        + _loss_rows("c1.png", "s2.jpg", 1, [(10, 999), (20, 999)], 1e6)  # the abandoned attempt
        + _loss_rows("c1.png", "s2.jpg", 2, [(10, 32), (20, 32), (30, 64), (40, 64)], 1.0)
        + _loss_rows(ODD, "s2.jpg", 1, [(10, 32)], 1.0)
        + "c1.png,s2.jpg,50,0.1")  # a line cut short by a crash
    return out


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.body: dict = {}

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "body":
            self.body = a


def _parse(text: str) -> _Links:
    p = _Links()
    p.feed(text)
    p.close()
    return p


def _pages(out: Path) -> dict[str, str]:
    """Every page of the report, by its path relative to OUT: the front page first."""
    pages = {"report.html": (out / "report.html").read_text()}
    pages |= {p.relative_to(out).as_posix(): p.read_text() for p in sorted((out / "styles").glob("*.html"))}
    return pages


def _check_links(out: Path) -> list[dict]:
    """Every link and image of every page is relative, stays inside OUT and resolves, anchors included
    (into other pages too); every page is reachable from the front page. Returns every img's attributes."""
    pages = _pages(out)
    parsed = {rel: _parse(text) for rel, text in pages.items()}
    imgs, reached = [], {"report.html"}
    for rel, page in parsed.items():
        here = (out / rel).parent
        imgs += page.imgs
        for url in [img["src"] for img in page.imgs] + page.hrefs:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, url  # nothing outside OUT, nothing on the network
            target = (here / unquote(parts.path)).resolve() if parts.path else (out / rel).resolve()
            assert target.is_relative_to(out.resolve()) and target.is_file(), (rel, url)
            key = target.relative_to(out.resolve()).as_posix()
            if key in parsed:
                reached.add(key)
            if parts.fragment:
                assert parts.fragment in parsed[key].ids, (rel, url)
    assert reached == set(pages)
    return imgs


def test_html_parses_and_every_relative_link_resolves(run_dir: Path):
    paths = build.write_report(run_dir)
    assert paths[0] == run_dir / "report.html"
    assert set(_pages(run_dir)) == {"report.html", "styles/1.html", "styles/2.html"}
    imgs = _check_links(run_dir)
    # Front page, the results grid: the 2 styles, 2 photos (broken.jpg has none), the 2 outputs on disk
    # (s1: c1, the odd name's output is gone; s2: c1). Each style page: its painting, the 2 photos, its
    # output on disk.
    assert len(imgs) == (2 + 2 + 2) + (1 + 2 + 1) * 2
    assert all(img["loading"] == "lazy" for img in imgs)


def test_states_failures_and_escaping(run_dir: Path):
    build.write_report(run_dir)
    pages = _pages(run_dir)
    front, text = pages["report.html"], "".join(pages.values())
    assert "broken.jpg: not an image &lt;Pillow&gt; can decode" in front  # in the failures table
    assert "broken.jpg: not an image &lt;Pillow&gt; can decode" in pages["styles/1.html"]  # and on its card
    assert f"nst-batch retry {run_dir}" in front
    assert "<x>" not in text and "a b#1 &amp; &lt;x&gt; &#34;q&#34;.png" in pages["styles/1.html"]  # markupsafe: &#34; for "
    assert "output missing" in pages["styles/1.html"]  # ODD × s1 is done but its file is gone
    assert "no preview" in text  # broken.jpg cannot be decoded: a placeholder, not a crash
    assert 'class="st st-running"' in pages["styles/2.html"] and 'class="st st-pending"' in pages["styles/2.html"]
    assert "<th>size</th>" in front


def test_abandoned_attempt_is_not_drawn(run_dir: Path):
    build.write_report(run_dir)
    rows = _ledger_rows(run_dir)
    curves = losslog.read_curves(run_dir / LOSS_LOG, rows)
    assert [(p.step, p.px) for p in curves[("c1.png", "s2.jpg")]] == [(10, 32), (20, 32), (30, 64), (40, 64)]
    assert len(curves[("c1.png", "s1.png")]) == 4  # the final row replaces the repeated last step
    text = "".join(_pages(run_dir).values())
    assert "999px" not in text and "64px" in text
    points = re.findall(r'<polyline points="([^"]*)"', text)
    assert len(points) == 3 * 3  # content, style, total for the 3 pairs with rows in their current attempt
    assert sorted(len(p.split()) for p in points) == [1] * 3 + [4] * 6


def test_curves_of_failed_and_running_pairs_but_not_of_pending_ones(run_dir: Path):
    with open(run_dir / LOSS_LOG, "a") as f:
        f.write("\n" + _loss_rows("broken.jpg", "s1.png", 1, [(10, 32)], 1.0))
    curves = losslog.read_curves(run_dir / LOSS_LOG, _ledger_rows(run_dir))
    assert ("broken.jpg", "s1.png") in curves and (ODD, "s2.jpg") in curves  # progress until it failed; so far
    ledger = Ledger(run_dir)
    try:
        ledger.requeue_failed()
    finally:
        ledger.close()
    assert ("broken.jpg", "s1.png") not in losslog.read_curves(run_dir / LOSS_LOG, _ledger_rows(run_dir))


def test_summary_csv(run_dir: Path):
    build.write_report(run_dir)
    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(summary.SUMMARY_COLUMNS)
    assert len(rows) == 6
    by = {(r["content"], r["style"]): r for r in rows}
    assert by[("c1.png", "s2.jpg")]["attempts"] == "2" and float(by[("c1.png", "s2.jpg")]["total_loss"]) == 1.2
    assert by[("broken.jpg", "s1.png")]["error_kind"] == "unreadable"
    assert sorted(r["state"] for r in rows) == ["done", "done", "done", "failed", "pending", "running"]
    # Written column by column for speed, it says what `shown` says of each cell.
    ledger_rows = _ledger_rows(run_dir)
    ref = io.StringIO()
    csv.writer(ref).writerows([summary.SUMMARY_COLUMNS] + [[summary.csv_cell(summary.shown(r, c))
                                                            for c in summary.SUMMARY_COLUMNS] for r in ledger_rows])
    assert summary.summary_csv(ledger_rows) == ref.getvalue()


def test_a_failed_retry_does_not_show_the_losses_of_an_earlier_success(run_dir: Path):
    ledger = Ledger(run_dir)
    try:
        row = next(r for r in ledger.rows() if (r.content, r.style) == ("c1.png", "s1.png"))
        # What `sync` does to a done pair whose recipe changed: pending again, its old losses still stored.
        ledger.db.execute("UPDATE pairs SET state='pending' WHERE id=?", (row.id,))
        ledger.claim(WORKER, 60, only={row.id})
        ledger.fail(row.id, WORKER, "internal", "RuntimeError: boom")
    finally:
        ledger.close()
    build.write_report(run_dir)
    with open(run_dir / "summary.csv", newline="") as f:
        got = next(r for r in csv.DictReader(f) if (r["content"], r["style"]) == ("c1.png", "s1.png"))
    assert got["state"] == "failed" and got["total_loss"] == "" and got["seconds"] != ""


def test_contact_sheet_is_rows_by_columns_cells(run_dir: Path):
    build.write_report(run_dir)
    with Image.open(run_dir / "contact_sheet.jpg") as im:
        assert im.size == (3 * sheets.SHEET_CELL_PX, 4 * sheets.SHEET_CELL_PX)  # header + 2 styles, header + 3


def test_sheet_layout_rule():
    assert sheets.sheet_layout(3, 2) == sheets.SheetLayout(180, 3, 2)
    assert sheets.sheet_layout(60, 10) == sheets.SheetLayout(131, 60, 10)
    assert sheets.sheet_layout(500, 10) == sheets.SheetLayout(64, 124, 10)
    big = sheets.sheet_layout(500, 500)
    assert (big.contents + 1) * big.cell <= sheets.SHEET_MAX_SIDE


def test_thumbnails_are_reused_until_the_output_changes(run_dir: Path):
    build.write_report(run_dir)
    thumbs = {p: p.stat().st_mtime_ns for p in (run_dir / "thumbs").iterdir()}
    assert len(thumbs) == 4 + 2  # c1, odd, s1, s2 + the two outputs on disk
    build.write_report(run_dir)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "thumbs").iterdir()} == thumbs
    output = run_dir / "s1" / "c1.png"
    later = time.time() + 5
    os.utime(output, (later, later))
    build.write_report(run_dir)
    changed = [p for p in (run_dir / "thumbs").iterdir() if p.stat().st_mtime_ns != thumbs[p]]
    assert len(changed) == 1 and changed[0].name.startswith("o-")


def test_thumbnails_made_in_worker_processes_are_the_same(run_dir: Path, monkeypatch):
    # A collection's thousands of thumbnails go to forked processes (a few, as here, to threads).
    monkeypatch.setattr(thumbs, "PROCESSES_FROM", 1)
    build.write_report(run_dir)
    names = sorted(p.name for p in (run_dir / "thumbs").iterdir())
    assert len(names) == 4 + 2 and all(not n.startswith(".") for n in names)  # no temporaries left
    for p in (run_dir / "thumbs").iterdir():
        with Image.open(p) as im:
            assert im.format == "JPEG" and max(im.size) <= encode.THUMB_PX


def test_style_pages_written_by_worker_processes_are_the_same(run_dir: Path, monkeypatch):
    # A collection's 400 style pages are shared out between forked workers; each page as one process writes it.
    build.write_report(run_dir)
    alone = {k: v for k, v in _pages(run_dir).items() if k.startswith("styles/")}  # the front page has the time
    shutil.rmtree(run_dir / "styles")  # else the pages already there are not written again
    monkeypatch.setattr(build, "PAGES_IN_PROCESSES_FROM", 1)
    monkeypatch.setattr(parallel, "workers", lambda: 2)
    forked, real = [], parallel.fork_map
    monkeypatch.setattr(parallel, "fork_map", lambda fn, parts, inherit=None: forked.append(fn) or real(fn, parts, inherit))
    written = build.write_report(run_dir)
    assert build._pages_part in forked
    assert {k: v for k, v in _pages(run_dir).items() if k.startswith("styles/")} == alone and len(alone) == 2
    assert [p for p in written if p.parent.name == "styles"] == sorted((run_dir / "styles").glob("*.html"))


def test_without_loss_log_or_ledger(run_dir: Path, tmp_path: Path):
    (run_dir / LOSS_LOG).unlink()
    assert "loss curves" in build.write_report(run_dir)[0].read_text()
    assert "<polyline" not in "".join(_pages(run_dir).values())
    with pytest.raises(ConfigError):
        build.write_report(tmp_path / "nowhere")


def test_terminal_report(run_dir: Path):
    summary = status.load_summary(run_dir)
    json.dumps(summary.to_dict())  # `status --json`
    assert [s["total_loss"] for s in summary.highest_loss] == [1.2, 0.9, 0.7]
    console = Console(record=True, width=200)
    status.print_report(console, run_dir, summary)
    text = console.export_text()
    for expected in ("Slowest pairs", "Highest final total loss", "1 failed", "unreadable",
                     f"nst-batch retry {run_dir}", "of compute in total"):
        assert expected in text


def test_terminal_report_prints_names_verbatim():
    odd = "x[/b]/[draft].png"  # rich markup would drop '[draft]' and raise on '[/b]'
    pair = {"content": odd, "style": "[s]", "seconds": 3.0, "total_loss": 1.0}
    summary = status.Summary({"pending": 0, "running": 0, "done": 1, "failed": 1}, 2, 3.0, 3.0, None, 0.0,
                             [{"content": odd, "style": "[s]", "kind": "unreadable", "message": f"{odd}: bad",
                               "attempts": 1}], [pair], [pair])
    console = Console(record=True, width=200)
    status.print_report(console, Path("out[/x]"), summary)
    text = console.export_text()
    assert text.count(odd) == 4 and "[s]" in text and "nst-batch retry 'out[/x]'" in text


def test_retry_commands_name_each_kind_when_there_are_several():
    fails = [{"kind": "oom"}, {"kind": "unreadable"}, {"kind": "oom"}]
    assert status.retry_commands(Path("my out"), fails) == [
        "nst-batch retry 'my out'", "nst-batch retry 'my out' --kind oom", "nst-batch retry 'my out' --kind unreadable"]
    assert status.retry_commands(Path("r"), fails[:1]) == ["nst-batch retry r"]


def _ledger_rows(out: Path):
    ledger = Ledger(out, create=False)
    try:
        return ledger.rows()
    finally:
        ledger.close()


# Injected into a copy of the page: records script errors, console errors and failed loads.
_CHECK = """<script>
window.__errors = [];
addEventListener("error", e => __errors.push(e.message || "failed to load " + (e.target.src || e.target.href)), true);
const __ce = console.error; console.error = (...a) => { __errors.push(a.join(" ")); __ce(...a); };
addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  document.body.dataset.images = document.images.length;
  document.body.dataset.broken = JSON.stringify(broken);
  document.body.dataset.errors = JSON.stringify(__errors);
});
</script>"""


def test_pages_render_in_headless_chromium(run_dir: Path, tmp_path: Path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must install it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    build.write_report(run_dir)
    images = {}
    for rel, text in _pages(run_dir).items():
        # Lazy images below the fold never load in a headless dump; the check wants them all, so load
        # eagerly. The copy sits beside the page, so its relative links are the page's.
        check = (run_dir / rel).with_name("check.html")
        check.write_text(text.replace("<head>", "<head>" + _CHECK, 1).replace('loading="lazy"', 'loading="eager"'))
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom",
             check.as_uri()], capture_output=True, text=True, timeout=120)
        check.unlink()
        assert proc.returncode == 0, proc.stderr[-2000:]
        body = _parse(proc.stdout).body
        images[rel] = body.get("data-images")
        assert json.loads(body["data-broken"]) == [], rel
        assert json.loads(body["data-errors"]) == [], rel
    assert images == {"report.html": "6", "styles/1.html": "4", "styles/2.html": "4"}


# -- input limits, skipped inputs, hostile names ------------------------------------------------------


def _one_pair_run(tmp_path: Path, content_name: str, settings: dict, content_size=(64, 40), fail=None) -> Path:
    src, out = tmp_path / "src", tmp_path / "out"
    c = make_image(src / "c" / content_name, *content_size, 1)
    s = make_image(src / "s" / "s.png", 48, 48, 2)
    ledger = Ledger(out)
    try:
        ledger.sync([Pair(content_name, "s.png", c, s, f"s/{Path(content_name).stem}.png", "r", "")], out, 60)
        ledger.set_meta("settings", settings)
        row = ledger.claim(WORKER, 60)
        if fail:
            ledger.fail(row.id, WORKER, *fail)
        else:
            make_image(out / row.output, 40, 24, 3)
            ledger.done(Finished(row.id, WORKER, 4, 0.5, 0.2, 0.01, 0.7))
    finally:
        ledger.close()
    return out


def test_a_source_over_max_megapixels_is_not_decoded_for_a_thumbnail(tmp_path: Path):
    # 64×40 = 2560 px, over a 0.0024 MP limit: the run failed it as too_large, and the report must not
    # decode it either (at full size, on every core at once, is what the limit is there to prevent).
    out = _one_pair_run(tmp_path, "huge.png", {"max_megapixels": 0.0024},
                        fail=("too_large", "huge.png: 64x40 is over the 0.0024 MP limit (key 'max_megapixels')"))
    build.write_report(out)  # reads the limit from the settings stored in the ledger
    row = _ledger_rows(out)[0]
    assert not (out / thumb_path("c", row.content_path)).exists()
    assert (out / thumb_path("s", row.style_path)).exists()  # 48×48 = 2304 px: within it
    assert "no preview" in _pages(out)["styles/1.html"]


@pytest.mark.parametrize("name", ["=HYPERLINK(\"http://x\",\"y\").png", "+1.png", "-2+3.png", "@SUM(A1).png",
                                  "\tx.png", "\rx.png"])
def test_summary_csv_cells_never_start_a_formula(tmp_path: Path, name: str):
    out = _one_pair_run(tmp_path, name, {}, fail=("unreadable", f"{name}: not an image Pillow can decode"))
    build.write_report(out)
    with open(out / "summary.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["content"] == "'" + name and row["error_message"] == "'" + name + ": not an image Pillow can decode"
    assert row["style"] == "s.png" and row["error_kind"] == "unreadable"  # harmless cells stay as they are
    assert _ledger_rows(out)[0].content == name  # the ledger keeps the real name


def test_skipped_inputs_are_listed_in_the_report_and_the_summary(tmp_path: Path):
    out = _one_pair_run(tmp_path, "a.png", {})
    ledger = Ledger(out)
    try:
        ledger.set_meta("skipped", [{"key": "content", "path": "notes <1>.txt", "reason": "not_image"},
                                    {"key": "content", "path": "IMG_0001.HEIC", "reason": "needs_heif"},
                                    {"key": "styles", "path": ".DS_Store", "reason": "hidden"}])
    finally:
        ledger.close()
    line = "3 input files skipped: 1 hidden, 1 not an image, 1 HEIC/HEIF (install nst-batch[heif])"
    text = build.write_report(out)[0].read_text()
    assert "notes &lt;1&gt;.txt" in text and "IMG_0001.HEIC" in text and ".DS_Store" in text
    assert "install nst-batch[heif]" in text and _e(line) in text and 'href="#skipped"' in text
    summary = status.load_summary(out)
    assert [s["path"] for s in summary.to_dict()["skipped"]] == ["notes <1>.txt", "IMG_0001.HEIC", ".DS_Store"]
    console = Console(record=True, width=200)
    status.print_status(console, out, summary)
    assert f"{line}; report.html names them" in console.export_text()


def _e(s: str) -> str:
    import html

    return html.escape(s, quote=True)


HOSTILE = "\x1b[31mred\x1b[0m\x07.png"  # colours the terminal and rings the bell, if printed raw


def test_printable_makes_control_characters_visible():
    from nst_batch.files.names import printable

    assert printable(HOSTILE) == "\\x1b[31mred\\x1b[0m\\x07.png"
    assert printable("a\nb\tc\x9bd\x7f") == "a\\x0ab\\x09c\\x9bd\\x7f"  # 0x9b: CSI on 8-bit terminals
    assert printable("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # shows as 'exe.png' otherwise
    assert printable(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"  # a Latin-1 name: its byte, not a crash
    assert printable("été [draft] 写真.png") == "été [draft] 写真.png"  # ordinary names untouched


def test_terminal_status_and_report_neutralise_control_characters():
    pair = {"content": HOSTILE, "style": "s\x1b]0;title\x07.png", "seconds": 3.0, "total_loss": 1.0}
    summary = status.Summary({"pending": 0, "running": 0, "done": 1, "failed": 1}, 2, 3.0, 3.0, None, 0.0,
                             [{"content": HOSTILE, "style": "s.png", "kind": "unreadable",
                               "message": f"{HOSTILE}: bad", "attempts": 1}], [pair], [pair])
    buf = io.StringIO()
    status.print_report(Console(file=buf, width=300), Path("out\x1b[2J"), summary)
    text = buf.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[31mred\\x1b[0m\\x07.png" in text and "out\\x1b[2J" in text


# -- collections: stored curves, runner-made thumbnails, pages, per-style sheets ----------------------

def _log(*rows):
    from types import SimpleNamespace

    return [SimpleNamespace(step=s, px=px, content=c, style=st, total=c + st) for s, px, c, st in rows]


def test_curve_record_keeps_the_last_start_and_the_final_losses_and_thins():
    # An out-of-memory retry starts again at step 1 (smaller px); the final row repeats the last step.
    rec = losslog.curve_record(_log((10, 64, 1.0, 9.0), (20, 64, 1.0, 8.0), (10, 45, 1.0, 7.0), (20, 45, 1.0, 6.0),
                                   (20, 45, 1.0, 5.5), (30, 45, float("nan"), 5.0)))
    assert json.loads(rec) == [[10, 45, 1, 7, 8], [20, 45, 1, 5.5, 6.5]]
    assert losslog.parse_curve(rec) == [[10, 45, 1, 7, 8], [20, 45, 1, 5.5, 6.5]]
    long = json.loads(losslog.curve_record(_log(*((s, 32, 1 / s, 2 / s) for s in range(1, 1001)))))
    assert len(long) == losslog.CURVE_MAX_POINTS and long[0][0] == 1 and long[-1][0] == 1000
    assert long[1][3] == float(f"{2 / long[1][0]:.4g}")  # 4 significant digits
    assert losslog.curve_record([]) is None
    assert losslog.parse_curve("not json") == losslog.parse_curve("[[1, 2]]") == losslog.parse_curve(None) == []


def _store_curve(out: Path, content: str, style: str, steps: list[tuple[int, int]], scale: float) -> None:
    ledger = Ledger(out)
    try:
        rec = losslog.curve_record(_log(*((s, px, 0.5 * scale / s, 2.0 * scale / s) for s, px in steps)))
        ledger.db.execute("UPDATE pairs SET curve=? WHERE content=? AND style=?", (rec, content, style))
    finally:
        ledger.close()


def _polylines(out: Path, page: str) -> list[str]:
    return re.findall(r'<polyline points="([^"]*)"', _pages(out)[page])


def test_curves_come_from_the_ledger_and_from_losses_csv_only_for_pairs_without_one(run_dir: Path, monkeypatch):
    # c1 × s1 has 4 steps in losses.csv; the ledger's curve (what the runner stores) has 2 and wins.
    _store_curve(run_dir, "c1.png", "s1.png", [(10, 32), (40, 64)], 1.0)
    build.write_report(run_dir)
    assert sorted(len(p.split()) for p in _polylines(run_dir, "styles/1.html")) == [2] * 3
    # c1 × s2 has no stored curve: drawn from losses.csv (4 steps of attempt 2), the odd name's too (1).
    assert sorted(len(p.split()) for p in _polylines(run_dir, "styles/2.html")) == [1] * 3 + [4] * 3
    # A losses.csv over the limit is not read: only stored curves are drawn.
    monkeypatch.setattr(curves, "CURVE_CSV_MAX_BYTES", 10)
    build.write_report(run_dir)
    assert len(_polylines(run_dir, "styles/1.html")) == 3 and _polylines(run_dir, "styles/2.html") == []


def test_the_runner_made_thumbnail_is_used_and_kept(run_dir: Path):
    output = run_dir / "s1" / "c1.png"
    with Image.open(output) as im:
        big = im.resize((480, 300))
    dst = encode.write_thumbnail(run_dir / thumb_path("o", "s1/c1.png"), big)
    assert dst == run_dir / thumb_path("o", "s1/c1.png")
    with Image.open(dst) as im:
        assert im.format == "JPEG" and im.size == (240, 150)  # 240 px on the long side
    made = dst.stat().st_mtime_ns
    build.write_report(run_dir)
    assert dst.stat().st_mtime_ns == made  # not decoded or written again
    assert f'src="../{thumb_path("o", "s1/c1.png")}"' in _pages(run_dir)["styles/1.html"]
    with Image.open(run_dir / thumb_path("o", "s2/c1.png")) as im:  # made by the report: an older run
        assert max(im.size) <= encode.THUMB_PX


def test_a_style_with_more_photos_than_a_page_gets_several_and_old_pages_go(run_dir: Path, monkeypatch):
    monkeypatch.setattr(pages, "PAGE_ROWS", 2)
    build.write_report(run_dir)
    assert set(_pages(run_dir)) == {"report.html", "styles/1.html", "styles/1-2.html", "styles/2.html",
                                    "styles/2-2.html"}
    _check_links(run_dir)  # the pager, the front page's links to each page, failures' links to their card
    written = _pages(run_dir)
    for k in (1, 2):  # each pair on exactly one page of its style, in plan order
        ids = [re.findall(r'<div class="card [^"]*" id="(p\d+)"', written[p]) for p in (f"styles/{k}.html",
                                                                                   f"styles/{k}-2.html")]
        assert [len(i) for i in ids] == [2, 1]
    assert 'href="styles/1-2.html#p' in written["report.html"]  # broken.jpg × s1 failed: 3rd photo, page 2
    monkeypatch.setattr(pages, "PAGE_ROWS", 500)
    build.write_report(run_dir)
    assert set(_pages(run_dir)) == {"report.html", "styles/1.html", "styles/2.html"}  # stale pages removed


def test_the_contact_sheet_rule():
    assert sheets.layout_is_readable(sheets.sheet_layout(82, 20), 82, 20)
    assert not sheets.layout_is_readable(sheets.sheet_layout(83, 20), 83, 20)  # cells under 96 px
    assert not sheets.layout_is_readable(sheets.sheet_layout(10, 200), 10, 200)
    assert sheets.style_sheet_shape(3) == (3, 1)
    assert sheets.style_sheet_shape(10_000) == (sheets.SHEET_STYLE_COLUMNS,
                                                sheets.SHEET_STYLE_MAX // sheets.SHEET_STYLE_COLUMNS)


def test_per_style_contact_sheets_when_one_sheet_would_be_unreadable(run_dir: Path, monkeypatch):
    monkeypatch.setattr(sheets, "SHEET_LABEL_PX", sheets.SHEET_CELL_PX + 1)  # as if cells had to shrink
    paths = build.write_report(run_dir)
    drawn = sorted(p.relative_to(run_dir).as_posix() for p in paths if p.parent.name == "contact_sheets")
    assert drawn == ["contact_sheets/1-s1.jpg", "contact_sheets/2-s2.jpg"]
    cell = sheets.SHEET_STYLE_CELL_PX
    for rel in drawn:
        with Image.open(run_dir / rel) as im:
            assert im.size == (3 * cell, 2 * cell)  # 3 photos in a row, under the painting's row
    _check_links(run_dir)
    assert 'href="contact_sheets/1-s1.jpg"' in _pages(run_dir)["report.html"]
    made = (run_dir / drawn[0]).stat().st_mtime_ns
    build.write_report(run_dir)
    assert (run_dir / drawn[0]).stat().st_mtime_ns == made  # nothing changed: not drawn again
    monkeypatch.undo()
    build.write_report(run_dir)
    assert not (run_dir / "contact_sheets" / "1-s1.jpg").exists()  # one sheet is enough again


def test_hostile_style_and_photo_names_are_escaped_on_every_page(tmp_path: Path):
    hostile = '<img src=x onerror=alert(1)> & "q" \'s\'.png'
    src, out = tmp_path / "src", tmp_path / "out"
    c = make_image(src / "c" / hostile, 40, 30, 1)
    s = make_image(src / "s" / hostile, 30, 30, 2)
    ledger = Ledger(out)
    try:
        ledger.sync([Pair(hostile, hostile, c, s, "s/x.png", "r", "")], out, 60)
        row = ledger.claim(WORKER, 60)
        ledger.fail(row.id, WORKER, "unreadable", f"{hostile}: <b>bad</b>")
    finally:
        ledger.close()
    build.write_report(out)
    for rel, text in _pages(out).items():
        assert "<img src=x" not in text and "<b>bad" not in text, rel
        assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#34;q&#34; &#39;s&#39;.png" in text, rel
    _check_links(out)


def test_cards_escape_as_the_templates_do():
    import markupsafe

    for text in (HOSTILE, '<img src=x onerror=alert(1)> & "q" \'s\'.png', ODD, "plain.png", "&amp;", ""):
        assert cards.esc(text) == str(markupsafe.escape(text))


def test_a_page_is_written_again_only_when_what_it_shows_changed(run_dir: Path):
    build.write_report(run_dir)
    page1, page2 = run_dir / "styles" / "1.html", run_dir / "styles" / "2.html"
    made = page1.stat().st_mtime_ns, page2.stat().st_mtime_ns
    build.write_report(run_dir)
    assert (page1.stat().st_mtime_ns, page2.stat().st_mtime_ns) == made
    ledger = Ledger(run_dir)
    try:  # the running pair of s2 finishes
        row = next(r for r in ledger.rows() if r.state == "running")
        make_image(run_dir / row.output, 40, 32, row.id)
        ledger.done(Finished(row.id, WORKER, 40, 0.5, 0.2, 0.01, 0.8))
    finally:
        ledger.close()
    build.write_report(run_dir)
    assert page1.stat().st_mtime_ns == made[0] and page2.stat().st_mtime_ns != made[1]
    assert 'class="st st-running"' not in page2.read_text()
    _store_curve(run_dir, "c1.png", "s1.png", [(10, 32), (40, 64)], 1.0)  # a stored curve changes page 1
    build.write_report(run_dir)
    assert page1.stat().st_mtime_ns != made[0]


# -- the front page: pictures first ----------------------------------------------------------------

def _front(out: Path) -> str:
    return (out / "report.html").read_text()


def test_a_small_run_opens_on_its_results_grid_and_folds_the_settings(run_dir: Path):
    build.write_report(run_dir)
    text = _front(run_dir)
    # The grid of results comes first: before the styles table, the failures and the settings.
    assert text.index('id="results"') < text.index('id="styles"') < text.index('id="failures"') \
        < text.index('id="settings"')
    start = text.index('<table class="results"')
    grid = text[start:text.index("</table>", start)]
    assert grid.count("<tr>") == 1 + 3  # the styles' row, then a row per photo
    # Each output on disk: its thumbnail, linked to the full image.
    for output in ("s1/c1.png", "s2/c1.png"):
        thumb = thumb_path("o", output)
        assert f'<a href="{output}" title=' in grid and f'<img src="{thumb}"' in grid
    # The failed pair shows its kind and reason and links to its card; the others say what they are.
    assert 'class="err" href="styles/1.html#p' in grid and "<b>unreadable</b>" in grid
    assert "not an image &lt;Pillow&gt; can decode" in grid
    assert "output missing" in grid and "st-running" in grid and "st-pending" in grid
    # Every style's column header links to its page; the settings are there, folded away.
    assert 'href="styles/1.html"' in grid and 'href="styles/2.html"' in grid
    assert re.search(r'<details id="settings"><summary>Settings \(4\)</summary>', text)
    assert "<th>size</th>" in text[text.index('id="settings"'):]


def _collection(tmp_path: Path, n_contents: int, styles: int, failed_every: int) -> Path:
    """A synthetic ledger (no VGG): n_contents × styles pairs, every failed_every-th pair failed, the
    others done with a small output on disk (the runner would have written it)."""
    src, out = tmp_path / "src", tmp_path / "out"
    photo = make_image(src / "c" / "p.png", 40, 30, 1)
    paints = [make_image(src / "s" / f"s{j}.png", 30, 30, 10 + j) for j in range(styles)]
    pairs = [Pair(f"p{i:03d}.png", s.name, photo, s, f"{s.stem}/p{i:03d}.png", "r", "")
             for s in paints for i in range(n_contents)]
    ledger = Ledger(out)
    try:
        ledger.sync(pairs, out, lease_s=60)
        ledger.set_meta("settings", {"size": 64, "steps": 20})
        for r in ledger.rows():
            if r.id % failed_every == 0:
                ledger.db.execute("UPDATE pairs SET state='failed', attempts=1, error_kind='oom', "
                                  "error_message=? WHERE id=?", (f"out of memory at 512 px ({r.content})", r.id))
            else:
                ledger.db.execute("UPDATE pairs SET state='done', attempts=1, seconds=2.0, started_at=?, "
                                  "finished_at=?, steps=20, total_loss=1.5 WHERE id=?", (r.id, r.id + 2.0, r.id))
                make_image(out / r.output, 16, 12, r.id)
    finally:
        ledger.close()
    return out


def test_a_large_run_opens_on_a_sample_per_style_and_lists_every_failure(tmp_path: Path):
    n_contents, n_styles = 26, 4  # 104 pairs: over the small-run grid's 100
    assert n_contents * n_styles > front.FRONT_GRID_MAX_PAIRS
    out = _collection(tmp_path, n_contents, n_styles, failed_every=9)
    build.write_report(out)
    text = _front(out)
    assert 'class="results"' not in text  # no grid of every pair
    sections = re.findall(r'<section class="sample" id="style-(\d)">(.*?)</section>', text, re.S)
    assert [k for k, _ in sections] == ["1", "2", "3", "4"]
    rows = _ledger_rows(out)
    for k, body in sections:
        style = f"s{int(k) - 1}.png"
        done = [r for r in rows if r.style == style and r.state == "done"]
        strip = body[body.index('class="strip"'):]
        # The style's first outputs, in plan order, each linked to its card on the style's page. They are
        # smaller than a thumbnail: shown as they are, no thumbnail made.
        cards = re.findall(r'<a href="(styles/[^"]+)" title="[^"]*"><img src="([^"]+)"', strip)
        assert cards == [(f"styles/{k}.html#p{r.id}", r.output) for r in done[:front.FRONT_SAMPLE]]
        assert f'href="styles/{k}.html"' in body  # the style's page
    failed = [r for r in rows if r.state == "failed"]
    assert len(failed) == 104 // 9
    failures = text[text.index('id="failures"'):text.index('id="settings"')]
    for r in failed:  # every one, with its reason and a link to its card
        assert f"out of memory at 512 px ({r.content})" in failures
        assert f'#p{r.id}"' in failures
    assert text.index('class="sample"') < text.index('id="failures"')  # pictures first
    assert not list((out / "thumbs").glob("o-*"))
    assert f'src="../{done[0].output}"' in (out / "styles" / "4.html").read_text()
    assert re.search(r"<details id=\"settings\"><summary>Settings \(2\)</summary>", text)
    _check_links(out)
