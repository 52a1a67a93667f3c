"""Reading what a user hands mvm: a regular file of bounded size, JSON of bounded depth.

A FIFO or a device named as a file would block mvm or feed it without end, so the file is
opened without blocking and refused unless it is a regular file, before a byte is read.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from mvm.errors import InvalidInput

MAX_JSON_DEPTH = 32

_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def read_file(path: Path, limit: int, hint: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else refused at once."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror}", "check the file's path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS.items() if test(st.st_mode)), "not a regular file")
            raise InvalidInput(f"{path} is {kind}, not a regular file", hint)
        if st.st_size > limit:
            raise InvalidInput(f"{path} is {st.st_size} bytes; at most {limit} are accepted", hint)
        chunks = []
        left = limit + 1  # the file may grow while we read it
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise InvalidInput(f"{path} grew past {limit} bytes while being read", hint)
        return data
    finally:
        os.close(fd)


def load_json(data: bytes | str, source: str, hint: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON nested at most `max_depth` deep; anything else is one clear InvalidInput."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{source} is not valid JSON ({e.__class__.__name__})", hint) from None
    except RecursionError:
        raise InvalidInput(f"{source} is JSON nested too deeply (at most {max_depth} levels)",
                           hint) from None
    if depth(value) > max_depth:
        raise InvalidInput(f"{source} is JSON nested too deeply (at most {max_depth} levels)", hint)
    return value


def depth(value: Any) -> int:
    """How deep arrays and objects nest (a scalar: 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if items is None:
            continue
        deepest = max(deepest, d)
        stack.extend((x, d + 1) for x in items)
    return deepest
