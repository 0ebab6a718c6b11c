"""Finetune use cases on a real SQLite file: training data fed by events, job validation, the job runner's
state machine (with a fast stand-in for the training edge), cancellation and the watchdog."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from services.finetune import domain, handlers, jobs, training
from services.finetune.config import FinetuneSettings
from services.finetune.store import JobRow, Store, outbox
from shared.contracts import (
    ExplanationCreated,
    FeedbackErased,
    FeedbackRecorded,
    FineTuneProgress,
    ModelRegistered,
    StartFineTune,
    derived_id,
)
from shared.outbox import relay
from tests.fakes.bus import FakeBus
from tests.support import explanation_created

TICKERS = ("AAPL", "MSFT", "NVDA", "TSLA")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# -- helpers shared with the integration tests ---------------------------------------------------------------


def explanation_event(i: int, *, good: bool = True, request_key: str | None = None) -> ExplanationCreated:
    ticker = TICKERS[i % 4]
    prompt = f"Explain the BUY signal for {ticker}. RSI is {20 + i % 50}.5, MACD is 0.4. Case {i}."
    text = (
        f"BUY: {ticker} shows positive momentum and RSI is oversold. Watch the volume. Case {i}."
        if good
        else f"SELL everything now, {ticker} is doomed!! Case {i}."
    )
    return explanation_created(
        derived_id("test-explanation", i),
        None,
        message_id=derived_id("test-explanation-event", i),
        request_key=request_key or f"req-{i}",
        ticker=ticker,
        signal="BUY",
        model="offline",
        prompt_text=prompt,
        text=text,
        tokens_in=40,
        tokens_out=20,
        latency_ms=5.0,
        created_at=T0,
    )


def vote_event(
    explanation_id: uuid.UUID, session: str, rating: int, stars: int | None, at: datetime = T0
) -> FeedbackRecorded:
    return FeedbackRecorded(
        feedback_id=derived_id("test-feedback", session, explanation_id),
        explanation_id=explanation_id,
        session_key=session,
        rating=rating,  # type: ignore[arg-type]
        stars=stars,
        submitted_at=at,
        prompt_name="explain_signal",
        prompt_version="v1.0",
        model="offline",
        signal="BUY",
        ticker="AAPL",
    )


def seed(store: Store, n_good: int, n_bad: int = 0, start: int = 0) -> list[ExplanationCreated]:
    """n_good five-star explanations and n_bad thumbed-down ones, fed through the event handlers."""
    events = []
    for i in range(start, start + n_good + n_bad):
        good = i - start < n_good
        ev = explanation_event(i, good=good)
        handlers.on_explanation_created(ev, store.uow())
        handlers.on_feedback_recorded(
            vote_event(ev.explanation_id, f"session-{i}", 1 if good else -1, 5 if good else 1), store.uow()
        )
        events.append(ev)
    return events


def fake_base_model(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return str(path)


class FakeTrainer:
    """The training edge's interface, with `train` writing a complete adapter at once."""

    TrainingCancelled = training.TrainingCancelled
    TrainingInputError = training.TrainingInputError
    validate_base_model = staticmethod(training.validate_base_model)

    def __init__(self, steps: int = 4, on_step: Any = None) -> None:
        self.steps, self.on_step = steps, on_step
        self.calls: list[dict[str, Any]] = []

    def train(self, base, train_rows, eval_rows, recipe, output_dir, *, on_progress=None, should_cancel=None):
        self.calls.append({"train": train_rows, "eval": eval_rows, "recipe": recipe})
        for step in range(1, self.steps + 1):
            if self.on_step:
                self.on_step(step)
            if should_cancel and should_cancel():
                raise training.TrainingCancelled(f"cancelled at step {step}")
            if on_progress:
                on_progress(step / self.steps, {"step": step, "loss": 1.0 / step, "eval_loss": None})
        output_dir.mkdir(parents=True)
        (output_dir / "adapter_config.json").write_text("{}")
        metrics = {"train_loss_first": 1.0, "train_loss_last": 0.25, "eval_loss_best": 0.5, "steps": self.steps}
        return training.TrainResult(str(output_dir), recipe.to_dict(), metrics)

    def evaluate_likelihood(self, base, adapter, good, bad):
        gain = 0.0 if adapter is None else 0.5
        return {"good_ll": -2.0 + gain, "bad_ll": -2.0, "margin": gain}


