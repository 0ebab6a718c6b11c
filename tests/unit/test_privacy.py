"""The PII scrubber and the session key on real-world shapes: e-mail addresses beyond example.com, IBANs of
several countries and lengths, cards with and without separators, phone numbers, IP addresses -- each replaced
whole (a scrubber that leaves half an address behind has failed), and text that is not personal data kept."""

from __future__ import annotations

import pytest

from shared.privacy import scrub_pii, session_key


@pytest.mark.parametrize(
    "address",
    [
        "jane.doe@example.com",
        "Ann.O_Neil%ops+alerts-2@Mail-2.Example-Bank.co.UK",  # every character class of the local part, uppercase
        "TRADER@BANK.DE",
        "x9@mail.de",  # a two-letter top-level domain, digits in the local part
        "max.mustermann@gmx.net",
        "desk-7@trading.firm.io",
        "li_wei@163.com",  # a domain of digits
    ],
)
def test_an_email_address_is_replaced_whole(address: str) -> None:
    assert scrub_pii(f"mail {address} today") == "mail [email] today"


@pytest.mark.parametrize(
    "iban",
    [
        "DE89370400440532013000",  # Germany: digits only after the check digits
        "GB29NWBK60161331926819",  # United Kingdom: letters in the account part
        "NO9386011117947",  # Norway: the shortest, eleven characters after the check digits
        "MT84MALT011000012345MTLCAST001S",  # Malta: 31 characters
        "LC55HEMM000100010012001200023015",  # Saint Lucia: 32 characters
        "XY12ABCDEFGHIJKLMNOPQRSTUVWXYZ1234",  # the standard's longest shape: 34 characters
    ],
)
def test_an_iban_is_replaced_whole(iban: str) -> None:
    assert scrub_pii(f"pay to {iban} now") == "pay to [account] now"


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "4222222222222",  # thirteen digits (an old Visa)
        "6759649826438453000",  # nineteen digits (Maestro)
    ],
)
def test_a_card_number_is_replaced_whole(card: str) -> None:
    assert scrub_pii(f"card {card} charged") == "card [number] charged"


@pytest.mark.parametrize(
    "phone",
    [
        "+44 20 7946 0958",
        "+1 (212) 555-0100",
        "212.555.0100",
        "+49 30 1234567",
        "5550 1234",  # nine characters: the shortest the pattern takes
    ],
)
def test_a_phone_number_is_replaced_whole(phone: str) -> None:
    assert scrub_pii(f"call {phone} please") == "call [phone] please"


@pytest.mark.parametrize("ip", ["192.168.1.20", "10.0.0.7", "255.255.255.255"])
def test_an_ip_address_is_replaced_whole(ip: str) -> None:
    assert scrub_pii(f"from {ip} at noon") == "from [ip] at noon"


def test_several_kinds_in_one_text_each_get_their_own_tag() -> None:
    text = "Jane (jane@firm.io, +44 20 7946 0958) paid 4111 1111 1111 1111 from DE89370400440532013000 via 10.0.0.7"
    assert scrub_pii(text) == "Jane ([email], [phone]) paid [number] from [account] via [ip]"


@pytest.mark.parametrize(
    "text",
    [
        "AAPL rose 3.5% to 187.20 on the 1st; RSI 71, volume 52,000,000.",
        "ISIN US0378331005 trades on NASDAQ100 futures; EURUSD at 1.0845.",
        "BUY signal: MACD crossed above 0.25 with a 20-day average of 181.4",
    ],
)
def test_trading_text_without_personal_data_is_unchanged(text: str) -> None:
    assert scrub_pii(text) == text


def test_a_word_that_merely_contains_an_iban_shape_is_not_an_account() -> None:
    # the word boundaries: letters and digits glued to more of the same are an identifier, not an IBAN
    assert scrub_pii("REF9912ABCDEFGHIJKL") == "REF9912ABCDEFGHIJKL"


def test_session_key_is_a_keyed_sha256_hex_digest() -> None:
    key = session_key("session-1", b"secret")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == session_key("session-1", b"secret")
    assert key != session_key("session-1", b"other secret")
    assert key != session_key("session-2", b"secret")
    # a known value (HMAC-SHA256 of the UTF-8 bytes), so that an encoding or digest change cannot pass unnoticed
    assert session_key("é", b"k") == "41b08e48379060d5566363083dabd4b2f9afd6e169af22d26522dbdc5e7a5134"
