"""The PII scrubber and the session key on real-world shapes: e-mail addresses beyond example.com, IBANs of
several countries and lengths, cards with and without separators, phone numbers, IP addresses -- each replaced
whole (a scrubber that leaves half an address behind has failed), and text that is not personal data kept."""

from __future__ import annotations

import pytest

from shared.privacy import scrub_pii, session_key

# Each kind of personal data: the shapes it comes in, a sentence it stands in, and the tag that replaces it.
EMAILS = [
    "jane.doe@example.com",
    "Ann.O_Neil%ops+alerts-2@Mail-2.Example-Bank.co.UK",  # every character class of the local part, uppercase
    "TRADER@BANK.DE",
    "x9@mail.de",  # a two-letter top-level domain, digits in the local part
    "max.mustermann@gmx.net",
    "desk-7@trading.firm.io",
    "li_wei@163.com",  # a domain of digits
]
IBANS = [
    "DE89370400440532013000",  # Germany: digits only after the check digits
    "GB29NWBK60161331926819",  # United Kingdom: letters in the account part
    "NO9386011117947",  # Norway: the shortest, eleven characters after the check digits
    "MT84MALT011000012345MTLCAST001S",  # Malta: 31 characters
    "LC55HEMM000100010012001200023015",  # Saint Lucia: 32 characters
    "XY12ABCDEFGHIJKLMNOPQRSTUVWXYZ1234",  # the standard's longest shape: 34 characters
]
CARDS = [
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "4111111111111111",
    "4222222222222",  # thirteen digits (an old Visa)
    "6759649826438453000",  # nineteen digits (Maestro)
]
PHONES = [
    "+44 20 7946 0958",
    "+1 (212) 555-0100",
    "212.555.0100",
    "+49 30 1234567",
    "5550 1234",  # nine characters: the shortest the pattern takes
]
IPS = ["192.168.1.20", "10.0.0.7", "255.255.255.255"]
KINDS = [
    (EMAILS, "mail {} today", "[email]"),
    (IBANS, "pay to {} now", "[account]"),
    (CARDS, "card {} charged", "[number]"),
    (PHONES, "call {} please", "[phone]"),
    (IPS, "from {} at noon", "[ip]"),
]


@pytest.mark.parametrize(("value", "sentence", "tag"), [(v, s, tag) for values, s, tag in KINDS for v in values])
def test_each_kind_of_personal_data_is_replaced_whole(value: str, sentence: str, tag: str) -> None:
    assert scrub_pii(sentence.format(value)) == sentence.format(tag)


def test_several_kinds_in_one_text_each_get_their_own_tag() -> None:
    text = "Jane (jane@firm.io, +44 20 7946 0958) paid 4111 1111 1111 1111 from DE89370400440532013000 via 10.0.0.7"
    assert scrub_pii(text) == "Jane ([email], [phone]) paid [number] from [account] via [ip]"


@pytest.mark.parametrize(
    "text",
    [
        "AAPL rose 3.5% to 187.20 on the 1st; RSI 71, volume 52,000,000.",
        "ISIN US0378331005 trades on NASDAQ100 futures; EURUSD at 1.0845.",
        "BUY signal: MACD crossed above 0.25 with a 20-day average of 181.4",
        # a word that merely contains an IBAN shape is not an account (the word boundaries: letters and digits
        # glued to more of the same are an identifier, not an IBAN)
        "REF9912ABCDEFGHIJKL",
    ],
)
def test_text_without_personal_data_is_unchanged(text: str) -> None:
    assert scrub_pii(text) == text


def test_session_key_is_a_keyed_sha256_hex_digest() -> None:
    key = session_key("session-1", b"secret")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == session_key("session-1", b"secret")
    assert key != session_key("session-1", b"other secret")
    assert key != session_key("session-2", b"secret")
    # a known value (HMAC-SHA256 of the UTF-8 bytes), so that an encoding or digest change cannot pass unnoticed
    assert session_key("é", b"k") == "41b08e48379060d5566363083dabd4b2f9afd6e169af22d26522dbdc5e7a5134"
