"""The finetune training edge for real: a tiny random Llama, LoRA SFT and KTO with TRL, the adapter served over the
OpenAI API by the fallback server (uvicorn on a free port, the OpenAI Python SDK as the client).

Everything runs offline on the CPU with one thread and finishes in well under two minutes.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The finetune extra is part of `make install`: a missing package fails these tests, it does not skip them.
for _module in ("torch", "transformers", "peft", "trl", "datasets", "openai", "uvicorn"):
    importlib.import_module(_module)

from services.finetune import domain, serving, training  # noqa: E402
from services.finetune.domain import Recipe  # noqa: E402
from services.finetune.tinymodel import build_tiny_model  # noqa: E402
from services.finetune.training import TrainingCancelled, TrainingInputError  # noqa: E402
from tests.support import wait_for  # noqa: E402

pytestmark = pytest.mark.slow

TICKERS = ("AAPL", "MSFT", "NVDA", "TSLA")


def _prompt(i: int) -> str:
    return f"Explain the BUY signal for {TICKERS[i % 4]}. RSI is 28.5, MACD is 0.4."


def _good(i: int) -> str:
    return f"BUY: {TICKERS[i % 4]} shows positive momentum and RSI is oversold. Watch the volume."


def _bad(i: int) -> str:
    return f"SELL everything now, {TICKERS[i % 4]} is doomed!!"


def sft_rows(n: int, offset: int = 0) -> list[dict]:
    """A learnable, repetitive data set: four tickers, one explanation template."""
    return [
        {"messages": [{"role": "user", "content": _prompt(i)}, {"role": "assistant", "content": _good(i)}]}
        for i in range(offset, offset + n)
    ]


def kto_rows(n: int, offset: int = 0) -> list[dict]:
    """Alternating thumbs-up (good template) and thumbs-down (bad template) rows."""
    return [
        {
            "prompt": [{"role": "user", "content": _prompt(i)}],
            "completion": [{"role": "assistant", "content": _good(i) if i % 2 == 0 else _bad(i)}],
            "label": i % 2 == 0,
        }
        for i in range(offset, offset + n)
    ]


FAST: dict[str, Any] = {"max_steps": 24, "eval_every_steps": 6, "learning_rate": 5e-3, "per_device_batch_size": 4}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0))


@pytest.fixture(scope="module")
def sft_result(base_model: str, tmp_path_factory: pytest.TempPathFactory) -> training.TrainResult:
    out = tmp_path_factory.mktemp("runs") / "sft-adapter"
    progress: list[tuple[float, dict]] = []
    result = training.train(
        base_model,
        sft_rows(40),
        sft_rows(8, offset=1),
        Recipe(method="sft", **FAST),
        out,
        on_progress=lambda f, d: progress.append((f, d)),
    )
    result.metrics["_progress"] = progress
    return result


def test_sft_lowers_training_and_validation_loss(sft_result: training.TrainResult) -> None:
    m = sft_result.metrics
    assert m["train_loss_last"] < m["train_loss_first"] - 0.1
    assert m["eval_loss_best"] < m["eval_loss_first"] and m["improved"] is True
    assert m["steps"] == 24 and m["device"] == "cpu" and m["dtype"] == "float32"
    assert m["tokens_per_s"] > 0 and m["seconds"] > 0
    assert sft_result.recipe == Recipe(method="sft", **FAST).to_dict()


def test_sft_reports_progress_from_zero_to_one(sft_result: training.TrainResult) -> None:
    progress = sft_result.metrics["_progress"]
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"step", "loss", "eval_loss"} <= set(progress[-1][1])
    assert progress[-1][1]["eval_loss"] is not None


def test_sft_adapter_reloads_and_prefers_the_trained_explanations(
    base_model: str, sft_result: training.TrainResult
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(sft_result.adapter_path)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    run = json.loads((adapter / training.RUN_FILE).read_text())
    assert run["recipe"]["method"] == "sft" and run["metrics"]["steps"] == 24
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(adapter))
    assert model.active_adapter == "default"

    good, bad = (
        sft_rows(6, offset=2),
        [
            {"messages": [{"role": "user", "content": _prompt(i)}, {"role": "assistant", "content": _bad(i)}]}
            for i in range(6)
        ],
    )
    before = training.evaluate_likelihood(base_model, None, good, bad)
    after = training.evaluate_likelihood(base_model, str(adapter), good, bad)
    assert after["good_ll"] > before["good_ll"]
    assert after["margin"] > before["margin"]
    assert set(before) >= {"good_ll", "bad_ll", "margin"}


def test_kto_lowers_loss_and_separates_good_from_bad(base_model: str, tmp_path: Path) -> None:
    result = training.train(
        base_model, kto_rows(40), kto_rows(8, offset=1), Recipe(method="kto", **FAST), tmp_path / "kto-adapter"
    )
    m = result.metrics
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["eval_loss_best"] < m["eval_loss_first"]
    good = [r for r in kto_rows(8, offset=40) if r["label"]]
    bad = [r for r in kto_rows(8, offset=40) if not r["label"]]
    before = training.evaluate_likelihood(base_model, None, good, bad)
    after = training.evaluate_likelihood(base_model, result.adapter_path, good, bad)
    assert after["margin"] > before["margin"]


def dpo_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": _prompt(i)}],
            "chosen": [{"role": "assistant", "content": _good(i)}],
            "rejected": [{"role": "assistant", "content": _bad(i)}],
        }
        for i in range(offset, offset + n)
    ]


def test_dpo_trains_the_tiny_model_from_pairs_and_its_loss_falls(base_model: str, tmp_path: Path) -> None:
    recipe = Recipe(method="dpo", **{**FAST, "max_steps": 16, "eval_every_steps": 8})
    result = training.train(base_model, dpo_rows(24), dpo_rows(6, offset=100), recipe, tmp_path / "dpo")
    m = result.metrics
    assert m["method"] == "dpo" and m["steps"] >= 8
    assert m["eval_loss_best"] < m["eval_loss_first"]  # ln 2 before training: the pairs are separated after
    assert m["train_loss_last"] < m["train_loss_first"]
    assert (Path(result.adapter_path) / "adapter_config.json").is_file()
    config = json.loads((Path(result.adapter_path) / "adapter_config.json").read_text())
    assert len(config["target_modules"]) >= 7  # all-linear: q, k, v, o, gate, up, down
    assert m["rows_too_long"] == 0 and m["max_length"] < recipe.max_seq_length


def test_rows_longer_than_the_ceiling_are_left_out_never_truncated(base_model: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    rows = sft_rows(8)
    lengths = training.row_lengths(tok, rows, "sft")
    ceiling = sorted(lengths)[4]
    kept, dropped, longest = training.fit_rows(tok, rows, "sft", ceiling, "train rows")
    assert dropped == sum(1 for n in lengths if n > ceiling) and longest <= ceiling and len(kept) + dropped == 8
    with pytest.raises(training.TrainingInputError, match="longer than 3 tokens"):
        training.fit_rows(tok, rows, "sft", 3, "train rows")


def test_validation_loss_that_stops_improving_stops_training_and_keeps_best(base_model: str, tmp_path: Path) -> None:
    # Train on one answer, validate on a contradicting one at a high learning rate: validation loss rises fast.
    contradicting = [
        {"messages": [{"role": "user", "content": _prompt(i)}, {"role": "assistant", "content": _bad(i)}]}
        for i in range(8)
    ]
    recipe = Recipe(method="sft", max_steps=60, eval_every_steps=2, early_stopping_patience=2, learning_rate=3e-2)
    result = training.train(base_model, sft_rows(40), contradicting, recipe, tmp_path / "adapter")
    m = result.metrics
    assert m["stopped_early"] is True
    assert m["steps"] < 60
    assert m["eval_loss_best"] == min(loss for _, loss in m["eval_losses"])
    assert m["best_step"] < m["steps"]
    assert m["improved"] is (m["best_step"] > 0)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty_train", "train_rows is empty"),
        ("empty_eval", "eval_rows is empty"),
        ("missing_key", "missing 'messages'"),
        ("kto_label", "label must be true or false"),
        ("no_base", "does not exist"),
        ("no_config", "has no config.json"),
        ("bad_recipe", "method must be one of"),
        ("rank_too_high", "lora_r must be <= 64"),
        ("kto_batch", "per_device_batch_size >= 2"),
        ("output_taken", "already exists and is not empty"),
    ],
)
def test_bad_inputs_raise_before_training(base_model: str, tmp_path: Path, kind: str, message: str) -> None:
    base, train_rows, eval_rows, recipe = base_model, sft_rows(4), sft_rows(2), Recipe(max_steps=1)
    out = tmp_path / "adapter"
    if kind == "empty_train":
        train_rows = []
    elif kind == "empty_eval":
        eval_rows = []
    elif kind == "missing_key":
        train_rows = [{"prompt": "hi"}]
    elif kind == "kto_label":
        train_rows, eval_rows, recipe = kto_rows(4), kto_rows(2), Recipe(method="kto", max_steps=1)
        train_rows[1] = {**train_rows[1], "label": "yes"}
    elif kind == "no_base":
        base = str(tmp_path / "no-such-model")
    elif kind == "no_config":
        (tmp_path / "empty-model").mkdir()
        base = str(tmp_path / "empty-model")
    elif kind == "bad_recipe":
        recipe = Recipe(method="ppo")
    elif kind == "rank_too_high":
        recipe = Recipe(lora_r=128)
    elif kind == "kto_batch":
        train_rows, eval_rows = kto_rows(4), kto_rows(2)
        recipe = Recipe(method="kto", per_device_batch_size=1)
    elif kind == "output_taken":
        out.mkdir()
        (out / "adapter_config.json").write_text("{}")
    with pytest.raises(TrainingInputError, match=message):
        training.train(base, train_rows, eval_rows, recipe, out)
    assert kind == "output_taken" or not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cancellation_leaves_no_adapter(base_model: str, tmp_path: Path) -> None:
    calls = {"n": 0}

    def should_cancel() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    out = tmp_path / "runs" / "adapter"
    with pytest.raises(TrainingCancelled):
        training.train(
            base_model,
            sft_rows(16),
            sft_rows(4),
            Recipe(max_steps=20, eval_every_steps=1),
            out,
            should_cancel=should_cancel,
        )
    assert calls["n"] == 3
    assert not out.exists()
    assert list((tmp_path / "runs").iterdir()) == []  # no temp directory left behind either


def test_recipe_round_trips_through_json() -> None:
    recipe = Recipe(method="kto", target_modules=("q_proj", "k_proj", "v_proj"), lora_r=4, seed=7)
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())) | {"from_the_future": 1})
    assert again == recipe and isinstance(again.target_modules, tuple)


def test_importing_the_training_edge_does_not_load_torch() -> None:
    code = (
        "import sys, services.finetune.training, services.finetune.serving, services.finetune.tinymodel;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_tiny_model_is_deterministic_for_a_seed(base_model: str, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (Path(base_model) / name).read_bytes()


def test_vllm_command_serves_adapters_by_name() -> None:
    cmd = serving.vllm_command("/models/base", {"sft-1": "/a/sft-1", "kto-2": "/a/kto-2"}, port=8002)
    assert cmd[:3] == ["vllm", "serve", "/models/base"]
    assert "--enable-lora" in cmd and cmd[cmd.index("--port") + 1] == "8002"
    assert cmd[cmd.index("--lora-modules") + 1 :][:2] == ["sft-1=/a/sft-1", "kto-2=/a/kto-2"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == str(domain.MAX_SERVED_LORA_RANK)


# --------------------------------------------------------------------------------------------------------------
# The fallback server over real HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(base_model: str, sft_result: training.TrainResult) -> Iterator[tuple[str, object]]:
    import uvicorn

    app = serving.create_serving_app(base_model, {"explainer-sft": sft_result.adapter_path})
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none", lifespan="off")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for(lambda: srv.started, timeout_s=20, interval_s=0.05, what="the model server to start")
    yield f"http://127.0.0.1:{port}/v1", app
    srv.should_exit = True
    thread.join(timeout=10)


def test_openai_sdk_gets_a_completion_from_the_adapter_by_name(server: tuple[str, object]) -> None:
    import openai

    url, _ = server
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client:
        assert {m.id for m in client.models.list()} == {"tiny-llama", "explainer-sft"}
        reply = client.chat.completions.create(
            model="explainer-sft", messages=[{"role": "user", "content": _prompt(1)}], max_tokens=12, temperature=0
        )
        assert reply.id and reply.model == "explainer-sft"
        assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content, str)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None
        assert 0 < reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        # Greedy decoding is deterministic, and the base model answers under its own name differently.
        again = client.chat.completions.create(
            model="explainer-sft", messages=[{"role": "user", "content": _prompt(1)}], max_tokens=12, temperature=0
        )
        assert again.choices[0].message.content == reply.choices[0].message.content
        base = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": _prompt(1)}], max_tokens=12, temperature=0
        )
        assert base.choices[0].message.content != reply.choices[0].message.content


def test_unknown_model_is_a_404_in_openai_error_shape(server: tuple[str, object]) -> None:
    import httpx
    import openai

    url, _ = server
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client, pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    r = httpx.post(f"{url}/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{url}/chat/completions", json={"model": "tiny-llama", "messages": []})
    assert r.status_code == 400 and "error" in r.json()


def test_adapter_registered_at_run_time_is_served(server: tuple[str, object], sft_result) -> None:
    import httpx

    url, app = server
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "explainer-v2", "lora_path": sft_result.adapter_path})
    assert r.status_code == 200
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "broken", "lora_path": "/no/such/adapter"})
    assert r.status_code == 400
    r = httpx.post(
        f"{url}/chat/completions",
        json={
            "model": "explainer-v2",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "temperature": 0.7,
            "seed": 1,
        },
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    assert "explainer-v2" in app.state.adapters  # type: ignore[attr-defined]
