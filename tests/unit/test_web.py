"""The shared HTTP surface: the admin dependency and the app-state dependencies of every service."""

from __future__ import annotations

import importlib
import inspect
from typing import Annotated, Any, get_args, get_origin

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


def _direct_app(endpoint: Any, *, also: Any = None) -> FastAPI:
    """A service app (`service_app`: doors, metrics, error handlers) whose router has one direct route,
    `POST /items/{item_id}` answered by `endpoint`, and `also(router)` to add more."""
    from contextlib import asynccontextmanager

    from fastapi import APIRouter

    from services.feedback.config import FeedbackSettings
    from shared.web import DirectRoute, service_app

    router = APIRouter()
    router.add_api_route("/items/{item_id}", endpoint, methods=["POST"], route_class_override=DirectRoute)
    if also is not None:
        also(router)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield

    from pydantic import SecretStr

    return service_app(FeedbackSettings(admin_token=SecretStr("t")), lifespan, router)


def test_a_direct_route_is_served_before_the_router_and_answers_errors_as_the_app_does() -> None:
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse

    from shared.web import path_uuid

    seen: list[dict] = []

    async def endpoint(request: Request) -> JSONResponse:
        seen.append(dict(request.scope))
        item = path_uuid(request, "item_id")
        if str(item).startswith("0"):
            raise HTTPException(429, "slow down", headers={"Retry-After": "3"})
        if str(item).startswith("1"):
            raise RuntimeError("a bug")
        if str(item).startswith("2"):
            raise KeyError("gone")
        return JSONResponse({"item": str(item), "body": (await request.json())["x"]}, status_code=202)

    def gone(request: Request, exc: Exception) -> JSONResponse:  # a plain `def` handler, for a base class
        return JSONResponse({"gone": str(exc)}, status_code=410)

    app = _direct_app(endpoint)
    app.add_exception_handler(LookupError, gone)
    with TestClient(app, raise_server_exceptions=False) as client:
        ok = client.post("/items/a0000000-0000-4000-8000-000000000000", json={"x": 1})
        assert ok.status_code == 202 and ok.json() == {"item": "a0000000-0000-4000-8000-000000000000", "body": 1}
        # the router's per-request machinery never ran: FastAPI's request_response sets these exit stacks
        assert "fastapi_inner_astack" not in seen[-1] and "fastapi_astack" not in seen[-1]
        bad = client.post("/items/not-a-uuid", json={"x": 1})
        assert bad.status_code == 422 and bad.json()["error"]["problems"][0]["field"] == "path.item_id"
        limited = client.post("/items/00000000-0000-4000-8000-000000000000", json={"x": 1})
        assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
        assert limited.json()["error"] == {"status": 429, "message": "slow down"}
        assert client.post("/items/10000000-0000-4000-8000-000000000000", json={"x": 1}).status_code == 500
        gone_r = client.post("/items/20000000-0000-4000-8000-000000000000", json={"x": 1})
        assert gone_r.status_code == 410 and gone_r.json() == {"gone": "'gone'"}
        # the doors are outside the lane: a form post is refused before the endpoint
        before = len(seen)
        assert client.post("/items/a0000000-0000-4000-8000-000000000000", data={"x": "1"}).status_code == 415
        assert len(seen) == before
        # another method on the same path is the router's answer
        assert client.get("/items/a0000000-0000-4000-8000-000000000000").status_code == 405
        metrics = client.get("/metrics").text
    assert 'route="/items/{item_id}",service="feedback",status="202"' in metrics
    assert 'route="/items/{item_id}",service="feedback",status="429"' in metrics


def test_an_app_whose_direct_route_overlaps_another_route_is_refused_when_built() -> None:
    from fastapi import Request, Response

    async def endpoint(request: Request) -> Response:
        return Response(status_code=204)

    def overlapping(router: Any) -> None:
        @router.post("/items/special")
        def special() -> dict:
            return {}

    with pytest.raises(ValueError, match="overlaps /items/special"):
        _direct_app(endpoint, also=overlapping)

    def elsewhere(router: Any) -> None:
        @router.get("/items/special")
        def special() -> dict:
            return {}

    _direct_app(endpoint, also=elsewhere)  # another method on the path: no overlap
