"""Rules for text that users send (tickers, indicator names and values, comments), free of any framework.

Two kinds of character are refused before anything is stored or sent to a provider:
- lone UTF-16 surrogates (U+D800-U+DFFF): JSON's `\\ud800` escape decodes to one in Python, and no encoder
  (SQLite, the JSON of an event, an HTTP client) will write it, so it would fail after the provider was paid;
- bidirectional control characters (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C): they reorder how
  text is displayed ("Trojan Source"), so what an operator reads is not what was sent.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def unsafe_text_reason(text: str) -> str | None:
    """Why `text` is refused, or None when it is acceptable."""
    if _SURROGATE.search(text):
        return "contains a lone UTF-16 surrogate (not valid Unicode text)"
    if _BIDI.search(text):
        return "contains a bidirectional control character (U+202A-U+202E, U+2066-U+2069, U+200E/F, U+061C)"
    return None


def check_text(text: str, what: str) -> str:
    """`text` unchanged, or ValueError naming `what` and the reason."""
    reason = unsafe_text_reason(text)
    if reason:
        raise ValueError(f"{what} {reason}")
    return text
