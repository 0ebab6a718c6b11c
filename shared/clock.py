"""Time in UTC: every store and message keeps UTC; SQLite hands datetimes back without their zone."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(ts: datetime) -> datetime:
    """`ts` as an aware UTC datetime: a naive one is taken to be UTC already (as stored), an aware one is
    converted, so two stored or received times always compare."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
