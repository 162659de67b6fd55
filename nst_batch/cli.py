"""The `nst-batch` command. Thin: parse options, call the run, the preview or the report, map errors to exit codes.

Exit codes: 0 every pair done; 1 the run finished but some pairs failed; 2 usage, manifest
or input-folder error; 3 model weights unavailable; 130 interrupted (Ctrl-C); 143 SIGTERM.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config import manifest
from .config.reference import default_text
from .config.settings import SETTINGS
from .errors import EXIT_OK, EXIT_PAIRS_FAILED, NstError
from .files.names import printable
from .run.options import RayOptions

app = typer.Typer(
    help="Batch neural style transfer: every photo in every style, resumable overnight.",
    no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    epilog="Exit codes: 0 all done, 1 some pairs failed, 2 usage or manifest error, "
           "3 model weights unavailable, 130 interrupted, 143 terminated.",
)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # soft wrap: an error stays one line, whatever the width


def _fail(e: NstError) -> typer.Exit:
    # Escaped: messages carry user paths and values, and "a[/b]" is not markup; printable: nor is ESC a command.
    err.print(f"[bold red]error:[/bold red] {escape(printable(e))}", highlight=False)
    return typer.Exit(e.exit_code)


def _settings(manifest_path: Optional[Path], overrides: dict[str, Any], sets: list[str]) -> manifest.Settings:
    if manifest_path is None:
        default = Path("pipeline.yaml")
        s = manifest.load(default) if default.is_file() else manifest.Settings()
    else:
        s = manifest.load(manifest_path)
    s = manifest.apply(s, manifest.parse_set(sets), "--set")
    opts = {k: v for k, v in overrides.items() if v is not None}
    return manifest.apply(s, {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()}, "option")


def _finish(result, out: Path, quiet: bool, shard=None) -> None:
    from .report.status import load_summary, print_status

    summary = load_summary(out, shard)  # a shard's exit code is its own pairs'
    if shard is None or _all_settled(out, shard.count):
        # Sharded, the report covers every shard: written by whichever shard finds none left to make.
        _write_report(out, quiet)
    elif not quiet:
        console.print(printable(f"shard {shard} finished; the report is written when the last shard ends "
                                f"(or now: nst-batch report {out})"), markup=False, highlight=False)
    if not quiet or summary.counts["failed"]:
        if shard is not None:
            console.print(f"shard {shard}:", markup=False, highlight=False)
        print_status(console, out, summary)
    raise typer.Exit(EXIT_PAIRS_FAILED if summary.counts["failed"] else EXIT_OK)


def _all_settled(out: Path, count: int) -> bool:
    """Every shard of `count` has a ledger (has started) and nothing is left to make in any of them."""
    from .batch.shards import found
    from .report.status import load_summary

    if len(found(out)) < count:
        return False
    c = load_summary(out).counts
    return c["pending"] + c["running"] == 0


def _write_report(out: Path, quiet: bool) -> None:
    from .report import build as report

    try:
        paths = report.write_report(out)
    except (OSError, NstError) as e:  # a full disk must not turn a finished run into a traceback
        err.print(printable(f"warning: could not write the report in {out}: {e}"), markup=False, highlight=False)
        return
    if not quiet and paths:
        console.print(printable(f"report: {paths[0]}"), markup=False, highlight=False)


def _run(settings: manifest.Settings, quiet: bool, retry_kinds: list[str] | None = None, retry: bool = False,
         shards: tuple = (None,), ray=None):
    from .run.progress import make_display
    from .run.local import run

    display = make_display(console, quiet)
    if ray is not None:
        from .run.ray import run_ray

        result = _computing(settings, lambda: run_ray(settings, display, ray, only_failed_kinds=retry_kinds,
                                                      retry=retry))
    else:
        result = _computing(settings, lambda: run(settings, display, only_failed_kinds=retry_kinds, retry=retry,
                                                  shards=shards))
    _finish(result, settings.out, quiet, shards[0] if len(shards) == 1 else None)


def _computing(settings: manifest.Settings, call):
    """call(), with what can go wrong while pairs are made mapped to one line and an exit code."""
    from .run.lifecycle import Interrupted

    try:
        return call()
    except Interrupted as e:
        err.print(f"interrupted ({e}): finished pairs are kept; run the same command again to resume", highlight=False)
        raise typer.Exit(e.exit_code)
    except NstError as e:
        raise _fail(e)
    except (OSError, sqlite3.DatabaseError) as e:
        # The output folder or its ledger as a whole (a pair's own write failure fails that pair only):
        # one line and exit 2, not a traceback and the exit code of "some pairs failed".
        raise _fail(NstError(f"cannot use the output folder {settings.out}: {e}"))


def _setting(key: str, retry: bool = False) -> Any:
    """The option for manifest key `key`: its flag, help and default as settings.py declares them, so
    `--help` and the manifest agree. None when not given: the manifest's value (or, retrying, the run's)
    stands, else the declared default."""
    s = SETTINGS[key]
    default = "as the run was made" if retry else f"the manifest's, else {default_text(key)}"
    return typer.Option(None, s.cli, help=escape(f"{s.help} Default: {default}."), show_default=False)


# What `run` and `preview` read their settings from, besides the options of single keys.
_MANIFEST = typer.Argument(None, metavar="[MANIFEST]", help="Pipeline file. Default: ./pipeline.yaml if present.")
_SET = typer.Option([], "--set", metavar="KEY=VALUE", help="Set any manifest key; repeatable.")

_SHARD_HELP = ("K/N: make only shard K (0..N-1) of N; each shard keeps its own ledger in OUT/shards/K-of-N/. "
               "auto: K and N from SLURM_ARRAY_TASK_ID/_COUNT (SLURM array) or JOB_COMPLETION_INDEX and "
               "NST_SHARD_COUNT (Kubernetes indexed Job). See docs/many-machines.md.")


@app.command()
def run(
    manifest_path: Optional[Path] = _MANIFEST,
    content: Optional[Path] = _setting("content"),
    styles: Optional[Path] = _setting("styles"),
    out: Optional[Path] = _setting("out"),
    size: Optional[int] = _setting("size"),
    steps: Optional[int] = _setting("steps"),
    device: Optional[str] = _setting("device"),
    weights: Optional[str] = _setting("weights"),
    set_: list[str] = _SET,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display: one line per pair."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="K/N|auto", help=_SHARD_HELP),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="local|auto|ADDRESS",
                                      help="Compute on Ray actors (pip install 'nst-batch\\[ray]'): a cluster started "
                                           "here, the one `ray start` made, or host:port."),
    ray_workers: Optional[int] = typer.Option(RayOptions.workers, min=1,
                                              help="Ray actors. Default: one per GPU (or CPU)."),
    ray_gpus_per_worker: Optional[float] = typer.Option(
        RayOptions.gpus_per_worker, min=0, help="GPUs per actor. Default 1; 0 (CPU actors) when device is cpu."),
    ray_cpus_per_worker: float = typer.Option(RayOptions.cpus_per_worker, min=0.01,
                                              help="CPUs per actor; also its torch threads."),
    ray_pair_timeout: float = typer.Option(RayOptions.pair_timeout_s, min=0.1, metavar="SECONDS",
                                           help="A pair still computing after this long: its actor is killed."),
) -> None:
    """Stylize every content image in every style. Run it again to resume."""
    from .batch import shards

    try:
        s = _settings(manifest_path, dict(content=content, styles=styles, out=out, size=size, steps=steps,
                                          device=device, weights=weights), set_)
        picked = shards.parse(shard) if shard is not None else None
    except NstError as e:
        raise _fail(e)
    opts = None
    if ray is not None:
        if picked is not None:
            raise _fail(manifest.ConfigError("--ray and --shard do not go together: a Ray cluster spreads the "
                                             "whole plan itself; a shard is for SLURM or Kubernetes jobs"))
        opts = RayOptions(ray, workers=ray_workers, gpus_per_worker=ray_gpus_per_worker,
                          cpus_per_worker=ray_cpus_per_worker, pair_timeout_s=ray_pair_timeout)
    _run(s, quiet, shards=(picked,), ray=opts)


@app.command()
def preview(
    manifest_path: Optional[Path] = _MANIFEST,
    content: Optional[Path] = _setting("content"),
    styles: Optional[Path] = _setting("styles"),
    out: Optional[Path] = _setting("out"),
    device: Optional[str] = _setting("device"),
    weights: Optional[str] = _setting("weights"),
    set_: list[str] = _SET,
    photos: int = typer.Option(3, "--photos", metavar="N", help="Sample photos, chosen to differ (brightness, "
                               "colour, portrait or landscape)."),
    photo: list[str] = typer.Option([], "--photo", metavar="NAME", help="This photo (path in the content folder, "
                                    "file name or stem) instead of chosen ones; repeatable."),
    strengths: Optional[str] = typer.Option(None, "--strengths", metavar="F,F,...",
                                            help="Factors of each style's current style_weight. Default: 0.333,1,3."),
    size: Optional[int] = typer.Option(None, "--size", help="Long side of the previews (not the run's). "
                                       "Default: 112."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps of each preview (not the run's). Default: 12."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display: one line per cell."),
) -> None:
    """A few photos in every style at a few style weights, small and quick: pick each painting's weight
    before the night. Written to OUT/previews/ (index.html); the run's own pairs are untouched."""
    from .config.settings import check
    from .report.preview_pages import write_pages
    from .run import preview as pv
    from .run.progress import make_display

    try:
        s = _settings(manifest_path, dict(content=content, styles=styles, out=out, device=device,
                                          weights=weights), set_)
        opts = pv.PreviewOptions(
            photos=check("steps", photos, "--photos", name="--photos"), names=tuple(photo),
            strengths=pv.parse_strengths(strengths) if strengths is not None else pv.STRENGTHS,
            size=check("size", size, "--size") if size is not None else pv.SIZE,
            steps=check("steps", steps, "--steps") if steps is not None else pv.STEPS)
    except NstError as e:
        raise _fail(e)
    _computing(s, lambda: pv.make_preview(s, make_display(console, quiet), opts))
    index, missing = _computing(s, lambda: write_pages(s.out))
    console.print(printable(f"preview: {index}" + (f" ({missing} cell(s) not made)" if missing else "")),
                  markup=False, highlight=False)
    raise typer.Exit(EXIT_PAIRS_FAILED if missing else EXIT_OK)