@pytest.fixture
def settings(tmp_path: Path, store_url: Callable[[str], str]) -> FinetuneSettings:
    return FinetuneSettings(
        data_dir=tmp_path,
        database_url=store_url("finetune"),
        admin_token=SecretStr("t"),
        min_examples=20,
        base_model=fake_base_model(tmp_path / "base"),
        gateway_url="http://gw.test",
        cost_per_1k_tokens_usd=0.5,
        heartbeat_interval_s=0.05,
        heartbeat_timeout_s=60,
    )


@pytest.fixture
def store(settings: FinetuneSettings) -> Iterator[Store]:
    s = Store(settings.db_url)
    yield s
    s.dispose()


def _runner(store: Store, settings: FinetuneSettings, bus: FakeBus, trainer: Any) -> jobs.JobRunner:
    return jobs.JobRunner(store, settings, lambda: relay(store.factory, outbox, bus), trainer)


def _job(store: Store, job_id: str) -> JobRow:
    return handlers.get_job(store.uow(), job_id)


# -- training data -------------------------------------------------------------------------------------------


def test_replaced_vote_counts_once_and_newer_wins_whatever_the_order(store: Store) -> None:
    ev = explanation_event(1)
    handlers.on_explanation_created(ev, store.uow())
    newer = vote_event(ev.explanation_id, "s", -1, None, T0 + timedelta(minutes=5))
    older = vote_event(ev.explanation_id, "s", 1, 5, T0)
    assert handlers.on_feedback_recorded(newer, store.uow()) == "stored"
    assert handlers.on_feedback_recorded(older, store.uow()) == "stale"
    assert handlers.on_feedback_recorded(newer, store.uow()) == "duplicate"
    with store.uow() as uow:
        [explanation] = uow.repo.training_explanations()
    assert [(v.rating, v.stars) for v in explanation.votes] == [(-1, None)]


def test_erased_session_is_never_exported_and_the_erasure_is_traced_to_exports(
    store: Store, settings: FinetuneSettings
) -> None:
    ev = explanation_event(1)
    handlers.on_explanation_created(ev, store.uow())
    vote = vote_event(ev.explanation_id, "gone", 1, 5)
    handlers.on_feedback_recorded(vote, store.uow())
    rules = domain.ExportRules(heldout_percent=1)
    export_id, export = handlers.export_dataset(store.uow(), "sft", "train", rules)
    assert export.feedback_ids == {str(vote.feedback_id)} and len(export.rows) == 1

    erased = FeedbackErased(
        session_key="gone", feedback_ids=[vote.feedback_id], explanation_ids=[ev.explanation_id], erased_at=T0
    )
    record = handlers.on_feedback_erased(erased, store.uow())
    assert record is not None and record["feedback_ids"] == [str(vote.feedback_id)]
    assert record["export_ids"] == [export_id]
    assert handlers.on_feedback_erased(erased, store.uow()) is None  # redelivery

    late = vote_event(ev.explanation_id, "gone", 1, 5, T0 + timedelta(days=1))
    assert handlers.on_feedback_recorded(late, store.uow()) == "erased"
    for fmt in domain.FORMATS:
        for split in domain.SPLITS:
            assert handlers.export_dataset(store.uow(), fmt, split, rules)[1].rows == []


def test_every_export_records_the_feedback_ids_that_went_into_it(store: Store, settings: FinetuneSettings) -> None:
    seed(store, 30)
    export_id, export = handlers.export_dataset(store.uow(), "sft", "train", handlers.rules_from(settings))
    with store.uow() as uow:
        recorded = uow.repo.export(export_id)
    assert recorded is not None and recorded["rows"] == len(export.rows) > 0
    assert set(recorded["feedback_ids"]) == export.feedback_ids and len(export.feedback_ids) == len(export.rows)


