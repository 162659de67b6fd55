"""The plan: which files are pairs, in what order, under which output names, with which recipe."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_image
from nst_batch.files import decode
from nst_batch.errors import ConfigError, PairError
from nst_batch.files.decode import discover
from nst_batch.batch.ledger import Ledger
from nst_batch.config.manifest import Settings
from nst_batch.files.names import Skipped, skipped_line
from nst_batch.files.hashing import HashCache, file_hash
from nst_batch.batch.plan import make_plan, recipe_hash, recipe_hasher, recipe_settings


def settings(content: Path, styles: Path, out: Path, **kw) -> Settings:
    return Settings(content=content, styles=styles, out=out, **kw)


def test_count_and_photo_major_order(folders):
    # Photo by photo: a worker decodes each photo once for all its styles.
    content, styles, out = folders
    pairs = make_plan(settings(content, styles, out))
    assert len(pairs) == 3 * 2
    assert [(p.content, p.style) for p in pairs] == [
        (c, s) for c in ("square.png", "tall.jpg", "wide.png") for s in ("s1.png", "s2.jpg")]
    assert pairs == make_plan(settings(content, styles, out))  # stable


def test_hidden_files_and_the_output_folder_are_skipped(tmp_path):
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "a.png", 20, 20, 1)
    make_image(content / ".hidden.png", 20, 20, 2)
    make_image(content / ".cache" / "b.png", 20, 20, 3)
    out = content / "results"  # the output folder inside the content folder: its images are not contents
    make_image(out / "s" / "a.png", 20, 20, 4)
    make_image(out / "thumbs" / "x.jpg", 20, 20, 5)
    make_image(styles / "s.png", 20, 20, 6)
    pairs = make_plan(settings(content, styles, out))
    assert [p.content for p in pairs] == ["a.png"]


def test_output_folder_given_relative_is_still_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "c" / "a.png", 20, 20, 1)
    make_image(tmp_path / "c" / "out" / "s" / "a.png", 20, 20, 2)
    make_image(tmp_path / "s" / "s.png", 20, 20, 3)
    assert [p.content for p in make_plan(settings(Path("c"), Path("s"), Path("c/./out")))] == ["a.png"]


def test_non_images_ignored_but_corrupt_images_listed(tmp_path):
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "a.png", 20, 20, 1)
    (content / "notes.txt").write_text("hello")
    (content / "Thumbs.db").write_bytes(b"\x00" * 100)
    (content / "broken.jpg").write_bytes(b"not a jpeg at all")  # listed: it fails later, as a pair
    (content / "empty.PNG").write_bytes(b"")
    make_image(content / "tmp.png", 20, 20, 2).rename(content / "no_extension")  # an image found by content
    make_image(styles / "s.png", 20, 20, 3)
    pairs = make_plan(settings(content, styles, tmp_path / "out"))
    assert [p.content for p in pairs] == ["a.png", "broken.jpg", "empty.PNG", "no_extension"]
    assert len({p.output for p in pairs}) == 4


def test_repeated_stems_get_distinct_output_names(tmp_path):
    content, styles = tmp_path / "c", tmp_path / "s"
    for name in ("a.jpg", "a.png", "b.png"):
        make_image(content / name, 20, 20, 1)
    make_image(styles / "s.png", 20, 20, 3)
    outputs = {p.content: p.output for p in make_plan(settings(content, styles, tmp_path / "out"))}
    assert outputs["b.png"] == "s/b.png"
    assert len(set(outputs.values())) == 3
    assert outputs["a.jpg"] != outputs["a.png"]


@pytest.mark.parametrize("names", [
    ("a.jpg", "a.png", "a_jpg.png"),  # the suffix-disambiguated name of a.jpg is a real stem too
    ("A.png", "a.png"),  # same up to case: one file on macOS/Windows
    ("a.png", "a.PNG"),
    ("x.png", "x.jpg", "x_png.jpg", "x_png.png"),
])
def test_output_names_never_collide(tmp_path, names):
    content, styles = tmp_path / "c", tmp_path / "s"
    for i, name in enumerate(names):
        make_image(content / name, 20, 20, i)
    make_image(styles / "s.png", 20, 20, 9)
    found = discover(content)
    if len(found) < len(names):
        pytest.skip("case-insensitive file system")
    pairs = make_plan(settings(content, styles, tmp_path / "out"))
    assert len(pairs) == len(names)
    assert len({p.output.casefold() for p in pairs}) == len(names), [p.output for p in pairs]


def test_style_names_never_collide(tmp_path):
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "a.png", 20, 20, 1)
    make_image(styles / "x" / "y.png", 20, 20, 2)  # the folder blend "x"
    make_image(styles / "x.png", 20, 20, 3)  # the style file "x.png", whose folder would be "x" too
    pairs = make_plan(settings(content, styles, tmp_path / "out"))
    assert len({p.output for p in pairs}) == 2, [p.output for p in pairs]


def test_subfolders(tmp_path):
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "trip" / "day1" / "a.png", 20, 20, 1)
    make_image(content / "a.png", 20, 20, 2)
    make_image(styles / "oils" / "v.png", 20, 20, 3)
    make_image(styles / "oils" / "dutch" / "w.png", 20, 20, 4)
    pairs = make_plan(settings(content, styles, tmp_path / "out", format="jpg"))
    # A styles sub-folder is one style, a blend of every image under it (equal weights), named after it.
    assert [(p.content, p.style, p.output) for p in pairs] == [
        ("a.png", "oils", "oils/a.jpg"),
        ("trip/day1/a.png", "oils", "oils/trip/day1/a.jpg"),
    ]
    assert pairs[1].content_path == (content / "trip" / "day1" / "a.png").resolve()
    assert [(m.path.relative_to(styles.resolve()).as_posix(), m.weight) for m in pairs[0].members] == [
        ("oils/dutch/w.png", 0.5), ("oils/v.png", 0.5)]


def test_empty_folder_is_a_config_error(tmp_path):
    make_image(tmp_path / "c" / "a.png", 20, 20, 1)
    (tmp_path / "s").mkdir()
    with pytest.raises(ConfigError, match="key 'styles'"):
        make_plan(settings(tmp_path / "c", tmp_path / "s", tmp_path / "out"))


def test_output_path_that_is_a_file(folders):
    content, styles, out = folders
    out.write_text("")
    with pytest.raises(ConfigError, match="key 'out'"):
        make_plan(settings(content, styles, out))


def test_recipe_changes_with_pixels_not_with_bookkeeping(folders):
    content, styles, out = folders
    base = {(p.content, p.style): p.recipe for p in make_plan(settings(content, styles, out))}
    assert len(set(base.values())) == len(base)  # every pair its own recipe
    same = make_plan(settings(content, styles, out, log_every=1, device="cpu", lease_s=5))
    assert {(p.content, p.style): p.recipe for p in same} == base
    for change in ({"steps": 5}, {"size": 64}, {"seed": 1}, {"layers": "tutorial"}, {"style_weight": 2.0}):
        other = make_plan(settings(content, styles, out, **change))
        assert all(p.recipe != base[(p.content, p.style)] for p in other), change
    make_image(content / "wide.png", 64, 40, 99)  # new pixels under the same name
    changed = {(p.content, p.style): p.recipe for p in make_plan(settings(content, styles, out))}
    assert [k for k in base if changed[k] != base[k]] == [("wide.png", "s1.png"), ("wide.png", "s2.jpg")]


# -- what is left out, and why: nothing in an input folder vanishes without a word ----------------------


def test_every_unused_entry_is_listed_with_its_reason(tmp_path):
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "a.png", 20, 20, 1)
    (content / "notes.txt").write_text("hello")
    (content / "Thumbs.db").write_bytes(b"\x00" * 100)
    make_image(content / ".hidden.png", 20, 20, 2)
    make_image(content / ".cache" / "b.png", 20, 20, 3)
    out = content / "styled"
    make_image(out / "s" / "a.png", 20, 20, 4)
    (content / "album").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    make_image(tmp_path / "elsewhere" / "x.png", 20, 20, 5)
    (content / "gone.png").symlink_to(tmp_path / "missing.png")  # a broken link
    os.mkfifo(content / "pipe.png")  # must not hang the search either
    make_image(styles / "s.png", 20, 20, 6)
    (styles / "palette.txt").write_text("red")
    plan = make_plan(settings(content, styles, out))
    assert [p.content for p in plan] == ["a.png"]
    assert [(k.key, k.path, k.reason) for k in plan.skipped] == [
        ("content", ".cache/", "hidden_folder"),
        ("content", ".hidden.png", "hidden"),
        ("content", "Thumbs.db", "not_image"),
        ("content", "album/", "folder_link"),
        ("content", "gone.png", "not_file"),
        ("content", "notes.txt", "not_image"),
        ("content", "pipe.png", "not_file"),
        ("content", "styled/", "output_folder"),
        ("styles", "palette.txt", "not_image"),
    ]
    assert skipped_line(plan.skipped) == ("9 input files and folders skipped: 3 not images, 2 not regular files, "
                                          "1 hidden, 1 hidden folder, 1 link to a folder (not followed), "
                                          "1 output folder")
    assert skipped_line([Skipped("content", "x", "not_image")]) == "1 input file skipped: 1 not an image"


def test_another_runs_output_folder_inside_the_inputs_is_not_read(tmp_path):
    # A first run wrote into c/styled, a second run writes elsewhere: c/styled's outputs, thumbnails and
    # contact sheet are not photos to restyle. A folder holding a run ledger is an output folder.
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "a.png", 20, 20, 1)
    make_image(content / "styled" / "s" / "a.png", 20, 20, 2)
    make_image(content / "styled" / "contact_sheet.jpg", 20, 20, 3)
    (content / "styled" / "ledger.sqlite").write_bytes(b"")
    make_image(styles / "s.png", 20, 20, 4)
    plan = make_plan(settings(content, styles, tmp_path / "out2"))
    assert [p.content for p in plan] == ["a.png"]
    assert [(k.path, k.reason) for k in plan.skipped] == [("styled/", "output_folder")]


def test_a_folder_of_nothing_usable_says_why(tmp_path):
    make_image(tmp_path / "c" / "a.png", 20, 20, 1)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "readme.txt").write_text("no styles yet")
    with pytest.raises(ConfigError, match=r"key 'styles'.*1 input file skipped: 1 not an image"):
        make_plan(settings(tmp_path / "c", tmp_path / "s", tmp_path / "out"))


@pytest.fixture
def no_heif(monkeypatch):
    """This process as if pillow-heif were not installed: importing it fails."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # None in sys.modules makes `import` raise
    decode.heif_support.cache_clear()
    yield
    decode.heif_support.cache_clear()


