"""What `nst-batch status` and the end of a run print, read from the ledger while workers may still be going.

`load_summary` / `summarize_ledger` read counts, sums and the few top rows by SQL (quick at 200,000
pairs); `summarize` does the same from rows already loaded (the report has them). `print_status` and
`print_report` are the terminal view; `retry_commands` is the advice both the terminal and report.html give.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..batch.ledger import Ledger, LedgerSet, Row, open_ledgers
from ..batch.shards import Shard
from ..files.names import Skipped, printable, skipped_from, skipped_line
from .summary import count_states

TOP_N = 5


@dataclass
class Summary:
    counts: dict[str, int]
    total: int
    seconds_total: float  # compute seconds spent on done pairs
    seconds_mean: float | None
    pairs_per_hour: float | None  # wall-clock rate over the span of finished pairs, all workers together
    eta_s: float | None
    failures: list[dict] = field(default_factory=list)
    slowest: list[dict] = field(default_factory=list)  # top done pairs by seconds
    highest_loss: list[dict] = field(default_factory=list)  # top done pairs by final total loss
    skipped: list[Skipped] = field(default_factory=list)  # input-folder entries the plan left out
    method_counts: dict[str, int] = field(default_factory=dict)  # done pairs per method (optimize, network)
    models: list[dict] = field(default_factory=list)  # each style's network (`models_of`), in style order

    def to_dict(self) -> dict:
        return asdict(self)


def _top(rows: Iterable[Row], key: str) -> list[dict]:
    ranked = sorted((r for r in rows if r.state == "done" and getattr(r, key) is not None),
                    key=lambda r: getattr(r, key), reverse=True)  # stable: ties stay in id order
    return [{"content": r.content, "style": r.style, key: getattr(r, key)} for r in ranked[:TOP_N]]


def summarize(rows: list[Row], skipped: list[Skipped] | None = None,
              methods: dict[tuple[str, str], str] | None = None) -> Summary:
    """`methods`: Ledger.methods(), the method of each done pair (none given: every done pair optimize)."""
    counts = count_states(rows)
    done = [r for r in rows if r.state == "done" and r.seconds is not None]
    span = (min(r.started_at for r in done), max(r.finished_at for r in done)) if done else (None, None)
    by_method: dict[str, int] = {}
    for r in rows:
        if r.state == "done":
            m = (methods or {}).get((r.content, r.style), "optimize")
            by_method[m] = by_method.get(m, 0) + 1
    return _summary(counts, [r.seconds for r in done], *span, [r for r in rows if r.state == "failed"],
                    _top(rows, "seconds"), _top(rows, "total_loss"), skipped or [], by_method)


def summarize_ledger(ledger: Ledger | LedgerSet) -> Summary:
    """summarize(ledger.rows()) without loading the rows: counts, sums and the top few by SQL, so
    `status` takes well under a second at 200,000 pairs. A LedgerSet: all shards together. With each
    style's network (`models_of`)."""
    secs, first, last = ledger.done_seconds()
    made = ledger.made_counts()  # the one grouped query both the method counts and the networks read
    by_method: dict[str, int] = {}
    for (_, method, _), n in made.items():
        by_method[method] = by_method.get(method, 0) + n
    summary = _summary(ledger.counts(), secs, first, last, ledger.failed_rows(),
                       _top(ledger.top_done("seconds", TOP_N), "seconds"),
                       _top(ledger.top_done("total_loss", TOP_N), "total_loss"),
                       skipped_from(ledger.get_meta("skipped")), by_method)
    summary.models = models_of(ledger.models(), made)
    return summary


def models_of(models: dict[str, dict], made: dict[tuple[str, str, str | None], int]) -> list[dict]:
    """Each style that has a network (Ledger.models), by style name: its recipe, how far it trained
    (`trained` once step reaches steps), when it was last recorded (`at`: its finishing time once trained),
    on how many photos, the done pairs of the style by method, and how many of them this model made
    (`made`) and how many a network made without a model recorded (`unrecorded`: before schema 7) or by
    another one (`other`). `made`: Ledger.made_counts, one grouped query."""
    got = []
    for style, m in sorted(models.items()):
        by_method: dict[str, int] = {}
        mine = unrecorded = other = 0
        for (st, method, model), n in made.items():
            if st != style:
                continue
            by_method[method] = by_method.get(method, 0) + n
            if method == "network":
                if model == m["recipe"]:
                    mine += n
                elif model is None:
                    unrecorded += n
                else:
                    other += n
        got.append({"style": style, "recipe": m["recipe"], "step": m["step"], "steps": m["steps"],
                    "trained": m["step"] >= m["steps"], "at": m["updated_at"], "photos": m.get("photos"),
                    "methods": dict(sorted(by_method.items(), key=lambda kv: -kv[1])), "made": mine,
                    "unrecorded": unrecorded, "other": other})
    return got


def short_model(recipe: str) -> str:
    """A model's recipe as the terminal and the report show it: its first 8 hex digits, enough to tell
    the models of one output folder apart."""
    return recipe[:8]