# -- job validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"base_model": "/no/such/model"}, 422, "unknown base model: base model path '/no/such/model' does not exist"),
        ({"recipe": {"learning_rat": 1}}, 422, "unknown recipe fields: learning_rat"),
        ({"recipe": {"max_steps": "ten"}}, 422, "recipe.max_steps must be of the same type"),
        ({"recipe": {"lora_r": 0}}, 422, "bad recipe: lora_r must be >= 1"),
        ({"recipe": {"kto_beta": float("nan")}}, 422, "bad recipe: kto_beta must be a finite number > 0"),
        ({"recipe": {"kto_beta": -1.0}}, 422, "bad recipe: kto_beta must be a finite number > 0"),
        ({"recipe": {"seed": 10**30}}, 422, "bad recipe: seed must be in [0, 2**32)"),
        ({"recipe": {"max_steps": 10**30}}, 422, "bad recipe: max_steps must be <= 1000000"),
        ({"min_examples": 500}, 409, "too little data: "),
    ],
)
def test_job_request_is_rejected_with_its_reason_before_anything_is_queued(
    store: Store, settings: FinetuneSettings, change: dict, status: int, message: str
) -> None:
    seed(store, 30)
    with pytest.raises(handlers.Rejected) as info:
        handlers.create_job(StartFineTune(**change), store, settings)
    assert info.value.status == status and message in info.value.message
    with store.uow() as uow:
        assert uow.repo.list_jobs() == []


def test_job_request_without_any_base_model_is_rejected(store: Store, settings: FinetuneSettings) -> None:
    with pytest.raises(handlers.Rejected, match="no base model"):
        handlers.create_job(StartFineTune(), store, settings.model_copy(update={"base_model": None}))


def test_job_request_on_an_empty_store_is_an_empty_export(store: Store, settings: FinetuneSettings) -> None:
    with pytest.raises(handlers.Rejected, match="empty export") as info:
        handlers.create_job(StartFineTune(min_examples=0), store, settings)
    assert info.value.status == 409


def test_valid_job_request_is_queued_with_the_full_recipe(store: Store, settings: FinetuneSettings) -> None:
    seed(store, 30)
    job, cmd = handlers.create_job(StartFineTune(method="sft", recipe={"max_steps": 7}), store, settings)
    assert job["state"] == "queued" and cmd.job_id == job["job_id"]
    assert cmd.recipe["max_steps"] == 7 and cmd.recipe["method"] == "sft" and cmd.base_model == settings.base_model


# -- the job runner ------------------------------------------------------------------------------------------


def test_job_runs_export_train_evaluate_register_and_publishes_model_registered(
    store: Store, settings: FinetuneSettings
) -> None:
    seed(store, 30, n_bad=10)
    bus, trainer = FakeBus(), FakeTrainer()
    job, cmd = handlers.create_job(StartFineTune(), store, settings)
    assert _runner(store, settings, bus, trainer).start(cmd) == "registered"

    job = _job(store, job["job_id"])
    model_id = domain.model_id_for(job["job_id"])
    assert job["model_id"] == model_id and job["progress"] == 1.0 and job["reason"] is None
    [event] = bus.of_type(ModelRegistered)
    assert event.model == f"local/{model_id}" and event.serving_base_url == "http://gw.test/api/finetune/v1"
    assert event.cost_per_1k_tokens_usd == 0.5
    assert event.metrics["offline_margin_gain"] == 0.5 and event.metrics["cost_per_explanation_usd"] == pytest.approx(
        0.03
    )
    states = [e.state for e in bus.of_type(FineTuneProgress)]
    assert states[0] == "queued" and states[-1] == "registered"
    assert {"exporting", "training", "evaluating"} <= set(states)

    with store.uow() as uow:
        [model] = uow.repo.list_models()
        train_export = uow.repo.export(model["train_export_id"])
        heldout_export = uow.repo.export(model["heldout_export_id"])
    assert train_export is not None and heldout_export is not None
    assert model["adapter_path"] == str(settings.adapters_dir / model_id / "adapter")
    assert (Path(model["adapter_path"]) / "adapter_config.json").is_file()
    assert train_export["rows"] == len(trainer.calls[0]["train"]) and heldout_export["rows"] == len(
        trainer.calls[0]["eval"]
    )
    assert set(train_export["feedback_ids"]).isdisjoint(heldout_export["feedback_ids"])
    heldout_prompts = {r["messages"][1]["content"] for r in trainer.calls[0]["eval"]}
    assert heldout_prompts.isdisjoint(r["messages"][1]["content"] for r in trainer.calls[0]["train"])


