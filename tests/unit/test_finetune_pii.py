"""The training-data scrubber (services.finetune.pii): the market data it must leave alone, including text that
looks close to personal data; what it replaces, from a table of common forms, then one row per member of its
patterns (each separator, each character that marks where a number or cue word begins or ends, each length limit),
then shapes without a cue word; and the number checks (Luhn, IBAN) at their limits."""

from __future__ import annotations

import pytest

from services.finetune.pii import iban_ok, luhn_ok, scrub


def _with_check_digits(country: str, bban: str) -> str:
    """An IBAN-shaped string whose mod-97 check digits are right (ISO 13616: move the first four characters to
    the end, letters as 10..35, the remainder is 1)."""
    number = int("".join(str(int(ch, 36)) for ch in bban + country + "00"))
    return f"{country}{98 - number % 97:02d}{bban}"


LONGEST_IBAN = _with_check_digits("GB", "WEST" + "1" * 26)  # 34 characters, the most the standard allows

KEEP = [
    "Earnings on 2024-01-15 beat estimates.",
    "The signal fired on 15/01/2024 and again on 01.02.2024.",
    "Price range 150.25-155.80 over the week.",
    "Support at $150-$160, resistance near $172.",
    "Volume was 1,234,567 shares, versus 12 500 000 last month.",
    "Volume of 45000000 is twice the 90-day average.",
    "RSI at 28.5 is oversold; MACD -0.42; SMA50 182.35 vs SMA200 176.10.",
    "The stock rose 3.25% to 1234.56 in 2023.",
    "AAPL BUY: 52-week high 199.62, low 164.08, market cap 2,950,000,000,000.",
    "Range 2023-2024: 120 to 180.",
    "A move from 100 to 110 is 10%.",
    # Text that looks close to personal data. IBAN-shaped strings glued to a letter or a digit, or with a wrong check, are not IBANs.
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
]

GO = [
    ("Contact me at jane.doe@example.com please", "jane.doe@example.com", "[email]"),
    ("Card 4111 1111 1111 1111 was charged", "4111 1111 1111 1111", "[card]"),
    ("card 4111-1111-1111-1111", "4111-1111-1111-1111", "[card]"),
    ("pay with 5500005555555559 now", "5500005555555559", "[card]"),
    ("IBAN DE89370400440532013000 for transfers", "DE89370400440532013000", "[account]"),
    ("iban de89 3704 0044 0532 0130 00 is mine", "de89 3704 0044 0532 0130 00", "[account]"),
    ("send to GB82 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 32", "[account]"),
    ("gb82west12345698765432 lowercase", "gb82west12345698765432", "[account]"),
    ("my account number 12345678 at the bank", "12345678", "[account]"),
    ("Acct no. 9876-5432-10 please", "9876-5432-10", "[account]"),
    ("account #: 00123456789", "00123456789", "[account]"),
    ("call me on +44 20 7946 0958 tomorrow", "+44 20 7946 0958", "[phone]"),
    ("ring (555) 123-4567 today", "(555) 123-4567", "[phone]"),
    ("office 555-123-4567", "555-123-4567", "[phone]"),
    ("phone: 0171 234567", "0171 234567", "[phone]"),
    ("from 192.168.10.254 again", "192.168.10.254", "[ip]"),
    ("Hi, my name is John Smith and I like it", "John Smith", "[name]"),
    ("Thanks for asking Dr. Alvarez about it", "Alvarez", "[name]"),
    ("Kind regards, Maria Keller", "Maria Keller", "[name]"),
]


@pytest.mark.parametrize("text", KEEP)
def test_market_data_is_left_alone(text: str) -> None:
    assert scrub(text) == text


@pytest.mark.parametrize(("text", "secret", "tag"), GO)
def test_personal_data_is_replaced_by_its_tag(text: str, secret: str, tag: str) -> None:
    out = scrub(text)
    assert secret not in out
    assert tag in out
    assert out == text.replace(secret, tag)


def test_number_checks() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE88 3704 0044 0532 0130 00")
    # a card-length number that fails Luhn is a volume or an id, not a card: it stays
    assert scrub("volume 1234567890123") == "volume 1234567890123"


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


def test_iban_check_at_the_length_limit_and_on_the_country_and_check_characters() -> None:
    assert len(LONGEST_IBAN) == 34 and iban_ok(LONGEST_IBAN)
    too_long = _with_check_digits("GB", "WEST" + "1" * 27)
    assert len(too_long) == 35 and iban_ok(too_long) is False  # the checksum is right, the length is not
    # Right checksums, wrong shapes: digits for the country, a letter among the check digits.
    assert iban_ok("1251WEST12345698765432") is False
    assert iban_ok("GBD2WEST12345698765432") is False
    assert iban_ok("GB82WEST12345698765432") is True
