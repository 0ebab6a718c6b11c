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
    assert steady_rate(marks) == 100.0  # from the end of step 3 to the end of step 9: 600 tokens in 6 s
    whole = marks[-1][1] / marks[-1][2]
    assert whole < 50  # the whole run: 900 tokens in 21 s


def test_short_or_empty_runs_give_no_figure() -> None:
    assert steady_rate([]) is None
    assert steady_rate([(1, 10, 1.0), (2, 20, 2.0), (3, 30, 3.0)]) is None
    # a clock that did not move, or no tokens counted (an older trainer that logs no num_tokens)
    assert steady_rate([(i, 0, float(i)) for i in range(1, 7)]) is None
    assert steady_rate([(i, 10 * i, 1.0) for i in range(1, 7)]) is None
