"""The model server mounted in the finetune service (the fallback when no vLLM runs), over real HTTP with the
tiny model: the serving key, streaming through the OpenAI SDK, the max_tokens ceiling and context limit, and other
routes answering while generations run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from gateway.redis_server import RedisServer, free_port
from services.finetune import domain
from services.finetune.config import FinetuneSettings
from services.finetune.main import create_app
from services.finetune.tinymodel import build_tiny_model
from shared.contracts import utcnow
from shared.serving import served_name, serving_api_key
from tests.support import ServedApp

ADMIN_TOKEN = "admin-secret"
KEY = serving_api_key(None, ADMIN_TOKEN)
CEILING = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("model-server")
    base = build_tiny_model(root / "tiny-llama", seed=0)
    adapter = root / "adapters" / "ft-served" / "adapter"
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    peft_model.save_pretrained(str(adapter))
    settings = FinetuneSettings(
        redis_url=redis_server.url,
        admin_token=SecretStr(ADMIN_TOKEN),
        session_hash_key=SecretStr("k"),
        data_dir=root,
        serving_max_tokens=CEILING,
    )
    app = create_app(settings)
    port = free_port()
    served = ServedApp(app, port, name="finetune app", timeout_s=30).start()
    model_id = "ft-served"
    with app.state.store.uow() as uow:
        uow.repo.add_model(
            {
                "model_id": model_id,
                "name": domain.model_name(model_id),
                "job_id": "job-served",
                "method": "sft",
                "base_model": str(base),
                "adapter_path": str(adapter),
                "recipe": {},
                "train_export_id": "t",
                "heldout_export_id": "h",
                "metrics": {},
                "status": domain.MODEL_REGISTERED,
                "serving_base_url": None,
                "cost_per_1k_tokens_usd": 0.0,
                "registered_at": utcnow(),
            }
        )
        uow.commit()
    url = served.url
    yield {"url": url, "v1": f"{url}/api/finetune/v1", "model": served_name(domain.model_name(model_id))}
    served.stop()


def _chat(server: dict[str, Any], **body: Any) -> httpx.Response:
    payload = {"model": server["model"], "messages": [{"role": "user", "content": "Explain BUY for AAPL"}], **body}
    return httpx.post(
        f"{server['v1']}/chat/completions", json=payload, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )


def test_a_streamed_completion_through_the_openai_sdk(server: dict[str, Any]) -> None:
    import openai

    with openai.OpenAI(base_url=server["v1"], api_key=KEY, max_retries=0) as client:
        stream = client.chat.completions.create(
            model=server["model"],
            messages=[{"role": "user", "content": "Explain the BUY signal for AAPL. RSI is 28."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        whole = client.chat.completions.create(
            model=server["model"],
            messages=[{"role": "user", "content": "Explain the BUY signal for AAPL. RSI is 28."}],
            max_tokens=12,
            temperature=0,
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert text == whole.choices[0].message.content  # greedy: the same text, streamed or not
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 12
    with httpx.stream(
        "POST",
        f"{server['v1']}/chat/completions",
        json={
            "model": server["model"],
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        },
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_max_tokens_is_capped_and_a_prompt_that_fills_the_context_is_refused(server: dict[str, Any]) -> None:
    r = _chat(server, max_tokens=100_000, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= CEILING
    r = _chat(server, messages=[{"role": "user", "content": "RSI MACD volume " * 2000}], max_tokens=4)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = _chat(server, messages=[{"role": "user", "content": "RSI MACD volume " * 2000}], max_tokens=4, stream=True)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = _chat(server, n=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_other_routes_answer_while_six_generations_run(server: dict[str, Any]) -> None:
    finished: list[float] = []
    statuses: list[int] = []

    def generate(i: int) -> None:
        r = _chat(server, max_tokens=CEILING, temperature=0, messages=[{"role": "user", "content": f"case {i}"}])
        statuses.append(r.status_code)
        finished.append(time.monotonic())

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    answered: list[tuple[float, int]] = []
    while any(t.is_alive() for t in threads):
        r = httpx.get(f"{server['url']}/api/finetune/jobs", timeout=30)
        answered.append((time.monotonic(), r.status_code))
    for t in threads:
        t.join()
    assert statuses == [200] * 6
    # the jobs route answered (200) while generations were still running, not only after the last one
    during = [at for at, status in answered if status == 200 and at < max(finished)]
    assert during, "GET /api/finetune/jobs did not answer while generation ran"
