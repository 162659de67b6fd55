"""The run loop on its own, with a fake backend: no Ray, no model. The fake computes nothing; it
answers each call as the test scripts it (a record with real PNG bytes, an error record, a lost or
hung slot, a Ctrl-C), so the drive's claims, records and fault logic are checked on a real ledger."""

from __future__ import annotations

import io
import signal
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from PIL import Image
from rich.console import Console

from nst_batch.batch.ledger import Ledger, Row
from nst_batch.config.manifest import Settings
from nst_batch.core.optimize import LogRow
from nst_batch.files.losslog import LOSS_LOG
from nst_batch.run.backend import Backend, Event, Returned, Lost, Slot
from nst_batch.run.drive import LOST_LIMIT, Drive, RunResult, Work
from nst_batch.run.lifecycle import Interrupted
from nst_batch.run.progress import Display
from nst_batch.run.record import Record

WORKER = "testhost:1"


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def record(row: Row, method: str = "optimize", error: tuple[str, str] | None = None) -> Record:
    final = LogRow(step=2, px=4, content=1.0, style=2.0, tv=0.1, total=3.1, elapsed_s=0.01)
    first = LogRow(step=1, px=4, content=2.0, style=3.0, tv=0.2, total=5.2, elapsed_s=0.005)
    return Record(None if error else png(), None, [first, final], final, 2, None, error, 0.01, method)


class Fake(Backend):
    """Slots that answer in order. `script(row)` says what becomes of the call whose first row is `row`
    (at its current attempt): "ok", "error" (its first pair fails), "lose" (the slot dies under it),
    "hang" (never answers), "interrupt" (Ctrl-C while it computes)."""

    def __init__(self, slots: int = 1, queue: int = 1, script: Callable[[Row], str] = lambda row: "ok",
                 method: str = "optimize"):
        self.slots = [Slot(f"fake{i}") for i in range(slots)]
        self.queue, self.script, self.method = queue, script, method
        self.calls: dict[str, deque[list[Row]]] = {s.name: deque() for s in self.slots}
        self.submitted: list[tuple[str, list[tuple[str, str]]]] = []  # (slot, [(content, style)]) per call
        self.cancelled: list[str] = []
        self.backlog: list[Event] = []
        self.closed = False

    def submit(self, slot: Slot, rows: list[Row]) -> None:
        q = self.calls[slot.name]
        if not q:
            slot.busy_since = time.time()
        q.append(rows)
        slot.calls = len(q)
        self.submitted.append((slot.name, [(r.content, r.style) for r in rows]))

    def poll(self, timeout: float) -> list[Event]:
        events, self.backlog = self.backlog, []
        for slot in self.slots:
            q = self.calls[slot.name]
            if not q:
                continue
            rows = q[0]
            action = self.script(rows[0])
            if action == "hang":
                continue
            if action == "interrupt":
                self.backlog = events  # computed before the signal: the drive gets them from drain()
                raise Interrupted(signal.SIGINT)
            if action == "lose":
                events += self._lose(slot, "the fake slot died")
                continue
            q.popleft()
            slot.calls, slot.busy_since = len(q), (time.time() if q else None)
            recs = [record(r, self.method, ("oom", "too big") if action == "error" and i == 0 else None)
                    for i, r in enumerate(rows)]
            events.append(Returned(slot, rows, recs))
        if not events:
            time.sleep(0.01)
        return events

    def _lose(self, slot: Slot, why: str) -> list[Event]:
        q, events, computing = self.calls[slot.name], [], True
        while q:
            events.append(Lost(slot, q.popleft(), computing, why))
            computing = False  # only the first call was computing; the rest were queued behind it
        slot.calls, slot.busy_since = 0, None
        return events

    def cancel(self, slot: Slot, why: str) -> None:
        self.cancelled.append(slot.name)
        self.backlog += self._lose(slot, why)

    def drain(self) -> list[Event]:
        events, self.backlog = self.backlog, []
        return events

    def close(self) -> None:
        self.closed = True