def when(t: float | None) -> str:
    """A time the ledger recorded, in this machine's time zone: '2026-12-06 07:45'."""
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def model_cells(m: dict) -> tuple[str, ...]:
    """A network's row in `status` (and its line on the style page): method, model, training, when,
    photos, pairs made."""
    methods = ", ".join(f"{k} {n}" for k, n in m["methods"].items()) or "network (none done yet)"
    made = f"{m['made']}" + (f" (+{m['unrecorded']} unrecorded)" if m["unrecorded"] else "") + \
        (f" (+{m['other']} by another model)" if m["other"] else "")
    training = f"trained {m['step']}/{m['steps']}" if m["trained"] else f"training {m['step']}/{m['steps']}"
    photos = "-" if m["photos"] is None else str(m["photos"])
    return methods, short_model(m["recipe"]), training, when(m["at"]), photos, made


def _summary(counts: dict[str, int], done_seconds: list[float], first_start: float | None,
             last_finish: float | None, failed: list[Row], slowest: list[dict], highest: list[dict],
             skipped: list[Skipped], method_counts: dict[str, int]) -> Summary:
    """done_seconds: of each done pair, in id order; first_start, last_finish: over those pairs."""
    secs = sum(done_seconds)
    n = len(done_seconds)
    rate = None
    if n:
        span = last_finish - first_start
        rate = n / span * 3600 if span > 0 else None
    left = counts["pending"] + counts["running"]
    eta = left / rate * 3600 if rate and left else (0.0 if not left else None)
    failures = [{"content": r.content, "style": r.style, "kind": r.error_kind, "message": r.error_message,
                 "attempts": r.attempts} for r in failed]
    return Summary(counts, sum(counts.values()), secs, secs / n if n else None, rate, eta, failures,
                   slowest, highest, list(skipped), dict(sorted(method_counts.items())))


def method_line(method_counts: dict[str, int]) -> str:
    """'done by method: network 120, optimize 8' (the report's front page says the same)."""
    return "done by method: " + ", ".join(f"{m} {n}" for m, n in sorted(method_counts.items(), key=lambda kv: -kv[1]))


def retry_commands(out: Path, failures: list[dict]) -> list[str]:
    """`nst-batch retry OUT`, then one `--kind K` line per error kind when there are several kinds."""
    base = f"nst-batch retry {shlex.quote(str(out))}"
    kinds = sorted({f["kind"] for f in failures if f["kind"]})
    return [base] + ([f"{base} --kind {shlex.quote(k)}" for k in kinds] if len(kinds) > 1 else [])


def duration(s: float | None) -> str:
    """'12m05s', '3h07m', '-' for unknown: the terminal and report.html write times the same way."""
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def print_status(console: Console, out: Path, summary: Summary) -> None:
    # Paths, names and messages are user data: never rich markup ('[draft]' would vanish, 'x[/b]' raise),
    # and never raw control characters (a name holding ESC [ 2 J would clear the terminal): printable().
    c = summary.counts
    console.print(f"[bold]{escape(printable(out))}[/bold]: {summary.total} pairs — [green]{c['done']} done[/green], "
                  f"{c['pending']} pending, {c['running']} running, "
                  f"[{'red' if c['failed'] else 'default'}]{c['failed']} failed[/]")
    rate = f"{summary.pairs_per_hour:.1f} pairs/hour" if summary.pairs_per_hour else "rate unknown yet"
    mean = f"{summary.seconds_mean:.1f} s/pair" if summary.seconds_mean else "-"
    console.print(f"{rate}, {mean} on average, {duration(summary.seconds_total)} of compute in total, "
                  f"ETA {duration(summary.eta_s)}")
    if summary.method_counts:
        console.print(method_line(summary.method_counts), markup=False, highlight=False)
    if summary.models:
        t = Table(title="Networks")
        for col in ("style", "method", "model", "training", "when", "photos", "pairs made"):
            t.add_column(col, overflow="fold")
        for m in summary.models:
            t.add_row(Text(printable(m["style"])), *map(Text, model_cells(m)))
        console.print(t)
    if summary.failures:
        t = Table(title="Failed pairs", show_lines=False)
        for col in ("style", "content", "kind", "reason"):
            t.add_column(col, overflow="fold")
        for f in summary.failures:
            t.add_row(*(Text(printable(v or "")) for v in (f["style"], f["content"], f["kind"], f["message"])))
        console.print(t)
        console.print("re-run them with: " + "\n  or: ".join(map(printable, retry_commands(out, summary.failures))),
                      markup=False, highlight=False)
    if summary.skipped:
        console.print(f"{skipped_line(summary.skipped)}; report.html names them", markup=False, highlight=False)


def print_report(console: Console, out: Path, summary: Summary) -> None:
    """print_status preceded by the slowest pairs and the highest final losses."""
    for title, top, key, fmt in (("Slowest pairs", summary.slowest, "seconds", "{:.1f} s"),
                                 ("Highest final total loss", summary.highest_loss, "total_loss", "{:.4g}")):
        if top:
            t = Table(title=title)
            for col in ("style", "content", key):
                t.add_column(col, overflow="fold")
            for r in top:
                t.add_row(Text(printable(r["style"])), Text(printable(r["content"])), fmt.format(r[key]))
            console.print(t)
    print_status(console, out, summary)


def load_summary(out: Path, shard: Shard | None = None) -> Summary:
    """The whole output folder (every shard's ledger, when it is split), or only `shard`'s."""
    if shard is not None:
        with Ledger(shard.folder(out), readonly=True) as ledger:
            return summarize_ledger(ledger)
    with open_ledgers(out) as ledgers:
        return summarize_ledger(ledgers)
