"""Session ids are personal data: they are stored and sent only as a keyed hash."""

from __future__ import annotations

import hashlib
import hmac
import re

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<!\w)(?:\+?\d[\d\s().-]{7,}\d)(?!\w)")
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")  # 13-19 digits; a separator only between digits
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b")
_IP = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")


def session_key(session_id: str, secret: bytes) -> str:
    """HMAC-SHA256 of the session id under the deployment's secret: stable per session, not reversible
    without the secret, and useless to anyone who copies the database alone."""
    return hmac.new(secret, session_id.encode("utf-8"), hashlib.sha256).hexdigest()


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses, card and account numbers, phone numbers and IP addresses with tags."""
    text = _EMAIL.sub("[email]", text)
    text = _IBAN.sub("[account]", text)
    text = _CARD.sub("[number]", text)
    text = _IP.sub("[ip]", text)
    text = _PHONE.sub("[phone]", text)
    return text