def test_job_sent_without_a_job_id_is_created_by_the_worker_and_fails_at_once_on_too_little_data(
    store: Store, settings: FinetuneSettings
) -> None:
    seed(store, 5)
    bus, trainer = FakeBus(), FakeTrainer()
    cmd = StartFineTune(min_examples=100)
    assert _runner(store, settings, bus, trainer).start(cmd) == "failed"
    with store.uow() as uow:
        [job] = uow.repo.list_jobs()
    assert job["reason"] is not None and job["reason"].startswith("too little data:") and trainer.calls == []
    assert _runner(store, settings, bus, trainer).start(cmd) == "failed"  # a redelivery changes nothing


def test_job_sent_by_name_with_an_unknown_base_model_fails_before_training(
    store: Store, settings: FinetuneSettings
) -> None:
    seed(store, 30)
    trainer = FakeTrainer()
    assert (
        _runner(store, settings, FakeBus(), trainer).start(StartFineTune(job_id="j1", base_model="/nope")) == "failed"
    )
    reason = _job(store, "j1")["reason"]
    assert reason is not None and "does not exist" in reason and trainer.calls == []


def test_cancelled_running_job_stops_and_registers_nothing(store: Store, settings: FinetuneSettings) -> None:
    seed(store, 30)
    bus = FakeBus()
    job, cmd = handlers.create_job(StartFineTune(), store, settings)

    def cancel_at(step: int) -> None:
        if step == 2:
            handlers.cancel_job(store.uow(), job["job_id"])

    assert _runner(store, settings, bus, FakeTrainer(on_step=cancel_at)).start(cmd) == "cancelled"
    with store.uow() as uow:
        assert uow.repo.list_models() == []
    assert not (settings.adapters_dir / domain.model_id_for(job["job_id"])).exists()
    assert bus.of_type(ModelRegistered) == []
    with pytest.raises(handlers.Rejected, match="already cancelled"):
        handlers.cancel_job(store.uow(), job["job_id"])


def test_cancelled_queued_job_never_runs(store: Store, settings: FinetuneSettings) -> None:
    seed(store, 30)
    job, cmd = handlers.create_job(StartFineTune(), store, settings)
    assert handlers.cancel_job(store.uow(), job["job_id"])["state"] == "cancelled"
    trainer = FakeTrainer()
    assert _runner(store, settings, FakeBus(), trainer).start(cmd) == "cancelled" and trainer.calls == []


def test_watchdog_fails_a_job_with_a_stale_heartbeat_and_leaves_no_model(
    store: Store, settings: FinetuneSettings
) -> None:
    seed(store, 30)
    job, _ = handlers.create_job(StartFineTune(), store, settings)
    adapter = settings.adapters_dir / domain.model_id_for(job["job_id"]) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({}))  # a finished adapter, never registered
    with store.uow() as uow:
        uow.repo.update_job(job["job_id"], state="training", heartbeat_at=T0)
        uow.commit()
    assert jobs.watchdog(store, settings, now=T0 + timedelta(seconds=30)) == []
    assert jobs.watchdog(store, settings, now=T0 + timedelta(seconds=61)) == [job["job_id"]]
    job = _job(store, job["job_id"])
    assert job["state"] == "failed" and job["reason"] == "worker lost"
    assert not adapter.parent.exists()