HEIC_HEADER = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"  # an iPhone photo's first bytes


def test_heic_without_the_extra_is_skipped_with_the_reason(tmp_path, no_heif):
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "a.png", 20, 20, 1)
    (content / "IMG_0001.HEIC").write_bytes(HEIC_HEADER + b"\x00" * 64)
    (content / "IMG_0002.heif").write_bytes(HEIC_HEADER + b"\x00" * 64)
    (content / "IMG_0003").write_bytes(HEIC_HEADER + b"\x00" * 64)  # no extension: known by its bytes
    make_image(styles / "s.png", 20, 20, 2)
    plan = make_plan(settings(content, styles, tmp_path / "out"))
    assert [p.content for p in plan] == ["a.png"]
    assert [(k.path, k.reason) for k in plan.skipped] == [
        ("IMG_0001.HEIC", "needs_heif"), ("IMG_0002.heif", "needs_heif"), ("IMG_0003", "needs_heif")]
    assert skipped_line(plan.skipped) == "3 input files skipped: 3 HEIC/HEIF (install nst-batch[heif])"


def test_heic_named_jpg_without_the_extra_fails_saying_what_it_needs(tmp_path, no_heif):
    p = tmp_path / "IMG_0001.jpg"  # some exports keep HEIC data under a .jpg name
    p.write_bytes(HEIC_HEADER + b"\x00" * 64)
    with pytest.raises(PairError, match=r"install nst-batch\[heif\]") as e:
        decode.load_rgb(p)
    assert e.value.kind == "unreadable"


