import io

import pytest
from rich.console import Console
from rich.text import Text

from moexport.core.tables import print_line, print_table

COLUMNS = ("runner", "layer", "tokens", "agreement", "near-ties", "downstream", "unexplained", "status")
ROWS = [["onnxrt-cpu", f"layers.{i}.ffn", "384", "99.74%", "1", "0", "0", Text("PASSED", style="green")]
        for i in range(4)]


def printed(width: int, **kwargs) -> str:
    console = Console(file=io.StringIO(), width=width)
    print_table(console, "Routing agreement [gpu]", COLUMNS, ROWS, **kwargs)
    return console.file.getvalue()


def every_value_whole(text: str, rows) -> bool:
    lines = text.splitlines()
    return "…" not in text and all(any(str(cell) in line for line in lines) for row in rows for cell in row)


def test_a_table_that_fits_is_a_table():
    text = printed(132)
    assert text.splitlines()[1].split() == list(COLUMNS) and every_value_whole(text, ROWS)
    assert text.splitlines()[0] == "Routing agreement [gpu]"  # plain text: no markup eats the brackets


def test_a_shared_column_moves_into_the_title_where_the_table_is_too_wide():
    wide = max(len(line) for line in printed(132).splitlines()[1:])
    text = printed(wide - 1, hoist=("runner",))
    assert text.splitlines()[0] == "Routing agreement [gpu] (runner: onnxrt-cpu)"
    assert "runner" not in text.splitlines()[1] and every_value_whole(text, [r[1:] for r in ROWS])
    assert max(len(line) for line in text.splitlines()[1:]) < wide


@pytest.mark.parametrize("width", [80, 40, 20])
def test_rows_are_stacked_under_a_width_and_no_value_is_cut(width):
    text = printed(width, caption="a caption longer than the narrowest width, printed whole")
    assert every_value_whole(text, ROWS) and "a caption longer than the narrowest width, printed whole" in text
    widest_pair = 4 + max(len(f"{c} {v}") for row in ROWS for c, v in zip(COLUMNS[1:], row[1:]))
    for line in text.splitlines()[1:-1]:  # wrapped between pairs: only a pair wider than the console is wider
        assert len(line) <= max(width, widest_pair), line


def test_a_line_is_printed_whole_and_as_it_is():
    console = Console(file=io.StringIO(), width=20)
    print_line(console, "pip install 'moexport[trt]' and a long tail")
    assert console.file.getvalue() == "pip install 'moexport[trt]' and a long tail\n"
