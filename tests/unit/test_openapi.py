"""The gateway's merged OpenAPI document covers every route the gateway sends to a service, declares the error
shape, guards admin routes, and nginx's static copy (deploy/openapi.json) is the same document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from gateway.openapi import SERVICE_OWN_PATHS, merged_openapi
from gateway.routes import service_for
from shared.contracts import SERVICES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def apps(monkeypatch_module: pytest.MonkeyPatch) -> dict[str, FastAPI]:
    import importlib

    from gateway.app import load_service_apps

    monkeypatch_module.setenv("ADMIN_TOKEN", "openapi-build")
    monkeypatch_module.setenv("SESSION_HASH_KEY", "openapi-build")
    configs = [importlib.import_module(f"services.{n}.config") for n in SERVICES]
    for config in configs:  # settings cached by an earlier test may lack the secrets
        config.get_settings.cache_clear()
    try:
        return load_service_apps()
    finally:
        for config in configs:
            config.get_settings.cache_clear()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def doc(apps: dict[str, FastAPI]) -> dict:
    return merged_openapi(apps)


def test_every_public_route_of_every_service_is_in_the_one_document(apps: dict[str, FastAPI], doc: dict) -> None:
    for name, app in apps.items():
        for route in app.routes:
            if not (isinstance(route, APIRoute) and route.include_in_schema):
                continue
            if route.path in SERVICE_OWN_PATHS:
                path = f"/services/{name}{route.path}"
            elif service_for(route.path) == name:
                path = route.path
            else:
                continue
            assert route.methods is not None
            for method in route.methods:
                assert method.lower() in doc["paths"][path], f"{name}: {method} {path}"


def test_errors_are_declared_in_the_shape_the_services_send(doc: dict) -> None:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }, f"{method} {path}"
            if "422" in op["responses"]:
                assert "Error" in json.dumps(op["responses"]["422"]), f"{method} {path}"
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_admin_routes_declare_the_bearer_token_and_public_ones_do_not(doc: dict) -> None:
    assert doc["paths"]["/api/admin/llm-learning"]["get"]["security"] == [{"adminToken": []}]
    assert doc["paths"]["/api/experiments"]["post"]["security"] == [{"adminToken": []}]
    assert doc["paths"]["/services/feedback/dead-letters"]["get"]["security"] == [{"adminToken": []}]
    assert "security" not in doc["paths"]["/api/explanations"]["post"]
    assert "security" not in doc["paths"]["/api/feedback/{explanation_id}"]["post"]


def test_nginx_static_copy_is_up_to_date(doc: dict) -> None:
    """deploy/openapi.json is what nginx serves in the compose shape; regenerate it with `make openapi`."""
    on_disk = json.loads((ROOT / "deploy" / "openapi.json").read_text())
    assert on_disk == json.loads(json.dumps(doc)), "deploy/openapi.json is stale: run `make openapi`"
