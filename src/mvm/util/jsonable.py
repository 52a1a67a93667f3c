"""Records as JSON values: the one form `--json` prints and the API answers with."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any


def jsonable(obj: Any) -> Any:
    """Dataclasses, enums and tuples as JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj
