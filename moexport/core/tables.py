"""Result tables that a person and a log can read: every value whole, whatever the width.

A table goes out as a rich table where it fits the console's width with every cell on one line.
Where it does not (an 80-column terminal, a pipe), columns whose value is the same in every row move
into the title, and if it still does not fit, each row is stacked: its first value, then
``column value`` pairs, wrapped between pairs and never inside a value. Titles, captions and values
are plain text, never rich markup, so a ``[gpu]`` in a path or message is printed as it is.
"""
from __future__ import annotations

from typing import Sequence, Union

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

Cell = Union[str, Text]


def print_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[Cell]], *,
                caption: str | None = None, hoist: Sequence[str] = ()) -> None:
    """Print `rows` under `columns` on `console` with every value whole (see the module docstring).

    Args:
        console: Where to print; its width decides the layout.
        title: A line above the table.
        columns: Column names.
        rows: One sequence of cells per row (strings, or rich Text for styled cells).
        caption: Lines below the table. Defaults to none.
        hoist: Columns that move into the title, as "column: value", when the table is too wide and their
            value is the same in every row. Defaults to none.
    """
    columns, rows = list(columns), [[cell if isinstance(cell, Text) else Text(str(cell)) for cell in row]
                                    for row in rows]
    table = _table(columns, rows)
    if _width(console, table) > console.width and rows:
        same = [c for c in hoist if c in columns and len({r[columns.index(c)].plain for r in rows}) == 1]
        if same:
            title += " (" + ", ".join(f"{c}: {rows[0][columns.index(c)].plain}" for c in same) + ")"
            keep = [i for i, c in enumerate(columns) if c not in same]
            columns, rows = [columns[i] for i in keep], [[r[i] for i in keep] for r in rows]
            table = _table(columns, rows)
    print_line(console, Text(title, style="bold"))
    if _width(console, table) <= console.width:
        console.print(table)
    else:
        for line in _stacked(columns, rows, console.width):
            print_line(console, line)
    for line in (caption or "").splitlines():
        print_line(console, Text(line, style="dim"))


def print_line(console: Console, line: str | Text) -> None:
    """Print one line whole: never rich markup, never wrapped or cut by rich (a terminal may wrap it)."""
    console.print(line if isinstance(line, Text) else Text(line), soft_wrap=True, highlight=False)


def _table(columns: list[str], rows: list[list[Text]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _width(console: Console, table: Table) -> int:
    return Measurement.get(console, console.options.update(width=10**6), table).maximum


def _stacked(columns: list[str], rows: list[list[Text]], width: int) -> list[Text]:
    """Each row as its first value followed by `column value` pairs, on as many lines as the width needs."""
    lines = []
    for row in rows:
        line = Text.assemble(("• ", "dim"), row[0])
        for column, cell in zip(columns[1:], row[1:]):
            pair = Text.assemble((f"{column} ", "dim"), cell)
            if line.cell_len + 2 + pair.cell_len > width:
                lines.append(line)
                line = Text("    ") + pair
            else:
                line += Text("  ") + pair
        lines.append(line)
    return lines