def _stored_settings(out: Path) -> manifest.Settings:
    from .batch.ledger import open_ledgers

    with open_ledgers(out) as ledgers:
        stored = ledgers.stored_settings()
    if not stored:
        raise manifest.ConfigError(f"{out}: the ledger holds no settings; run 'nst-batch run' first")
    return manifest.apply(manifest.Settings(), stored, f"{out}/ledger.sqlite")


@app.command()
def retry(
    out: Path = typer.Argument(Path("results"), help="Output folder of an earlier run."),
    kind: list[str] = typer.Option([], "--kind", help="Only failures of this kind (e.g. oom); repeatable."),
    size: Optional[int] = _setting("size", retry=True),
    steps: Optional[int] = _setting("steps", retry=True),
    device: Optional[str] = _setting("device", retry=True),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override any manifest key."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="K/N|auto",
                                        help="Only this shard's failed pairs. Without it, a sharded OUT has "
                                             "every shard's failed pairs re-run here, shard after shard."),
) -> None:
    """Re-run only the failed pairs of OUT, with the same settings or with overrides."""
    try:
        s = _stored_settings(out).replace(out=out)  # the folder given, wherever it has moved since
        s = manifest.apply(s, manifest.parse_set(set_), "--set")
        s = manifest.apply(s, {k: v for k, v in dict(size=size, steps=steps, device=device).items() if v is not None},
                           "option")
        targets = _retry_shards(out, shard)
    except NstError as e:
        raise _fail(e)
    _run(s, quiet, retry_kinds=kind or None, retry=True, shards=targets)