def setup(tmp_path: Path, names: list[tuple[str, str]], batch: int = 1):
    out = tmp_path / "out"
    ledger = Ledger(out)
    pairs = [SimpleNamespace(content=c, style=s, content_path=Path("/in") / c, style_path=Path("/st") / s,
                             output=f"{s[:-4]}/{c[:-4]}.png", recipe="r1") for c, s in names]
    ledger.sync(pairs, out, 30.0)
    work = Work({}, {(c, s): "r1" for c, s in names}, None, 0, len(names))
    settings = Settings(out=out, lease_s=30.0, batch=batch)
    return ledger, work, settings


def drive(tmp_path: Path, backend: Fake, names: list[tuple[str, str]], batch: int = 1,
          pair_timeout_s: float | None = None) -> tuple[RunResult, dict[str, Row], Ledger]:
    ledger, work, settings = setup(tmp_path, names, batch)
    styles = list(dict.fromkeys(s for _, s in names))
    d = Drive(ledger, backend, Display(Console(quiet=True)), work, WORKER, settings.out, settings, styles,
              pair_timeout_s)
    result = d.run()
    return result, {r.content: r for r in ledger.rows()}, ledger


PAIRS = [("a.png", "s1.png"), ("b.png", "s1.png")]


def test_every_pair_is_written_and_recorded_with_its_method(tmp_path):
    fake = Fake(method="network")
    result, rows, ledger = drive(tmp_path, fake, PAIRS)
    assert (result.made, result.failed) == (2, 0) and fake.closed
    assert all(r.state == "done" and r.attempts == 1 and r.steps == 2 for r in rows.values())
    assert ledger.methods() == {(c, s): "network" for c, s in PAIRS}
    out = tmp_path / "out"
    for r in rows.values():
        with Image.open(out / r.output) as im:
            assert im.size == (4, 3)
    lines = (out / LOSS_LOG).read_text().splitlines()
    assert len(lines) == 1 + 2 * 2  # the header, then each record's two loss rows


def test_lost_while_computing_counts_an_attempt_and_the_pair_is_made_again(tmp_path):
    fake = Fake(script=lambda row: "lose" if row.content == "a.png" and row.attempts == 1 else "ok")
    result, rows, _ = drive(tmp_path, fake, PAIRS)
    assert (result.made, result.failed) == (2, 0)
    assert (rows["a.png"].state, rows["a.png"].attempts) == ("done", 2)
    assert (rows["b.png"].state, rows["b.png"].attempts) == ("done", 1)
    assert [c for _, call in fake.submitted for c, _ in call].count("a.png") == 2


def test_a_call_queued_behind_a_lost_one_goes_back_uncounted(tmp_path):
    fake = Fake(queue=2, script=lambda row: "lose" if row.content == "a.png" and row.attempts == 1 else "ok")
    result, rows, _ = drive(tmp_path, fake, PAIRS)
    assert (result.made, result.failed) == (2, 0)
    assert fake.submitted[:2] == [("fake0", [PAIRS[0]]), ("fake0", [PAIRS[1]])]  # b queued behind a
    assert rows["a.png"].attempts == 2 and rows["b.png"].attempts == 1  # b's first claim was taken back


def test_the_third_loss_of_one_pair_fails_it_as_worker_lost(tmp_path):
    fake = Fake(script=lambda row: "lose" if row.content == "a.png" else "ok")
    result, rows, _ = drive(tmp_path, fake, PAIRS)
    assert (result.made, result.failed) == (1, 1)
    a = rows["a.png"]
    assert (a.state, a.error_kind, a.attempts) == ("failed", "worker_lost", LOST_LIMIT)
    assert f"lost {LOST_LIMIT} times" in a.error_message and "the fake slot died" in a.error_message
    assert rows["b.png"].state == "done"


def test_a_call_past_the_pair_timeout_is_cancelled_and_counted_lost(tmp_path):
    fake = Fake(script=lambda row: "hang" if row.content == "a.png" and row.attempts == 1 else "ok")
    result, rows, _ = drive(tmp_path, fake, PAIRS, pair_timeout_s=0.2)
    assert (result.made, result.failed) == (2, 0) and fake.cancelled == ["fake0"]
    assert rows["a.png"].attempts == 2 and rows["b.png"].attempts == 1


