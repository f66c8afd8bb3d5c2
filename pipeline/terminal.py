"""Text from outside the process, made safe to print on a terminal; pure.

Dead letters (a producer's key, value and headers, the reason built from them), heartbeats on
the status topic (an instance id, a state, a last error) and control-log reasons are written
by whoever can produce to a topic: printed as they are, an escape sequence in them would move
the cursor, rewrite the screen, set the window title or worse in the operator's terminal.
``pipeline dlq``, ``pipeline control`` (its acks and the group's decision), ``control status``
and ``log``, and ``pipeline top`` print them through :func:`printable`.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every character that does not print written as an escape: C0 and C1
    controls, DEL, and the other non-printing characters (format characters such as the
    bidirectional overrides, line and paragraph separators) become ``\\xNN``, ``\\uNNNN`` or
    ``\\UNNNNNNNN``; printable Unicode is kept. A newline too: one field stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
