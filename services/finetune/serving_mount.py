"""The OpenAI-compatible endpoint of the embedded system, mounted under this service at /api/finetune/v1.

Registered models are served by the transformers fallback server (services.finetune.serving), one server per
base model, built on the first request that needs it (the model itself loads lazily inside it). The model is
picked by the request's `model` name: its served name (shared.serving.served_name: the model id, which is what
the router asks for) or its full name "local/<model_id>"; models registered after start (by the worker, in
another process) are found in the registry on the next request. Only models with status "registered" are
served (not below-base or withdrawn ones). Every route needs the serving key (the router has it); lists show
no paths. When FINETUNE_SERVING_BASE_URL is set (e.g. vLLM from serving.vllm_command), the models are served
there and this mount only says so.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from services.finetune import handlers
from services.finetune.config import FinetuneSettings
from services.finetune.serving import bearer_ok
from services.finetune.store import ModelRow, Store
from shared.serving import served_name
from shared.web import send_json

PREFIX = "/api/finetune/v1"


def _openai_error(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ServingMount:
    def __init__(self, store_of: Any, settings: FinetuneSettings) -> None:
        self._store_of = store_of  # a callable returning the service's Store (built in the lifespan)
        self.settings = settings
        self._apps: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> Store:
        return self._store_of()

    def _models(self) -> dict[str, ModelRow]:
        """Name -> model row: both the served name ("<id>") and the full name ("local/<id>") name a model."""
        out: dict[str, ModelRow] = {}
        for m in handlers.registered_adapters(self.store.uow()):
            out[m["name"]] = m
            out[served_name(m["name"])] = m
        return out

    def _app_for(self, base_model: str) -> Any:
        with self._lock:
            app = self._apps.get(base_model)
            if app is None:
                from services.finetune.serving import create_serving_app  # no torch until a model is loaded

                app = create_serving_app(
                    base_model,
                    {},
                    max_tokens_ceiling=self.settings.serving_max_tokens,
                    threads=self.settings.torch_threads,
                )
                self._apps[base_model] = app
            return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        rest = path[len(PREFIX) :] if path.startswith(PREFIX) else path
        rest = rest or "/"
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if not bearer_ok(authorization, self.settings.serving_key() or "unset"):
            await send_json(
                send,
                401,
                _openai_error(401, "a serving key is required: Authorization: Bearer <key>", "invalid_api_key"),
            )
            return
        if self.settings.serving_base_url:
            await send_json(
                send,
                404,
                _openai_error(404, f"local models are served at {self.settings.serving_base_url}", "not_served_here"),
            )
            return
        if rest == "/models" and scope["method"] == "GET":
            await send_json(send, 200, self._list_models())
            return
        if rest == "/chat/completions" and scope["method"] == "POST":
            await self._chat(scope, receive, send)
            return
        await send_json(send, 404, _openai_error(404, f"no route {scope['method']} {PREFIX}{rest}", "not_found"))

    def _list_models(self) -> dict[str, Any]:
        """Each model once, by its full name (no paths)."""
        data = [
            {
                "id": m["name"],
                "object": "model",
                "created": int(m["registered_at"].timestamp()),
                "owned_by": "selflearn",
                "root": m["name"],
                "parent": None,
            }
            for name, m in sorted(self._models().items())
            if name == m["name"]
        ]
        return {"object": "list", "data": data}

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            await send_json(send, 400, _openai_error(400, "the request body is not valid JSON"))
            return
        name = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(name, str) or not name:
            await send_json(send, 400, _openai_error(400, "model is required", param="model"))
            return
        model = self._models().get(name)
        if model is None:
            await send_json(
                send, 404, _openai_error(404, f"The model `{name}` does not exist.", "model_not_found", "model")
            )
            return
        try:
            app = self._app_for(model["base_model"])
            if app.state.adapters.get(name) != model["adapter_path"]:
                app.state.register_adapter(name, model["adapter_path"])
        except ValueError as exc:
            await send_json(send, 503, _openai_error(503, f"model {name} cannot be served: {exc}", "model_unavailable"))
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        child = {**scope, "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": ""}
        # the key was checked above; the child app requires none
        await app(child, replay, send)