def test_a_pair_that_always_hangs_fails_as_worker_lost_naming_the_timeout(tmp_path):
    fake = Fake(script=lambda row: "hang" if row.content == "a.png" else "ok")
    result, rows, _ = drive(tmp_path, fake, PAIRS, pair_timeout_s=0.1)
    a = rows["a.png"]
    assert (a.state, a.error_kind, a.attempts) == ("failed", "worker_lost", LOST_LIMIT)
    assert "pair_timeout_s=0.1" in a.error_message and len(fake.cancelled) == LOST_LIMIT
    assert rows["b.png"].state == "done"


def test_an_error_record_fails_only_its_own_pair(tmp_path):
    fake = Fake(script=lambda row: "error")
    result, rows, _ = drive(tmp_path, fake, PAIRS, batch=2)
    assert fake.submitted == [("fake0", PAIRS)]  # one call, both pairs
    assert (result.made, result.failed) == (1, 1)
    assert result.failures == [("s1.png × a.png", "oom", "too big")]
    assert (rows["a.png"].state, rows["a.png"].error_kind) == ("failed", "oom")
    assert rows["b.png"].state == "done"
    assert not (tmp_path / "out" / rows["a.png"].output).exists()


def test_ctrl_c_releases_the_claims_not_computed_and_keeps_what_was(tmp_path):
    # Two slots: a's call is answered in the same poll in which b's is interrupted.
    names = [("a.png", "s1.png"), ("b.png", "s2.png"), ("c.png", "s1.png")]
    fake = Fake(slots=2, script=lambda row: "interrupt" if row.content == "b.png" else "ok")
    with pytest.raises(Interrupted):
        drive(tmp_path, fake, names)
    with Ledger(tmp_path / "out") as ledger:
        rows = {r.content: r for r in ledger.rows()}
    assert rows["a.png"].state == "done" and (tmp_path / "out" / rows["a.png"].output).is_file()
    assert (rows["b.png"].state, rows["b.png"].worker, rows["b.png"].attempts) == ("pending", None, 1)
    assert rows["c.png"].state == "pending" and fake.closed


def test_each_slot_keeps_its_style(tmp_path):
    # The ledger's order is photo by photo (each photo in both styles); the slots still keep one style each.
    names = [(f"p{i}.png", s) for i in range(4) for s in ("s1.png", "s2.png")]
    fake = Fake(slots=2)
    result, rows, _ = drive(tmp_path, fake, names)
    assert result.made == 8
    by_slot: dict[str, set[str]] = {}
    for slot, call in fake.submitted:
        by_slot.setdefault(slot, set()).update(s for _, s in call)
    assert by_slot == {"fake0": {"s1.png"}, "fake1": {"s2.png"}}


def test_a_batch_is_of_one_style(tmp_path):
    names = [(f"p{i}.png", s) for i in range(3) for s in ("s1.png", "s2.png")]
    fake = Fake()
    result, _, _ = drive(tmp_path, fake, names, batch=2)
    assert result.made == 6
    assert all(len({s for _, s in call}) == 1 for _, call in fake.submitted)
    assert max(len(call) for _, call in fake.submitted) == 2


def test_batch_auto_claims_what_the_backend_says_a_call_may_hold(tmp_path):
    """`batch: auto`: a backend says how many pairs one call may take (a CPU engine: 1, so a CPU worker does
    not hold 64 claims it makes one by one); by default settings.AUTO_BATCH_MAX."""
    names = [(f"p{i}.png", "s1.png") for i in range(5)]

    class AtMostTwo(Fake):
        def most_per_call(self, settings):
            assert settings.batch == "auto"
            return 2

    fake = AtMostTwo()
    result, _, _ = drive(tmp_path, fake, names, batch="auto")
    assert result.made == 5 and [len(call) for _, call in fake.submitted] == [2, 2, 1]
    plain = Fake()
    result, _, _ = drive(tmp_path / "b", plain, names, batch="auto")
    assert result.made == 5 and [len(call) for _, call in plain.submitted] == [5]  # up to 64


