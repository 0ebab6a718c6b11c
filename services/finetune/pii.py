"""Personal data out of training rows, market data left in.

Goes: e-mail addresses, card numbers (13-19 digits that pass the Luhn check), IBANs in any case and spacing (checked
with their mod-97 checksum), account numbers after a cue ("account number", "acct no.", "account #"), phone numbers
(an international "+" number, a North-American 3-3-4 number, or digits after a cue such as "phone" / "call"), IP
addresses, and names after a cue ("my name is", "Mr.", "Dr.", a closing such as "regards,").
Stays: dates (2024-01-15, 15/01/2024, 01.02.2024), prices and price ranges (150.25-155.80, $150-$160), volumes
(1,234,567 or 12 500 000 or 45000000), percentages, indicator readings.

Names without a cue are NOT detected (no name list or model here); the table in tests/unit/test_finetune_pii.py
is the contract.
"""

from __future__ import annotations

import re

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\d.,])\d(?:[ -]?\d){12,18}(?![\d.,]?\d)")
_ACCOUNT = re.compile(
    r"(?i)\b(account|acct|a/c)(\s*(?:number|no\.?|num\.?|#)?\s*[:#]?\s*)(\d[\d -]{3,}\d)",
)
_PHONE_CUE = re.compile(
    r"(?i)\b(phone|tel|telephone|mobile|cell|call me(?: at| on)?|whatsapp|fax)(\s*(?:number|no\.?|#)?\s*[:]?\s*)"
    r"(\+?\(?\d[\d ().-]{5,}\d)"
)
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d+\)?){2,6}(?![\w])")
_PHONE_NANP = re.compile(r"(?<![\w.])\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?![\w.])")
_IP = re.compile(r"(?<![\d.])(?:25[0-5]|2[0-4]\d|1?\d?\d)(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){3}(?![\d.])")
# The name: one or two capitalised words, each whole when it has parts joined by an apostrophe or a hyphen
# (O'Neil, D'Angelo, Anne-Marie, Smith-Jones), so no part of it is left behind. (Written out twice rather than
# built from one fragment: a pattern is then one literal, which the mutation tests can change.)
_NAME_CUE = re.compile(
    r"\b((?i:my name is|name:|signed,?|regards,?|sincerely,?|cheers,?|thanks,?)\s+|(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s+)"
    r"((?:[A-Z][a-z]*(?:['-][A-Z]?[a-z]+)+|[A-Z][a-z]+)(?:\s+(?:[A-Z][a-z]*(?:['-][A-Z]?[a-z]+)+|[A-Z][a-z]+))?)"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = re.sub(r"[ -]", "", candidate).upper()
    if not 15 <= len(s) <= 34 or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    rearranged = s[4:] + s[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[card]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group(0)


def _iban(m: re.Match[str]) -> str:
    """The longest prefix (whole space-separated groups) that is a valid IBAN; the words after it stay."""
    parts = m.group(0).split(" ")
    for end in range(len(parts), 0, -1):
        head = " ".join(parts[:end])
        if iban_ok(head):
            return " ".join(["[account]", *parts[end:]])
    return m.group(0)


def scrub(text: str) -> str:
    """`text` with personal data replaced by tags ([email], [account], [card], [phone], [ip], [name])."""
    text = _EMAIL.sub("[email]", text)
    text = _IBAN.sub(_iban, text)
    text = _ACCOUNT.sub(lambda m: f"{m.group(1)}{m.group(2)}[account]", text)
    text = _CARD.sub(_card, text)
    text = _PHONE_CUE.sub(lambda m: f"{m.group(1)}{m.group(2)}[phone]", text)
    text = _PHONE_INTL.sub("[phone]", text)
    text = _PHONE_NANP.sub("[phone]", text)
    text = _IP.sub("[ip]", text)
    text = _NAME_CUE.sub(lambda m: f"{m.group(1)}[name]", text)
    return text
