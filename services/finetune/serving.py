"""Serving fine-tuned adapters over an OpenAI-compatible chat-completions API.

Two ways, one contract (the router's "local" provider talks to either through the OpenAI SDK, choosing the adapter
by the request's ``model`` name):

- on a GPU machine, vLLM: ``vllm_command`` builds ``vllm serve BASE --enable-lora --lora-modules name=path ...``
  (vllm is an optional extra and is never imported here). Set ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in its
  environment to add adapters at run time through ``POST /v1/load_lora_adapter``.
- elsewhere, ``create_serving_app``: a small FastAPI server on transformers + peft with the same routes
  (``GET /v1/models``, non-streaming ``POST /v1/chat/completions``, ``POST /v1/load_lora_adapter``,
  ``POST /v1/unload_lora_adapter``). The base model's own name (its directory name) serves the base model.
  Models load lazily on the first request and stay cached; generation runs in a worker thread, one at a time,
  so the event loop never blocks.

CLI: ``python -m services.finetune.serving --base PATH --adapter name=path [--adapter ...] --port 8001``.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

DEFAULT_MAX_TOKENS = 256


def vllm_command(
    base_model: str,
    adapters: Mapping[str, str],
    *,
    port: int = 8001,
    host: str = "0.0.0.0",
    max_lora_rank: int = 16,
    served_model_name: str | None = None,
) -> list[str]:
    """The argv that serves ``base_model`` with the given LoRA adapters on vLLM's OpenAI-compatible server.

    vLLM names the base model by ``base_model`` unless ``served_model_name`` is given; the fallback server names it
    by its directory name, so pass ``served_model_name=Path(base).name`` where both must agree.
    """
    cmd = ["vllm", "serve", base_model, "--host", host, "--port", str(port), "--enable-lora"]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    cmd += ["--max-lora-rank", str(max_lora_rank)]
    if adapters:
        cmd += ["--max-loras", str(len(adapters)), "--lora-modules"]
        cmd += [f"{name}={path}" for name, path in adapters.items()]
    return cmd


# --------------------------------------------------------------------------------------------------------------
# Request / response shapes (the subset of OpenAI's chat completions this server honours)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI parameters are accepted and ignored
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    lora_name: str


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


# --------------------------------------------------------------------------------------------------------------
# The model pool: one base model, adapters attached by name, loaded lazily


class ModelPool:
    """Loads the base model once and attaches adapters on first use; generation is serialised by a lock."""

    def __init__(self, base_model_path: str) -> None:
        self.base_model_path = base_model_path
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._model: Any = None  # the base model, or a PeftModel wrapping it once an adapter is attached
        self._loaded: dict[str, str] = {}  # adapter name -> path attached to the model
        self.device = "cpu"

    def _ensure_base(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        self._tokenizer = AutoTokenizer.from_pretrained(self.base_model_path)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        self._model = AutoModelForCausalLM.from_pretrained(self.base_model_path, dtype=dtype).to(self.device).eval()

    def _ensure_adapter(self, name: str, path: str) -> None:
        if self._loaded.get(name) == path:
            return
        from peft import PeftModel

        if name in self._loaded:  # same name, new path: replace it
            self._model.delete_adapter(name)
            del self._loaded[name]
        if not self._loaded and not hasattr(self._model, "peft_config"):
            self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name).eval()
        else:
            self._model.load_adapter(path, adapter_name=name)
            self._model.eval()
        self._loaded[name] = path

    def generate(self, adapter: tuple[str, str] | None, req: ChatCompletionRequest) -> dict[str, Any]:
        import contextlib

        import torch

        with self._lock:
            self._ensure_base()
            if adapter is not None:
                self._ensure_adapter(*adapter)
            tok, model = self._tokenizer, self._model
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            prompt_len = int(enc["input_ids"].shape[1])
            max_new = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
            temperature = 1.0 if req.temperature is None else req.temperature
            sample = temperature > 0
            gen_kwargs: dict[str, Any] = {
                "max_new_tokens": max_new,
                "do_sample": sample,
                "pad_token_id": tok.pad_token_id,
                "eos_token_id": tok.eos_token_id,
            }
            if sample:
                gen_kwargs.update(temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p, top_k=0)
            else:
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            if req.seed is not None:
                torch.manual_seed(req.seed)
            if adapter is not None:
                model.set_adapter(adapter[0])
                ctx: Any = contextlib.nullcontext()
            elif hasattr(model, "disable_adapter"):
                ctx = model.disable_adapter()  # the base model's own name: no adapter
            else:
                ctx = contextlib.nullcontext()
            with ctx, torch.inference_mode():
                out = model.generate(**enc, **gen_kwargs)
        new = out[0, prompt_len:].tolist()
        hit_eos = bool(new) and new[-1] == tok.eos_token_id
        completion_tokens = len(new)
        text = tok.decode(new, skip_special_tokens=True)
        finish = "stop" if hit_eos or completion_tokens < max_new else "length"
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        for s in stops:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return {
            "text": text,
            "finish_reason": finish,
            "prompt_tokens": prompt_len,
            "completion_tokens": completion_tokens,
        }


# --------------------------------------------------------------------------------------------------------------
# The app


def create_serving_app(
    base_model_path: str, adapters: Mapping[str, str], *, base_model_name: str | None = None
) -> FastAPI:
    """An OpenAI-compatible chat server for ``base_model_path`` and its LoRA adapters (name -> path).

    ``app.state.adapters`` is the live name -> path dict; ``app.state.register_adapter(name, path)`` (or
    ``POST /v1/load_lora_adapter``) adds one at run time.
    """
    base = Path(base_model_path)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model path {base_model_path!r} has no config.json")
    base_name = base_model_name or base.name
    app = FastAPI(title="selflearn local model server", version="1")
    pool = ModelPool(str(base))
    created = int(time.time())
    app.state.pool = pool
    app.state.base_model_name = base_name
    app.state.adapters = {}

    def register_adapter(name: str, path: str) -> None:
        if not name or name == base_name:
            raise ValueError(f"adapter name {name!r} is empty or clashes with the base model's name")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"adapter path {path!r} has no adapter_config.json")
        app.state.adapters[name] = str(path)

    def unregister_adapter(name: str) -> bool:
        return app.state.adapters.pop(name, None) is not None

    app.state.register_adapter = register_adapter
    app.state.unregister_adapter = unregister_adapter
    for name, path in adapters.items():
        register_adapter(name, path)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return openai_error(400, f"invalid request: {first.get('msg', exc)}", param=param)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "base": base_name, "adapters": sorted(app.state.adapters)}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        data = [
            {
                "id": base_name,
                "object": "model",
                "created": created,
                "owned_by": "selflearn",
                "root": str(base),
                "parent": None,
            }
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "selflearn",
                "root": path,
                "parent": base_name,
            }
            for name, path in app.state.adapters.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    def load_adapter(body: LoadAdapterRequest) -> JSONResponse:
        try:
            register_adapter(body.lora_name, body.lora_path)
        except ValueError as exc:
            return openai_error(400, str(exc), param="lora_path")
        return JSONResponse({"status": "ok", "lora_name": body.lora_name})

    @app.post("/v1/unload_lora_adapter")
    def unload_adapter(body: UnloadAdapterRequest) -> JSONResponse:
        if not unregister_adapter(body.lora_name):
            return openai_error(404, f"adapter {body.lora_name!r} is not loaded", code="model_not_found")
        return JSONResponse({"status": "ok", "lora_name": body.lora_name})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> JSONResponse:
        if req.stream:
            return openai_error(400, "streaming is not supported by this server; send stream=false", param="stream")
        if req.n != 1:
            return openai_error(400, "only n=1 is supported", param="n")
        if req.model == base_name:
            adapter = None
        elif req.model in app.state.adapters:
            adapter = (req.model, app.state.adapters[req.model])
        else:
            return openai_error(404, f"The model `{req.model}` does not exist.", code="model_not_found", param="model")
        result: dict[str, Any] = await run_in_threadpool(pool.generate, adapter, req)
        usage = {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        }
        finish: Literal["stop", "length"] = result["finish_reason"]
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result["text"]},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            }
        )

    return app


def _parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter must be name=path, got {spec!r}")
    return name, path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible chat server for a base model + LoRA adapters")
    parser.add_argument("--base", required=True, help="local Hugging Face model directory")
    parser.add_argument("--adapter", action="append", type=_parse_adapter, default=[], help="name=path (repeat)")
    parser.add_argument("--name", default=None, help="model name of the base (default: its directory name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--print-vllm", action="store_true", help="print the equivalent vllm command and exit")
    args = parser.parse_args(argv)
    adapters = dict(args.adapter)
    if args.print_vllm:
        print(" ".join(vllm_command(args.base, adapters, port=args.port, host=args.host)))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import uvicorn

    uvicorn.run(create_serving_app(args.base, adapters, base_model_name=args.name), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
