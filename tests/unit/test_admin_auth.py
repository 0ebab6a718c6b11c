"""The admin door (`shared.web.require_admin`) against the near misses an attacker or a sloppy client sends: a
prefix of the token, the token with more after it, the right token under another scheme, the scheme in another
case; and what a refused client is told (status, message, the WWW-Authenticate challenge)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support import ClientResponse, admin_app

TOKEN = "s3cret-admin-token"


def _get(authorization: str | None, token: str | None = TOKEN) -> ClientResponse:
    headers = {} if authorization is None else {"Authorization": authorization}
    with TestClient(admin_app(token, "/admin/thing")) as client:
        return client.get("/admin/thing", headers=headers)


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN[:-1]}",  # a prefix of the token
        f"Bearer {TOKEN[:1]}",
        f"Bearer {TOKEN}x",  # the token and more
        f"Bearer x{TOKEN}",
        f"Bearer {TOKEN.upper()}",  # tokens are case-sensitive
    ],
)
def test_anything_but_the_exact_token_is_refused(authorization: str) -> None:
    r = _get(authorization)
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "admin token is not valid"
    assert r.headers["www-authenticate"] == "Bearer"
    assert "secret" not in r.text


@pytest.mark.parametrize("authorization", [f"Basic {TOKEN}", f"Token {TOKEN}", TOKEN, f"Bearer{TOKEN}", "Basic abc"])
def test_the_right_token_under_another_scheme_or_without_one_is_refused(authorization: str) -> None:
    r = _get(authorization)
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "admin route: send Authorization: Bearer <admin token>"
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer    "])
def test_a_missing_or_empty_token_is_asked_for(authorization: str | None) -> None:
    r = _get(authorization)
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "admin route: send Authorization: Bearer <admin token>"
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}"])
def test_the_scheme_is_case_insensitive_and_spaces_around_the_token_do_not_matter(authorization: str) -> None:
    r = _get(authorization)
    assert r.status_code == 200
    assert r.json() == {"data": "secret"}


def test_without_a_configured_token_every_request_gets_503_and_no_data() -> None:
    r = _get(f"Bearer {TOKEN}", token=None)
    assert r.status_code == 503
    assert r.json()["error"]["message"] == "admin routes are disabled: ADMIN_TOKEN is not set"
    assert "secret" not in r.text
