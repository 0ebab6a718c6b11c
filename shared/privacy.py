"""Session ids are personal data: they are stored and sent only as a keyed hash."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence


def session_key(session_id: str, secret: bytes) -> str:
    """HMAC-SHA256 of the session id under the deployment's secret: stable per session, not reversible
    without the secret, and useless to anyone who copies the database alone."""
    return hmac.new(secret, session_id.encode("utf-8"), hashlib.sha256).hexdigest()


def session_keys(session_id: str, secrets: Sequence[bytes]) -> list[str]:
    """The session's key under every version of the secret, newest first (see `parse_hash_keys`): new rows
    are written under the first; lookups and erasure try them all, so rotating the secret orphans nothing."""
    keys: list[str] = []
    for secret in secrets:
        key = session_key(session_id, secret)
        if key not in keys:
            keys.append(key)
    return keys


def parse_hash_keys(versioned: str, legacy: str | None = None) -> list[tuple[str, bytes]]:
    """`SESSION_HASH_KEYS` ("v2:newsecret,v1:oldsecret", newest first) and the single `SESSION_HASH_KEY`, as
    (version, secret) pairs, newest first. The single key, when set and not already listed, is the oldest
    version ("v0"): rotating is adding `SESSION_HASH_KEYS=v1:<new secret>` and keeping the old setting."""
    pairs: list[tuple[str, bytes]] = []
    for item in (part.strip() for part in versioned.split(",")):
        if not item:
            continue
        version, sep, secret = item.partition(":")
        version = version.rstrip()  # the item is stripped: only "v1 :secret" leaves white space here
        if not sep or not version or not secret:
            raise ValueError("SESSION_HASH_KEYS entries are <version>:<secret>, comma-separated, newest first")
        if any(v == version for v, _ in pairs):
            raise ValueError(f"SESSION_HASH_KEYS names version {version!r} twice")
        pairs.append((version, secret.encode()))
    if legacy and all(secret != legacy.encode() for _, secret in pairs):
        if any(v == "v0" for v, _ in pairs):
            raise ValueError("SESSION_HASH_KEYS uses version 'v0', the name of SESSION_HASH_KEY when both are set")
        pairs.append(("v0", legacy.encode()))
    return pairs


def erasure_tag(session_key: str) -> str:
    """What an erasure record keeps of a session: a one-way digest of its keyed hash, under its own label.
    Whoever holds a session key (a message still in flight) can tell that it was erased; the record alone
    cannot be joined with anything else, since no store keeps the key itself once erased."""
    return hashlib.sha256(b"erased-session:" + session_key.encode()).hexdigest()
