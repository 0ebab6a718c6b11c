"""Session-hash secrets are versioned: new keys under the newest, every version for lookups and erasure."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from shared.privacy import erasure_tag, parse_hash_keys, session_key, session_keys
from shared.settings import ServiceSettings


def test_session_key_is_a_keyed_sha256_hex_digest() -> None:
    key = session_key("session-1", b"secret")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == session_key("session-1", b"secret")
    assert key != session_key("session-1", b"other secret")
    assert key != session_key("session-2", b"secret")
    # a known value (HMAC-SHA256 of the UTF-8 bytes), so that an encoding or digest change cannot pass unnoticed
    assert session_key("é", b"k") == "41b08e48379060d5566363083dabd4b2f9afd6e169af22d26522dbdc5e7a5134"


def test_versions_are_read_newest_first_and_the_single_key_is_the_oldest() -> None:
    assert parse_hash_keys("v2:new, v1:old", "legacy") == [("v2", b"new"), ("v1", b"old"), ("v0", b"legacy")]
    assert parse_hash_keys("v2:new,v1:old", "old") == [("v2", b"new"), ("v1", b"old")]  # listed already
    assert parse_hash_keys("", "only") == [("v0", b"only")]
    assert parse_hash_keys("v1:a:b") == [("v1", b"a:b")]  # a secret may hold colons


def test_white_space_around_entries_and_empty_entries_are_ignored() -> None:
    assert parse_hash_keys(" v2:new , ,v1 :old,") == [("v2", b"new"), ("v1", b"old")]


@pytest.mark.parametrize("bad", ["nocolon", ":secret", " :secret", "v1:", "v1:a,v1:b", "v1 :a, v1:b"])
def test_a_malformed_key_list_is_refused(bad: str) -> None:
    with pytest.raises(
        ValueError, match="^SESSION_HASH_KEYS (entries are <version>:<secret>|names version 'v1' twice)"
    ):
        parse_hash_keys(bad)


def test_the_single_key_cannot_take_a_version_the_list_already_uses() -> None:
    with pytest.raises(ValueError, match="^SESSION_HASH_KEYS uses version 'v0', the name of SESSION_HASH_KEY"):
        parse_hash_keys("v0:new", "legacy")
    assert parse_hash_keys("v0:same", "same") == [("v0", b"same")]  # the same secret: listed already


def test_a_session_has_one_key_per_version_newest_first() -> None:
    keys = session_keys("s-1", [b"new", b"old"])
    assert keys == [session_key("s-1", b"new"), session_key("s-1", b"old")]
    assert session_keys("s-1", [b"same", b"same"]) == [session_key("s-1", b"same")]


def test_settings_hash_new_sessions_with_the_newest_secret_and_keep_the_old_one() -> None:
    rotated = ServiceSettings(session_hash_key=SecretStr("old"), session_hash_keys=SecretStr("v2:new"))
    assert rotated.session_hash_secrets() == (b"new", b"old")
    assert rotated.require_session_hash_key() == b"new"
    assert ServiceSettings(session_hash_key=SecretStr("old")).session_hash_secrets() == (b"old",)
    with pytest.raises(RuntimeError, match="SESSION_HASH_KEY"):
        ServiceSettings(session_hash_key=None).require_session_hash_key()
    with pytest.raises(RuntimeError, match="<version>:<secret>"):
        ServiceSettings(session_hash_keys=SecretStr("broken")).session_hash_secrets()


def test_an_erasure_tag_is_stable_and_is_not_the_key() -> None:
    key = session_key("s-1", b"k")
    assert erasure_tag(key) == erasure_tag(key) != key
    assert erasure_tag(key) != erasure_tag(session_key("s-2", b"k")) and len(erasure_tag(key)) == 64
