"""A stand-in for vLLM's OpenAI-compatible server, answering as vLLM does where the system depends on it
(read against vllm/entrypoints/openai/serving_models.py and its api_server):

- with ``--api-key``, every ``/v1`` route needs ``Authorization: Bearer <key>``: else 401 ``{"error": "Unauthorized"}``;
- ``GET /v1/models``: the base model's served name and every LoRA adapter loaded so far, by the name it was loaded
  under (``parent`` = the base);
- ``POST /v1/load_lora_adapter`` exists only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (else 404 ``Not Found``); a
  name already loaded is 400 "The lora adapter '<name>' has already been loaded."; a path without an adapter is 400;
  success is a plain-text 200 "Success: LoRA adapter '<name>' added successfully.";
- ``POST /v1/unload_lora_adapter``: 404 "... cannot be found." for an unknown name;
- ``POST /v1/chat/completions`` serves only the base name or a loaded adapter name; anything else is 404
  ``{"error": {"message": "The model `<name>` does not exist.", "type": "NotFoundError", "code": 404}}``;
- ``restart()`` forgets every adapter loaded at run time, as a restarted vLLM does.

The completion text names the model that answered, so a test sees which adapter served it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from gateway.redis_server import free_port
from tests.support import ServedApp, ServesApp


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


@dataclass
class FakeVLLM(ServesApp):
    served_model_name: str = "base"
    api_key: str | None = None
    allow_runtime_lora_updating: bool = True
    max_lora_rank: int = 16
    port: int = 0
    loras: dict[str, str] = field(default_factory=dict)
    chat_models: list[str] = field(default_factory=list)  # the `model` of every chat request, in order

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.app = self._build()
        self._served = ServedApp(self.app, self.port, name="fake-vllm", access_log=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def restart(self) -> None:
        self.loras.clear()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Any:
            wanted = f"Bearer {self.api_key}"
            if self.api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != wanted:
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

        @app.get("/v1/models")
        def models() -> dict[str, Any]:
            data = [{"id": self.served_model_name, "object": "model", "root": "/models/base", "parent": None}]
            data += [
                {"id": name, "object": "model", "root": path, "parent": self.served_model_name}
                for name, path in self.loras.items()
            ]
            return {"object": "list", "data": data}

        @app.post("/v1/load_lora_adapter", response_model=None)
        async def load(request: Request) -> Any:
            if not self.allow_runtime_lora_updating:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            body = await request.json()
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
            if name in self.loras:
                return _error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
            config = Path(path) / "adapter_config.json"
            if not config.is_file():
                return _error(400, f"Loading lora {name} failed: No adapter found for {path}", "BadRequestError")
            self.loras[name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", response_model=None)
        async def unload(request: Request) -> Any:
            if not self.allow_runtime_lora_updating:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            name = (await request.json()).get("lora_name")
            if name not in self.loras:
                return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self.loras[name]
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: Request) -> Any:
            body = await request.json()
            model = body.get("model")
            self.chat_models.append(str(model))
            if model != self.served_model_name and model not in self.loras:
                return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
            text = f"Answered by {model}: the indicators support the signal."
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62},
            }

        return app