def _retry_shards(out: Path, shard: Optional[str]) -> tuple:
    """The ledgers a retry works through: (None,) unsharded; the one --shard names; or every shard
    with failed pairs, refused while any shard has a live worker (a shard's ledger has one writer
    host, and the array may still be running on others)."""
    from .batch import shards
    from .batch.ledger import open_ledgers

    if shard is not None:
        return (shards.parse(shard),)
    found = shards.found(out)
    if not found:
        return (None,)
    with open_ledgers(out) as ledgers:
        live = ledgers.live_workers()
        failed = [s for s, led in ledgers.parts if led.counts()["failed"]]
    if live:
        raise manifest.ConfigError(f"{out}: a shard is still running ({live[0][0]}); wait for every shard to end, "
                                   "or retry one shard with --shard K/N")
    return tuple(failed) or (found[0],)


@app.command()
def retrain(
    out: Path = typer.Argument(Path("results"), help="Output folder of an earlier run."),
    style: list[str] = typer.Option([], "--style", metavar="NAME", help="Only this style's network; repeatable. "
                                    "Without it: every style's."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be redone; change nothing."),
) -> None:
    """Train a style's network again on the collection as it is now. A network is trained once, on the photos
    pending at the time, and kept while photos are added or removed. This forgets it (OUT/models/STYLE.pt)
    and sends every pair it made back to pending: the next 'nst-batch run' trains it afresh on an even sample
    of the photos then pending and makes those pairs again (optimised pairs stay). Refused while a run is
    going on OUT."""
    from .run.training import retrain as forget

    try:
        lines = forget(out, style, dry_run)
    except NstError as e:
        raise _fail(e)
    for line in lines or ["no network is trained in this folder: nothing to retrain"]:
        typer.echo(line)
    if lines and not dry_run:
        typer.echo(f"now run 'nst-batch run' with the same manifest to train and make them (OUT {out})")


@app.command()
def status(
    out: Path = typer.Argument(Path("results"), help="Output folder of a run (finished or still going)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Counts per state, throughput, ETA and failures. Safe while a run is going."""
    from .report.status import load_summary, print_status

    try:
        summary = load_summary(out)
    except NstError as e:
        raise _fail(e)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        print_status(console, out, summary)


@app.command()
def report(
    out: Path = typer.Argument(Path("results"), help="Output folder of a run (finished or still going)."),
) -> None:
    """Write report.html, summary.csv and contact_sheet.jpg into OUT and print a summary."""
    from .report.status import load_summary, print_report

    try:
        summary = load_summary(out)
        _write_report(out, quiet=False)
    except NstError as e:
        raise _fail(e)
    print_report(console, out, summary)


if __name__ == "__main__":
    app()
