"""Phase 3 over HTTP with the whole system: feedback -> training data -> a LoRA job through the queue ->
a registered model -> an experiment arm against the API model -> explanations served by the tuned model
through the OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import start_stack
from tests.support import wait_for

pytestmark = pytest.mark.slow

TICKERS = ["AAPL", "MSFT", "NVDA", "AMZN", "TSLA", "META", "GOOG", "AMD", "INTC", "NFLX"]


def test_feedback_becomes_a_served_fine_tuned_model_in_an_experiment(
    tmp_path: Path, admin_headers: dict[str, str]
) -> None:
    from services.finetune.tinymodel import build_tiny_model

    base = build_tiny_model(tmp_path / "tiny")
    stack = start_stack(
        tmp_path / "system",
        FINETUNE_BASE_MODEL=str(base),
        FINETUNE_MIN_EXAMPLES="20",
        FINETUNE_TORCH_THREADS="1",
        # no API key here: every explanation is the offline template's, which is not trained on by default
        FINETUNE_EXCLUDE_MODEL_PREFIXES="[]",
        OPTIMIZER_AUTO_EXPERIMENT="false",
    )
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            for i in range(60):
                exp = client.post(
                    "/api/explanations",
                    json={
                        "ticker": TICKERS[i % len(TICKERS)],
                        "signal": ("BUY", "SELL", "HOLD")[i % 3],
                        "context": {"rsi": 20 + i, "macd": i % 5 - 2},
                        "session_id": f"ft-{i}",
                    },
                )
                assert exp.status_code == 201, exp.text
                vote = {"rating": 1 if i % 6 else -1, "stars": 5 if i % 6 else 1, "session_id": f"ft-{i}"}
                assert client.post(f"/api/feedback/{exp.json()['explanation_id']}", json=vote).status_code == 202

            def job_accepted() -> dict | None:
                res = client.post(
                    "/api/finetune/jobs",
                    headers=admin_headers,
                    json={"method": "sft", "recipe": {"max_steps": 6, "eval_every_steps": 3, "learning_rate": 0.005}},
                )
                assert res.status_code in (202, 409), res.text  # 409: the training data is still arriving
                return res.json() if res.status_code == 202 else None

            job = wait_for(job_accepted, timeout_s=60, interval_s=1, what="enough training data for a job")
            done = wait_for(
                lambda: (
                    (j := client.get(f"/api/finetune/jobs/{job['job_id']}").json())["state"] in ("registered", "failed")
                    and j
                ),
                timeout_s=240,
                interval_s=1,
                what="the job to finish",
            )
            assert done["state"] == "registered", done
            model = f"local/{done['model_id']}"
            models = client.get("/api/finetune/models", headers=admin_headers).json()["items"]
            [registered] = [m for m in models if m["model_id"] == done["model_id"]]
            if registered["status"] == "below_base":  # the held-out gate held it back: an operator forces it live
                res = client.post(
                    f"/api/finetune/models/{done['model_id']}/release", headers=admin_headers, json={"force": True}
                )
                assert res.status_code == 200 and res.json()["status"] == "registered", res.text
            else:
                assert registered["status"] == "registered" and registered["metrics"]["beats_base"] is True

            def experiment_with_model() -> dict | None:
                for e in client.get("/api/experiments").json()["experiments"]:
                    if any(arm["model"] == model for arm in e["arms"]) and e["status"] == "running":
                        return e
                return None

            experiment = wait_for(
                experiment_with_model, timeout_s=60, what="an experiment with the tuned model as an arm"
            )
            served = None
            for i in range(40):  # sticky 50/50 assignment: some sessions land on the tuned model's arm
                res = client.post(
                    "/api/explanations",
                    json={"ticker": "AAPL", "signal": "BUY", "context": {"rsi": 30}, "session_id": f"arm-{i}"},
                )
                assert res.status_code == 201, res.text
                if res.json()["experiment_id"] == experiment["experiment_id"] and res.json()["model"] == model:
                    served = res.json()
                    break
            assert served is not None, "no session was served by the tuned model"
            assert served["fallback_used"] is False and served["text"]
    finally:
        stack.stop()
