"""Serving fine-tuned adapters over an OpenAI-compatible chat-completions API.

Two ways, one contract (the router's "local" provider talks to either through the OpenAI SDK, choosing the adapter
by the request's ``model`` name):

- on a GPU machine, vLLM: ``vllm_command`` builds ``vllm serve BASE --enable-lora --lora-modules name=path ...``
  (vllm is an optional extra and is never imported here). Set ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in its
  environment to add adapters at run time through ``POST /v1/load_lora_adapter``.
- elsewhere, ``create_serving_app``: a small FastAPI server on transformers + peft with the same routes
  (``GET /v1/models``, ``POST /v1/chat/completions`` with or without ``stream``, ``POST /v1/load_lora_adapter``,
  ``POST /v1/unload_lora_adapter``). The base model's own name (its directory name) serves the base model.
  Models load lazily on the first request and stay cached. Generation runs one at a time on the pool's own
  thread (never on the thread pool that every sync route of the embedded gateway shares), so the event loop and
  the other routes stay free; ``stream=true`` sends OpenAI's SSE chunks ending ``data: [DONE]``.
- Doors: with an ``api_key`` every ``/v1`` route needs ``Authorization: Bearer <key>`` (the router has it:
  shared.serving.serving_api_key); ``max_tokens`` is capped to ``max_tokens_ceiling`` and to what the model's
  context leaves after the prompt (a prompt that fills the context is a 400); model lists show no paths; every
  error is OpenAI-shaped JSON.

CLI: ``python -m services.finetune.serving --base PATH --adapter name=path [--adapter ...] --port 8001``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_CEILING = 512


class ContextTooLong(ValueError):
    """The prompt leaves no room in the model's context for a completion."""


