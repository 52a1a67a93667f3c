"""The two kinds of progress callback, one name each.

`Progress` is what a long command tells as it goes, for a person: `(step, message)`, where
the message is "…" when the step starts and then what it did (`cli.output.StepPrinter`
prints each step with its duration; the API keeps the lines with its operation). Builds,
host set-up, the builder microVM and instance transitions report through it.

`StepTimes` is what a runtime tells after each named step of a boot, restore or snapshot:
`(step, seconds it took)` (`runtime.base.UndoSteps` measures them).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, str], None]
StepTimes = Callable[[str, float], None]
