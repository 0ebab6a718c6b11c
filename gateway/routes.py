"""The gateway's routing table: which service answers which path. nginx (deploy/nginx.conf) carries the
same table for the production shape; `tests/unit/test_gateway_routes.py` keeps the two in step."""

from __future__ import annotations

#: path prefix -> service. Longest prefix wins; "/" is the web page, served by the dashboard.
ROUTES: tuple[tuple[str, str], ...] = (
    ("/api/explanations", "router"),
    ("/api/router", "router"),
    ("/api/feedback", "feedback"),
    ("/api/experiments", "optimizer"),
    ("/api/prompts", "optimizer"),
    ("/api/finetune", "finetune"),
    ("/api/admin", "dashboard"),
    ("/", "dashboard"),
)


def service_for(path: str) -> str:
    best = ""
    chosen = "dashboard"
    for prefix, service in ROUTES:
        matches = path == prefix or path.startswith(prefix.rstrip("/") + "/") or prefix == "/"
        if matches and len(prefix) > len(best):
            best, chosen = prefix, service
    return chosen
