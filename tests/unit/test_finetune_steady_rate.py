"""training.steady_rate: the tokens/s of a run after its first third of steps, which also pay for loading kernels."""

from __future__ import annotations

from services.finetune.training import steady_rate


def test_the_first_third_of_the_steps_is_left_out() -> None:
    # 9 steps of 100 tokens: the first three take 5 s each (warm-up), the rest 1 s each
    marks, tokens, now = [], 0, 0.0
    for step in range(1, 10):
        tokens += 100
        now += 5.0 if step <= 3 else 1.0
        marks.append((step, tokens, now))
    # from the end of step 3 to the end of step 9: 600 tokens in 6 s (the whole run: 900 tokens in 21 s)
    assert steady_rate(marks) == 100.0


def test_short_or_empty_runs_give_no_figure() -> None:
    assert steady_rate([]) is None
    assert steady_rate([(1, 10, 1.0), (2, 20, 2.0), (3, 30, 3.0)]) is None
    # a clock that did not move, or no tokens counted (an older trainer that logs no num_tokens)
    assert steady_rate([(i, 0, float(i)) for i in range(1, 7)]) is None
    assert steady_rate([(i, 10 * i, 1.0) for i in range(1, 7)]) is None


def test_evaluations_and_saves_between_steps_are_not_training_time(monkeypatch, tmp_path) -> None:
    """The trainer logs a step before it evaluates; an evaluation (3 s) and the save of a better adapter (5 s)
    inside the window must not lower the steady rate."""
    from types import SimpleNamespace

    from services.finetune import training
    from services.finetune.domain import Recipe

    clock = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])

    class Model:
        def save_pretrained(self, path) -> None:
            clock[0] += 5.0

    callback = training._make_callback(Recipe(max_steps=9, eval_every_steps=3), tmp_path / "best", None, None)
    state = SimpleNamespace(global_step=0, max_steps=9)
    control = SimpleNamespace(should_training_stop=False)
    for step in range(1, 10):
        clock[0] += 1.0  # one second a step, 100 tokens a step
        state.global_step = step
        callback.on_log(None, state, control, logs={"loss": 1.0, "num_tokens": 100 * step})
        if step % 3 == 0:
            clock[0] += 3.0
            metrics = {"eval_loss": 1.0 / step, "eval_runtime": 3.0}  # better every time: saved every time
            callback.on_evaluate(None, state, control, metrics=metrics, model=Model())
    assert training.steady_rate(callback.marks) == 100.0
    assert callback.eval_seconds == 3 * (3.0 + 5.0)