def bearer_ok(authorization: str | None, key: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header; always true when no key is required."""
    if not key:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def vllm_command(
    base_model: str,
    adapters: Mapping[str, str],
    *,
    port: int = 8001,
    host: str = "0.0.0.0",
    max_lora_rank: int = 64,
    served_model_name: str | None = None,
    api_key: str | None = None,
) -> list[str]:
    """The argv that serves ``base_model`` with the given LoRA adapters (served name -> path) on vLLM's
    OpenAI-compatible server. Run it with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in the environment so the
    finetune service can load adapters registered later. ``max_lora_rank`` must cover every adapter's rank
    (training refuses ranks above FINETUNE's MAX_SERVED_LORA_RANK, 64 by default).

    vLLM names the base model by ``base_model`` unless ``served_model_name`` is given; the fallback server names it
    by its directory name, so pass ``served_model_name=Path(base).name`` where both must agree.
    """
    cmd = ["vllm", "serve", base_model, "--host", host, "--port", str(port), "--enable-lora"]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if api_key:
        cmd += ["--api-key", api_key]
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
    """Loads the base model once and attaches adapters on first use. Generation is serialised (one model, one
    lock) and runs on this pool's own thread, not on the shared thread pool of the app it is mounted in."""

    def __init__(
        self, base_model_path: str, max_tokens_ceiling: int = MAX_TOKENS_CEILING, threads: int | None = None
    ) -> None:
        self.base_model_path = base_model_path
        self.max_tokens_ceiling = max_tokens_ceiling
        self.threads = threads  # torch CPU threads (process-wide); None: torch's default
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._model: Any = None  # the base model, or a PeftModel wrapping it once an adapter is attached
        self._loaded: dict[str, str] = {}  # adapter name -> path attached to the model
        self.device = "cpu"
        self.context_length: int | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        # reads streamed text while the generation thread writes it (a few: one per open stream is plenty)
        self.stream_readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stream")

    def _ensure_base(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        if not cuda and self.threads:
            # On a shared CPU, more threads than cores to spare make generation many times slower, not faster.
            torch.set_num_threads(self.threads)
        self._tokenizer = AutoTokenizer.from_pretrained(self.base_model_path)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.base_model_path, dtype=dtype)
        # transformers types `to` through a decorator mypy reads as taking the model first
        self._model = model.to(self.device).eval()  # type: ignore[arg-type]
        config = self._model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None)
            or getattr(self._tokenizer, "model_max_length", None)
            or 2048
        )

    def _ensure_adapter(self, name: str, path: str) -> None:
        if self._loaded.get(name) == path:
            return
        from peft import PeftModel

        if name in self._loaded:  # same name, new path: replace it
            self._model.delete_adapter(name)
            del self._loaded[name]
        # The adapters in the base model's dtype (bf16 on a GPU), as vLLM serves them: peft's default upcasts them
        # to float32 for training, which costs every adapted layer two casts and float32 products per token.
        if not self._loaded and not hasattr(self._model, "peft_config"):
            self._model = PeftModel.from_pretrained(
                self._model, path, adapter_name=name, autocast_adapter_dtype=False
            ).eval()
        else:
            self._model.load_adapter(path, adapter_name=name, autocast_adapter_dtype=False)
            self._model.eval()
        self._loaded[name] = path

    def _prepare(self, adapter: tuple[str, str] | None, req: ChatCompletionRequest) -> tuple[Any, dict, Any, int, int]:
        """Under the lock: the model with the right adapter active, the encoded prompt, the generation kwargs, the
        prompt length and the capped max_new_tokens."""
        import contextlib

        import torch

        self._ensure_base()
        if adapter is not None:
            self._ensure_adapter(*adapter)
        tok, model = self._tokenizer, self._model
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        prompt_len = int(enc["input_ids"].shape[1])
        room = (self.context_length or prompt_len + self.max_tokens_ceiling) - prompt_len
        if room <= 0:
            raise ContextTooLong(
                f"the prompt is {prompt_len} tokens; this model's context is {self.context_length} tokens"
            )
        asked = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        max_new = max(1, min(asked, self.max_tokens_ceiling, room))
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
        return ctx, enc, gen_kwargs, prompt_len, max_new

    def generate(self, adapter: tuple[str, str] | None, req: ChatCompletionRequest) -> dict[str, Any]:
        import torch

        with self._lock:
            ctx, enc, gen_kwargs, prompt_len, max_new = self._prepare(adapter, req)
            tok = self._tokenizer
            with ctx, torch.inference_mode():
                out = self._model.generate(**enc, **gen_kwargs)
        new = out[0, prompt_len:].tolist()
        hit_eos = bool(new) and new[-1] == tok.eos_token_id
        completion_tokens = len(new)
        text = tok.decode(new, skip_special_tokens=True)
        finish = "stop" if hit_eos or completion_tokens < max_new else "length"
        for s in _stops(req):
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return {
            "text": text,
            "finish_reason": finish,
            "prompt_tokens": prompt_len,
            "completion_tokens": completion_tokens,
        }

    def stream(self, adapter: tuple[str, str] | None, req: ChatCompletionRequest) -> Generator[dict[str, Any]]:
        """Runs on the pool's thread: yields {"text": piece} as tokens are decoded, then {"finish_reason", usage}.
        The caller iterates it from another thread (the generation itself runs here, under the lock)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        cancel = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        with self._lock:
            ctx, enc, gen_kwargs, prompt_len, max_new = self._prepare(adapter, req)
            tok = self._tokenizer
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
            result: dict[str, Any] = {}

            def run() -> None:
                try:
                    with ctx, torch.inference_mode():
                        result["out"] = self._model.generate(
                            **enc,
                            **gen_kwargs,
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                        )
                except Exception as exc:  # surfaced to the reader below
                    result["error"] = exc
                    streamer.end()

            worker = threading.Thread(target=run, name="generate-stream", daemon=True)
            worker.start()
            try:
                text, stops, stopped = "", [s for s in _stops(req) if s], False
                for piece in streamer:
                    if stopped or not piece:
                        continue
                    candidate = text + piece
                    cut = min((candidate.index(s) for s in stops if s in candidate), default=None)
                    if cut is not None:
                        piece, stopped = candidate[len(text) : cut], True
                        cancel.set()
                    text += piece
                    if piece:
                        yield {"text": piece}
            finally:  # also when the client went away: stop generating before the next request may use the model
                if "out" not in result:
                    cancel.set()
                worker.join()
        if "error" in result:
            raise result["error"]
        new = result["out"][0, prompt_len:].tolist()
        hit_eos = bool(new) and new[-1] == tok.eos_token_id
        finish = "stop" if stopped or hit_eos or len(new) < max_new else "length"
        yield {"finish_reason": finish, "prompt_tokens": prompt_len, "completion_tokens": len(new)}


def _stops(req: ChatCompletionRequest) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else (req.stop or [])


# --------------------------------------------------------------------------------------------------------------
# The app


def create_serving_app(
    base_model_path: str,
    adapters: Mapping[str, str],
    *,
    base_model_name: str | None = None,
    api_key: str | None = None,
    max_tokens_ceiling: int = MAX_TOKENS_CEILING,
    threads: int | None = None,
) -> FastAPI:
    """An OpenAI-compatible chat server for ``base_model_path`` and its LoRA adapters (name -> path).

    ``app.state.adapters`` is the live name -> path dict; ``app.state.register_adapter(name, path)`` (or
    ``POST /v1/load_lora_adapter``) adds one at run time. With ``api_key``, every /v1 route needs it as a bearer
    token.
    """
    base = Path(base_model_path)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model path {base_model_path!r} has no config.json")
    base_name = base_model_name or base.name
    app = FastAPI(title="selflearn local model server", version="1")
    pool = ModelPool(str(base), max_tokens_ceiling, threads)
    created = int(time.time())
    app.state.pool = pool
    app.state.base_model_name = base_name
    app.state.adapters = {}

    def register_adapter(name: str, path: str) -> None:
        if not name or name == base_name:
            raise ValueError(f"adapter name {name!r} is empty or clashes with the base model's name")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"no adapter found at the path given for {name!r}")
        app.state.adapters[name] = str(path)

    def unregister_adapter(name: str) -> bool:
        return app.state.adapters.pop(name, None) is not None

    app.state.register_adapter = register_adapter
    app.state.unregister_adapter = unregister_adapter
    for name, path in adapters.items():
        register_adapter(name, path)

    @app.middleware("http")
    async def _require_key(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1") and not bearer_ok(request.headers.get("authorization"), api_key):
            return openai_error(
                401, "a serving key is required: Authorization: Bearer <key>", type_="authentication_error",
                code="invalid_api_key",
            )  # fmt: skip
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return openai_error(400, f"invalid request: {first.get('msg', exc)}", param=param)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("model server error")
        return openai_error(500, f"generation failed: {type(exc).__name__}", type_="server_error")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    def card(name: str, parent: str | None) -> dict[str, Any]:
        # no filesystem paths: "root" names the model, as the id does
        return {"id": name, "object": "model", "created": created, "owned_by": "selflearn", "root": name,
                "parent": parent}  # fmt: skip

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        data = [card(base_name, None), *(card(name, base_name) for name in app.state.adapters)]
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
            return openai_error(404, f"The lora adapter '{body.lora_name}' cannot be found.", code="model_not_found")
        return JSONResponse({"status": "ok", "lora_name": body.lora_name})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        if req.n != 1:
            return openai_error(400, "only n=1 is supported", param="n")
        if req.model == base_name:
            adapter = None
        elif req.model in app.state.adapters:
            adapter = (req.model, app.state.adapters[req.model])
        else:
            return openai_error(404, f"The model `{req.model}` does not exist.", code="model_not_found", param="model")
        loop = asyncio.get_running_loop()
        if req.stream:
            return await _stream_response(pool, adapter, req)
        try:
            result: dict[str, Any] = await loop.run_in_executor(pool.executor, pool.generate, adapter, req)
        except ContextTooLong as exc:
            return openai_error(400, str(exc), code="context_length_exceeded", param="messages")
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


async def _stream_response(
    pool: ModelPool, adapter: tuple[str, str] | None, req: ChatCompletionRequest
) -> JSONResponse | StreamingResponse:
    """OpenAI's streamed chat completion: `chat.completion.chunk` events as SSE, the role first, then the text as
    it is generated, then the finish reason (and usage when stream_options.include_usage), then `data: [DONE]`.
    A prompt too long for the context is refused as JSON before the stream starts."""
    loop = asyncio.get_running_loop()
    chunks = pool.stream(adapter, req)
    try:
        first = await loop.run_in_executor(pool.stream_readers, next, chunks, None)
    except ContextTooLong as exc:
        return openai_error(400, str(exc), code="context_length_exceeded", param="messages")
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    options = getattr(req, "stream_options", None) or {}
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

    def event(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        item = first
        try:
            yield event({"role": "assistant", "content": ""})
            while item is not None:
                if "text" in item:
                    yield event({"content": item["text"]})
                else:
                    usage = {
                        "prompt_tokens": item["prompt_tokens"],
                        "completion_tokens": item["completion_tokens"],
                        "total_tokens": item["prompt_tokens"] + item["completion_tokens"],
                    }
                    yield event({}, item["finish_reason"], usage if include_usage else None)
                item = await loop.run_in_executor(pool.stream_readers, next, chunks, None)
        except Exception as exc:  # the status is sent already: an OpenAI-shaped error event, then the end
            log.exception("streamed generation failed")
            err = {"error": {"message": f"generation failed: {type(exc).__name__}", "type": "server_error"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            await loop.run_in_executor(pool.stream_readers, chunks.close)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
    parser.add_argument(
        "--api-key", default=None, help="serving key (default: SERVING_API_KEY, else derived from ADMIN_TOKEN)"
    )
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS_CEILING, help="max_tokens ceiling")
    parser.add_argument("--print-vllm", action="store_true", help="print the equivalent vllm command and exit")
    args = parser.parse_args(argv)
    adapters = dict(args.adapter)
    if args.print_vllm:
        print(" ".join(vllm_command(args.base, adapters, port=args.port, host=args.host, api_key="$SERVING_API_KEY")))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import uvicorn

    from shared.serving import serving_api_key

    key = args.api_key or serving_api_key(None, os.environ.get("ADMIN_TOKEN"))
    if not key:
        print("warning: no serving key (--api-key, SERVING_API_KEY or ADMIN_TOKEN): anyone may call this server")
    app = create_serving_app(
        args.base, adapters, base_model_name=args.name, api_key=key, max_tokens_ceiling=args.max_tokens
    )
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
