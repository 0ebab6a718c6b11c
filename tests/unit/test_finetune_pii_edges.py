"""The training-data scrubber on shapes its table did not have: addresses beyond example.com, IBANs of the
shortest and long formats, 13- and 19-digit cards, international and dotted phone numbers without a cue word,
and the number checks at their length limits. Each is replaced whole."""

from __future__ import annotations

import pytest

from services.finetune.pii import iban_ok, luhn_ok, scrub


@pytest.mark.parametrize(
    ("secret", "tag"),
    [
        ("Ann.O_Neil%ops+alerts-2@Mail-2.Example-Bank.co.UK", "[email]"),
        ("x9@mail.de", "[email]"),
        ("TRADER@BANK.DE", "[email]"),
        ("li_wei@163.com", "[email]"),
        ("NO9386011117947", "[account]"),  # Norway: 15 characters, the shortest IBAN
        ("MT84MALT011000012345MTLCAST001S", "[account]"),  # Malta: 31
        ("LC55HEMM000100010012001200023015", "[account]"),  # Saint Lucia: 32
        ("4222222222222", "[card]"),  # 13 digits
        ("6799990100000000019", "[card]"),  # 19 digits
        ("+1 212 555 0100", "[phone]"),  # international, no cue word
        ("+44 20 7946 0958", "[phone]"),
        ("555.123.4567", "[phone]"),
        ("10.0.0.7", "[ip]"),
    ],
)
def test_personal_data_without_a_cue_is_replaced_whole(secret: str, tag: str) -> None:
    assert scrub(f"see {secret} now") == f"see {tag} now"


def test_number_checks_at_their_limits() -> None:
    assert iban_ok("NO9386011117947") and iban_ok("no93 8601 1117 947")
    assert not iban_ok("NO938601111794")  # 14 characters
    assert not iban_ok("1O9386011117947")  # the country must be letters
    assert not iban_ok("NOX386011117947")  # the check digits must be digits
    assert not iban_ok("NO" + "9" * 33)  # over 34 characters
    assert luhn_ok("4222222222222") and luhn_ok("6799990100000000019")
    assert not luhn_ok("4222222222223")


def test_a_luhn_valid_number_outside_13_to_19_digits_is_not_a_card() -> None:
    twelve = "123456789015"  # Luhn-valid, 12 digits
    assert luhn_ok(twelve)
    assert "[card]" not in scrub(f"order {twelve} shipped")