def test_runner_whose_job_was_failed_by_the_watchdog_does_not_register(
    store: Store, settings: FinetuneSettings
) -> None:
    seed(store, 30)
    bus = FakeBus()
    job, cmd = handlers.create_job(StartFineTune(), store, settings)

    def lose_at(step: int) -> None:
        if step == 3:
            jobs.watchdog(store, settings, now=datetime.now(UTC) + timedelta(hours=1))

    _runner(store, settings, bus, FakeTrainer(on_step=lose_at)).start(cmd)
    assert _job(store, job["job_id"])["state"] == "failed"
    with store.uow() as uow:
        assert uow.repo.list_models() == []
    assert bus.of_type(ModelRegistered) == []


def test_the_finetune_api_worker_and_cli_import_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import services.finetune.main, services.finetune.tasks, services.finetune.cli, services.finetune.handlers\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=60)


def test_invalid_payload_sent_by_name_is_recorded_as_a_failed_job_with_the_reason(store: Store) -> None:
    reason = "invalid finetune.start_job payload: Input should be 'sft' or 'kto'"
    assert handlers.reject_payload(store, {"job_id": "j-bad", "method": "dpo"}, reason) == "j-bad"
    job = _job(store, "j-bad")
    assert job["state"] == "failed" and job["reason"] == reason
    assert handlers.reject_payload(store, {"job_id": "j-bad"}, reason) is None  # never overwrites a job
    assert handlers.reject_payload(store, {"method": "dpo"}, reason) is None


# -- the held-out gate, erasure to models, one job at a time ----------------------------------------------------


class BelowBaseTrainer(FakeTrainer):
    def evaluate_likelihood(self, base, adapter, good, bad):
        gain = 0.0 if adapter is None else -0.3
        return {"good_ll": -2.0 + gain, "bad_ll": -2.0, "margin": gain}


def _published(bus: FakeBus, cls: type) -> list[Any]:
    return bus.of_type(cls)


def test_a_model_that_does_not_beat_its_base_is_kept_below_base_and_not_announced_until_forced(
    store: Store, settings: FinetuneSettings
) -> None:
    seed(store, 60, 20)
    bus = FakeBus()
    cmd = StartFineTune(job_id="job-below", min_examples=10)
    assert _runner(store, settings, bus, BelowBaseTrainer()).start(cmd) == "registered"
    model_id = domain.model_id_for("job-below")
    with store.uow() as uow:
        model = uow.repo.model(model_id)
    assert model is not None and model["status"] == domain.MODEL_BELOW_BASE
    assert model["metrics"]["beats_base"] is False
    assert model["status_reason"] is not None and "did not beat its base" in model["status_reason"]
    assert _published(bus, ModelRegistered) == []  # no live experiment, not served
    assert handlers.registered_adapters(store.uow()) == []
    with pytest.raises(handlers.Rejected) as info:
        handlers.release_model(store.uow(), model_id, force=False)
    assert info.value.status == 422
    released = handlers.release_model(store.uow(), model_id, force=True)
    assert released["status"] == domain.MODEL_REGISTERED
    relay(store.factory, outbox, bus)
    [event] = _published(bus, ModelRegistered)
    assert event.model_id == model_id and event.message_id == derived_id("model.registered", model_id)


