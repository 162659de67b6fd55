"""What the user sees while a run goes: a live rich display on a terminal, plain lines elsewhere."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from ..files.names import printable
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class Display:
    """Plain lines: one per finished pair. Used with --quiet and when stdout is not a terminal.

    Printed with soft_wrap: rich would otherwise wrap at the console width (80 columns when stdout is
    a file or a pipe), and a log is grepped one line per pair. Names and messages are user data, so
    they pass through `printable` (a file name may hold terminal escape sequences)."""

    def __init__(self, console: Console):
        self.console = console
        self.total = 0
        self.finished = 0

    def start(self, total: int, already_done: int) -> None:
        self.total, self.finished = total, already_done

    def pair_start(self, name: str, total_steps: int) -> None:
        pass

    def step(self, step: int, loss: float) -> None:
        pass

    def pair_end(self, name: str, ok: bool, seconds: float, message: str = "") -> None:
        self.finished += 1
        status = "done" if ok else "FAILED"
        extra = f" ({message})" if message else ""
        self.console.print(printable(f"[{self.finished}/{self.total}] {status} {name} in {seconds:.1f}s{extra}"),
                           markup=False, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        self.console.print(printable(message), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        pass


class LiveDisplay(Display):
    """Pairs done/total with ETA, and the current pair with its step and loss."""

    def __init__(self, console: Console):
        super().__init__(console)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.pairs: TaskID | None = None
        self.current: TaskID | None = None

    def start(self, total: int, already_done: int) -> None:
        super().start(total, already_done)
        self.progress.start()
        self.pairs = self.progress.add_task("pairs", total=total, completed=already_done, info="")

    def pair_start(self, name: str, total_steps: int) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.current = self.progress.add_task(f"  {escape(printable(name))}", total=total_steps, info="")

    def step(self, step: int, loss: float) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=step, info=f"loss {loss:.4g}")

    def pair_end(self, name: str, ok: bool, seconds: float, message: str = "") -> None:
        self.finished += 1
        if not ok:
            self.progress.console.print(f"[red]failed[/red] {escape(printable(name))}: {escape(printable(message))}",
                                        highlight=False)
        elif message:
            self.progress.console.print(printable(f"{name}: {message}"), markup=False, highlight=False)
        if self.pairs is not None:
            self.progress.advance(self.pairs)

    def note(self, message: str) -> None:
        self.progress.console.print(printable(message), markup=False, highlight=False)

    def close(self) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None
        self.progress.stop()


def make_display(console: Console, quiet: bool) -> Display:
    return LiveDisplay(console) if console.is_terminal and not quiet else Display(console)
