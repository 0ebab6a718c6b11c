"""The PII table: what the training-data scrubber removes, and the market data it must leave alone."""

from __future__ import annotations

import pytest

from services.finetune.pii import iban_ok, luhn_ok, scrub

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
