"""One OpenAPI document for the whole public surface: every service's routes as the gateway serves them.

Each service's FastAPI app describes its own routes; this module merges those descriptions into one document,
keeping only the paths the gateway routes to that service (`routes.service_for`), so the document shows exactly
what a frontend can reach at the one origin. It also:

- declares the error shape every service answers with (`shared.web.error_body`: `{"error": {"status", "message",
  ...}}`) as the `Error` schema, as the body of 422 (FastAPI's default `HTTPValidationError` is not what the
  services send) and as each operation's `default` response (401, 403, 404, 409, 413, 415, 429, 503 ...);
- keeps each service's security declarations (admin routes: the `adminToken` bearer scheme of `shared.web`);
- puts each service's own operational routes (`/healthz`, `/dead-letters`) where the gateway serves them
  (`/services/{name}/...`), and adds the gateway's own (`/healthz` of everything, `/services/{name}/metrics`).

The embedded gateway serves it at `/openapi.json` with Swagger UI at `/docs`. For the production shape nginx
serves the same document as a file: `python -m gateway.openapi > deploy/openapi.json` (`make openapi`);
`tests/unit/test_openapi.py` fails when that file is out of date.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from gateway.routes import service_for
from shared.contracts import SERVICES

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["status", "message"],
            "properties": {
                "status": {"type": "integer", "description": "the HTTP status, repeated"},
                "message": {"type": "string", "description": "what went wrong, for a person"},
                "problems": {
                    "type": "array",
                    "description": "422 only: one entry per invalid field",
                    "items": {
                        "type": "object",
                        "properties": {
                            "field": {"type": "string"},
                            "message": {"type": "string"},
                            "type": {"type": ["string", "null"]},
                        },
                    },
                },
            },
            "additionalProperties": True,
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_ERROR_CONTENT = {"application/json": {"schema": _ERROR_REF}}
#: A service's own operational routes, served at the gateway under /services/{name}/.
SERVICE_OWN_PATHS = ("/healthz", "/dead-letters")
_HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def _rename_refs(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                "#/components/schemas/" + renames[v.rsplit("/", 1)[1]]
                if k == "$ref" and isinstance(v, str) and v.rsplit("/", 1)[-1] in renames
                else _rename_refs(v, renames)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rename_refs(v, renames) for v in node]
    return node


def _declare_errors(operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    if "422" in responses:
        responses["422"] = {"description": "the request is not valid", "content": copy.deepcopy(_ERROR_CONTENT)}
    responses.setdefault("default", {"description": "an error", "content": copy.deepcopy(_ERROR_CONTENT)})


def _gateway_paths() -> dict[str, Any]:
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": list(SERVICES)},
    }
    health = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
        "additionalProperties": True,
    }

    def op(summary: str, content: dict[str, Any], params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "tags": ["gateway"],
            "summary": summary,
            "responses": {"200": {"description": "ok", "content": content}},
        }
        if params:
            operation["parameters"] = params
        _declare_errors(operation)
        return {"get": operation}

    json_health = {"application/json": {"schema": health}}
    return {
        "/healthz": op("health of every service and the broker (503 when one is down)", json_health),
        "/services/{name}/metrics": op(
            "one service's Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}, [name_param]
        ),
    }


def merged_openapi(apps: Mapping[str, FastAPI], *, title: str = "Self-learning explanations") -> dict[str, Any]:
    """The gateway's OpenAPI document, merged from each service app's own."""
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    security_schemes: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for name, app in apps.items():
        spec = app.openapi()
        own = spec.get("components", {}).get("schemas", {})
        # A schema name another service already uses with another shape gets the service's prefix.
        renames = {k: f"{name}_{k}" for k, v in own.items() if k in schemas and schemas[k] != v}
        for k, v in _rename_refs(own, renames).items():
            schemas[renames.get(k, k)] = v
        security_schemes.update(spec.get("components", {}).get("securitySchemes", {}))
        for own_path, item in _rename_refs(spec.get("paths", {}), renames).items():
            if own_path in SERVICE_OWN_PATHS:
                path = f"/services/{name}{own_path}"  # where the gateway serves one service's own route
            elif service_for(own_path) == name:
                path = own_path
            else:
                continue  # the gateway sends this path elsewhere: not reachable on this service
            for method, operation in item.items():
                if method not in _HTTP_METHODS:
                    continue
                operation.setdefault("tags", [name])
                operation["operationId"] = f"{name}_{operation.get('operationId', method + path)}"
                if own_path in SERVICE_OWN_PATHS:
                    operation["tags"] = ["operations"]
                _declare_errors(operation)
            paths[path] = item
    paths.update(_gateway_paths())
    # FastAPI's own validation-error schemas are referenced by nothing now that 422 declares `Error`.
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f'"#/components/schemas/{unused}"' not in json.dumps(paths):
            del schemas[unused]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": "1",
            "description": "Every public and admin route of the five services, as served at the gateway's one "
            'origin. Errors are JSON: `{"error": {"status": ..., "message": ...}}`. Admin routes need '
            "`Authorization: Bearer <ADMIN_TOKEN>`.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": security_schemes,
        },
    }


def main() -> None:
    """Print the document (for nginx's static copy): the services' apps are built, never started."""
    os.environ.setdefault("ADMIN_TOKEN", "openapi-build")
    os.environ.setdefault("SESSION_HASH_KEY", "openapi-build")
    from gateway.app import load_service_apps

    json.dump(merged_openapi(load_service_apps()), sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
