"""What a run made and what went wrong, read from the ledger (never blocking a worker)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .ledger import STATES, Ledger, Row


@dataclass
class Summary:
    counts: dict[str, int]
    total: int
    seconds_total: float  # compute seconds spent on done pairs
    seconds_mean: float | None
    pairs_per_hour: float | None  # wall-clock rate over the span of finished pairs, all workers together
    eta_s: float | None
    failures: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(rows: list[Row], now: float | None = None) -> Summary:
    now = time.time() if now is None else now
    counts = dict.fromkeys(STATES, 0)
    for r in rows:
        counts[r.state] += 1
    done = [r for r in rows if r.state == "done" and r.seconds is not None]
    secs = sum(r.seconds for r in done)
    rate = None
    if done:
        span = max(r.finished_at for r in done) - min(r.started_at for r in done)
        rate = len(done) / span * 3600 if span > 0 else None
    left = counts["pending"] + counts["running"]
    eta = left / rate * 3600 if rate and left else (0.0 if not left else None)
    failures = [{"content": r.content, "style": r.style, "kind": r.error_kind, "message": r.error_message,
                 "attempts": r.attempts} for r in rows if r.state == "failed"]
    return Summary(counts, len(rows), secs, secs / len(done) if done else None, rate, eta, failures)


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def print_status(console: Console, out: Path, summary: Summary) -> None:
    c = summary.counts
    console.print(f"[bold]{out}[/bold]: {summary.total} pairs — [green]{c['done']} done[/green], "
                  f"{c['pending']} pending, {c['running']} running, "
                  f"[{'red' if c['failed'] else 'default'}]{c['failed']} failed[/]")
    rate = f"{summary.pairs_per_hour:.1f} pairs/hour" if summary.pairs_per_hour else "rate unknown yet"
    mean = f"{summary.seconds_mean:.1f} s/pair" if summary.seconds_mean else "-"
    console.print(f"{rate}, {mean} on average, ETA {_dur(summary.eta_s)}")
    if summary.failures:
        t = Table(title="Failed pairs", show_lines=False)
        for col in ("style", "content", "kind", "reason"):
            t.add_column(col, overflow="fold")
        for f in summary.failures:
            t.add_row(f["style"], f["content"], f["kind"] or "", f["message"] or "")
        console.print(t)
        console.print(f"re-run them with: nst-batch retry {out}")


def load_summary(out: Path) -> Summary:
    ledger = Ledger(out, create=False)
    try:
        return summarize(ledger.rows())
    finally:
        ledger.close()
