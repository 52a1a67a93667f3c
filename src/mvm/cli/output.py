"""Presenting results: tables with Rich, `--json` everywhere, step progress on stderr.

Everything printed here may hold text from outside (error messages, paths, flake refs, a
guest's or Nix's output), so both consoles print strings literally: no Rich markup (a `[/x]`
in a path would crash the print), no `:emoji:` codes. Styling is applied with `Text` only.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mvm.util.jsonable import jsonable as to_jsonable

out = Console(soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)




def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    t = Table(title=title, show_edge=False, pad_edge=False, box=None, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        # literal text, highlighted as before (numbers, addresses, paths)
        t.add_row(*(out.render_str("" if v is None else str(v), markup=False, emoji=False)
                    for v in r))
    out.print(t)


def error(message: str) -> None:
    """The one `error: …` line on stderr; the message is printed as it is."""
    err.print(Text.assemble(("error:", "bold red"), " ", message))


def note(line: str) -> None:
    """A line of a report on stderr (e.g. what `pool scale` did to each instance)."""
    err.print(Text(line))


class StepPrinter:
    """A long command's `Progress` on stderr: one line per step with its duration."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started: dict[str, float] = {}

    def __call__(self, step: str, message: str) -> None:
        now = time.monotonic()
        if message == "…":
            self.started[step] = now
            err.print(Text.assemble((self.what, "dim"), f" {step} …"))
            return
        if step not in self.started:  # a step that reports its own timing
            err.print(Text.assemble((self.what, "dim"), f" {step}: {message}"))
            return
        took = now - self.started.pop(step)
        err.print(Text.assemble((self.what, "dim"), f" {step}: {message} ", (f"({took:.2f}s)", "dim")))