def test_heic_photo_is_planned_and_decodes(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    content, styles = tmp_path / "c", tmp_path / "s"
    photo = Image.new("RGB", (48, 32), (200, 40, 30))
    photo.paste((30, 40, 200), (0, 0, 16, 32))  # a blue band on the left
    content.mkdir()
    pillow_heif.from_pillow(photo).save(str(content / "IMG_0001.HEIC"), quality=95)
    make_image(styles / "s.png", 20, 20, 2)
    plan = make_plan(settings(content, styles, tmp_path / "out"))
    assert [(p.content, p.output) for p in plan] == [("IMG_0001.HEIC", "s/IMG_0001.png")]
    assert plan.skipped == []
    im = decode.load_rgb(plan[0].content_path)
    assert im.size == (48, 32)
    r, g, b = im.getpixel((40, 16))
    assert r > 150 and b < 100
    r, g, b = im.getpixel((4, 16))
    assert b > 150 and r < 100


def test_avif_is_read_by_pillow_itself(tmp_path):
    if not decode.avif_support():
        pytest.skip("this Pillow has no AVIF support")
    content, styles = tmp_path / "c", tmp_path / "s"
    content.mkdir()
    Image.new("RGB", (40, 24), (30, 180, 60)).save(content / "p.avif", quality=95)
    make_image(styles / "s.png", 20, 20, 2)
    plan = make_plan(settings(content, styles, tmp_path / "out"))
    assert [p.content for p in plan] == ["p.avif"]
    r, g, b = decode.load_rgb(plan[0].content_path).getpixel((20, 12))
    assert g > 150 and r < 80


def test_avif_without_pillow_support_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "avif_support", lambda: False)  # a Pillow built without libavif
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "a.png", 20, 20, 1)
    (content / "p.avif").write_bytes(b"\x00\x00\x00\x20ftypavif" + b"\x00" * 64)
    make_image(styles / "s.png", 20, 20, 2)
    plan = make_plan(settings(content, styles, tmp_path / "out"))
    assert [(k.path, k.reason) for k in plan.skipped] == [("p.avif", "no_avif")]


