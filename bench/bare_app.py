"""The baselines: a bare FastAPI endpoint that does nothing, and one that only forwards a chat completion to a
provider (BARE_FORWARD_URL, its `/chat/completions`) and returns its text, served the same way as the services.
The second is the floor of the router's stack: an HTTP server and an HTTP client in one Python process."""

from __future__ import annotations

import json
import os

import urllib3
from fastapi import FastAPI, HTTPException


def create_app() -> FastAPI:
    app = FastAPI()
    forward_url = os.environ.get("BARE_FORWARD_URL", "").rstrip("/") + "/chat/completions"
    pool = urllib3.PoolManager(maxsize=64, retries=False)

    @app.post("/bare/{item_id}", status_code=202)
    async def bare(item_id: str) -> dict:
        return {"received": True}

    @app.post("/bare-forward", status_code=201)
    def forward(body: dict) -> dict:
        chat = {"model": "bench-model", "messages": [{"role": "user", "content": json.dumps(body)}]}
        answer = pool.request(
            "POST", forward_url, body=json.dumps(chat).encode(), headers={"Content-Type": "application/json"}
        )
        if answer.status != 200:
            raise HTTPException(502, f"the provider answered {answer.status}")
        return {"text": json.loads(answer.data)["choices"][0]["message"]["content"]}

    return app
