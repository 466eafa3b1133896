"""Writing benchmark results: one call gives a markdown table, a JSON file and (optionally) a plot."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `rows` (dicts) restricted to `columns`, in that order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict[str, Any]], *, columns: Sequence[str], out_dir: str | os.PathLike,
                  title: str, notes: str = "", environment: dict[str, Any] | None = None,
                  plot: Callable[[Sequence[dict[str, Any]], Path], None] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write `<out_dir>/<name>.md`, `<name>.json` and, given `plot(rows, path)`, `<name>.png`.

    Args:
        name: File stem, e.g. "kernels_h200".
        rows: One dict per measurement.
        columns: Columns of the markdown table (the JSON keeps every key).
        out_dir: Folder to write into (created).
        title: Heading of the markdown file.
        notes: Markdown placed under the table (method, floors, what the ratios mean).
        environment: Machine/software facts recorded in both files. Defaults to host and time.
        plot: Draws the rows into the given PNG path.
        extra: More JSON entries beside "rows" (e.g. a second table's rows, which `notes` shows).

    Returns:
        The paths written, by kind ("md", "json", "png").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    environment = {"host": platform.node(), "python": platform.python_version(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **(environment or {})}
    paths = {"md": out / f"{name}.md", "json": out / f"{name}.json"}
    env_lines = "\n".join(f"- {key}: {value}" for key, value in environment.items())
    paths["md"].write_text(f"# {title}\n\n{env_lines}\n\n{markdown_table(rows, columns)}\n\n{notes}\n".rstrip() + "\n")
    paths["json"].write_text(json.dumps({"title": title, "environment": environment, "rows": list(rows), **(extra or {})},
                                        indent=1))
    if plot is not None:
        paths["png"] = out / f"{name}.png"
        plot(rows, paths["png"])
    return paths


def add_results_options(parser, suite: str, stem: str | None = None) -> None:
    """The options every suite takes for where its results go: -o/--output DIR (also --out), and for
    suites named after the GPU, --name STEM (default `<stem>_<gpu>`)."""
    parser.add_argument("-o", "--output", "--out", dest="output", default=None,
                        help=f"Results folder. Defaults to a fresh ./moexport-bench/{suite}-<date>-<time>.")
    if stem:
        parser.add_argument("--name", default=None, help=f"File stem. Defaults to {stem}_<gpu>, e.g. {stem}_h200.")


def results_name(name: str | None, stem: str) -> str:
    """`name`, or `<stem>_<gpu>` after the CUDA device's model (e.g. kernels_h200)."""
    import torch

    return name or f"{stem}_{torch.cuda.get_device_name().split()[1].lower()}"


def results_folder(out: str | os.PathLike | None, suite: str) -> Path:
    """Where a suite writes: `out`, checked, or a fresh ./moexport-bench/<suite>-<date>-<time> (never the
    checkout's committed bench/results unless asked for)."""
    from moexport.core.files import check_output_folder

    return check_output_folder(out or Path("moexport-bench") / time.strftime(f"{suite}-%Y%m%d-%H%M%S"))
