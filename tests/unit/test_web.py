"""The shared HTTP surface: the admin dependency and the app-state dependencies of every service."""

from __future__ import annotations

import importlib
import inspect
from typing import Annotated, get_args, get_origin

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.contracts import SERVICES
from shared.web import require_admin
from tests.support import ClientResponse, admin_app


def _get(app: FastAPI, headers: dict[str, str]) -> ClientResponse:
    with TestClient(app) as client:
        return client.get("/secret", headers=headers)


def test_require_admin_is_async_so_it_takes_no_threadpool_hop() -> None:
    assert inspect.iscoroutinefunction(require_admin)


@pytest.mark.parametrize("service", SERVICES)
def test_app_state_dependencies_of_every_service_are_async(service: str) -> None:
    api = importlib.import_module(f"services.{service}.api")
    deps = [
        meta.dependency
        for name, alias in vars(api).items()
        if name.endswith("Dep") and get_origin(alias) is Annotated
        for meta in get_args(alias)[1:]
        if getattr(meta, "dependency", None) is not None
    ]
    assert len(deps) >= 2, f"{service} has no app-state dependencies to check"
    sync = [fn.__name__ for fn in deps if not inspect.iscoroutinefunction(fn)]
    assert sync == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Basic abc"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Bearer right"}, 200),
    ],
)
def test_admin_route_lets_through_only_the_right_bearer_token(headers: dict[str, str], status: int) -> None:
    r = _get(admin_app("right", "/secret"), headers)
    assert r.status_code == status
    if status == 401:
        assert set(r.json()["error"]) >= {"status", "message"}
        assert "secret" not in r.text


def test_admin_route_without_a_configured_token_answers_503_json_not_500() -> None:
    r = _get(admin_app(None, "/secret"), {"Authorization": "Bearer anything"})
    assert r.status_code == 503
    assert "ADMIN_TOKEN" in r.json()["error"]["message"]


def test_same_origin_compares_the_origin_with_the_host_the_browser_connected_to() -> None:
    from shared.web import _same_origin

    assert _same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert _same_origin("https://App.Example", "app.example")
    assert not _same_origin("http://127.0.0.1:8001", "127.0.0.1:8000")
    assert not _same_origin("https://evil.example", "app.example")
    assert not _same_origin("null", "app.example")


def test_json_content_types() -> None:
    from shared.web import _is_json

    assert _is_json("application/json") and _is_json("application/json; charset=utf-8")
    assert _is_json("application/merge-patch+json")
    assert not _is_json("text/plain") and not _is_json("application/x-www-form-urlencoded") and not _is_json("")
