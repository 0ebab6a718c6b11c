"""The training-data scrubber, one row per member of its patterns: each separator a number may be written with,
each character that marks where a number or a cue word begins or ends, and each length limit. Two tables: what
is replaced (and how much of it), and market text or glued strings that look close but must stay whole."""

from __future__ import annotations

import pytest

from services.finetune.pii import iban_ok, scrub


def _with_check_digits(country: str, bban: str) -> str:
    """An IBAN-shaped string whose mod-97 check digits are right (ISO 13616: move the first four characters to
    the end, letters as 10..35, the remainder is 1)."""
    number = int("".join(str(int(ch, 36)) for ch in bban + country + "00"))
    return f"{country}{98 - number % 97:02d}{bban}"


LONGEST_IBAN = _with_check_digits("GB", "WEST" + "1" * 26)  # 34 characters, the most the standard allows


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        # IBANs: in lower case and grouped, with dashes, at the end of a sentence, at the longest length.
        ("to gb82 west 1234 5698 7654 32 please", "to [account] please"),
        ("IBAN DE89-3704-0044-0532-0130-00 (Commerzbank)", "IBAN [account] (Commerzbank)"),
        ("pay to NO9386011117947.", "pay to [account]."),
        (f"wire {LONGEST_IBAN}", "wire [account]"),
        # Account numbers after a cue: five digits, grouped with spaces, '#' after "no.".
        ("acct 12345", "acct [account]"),
        ("account number: 1234 5678 9012 ok", "account number: [account] ok"),
        ("account no. # 12345678", "account no. # [account]"),
        # Phone numbers after a cue, written with brackets, dots, dashes, or as seven plain digits.
        ("call me at 020 (7946) 0958", "call me at [phone]"),
        ("fax 0(20)79460958", "fax [phone]"),
        ("phone 020.7946.0958", "phone [phone]"),
        ("mobile 07700-900-461", "mobile [phone]"),
        ("tel 5550100", "tel [phone]"),
        # International numbers with dots or dashes, and one in six pairs; a North-American one with spaces.
        ("+44.20.7946.0958 any time", "[phone] any time"),
        ("+44-20-7946-0958 any time", "[phone] any time"),
        ("Berlin desk: +49 30 12 34 56 78 90", "Berlin desk: [phone]"),
        ("desk 212 555 0100", "desk [phone]"),
        # Names whose parts are joined by a hyphen or an apostrophe go whole.
        ("regards, Anne-Marie", "regards, [name]"),
        ("Mr. O'Neil asked", "Mr. [name] asked"),
        ("Ms. Mary O'Brien", "Ms. [name]"),
        ("Prof. Mary Smith-Jones wrote", "Prof. [name] wrote"),
        ("my name is Jean-luc Picard", "my name is [name]"),
        ("Dr. D'Angelo here", "Dr. [name] here"),
    ],
)
def test_each_written_form_is_replaced_whole(text: str, scrubbed: str) -> None:
    assert scrub(text) == scrubbed


@pytest.mark.parametrize(
    "text",
    [
        # IBAN-shaped strings glued to a letter or a digit, or with a wrong check, are not IBANs.
        "XNO9386011117947",
        "xNO9386011117947",
        "7NO9386011117947",
        f"{LONGEST_IBAN}X",
        "GB00 WEST 1234 5698 7654 32",
        # Long numbers that are decimals, or a 20-digit reference whose last 19 digits pass the Luhn check.
        "ratio 0.4222222222222",
        "EUR 1,4222222222222",
        "4222222222222.5 shares",
        "4222222222222,5 shares",
        "order 16799990100000000019",
        # A cue word inside another word is no cue: Intel's volume, a sub-account's balance, a market that
        # disregards a company.
        "Intel 5550100 shares",
        "subaccount 12345",
        "The market disregards Apple news",
        # Sums, digit-grouped decimals and volumes, versions: no phone number, no IP address.
        "sum 12+34 56 78",
        "++44 20 7946 0958",
        "pi 3.141 592 6535",
        "volume 1 234 567 8901.25",
        "ref123 456 7890",
        "212 555 01000",
        "1256.0.0.7",
        "192.168.1.1000",
        "version 10.0.0.7.1",
        "1.10.0.0.7",
        # A lower-case word after a title is no name.
        "Dr. jones",
    ],
)
def test_close_looking_market_text_stays(text: str) -> None:
    assert scrub(text) == text


def test_iban_check_at_the_length_limit_and_on_the_country_and_check_characters() -> None:
    assert len(LONGEST_IBAN) == 34 and iban_ok(LONGEST_IBAN)
    too_long = _with_check_digits("GB", "WEST" + "1" * 27)
    assert len(too_long) == 35 and iban_ok(too_long) is False  # the checksum is right, the length is not
    # Right checksums, wrong shapes: digits for the country, a letter among the check digits.
    assert iban_ok("1251WEST12345698765432") is False
    assert iban_ok("GBD2WEST12345698765432") is False
    assert iban_ok("GB82WEST12345698765432") is True
