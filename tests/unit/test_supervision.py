"""`make run`'s supervisor: a process that keeps dying is restarted ever more slowly; one that ran for a while
starts from a short delay again."""

from __future__ import annotations

from pathlib import Path

from gateway.run import _Backoff, _without_password


def test_restarts_back_off_and_reset_after_a_long_run() -> None:
    b = _Backoff()
    assert not b.due(100.0)  # first death noticed: 1 s later
    assert b.due(101.0)
    b.started(101.0)
    delays = []
    now = 101.0
    for _ in range(6):  # dies again right away, six times
        now += 0.5
        b.due(now)
        delays.append(b.next_at - now)
        now = b.next_at
        b.started(now)
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    now += 120  # ran for two minutes, then died
    b.due(now)
    assert b.next_at - now == 1.0 and b.count == 7


def test_the_banner_never_prints_the_redis_password() -> None:
    assert _without_password("redis://:s3cret@127.0.0.1:46001/0") == "redis://:***@127.0.0.1:46001/0"


def test_secrets_are_created_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    import os
    import stat

    from gateway.run import ensure_secrets

    old = os.umask(0)
    try:
        env: dict[str, str] = {}
        ensure_secrets(tmp_path / "data", env)
    finally:
        os.umask(old)
    assert env["ADMIN_TOKEN"] and env["SESSION_HASH_KEY"]
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data" / "secrets.env").stat().st_mode) == 0o600
    again: dict[str, str] = {}
    ensure_secrets(tmp_path / "data", again)  # read back, not regenerated
    assert again == env