def test_the_local_backend_claims_one_at_a_time_for_batch_auto_on_a_cpu(tmp_path):
    from nst_batch.core.engine import resolve
    from nst_batch.run.local import LocalBackend

    s = Settings(batch="auto")
    for device, most in (("cpu", 1), ("cuda", 64)):
        backend = LocalBackend.__new__(LocalBackend)  # most_per_call reads only the engine's config
        backend.engine = SimpleNamespace(config=resolve(s, device))
        assert backend.most_per_call(s) == most
        assert backend.most_per_call(s.replace(batch=3)) == 3


def test_the_ray_backend_claims_one_at_a_time_for_batch_auto_on_cpu_actors():
    from nst_batch.run.ray import RayBackend

    s = Settings(batch="auto")
    for device_type, most in (("cpu", 1), ("cuda", 64)):
        backend = RayBackend.__new__(RayBackend)  # most_per_call reads only the actors' device type
        backend.device_type = device_type
        assert backend.most_per_call(s) == most and backend.most_per_call(s.replace(batch=3)) == 3


def test_a_batch_is_claimed_of_one_style_and_one_working_shape(tmp_path):
    """The engine makes a batch per working shape, so a call mixing shapes would be several small launches:
    the drive fills a call with pairs whose photo has its first pair's shape (read from the header, an
    EXIF-turned photo by its upright shape); a photo whose header cannot be read goes with any."""
    from tests.conftest import make_image

    photos = tmp_path / "in"
    photos.mkdir()
    wide = [make_image(photos / f"w{i}.png", 48, 32, i) for i in range(2)]
    tall = [make_image(photos / f"t{i}.png", 32, 48, 10 + i) for i in range(2)]
    turned = photos / "turned.jpg"  # stored tall, upright wide
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(tall[0]).convert("RGB").save(turned, exif=exif.tobytes())
    broken = photos / "broken.png"
    broken.write_bytes(b"not an image")
    order = [wide[0], tall[0], broken, wide[1], tall[1], turned]  # the ledger's order: shapes interleaved
    out = tmp_path / "out"
    ledger = Ledger(out)
    pairs = [SimpleNamespace(content=p.name, style="s.png", content_path=p, style_path=Path("/st/s.png"),
                             output=f"s/{p.stem}.png", recipe="r1") for p in order]
    ledger.sync(pairs, out, 30.0)
    work = Work({}, {(p.name, "s.png"): "r1" for p in order}, None, 0, len(order))
    for bucket, calls in ((0, [["w0.png", "broken.png", "w1.png", "turned.jpg"], ["t0.png", "t1.png"]]),
                          (64, [["w0.png", "t0.png", "broken.png", "w1.png"], ["t1.png", "turned.jpg"]])):
        settings = Settings(out=out, lease_s=30.0, batch=4, size=48, bucket=bucket)
        ledger.db.execute("UPDATE pairs SET state='pending', worker=NULL")
        fake = Fake()
        Drive(ledger, fake, Display(Console(quiet=True)), work, WORKER, out, settings, ["s.png"]).run()
        assert [[c for c, _ in call] for _, call in fake.submitted] == calls, bucket


def test_a_retry_claim_that_passes_rows_over_for_their_shape_leaves_them_claimable(tmp_path):
    """A retry remembers, per style, the id below which all its pairs were taken (so its claims stay fast);
    pairs passed over by a shape filter are still pending below the one it took and must stay in reach."""
    names = [(f"p{i}.png", "s1.png") for i in range(4)]
    ledger, work, settings = setup(tmp_path, names)
    only = {r.id for r in ledger.rows()}
    take = ledger.claim(WORKER, 30.0, only, style="s1.png", accept=lambda path: path.endswith("p2.png"))
    assert take is not None and take.content == "p2.png"
    rest = [ledger.claim(WORKER, 30.0, only, style="s1.png") for _ in range(4)]
    assert sorted(r.content for r in rest if r is not None) == ["p0.png", "p1.png", "p3.png"]
