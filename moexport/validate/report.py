"""The parity report: a terminal table (rich), JSON and a self-contained HTML page."""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

from moexport.core.files import write_atomically
from moexport.core.tables import print_line, print_table
from moexport.validate.compare import OutputResult, RoutingResult

MAX_PRINTED = 10  # disagreeing tokens printed; the saved report lists up to compare.MAX_EXAMPLES per layer


@dataclass
class ValidationReport:
    """Everything one validation found. Truthy when every output and every routing check passed."""

    artifact: str
    reference: str
    dtype: str
    runners: list[str]
    inputs: list[str]
    outputs: list[OutputResult] = field(default_factory=list)
    routing: list[RoutingResult] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """At least one output was compared, and every output and routing check passed."""
        return bool(self.outputs) and all(o.passed for o in self.outputs) and all(r.passed for r in self.routing)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        """The report as plain data (what report.json holds), routing with its derived fields."""
        routing = [{**vars(r), "agreement": r.agreement, "passed": r.passed} for r in self.routing]
        return {"artifact": self.artifact, "reference": self.reference, "dtype": self.dtype, "runners": self.runners,
                "inputs": self.inputs, "passed": self.passed, "outputs": [vars(o) for o in self.outputs],
                "routing": routing, "latency_ms": self.latency_ms, "notes": self.notes}

    def print(self, console: Console | None = None) -> None:
        """Print the report: tables and notes, every value whole at the console's width (see `print_table`)."""
        console = console or Console()
        rows = [[o.runner, o.output, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", f"{o.mean_abs:.3g}",
                 f"{o.atol:g} / {o.rtol:g}", _status(o.passed)] for o in self.outputs]
        title = f"Parity of {self.artifact} ({self.dtype}) against {self.reference} (PyTorch, float32)"
        columns = ("runner", "output", "max |err|", "relative", "mean |err|", "atol / rtol", "status")
        print_table(console, title, columns, rows,
                    caption="relative = max |err| / max |reference|; an output passes when "
                            "max |err| <= atol + rtol * max |reference|", hoist=("runner",))
        for o in self.outputs:
            if o.rerouted:
                print_line(console, f"  Note: {o.runner} routed near-ties to other experts on {o.rerouted} "
                                    f"input(s); there its {o.output} were compared with the PyTorch reference run "
                                    f"on that routing (with the reference's own routing: max |err| "
                                    f"{o.max_abs_own_routing:.3g}, the other experts' outputs)")
        if self.routing:
            rows = [[r.runner, r.layer or "(layer)", str(r.tokens), f"{100 * r.agreement:.2f}%", str(r.near_ties),
                     str(r.downstream), str(r.unexplained), _status(r.passed)] for r in self.routing]
            print_table(console, "Routing agreement (identical top-k expert sets)",
                        ("runner", "layer", "tokens", "agreement", "near-ties", "downstream", "unexplained",
                         "status"), rows, hoist=("runner",))
            examples = [(r, ex) for r in self.routing for ex in r.examples]
            for r, ex in examples[:MAX_PRINTED]:
                print_line(console, _example_line(r, ex))
            if len(examples) > MAX_PRINTED:
                more = len(examples) - MAX_PRINTED
                print_line(console, f"  … and {more} more in the saved report (--save-report)")
        for note in self.notes:
            print_line(console, f"  Note: {note}")

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write report.json and report.html into `folder`; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "report.json", "html": folder / "report.html"}
        write_atomically(paths["json"], lambda tmp: tmp.write_text(json.dumps(self.to_dict(), indent=1)))
        write_atomically(paths["html"], lambda tmp: tmp.write_text(self.to_html(), encoding="utf-8"))
        return paths

    def to_html(self) -> str:
        """The report as a self-contained HTML page (what report.html holds)."""
        data = self.to_dict()
        outputs = _html_table(["runner", "output", "max_abs", "max_rel", "mean_abs", "scale", "atol", "rtol", "passed"],
                              data["outputs"])
        routing = _html_table(["runner", "layer", "tokens", "agreement", "near_ties", "downstream", "unexplained", "passed"],
                              data["routing"])
        examples = _html_table(["runner", "layer", "iteration", "token", "reference", "runner_experts", "margin", "kind"],
                               [{"runner": r["runner"], "layer": r["layer"], **ex, "runner_experts": ex["runner"]}
                                for r in data["routing"] for ex in r["examples"]])
        verdict = "PASSED" if self.passed else "FAILED"
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>moexport parity: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px}}.False{{color:#b00;font-weight:bold}}.True{{color:#080}}</style></head>
<body><h1>{verdict}</h1><p>artifact <code>{html.escape(self.artifact)}</code> against <code>{html.escape(self.reference)}</code>,
dtype {self.dtype}; runners {html.escape(", ".join(self.runners))}; inputs {html.escape(", ".join(self.inputs))}</p>
<h2>Outputs</h2>{outputs}<h2>Routing agreement</h2>{routing}<h3>Disagreeing tokens</h3>{examples}
<h2>Notes</h2><ul>{notes}</ul></body></html>"""


def _status(passed: bool) -> Text:
    return Text("PASSED", style="green") if passed else Text("FAILED", style="red")


def _example_line(r: RoutingResult, ex: dict) -> Text:
    """One disagreeing token: where, which experts, and what explains it (or that nothing does)."""
    where = (f"{r.runner} layer {r.layer or '(layer)'} input {ex['iteration']} token {ex['token']}: "
             f"reference experts {ex['reference']}, {r.runner} {ex['runner']}")
    if ex["kind"] == "near-tie":
        return Text(f"  near-tie: {where}; top-k margin {ex['margin']:.3g} is below {r.tie_margin:g}")
    if ex["kind"] == "downstream":
        return Text(f"  after an earlier layer's difference: {where}, which the reference picks too on "
                    f"{r.runner}'s routing of the layers before")
    why = ("an exact tie broken against the routing rule (the lower expert index wins)" if ex["margin"] == 0
           else f"top-k margin {ex['margin']:.3g} is not below {r.tie_margin:g}")
    return Text.assemble("  ", ("UNEXPLAINED", "red"), f": {where}; {why}")


def _html_table(columns: list[str], rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{c}</th>" for c in columns)

    def cell(value):
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f'<td class="{value}">{html.escape(text)}</td>' if isinstance(value, bool) else f"<td>{html.escape(text)}</td>"

    body = "".join("<tr>" + "".join(cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