def test_erasure_after_registration_withdraws_the_model_and_says_so(store: Store, settings: FinetuneSettings) -> None:
    from shared.contracts import ModelWithdrawn

    events = seed(store, 60, 20)
    bus = FakeBus()
    assert _runner(store, settings, bus, FakeTrainer()).start(StartFineTune(job_id="job-e", min_examples=10)) == (
        "registered"
    )
    model_id = domain.model_id_for("job-e")
    ev = events[0]
    vote = vote_event(ev.explanation_id, "session-0", 1, 5)
    erased = FeedbackErased(
        session_key="session-0", feedback_ids=[vote.feedback_id], explanation_ids=[ev.explanation_id], erased_at=T0
    )
    record = handlers.on_feedback_erased(erased, store.uow())
    assert record is not None and record["withdrawn"] == [model_id]
    relay(store.factory, outbox, bus)
    [withdrawn] = _published(bus, ModelWithdrawn)
    assert withdrawn.model == f"local/{model_id}" and "erased" in withdrawn.reason
    assert handlers.registered_adapters(store.uow()) == []  # the fallback server no longer serves it
    with pytest.raises(handlers.Rejected, match="withdrawn"):
        handlers.release_model(store.uow(), model_id, force=True)
    cmd = handlers.retrain_command(store.uow(), model_id)
    assert cmd.method == "sft" and cmd.base_model == settings.base_model and cmd.min_examples == 10


def test_a_session_erased_while_the_model_trained_ends_withdrawn(store: Store, settings: FinetuneSettings) -> None:
    from shared.contracts import ModelWithdrawn

    events = seed(store, 60, 20)
    ev = events[3]
    vote = vote_event(ev.explanation_id, "session-3", 1, 5)
    erased = FeedbackErased(
        session_key="session-3", feedback_ids=[vote.feedback_id], explanation_ids=[ev.explanation_id], erased_at=T0
    )

    def erase_mid_training(step: int) -> None:
        if step == 2:
            handlers.on_feedback_erased(erased, store.uow())

    bus = FakeBus()
    trainer = FakeTrainer(on_step=erase_mid_training)
    assert _runner(store, settings, bus, trainer).start(StartFineTune(job_id="job-mid", min_examples=10)) == (
        "registered"
    )
    with store.uow() as uow:
        model = uow.repo.model(domain.model_id_for("job-mid"))
    assert model is not None and model["status"] == domain.MODEL_WITHDRAWN
    assert _published(bus, ModelRegistered) == []
    assert [e.model_id for e in _published(bus, ModelWithdrawn)] == [model["model_id"]]


def test_a_second_job_waits_queued_while_one_runs_and_the_api_says_409(
    store: Store, settings: FinetuneSettings
) -> None:
    seed(store, 60, 20)
    bus = FakeBus()
    seen: dict[str, Any] = {}

    def second_job(step: int) -> None:
        if step == 1:
            other = _runner(store, settings, bus, FakeTrainer())
            seen["state"] = other.start(StartFineTune(job_id="job-2", min_examples=10))
            seen["job"] = _job(store, "job-2")
            with pytest.raises(handlers.Rejected) as info:
                handlers.create_job(StartFineTune(min_examples=10), store, settings)
            seen["api"] = (info.value.status, info.value.message)

    assert _runner(store, settings, bus, FakeTrainer(on_step=second_job)).start(
        StartFineTune(job_id="job-1", min_examples=10)
    ) == ("registered")
    assert seen["state"] == jobs.BUSY and seen["job"]["state"] == "queued"
    assert seen["api"][0] == 409 and "one job at a time" in seen["api"][1]
    # once the first has ended, the waiting one runs (the task sends itself again later)
    assert _runner(store, settings, bus, FakeTrainer()).start(StartFineTune(job_id="job-2", min_examples=10)) == (
        "registered"
    )


def test_a_job_past_its_time_limit_fails_with_that_reason(store: Store, settings: FinetuneSettings) -> None:
    seed(store, 60, 20)
    bus = FakeBus()
    slow = settings.model_copy(update={"job_time_limit_s": 0.01})
    import time as _time

    trainer = FakeTrainer(on_step=lambda step: _time.sleep(0.02))
    assert _runner(store, slow, bus, trainer).start(StartFineTune(job_id="job-t", min_examples=10)) == "failed"
    reason = _job(store, "job-t")["reason"]
    assert reason is not None and "time limit" in reason