def test_a_name_that_is_not_utf8_is_skipped_not_a_crash(tmp_path):
    # Latin-1 bytes from an old camera or a zip made on Windows: the ledger (SQLite text), summary.csv and
    # report.html hold names as UTF-8, and such a name crashed the ledger with a traceback.
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "a.png", 20, 20, 1)
    try:
        make_image(Path(os.fsdecode(bytes(content) + b"/caf\xe9.png")), 20, 20, 2)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    make_image(styles / "s.png", 20, 20, 3)
    s = settings(content, styles, tmp_path / "out")
    plan = make_plan(s)
    assert [p.content for p in plan] == ["a.png"]
    assert [(k.path, k.reason) for k in plan.skipped] == [(os.fsdecode(b"caf\xe9.png"), "bad_name")]
    ledger = Ledger(s.out)
    try:
        ledger.sync(plan, s.out, s.lease_s)
        ledger.set_meta("skipped", [k.to_dict() for k in plan.skipped])
        assert ledger.get_meta("skipped")[0]["path"] == os.fsdecode(b"caf\xe9.png")
    finally:
        ledger.close()


# -- input hashes kept between plans -----------------------------------------------------------------


HOUR_NS = 3600 * 10**9


class Reads:
    """file_hash, counting which files it read."""

    def __init__(self):
        self.paths: list[str] = []

    def __call__(self, path: Path) -> str:
        self.paths.append(Path(path).name)
        return file_hash(path)


def _age(*paths: Path) -> None:
    """An hour old: past the window in which a hash is used but not kept."""
    for p in paths:
        t = p.stat().st_mtime_ns - HOUR_NS
        os.utime(p, ns=(t, t))


def _recipes(plan) -> dict:
    return {(p.content, p.style): p.recipe for p in plan}


