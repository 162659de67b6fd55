"""What the report reads from the ledger, once, and the photos × styles grid every part of it draws from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..batch.ledger import Row, open_ledgers, output_exists
from ..files.names import Skipped, skipped_from


@dataclass(frozen=True)
class Read:
    rows: list[Row]
    settings: dict
    skipped: list[Skipped]
    methods: dict[tuple[str, str], str]  # (content, style) -> the method that made each done pair
    models: dict[str, dict]  # style -> its network (Ledger.models: recipe, step, steps, curve, photos...)
    pair_models: dict[tuple[str, str], str]  # (content, style) -> the model that made each done network pair


def read_ledger(out: Path) -> Read:
    with open_ledgers(out) as ledgers:  # one ledger, or every shard's
        return Read(ledgers.rows(), ledgers.stored_settings(), skipped_from(ledgers.get_meta("skipped")),
                    ledgers.methods(), ledgers.models(), ledgers.pair_models())


@dataclass(frozen=True)
class Grid:
    """Rows = content images, columns = style images, in plan order."""
    contents: list[str]
    styles: list[str]
    cells: dict[tuple[str, str], Row]
    on_disk: set[int]  # ids of done pairs whose output file is there to link to

    @staticmethod
    def of(out: Path, rows: list[Row]) -> Grid:
        exists = output_exists(out)  # one listing per output folder, not one stat per pair
        return Grid(list(dict.fromkeys(r.content for r in rows)), list(dict.fromkeys(r.style for r in rows)),
                    {(r.content, r.style): r for r in rows},
                    {r.id for r in rows if r.state == "done" and exists(r.output)})

    def column(self, style: str) -> list[Row]:
        """A style's pairs, in plan order of their photos."""
        cells = self.cells
        return [r for c in self.contents if (r := cells.get((c, style))) is not None]
