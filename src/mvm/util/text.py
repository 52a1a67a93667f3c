"""Text from outside (a guest's console, a guest agent's message) made safe for a terminal.

A guest is root in its VM and writes what it likes to its console and its agent channel; shown
raw, escape sequences in it would drive the operator's terminal (retitle it, rewrite what is
on screen, or worse on some terminals). `printable` keeps text, newlines and tabs, and shows
everything else as an escape: C0 and C1 controls and DEL as `\\xNN`, bytes that are not
UTF-8 as `\\xNN`, and the Unicode bidirectional overrides as `\\uNNNN`. A serial console's
`\\r\\n` line ends are plain newlines.
"""

from __future__ import annotations

import re

# C0 but tab and newline, DEL, C1; bidi embeddings, overrides and isolates; lone surrogates.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    o = ord(m.group())
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def printable(data: bytes | str) -> str:
    """`data` with every character that could act on a terminal shown as an escape."""
    text = data.decode("utf-8", "backslashreplace") if isinstance(data, bytes) else data
    return _UNSAFE.sub(_escape, text.replace("\r\n", "\n"))
