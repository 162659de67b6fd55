"""The plan: which files are pairs, in what order, under which output names, with which recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_image
from nst_batch.errors import ConfigError
from nst_batch.images import discover
from nst_batch.manifest import Settings
from nst_batch.plan import make_plan


def settings(content: Path, styles: Path, out: Path, **kw) -> Settings:
    return Settings(content=content, styles=styles, out=out, **kw)


def test_count_and_style_major_order(folders):
    content, styles, out = folders
    pairs = make_plan(settings(content, styles, out))
    assert len(pairs) == 3 * 2
    assert [(p.style, p.content) for p in pairs] == [
        (s, c) for s in ("s1.png", "s2.jpg") for c in ("square.png", "tall.jpg", "wide.png")]
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
    make_image(styles / "x" / "y.png", 20, 20, 2)  # flattened to x__y
    make_image(styles / "x__y.png", 20, 20, 3)
    pairs = make_plan(settings(content, styles, tmp_path / "out"))
    assert len({p.output for p in pairs}) == 2, [p.output for p in pairs]


def test_subfolders(tmp_path):
    content, styles = tmp_path / "c", tmp_path / "s"
    make_image(content / "trip" / "day1" / "a.png", 20, 20, 1)
    make_image(content / "a.png", 20, 20, 2)
    make_image(styles / "oils" / "v.png", 20, 20, 3)
    pairs = make_plan(settings(content, styles, tmp_path / "out", format="jpg"))
    assert [(p.content, p.style, p.output) for p in pairs] == [
        ("a.png", "oils/v.png", "oils__v/a.jpg"),
        ("trip/day1/a.png", "oils/v.png", "oils__v/trip/day1/a.jpg"),
    ]
    assert pairs[1].content_path == (content / "trip" / "day1" / "a.png").resolve()


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


# -- input hashes kept between plans (issue 10) --------------------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from nst_batch.ledger import Ledger  # noqa: E402
from nst_batch.plan import HashCache, file_hash, recipe_hash, recipe_hasher, recipe_settings  # noqa: E402

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


def test_recipe_hasher_gives_the_recipes_already_in_ledgers():
    """Pinned: recipes written by earlier versions (json + sha256 of settings and input hashes per
    pair) are what the one-encoding hasher gives, so no finished pair is redone on upgrade."""
    s = Settings(content=Path("c"), styles=Path("s"), out=Path("o"))
    jpg = s.replace(format="jpg", quality=80)
    assert recipe_hasher(s)("a" * 64, "b" * 64) == recipe_hash(s, "a" * 64, "b" * 64) == "5fd81f17c7aba563"
    assert recipe_hasher(jpg)("unreadable:13", "b" * 64) == "7d2ac6886a420065"
    for st in (s, jpg, s.replace(scales=(0.25, 0.5, 1.0), style_weight=3.5, seed=7)):
        d = {**recipe_settings(st), "content": "c1", "style": "s\"1"}
        old = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
        assert recipe_hasher(st)("c1", "s\"1") == old