def test_hash_cache_reads_only_files_whose_size_or_mtime_changed(folders):
    content, styles, out = folders
    files = sorted(p for p in (*content.iterdir(), *styles.iterdir()))
    _age(*files)
    s = settings(content, styles, out)
    reads = Reads()
    first = HashCache({}, reads)
    base = _recipes(make_plan(s, first))
    assert sorted(reads.paths) == sorted(p.name for p in files)  # cold: each file read once
    assert _recipes(make_plan(s)) == base  # the cache changes no recipe
    known, forget = first.changes()
    assert set(known) == {str(p.resolve()) for p in files} and forget == []

    reads.paths.clear()
    warm = HashCache(known, reads)
    assert _recipes(make_plan(s, warm)) == base and reads.paths == []
    assert warm.changes() == ({}, [])  # nothing to write back

    # New bytes, same size, mtime put back (os.utime): not seen, as make and rsync do not see it.
    wide = content / "wide.png"
    st = wide.stat()
    data = bytearray(wide.read_bytes())
    data[-20] ^= 0xFF
    wide.write_bytes(bytes(data))
    os.utime(wide, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _recipes(make_plan(s, HashCache(known, reads))) == base and reads.paths == []

    # Touched (a new mtime, an hour ago still): read again, and its pairs get a new recipe.
    t = st.st_mtime_ns + 10**9
    os.utime(wide, ns=(t, t))
    again = HashCache(known, reads)
    now = _recipes(make_plan(s, again))
    assert reads.paths == ["wide.png"]
    assert sorted(k for k in base if now[k] != base[k]) == [("wide.png", "s1.png"), ("wide.png", "s2.jpg")]
    put, forget = again.changes()
    assert list(put) == [str(wide.resolve())] and put[str(wide.resolve())][1] == t and forget == []


def test_hash_cache_keeps_no_young_or_unreadable_file_and_forgets_gone_ones(folders):
    content, styles, out = folders
    _age(*content.iterdir(), *styles.iterdir())
    s = settings(content, styles, out)
    first = HashCache()
    make_plan(s, first)
    known, _ = first.changes()
    make_image(content / "new.png", 40, 30, 7)  # just written: its mtime may yet be shared by a later edit
    (content / "tall.jpg").unlink()
    cache = HashCache(known, lambda p: "unreadable:13" if p.name == "wide.png" else file_hash(p))
    os.utime(content / "wide.png", ns=(1, 1))  # a changed mtime: read again, and unreadable
    make_plan(s, cache)
    put, forget = cache.changes()
    assert put == {} and forget == [str((content / "tall.jpg").resolve()), str((content / "wide.png").resolve())]


def test_hashes_go_through_the_ledger_from_one_run_to_the_next(folders):
    """What a worker does: known hashes from OUT's ledger, plan, store what changed."""
    content, styles, out = folders
    _age(*content.iterdir(), *styles.iterdir())
    s = settings(content, styles, out)
    assert Ledger.stored_hashes(out) == {}  # no ledger yet: none, and OUT is not created
    assert not out.exists()
    cache = HashCache(Ledger.stored_hashes(out))
    base = _recipes(make_plan(s, cache))
    led = Ledger(out)
    led.store_hashes(*cache.changes())
    led.close()
    reads = Reads()
    assert _recipes(make_plan(s, HashCache(Ledger.stored_hashes(out), reads))) == base and reads.paths == []


def test_recipe_hasher_changes_with_every_pixel_setting_and_input_and_nothing_else():
    """The one-encoding hasher: a recipe moves with each input hash and each setting in the recipe,
    never with a setting that leaves the pixels alone (so changing it redoes nothing)."""
    s = Settings(content=Path("c"), styles=Path("s"), out=Path("o"))
    base = recipe_hasher(s)("a" * 64, "b" * 64)
    assert base == recipe_hash(s, "a" * 64, "b" * 64)
    assert recipe_hasher(s)("a" * 63 + "c", "b" * 64) != base != recipe_hasher(s)("a" * 64, "b" * 63 + "c")
    assert recipe_hasher(s)("b" * 64, "a" * 64) != base  # the two inputs are not interchangeable
    for change in (dict(size=256), dict(style_weight=3.5), dict(scales=(0.25, 0.5, 1.0)), dict(seed=7),
                   dict(format="jpg"), dict(precision="bf16"), dict(steps=299), dict(colors="preserve"),
                   dict(colors="match")):
        assert recipe_hasher(s.replace(**change))("a" * 64, "b" * 64) != base, change
    for change in (dict(log_every=1), dict(lease_s=5.0), dict(device="cuda"), dict(quality=80),
                   dict(out=Path("elsewhere")), dict(max_megapixels=3.0)):
        assert recipe_hasher(s.replace(**change))("a" * 64, "b" * 64) == base, change
    jpg = s.replace(format="jpg")
    assert recipe_hasher(jpg.replace(quality=80))("a", "b") != recipe_hasher(jpg)("a", "b")  # JPEG only
    # `colors: style` is what was made before the key existed: its recipes (and finished pairs) stay.
    assert "colors" not in recipe_settings(s) and recipe_settings(s.replace(colors="match"))["colors"] == "match"
