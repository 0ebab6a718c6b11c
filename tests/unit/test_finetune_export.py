"""The export rules of the finetune service (pure domain logic)."""

from __future__ import annotations

import uuid

from services.finetune import domain
from services.finetune.domain import Explanation, ExportRules, Vote
from services.finetune.pii import scrub as scrub_pii
from shared.serving import SYSTEM_MESSAGE

SYSTEM = {"role": "system", "content": SYSTEM_MESSAGE}

RULES = ExportRules(sft_min_stars=5, sft_accept_thumbs_up=True, heldout_percent=10)


def _id(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"explanation-{n}"))


def _tag(eid: str) -> str:
    """The id without digits, so PII scrubbing leaves it alone in a text."""
    return eid.translate(str.maketrans("0123456789-", "ghijklmnopq"))


def _rk(eid: str) -> str:
    return f"rk-{eid}"


def _key_in(split: str, prefix: str = "r") -> str:
    n = 0
    while domain.is_heldout(f"{prefix}{n}", RULES.heldout_percent) != (split == "heldout"):
        n += 1
    return f"{prefix}{n}"


def _ids_in(split: str, count: int, start: int = 1) -> list[str]:
    out: list[str] = []
    n = start
    while len(out) < count:
        if domain.is_heldout(_rk(_id(n)), RULES.heldout_percent) == (split == "heldout"):
            out.append(_id(n))
        n += 1
    return out


def ex(
    eid: str,
    *votes: tuple[int, int | None],
    request_key: str | None = None,
    prompt: str | None = None,
    text: str | None = None,
    session: str = "s",
) -> Explanation:
    return Explanation(
        explanation_id=eid,
        request_key=request_key or _rk(eid),
        prompt_text=prompt or f"Explain BUY for AAPL ({_tag(eid)})",
        text=text or f"AAPL looks strong ({_tag(eid)})",
        votes=tuple(Vote(f"f-{eid}-{i}", f"{session}{i}", r, s) for i, (r, s) in enumerate(votes)),
    )


def export(explanations: list[Explanation], fmt: str, split: str = "train", erased: frozenset[str] = frozenset()):
    return domain.build_export(domain.examples(explanations, erased, scrub_pii), fmt, split, RULES)


def test_sft_takes_five_star_and_thumbs_up_without_stars_only() -> None:
    a, b, c, d, e = _ids_in("train", 5)
    rows = export(
        [ex(a, (1, 5)), ex(b, (1, None)), ex(c, (1, 4)), ex(d, (-1, None)), ex(e, (-1, 5))],
        "sft",
    ).rows
    completions = [r["messages"][-1]["content"] for r in rows]
    assert sorted(completions) == sorted([f"AAPL looks strong ({_tag(a)})", f"AAPL looks strong ({_tag(b)})"])


def test_sft_threshold_is_configurable() -> None:
    (a,) = _ids_in("train", 1)
    pool = domain.examples([ex(a, (1, 4)), ex(_ids_in("train", 2)[1], (1, None))], frozenset(), scrub_pii)
    strict = ExportRules(sft_min_stars=5, sft_accept_thumbs_up=False)
    lenient = ExportRules(sft_min_stars=4, sft_accept_thumbs_up=False)
    assert len(domain.build_export(pool, "sft", "train", strict).rows) == 0
    assert len(domain.build_export(pool, "sft", "train", lenient).rows) == 1


def test_sft_excludes_explanation_whose_thumbs_down_outnumber_top_votes() -> None:
    (a,) = _ids_in("train", 1)
    assert export([ex(a, (1, 5), (-1, None), (-1, None))], "sft").rows == []


def test_row_formats_are_exactly_the_chat_formats() -> None:
    a, b = _ids_in("train", 2)
    rk = _key_in("train")
    data = [
        ex(a, (1, 5), prompt="P", text="good", request_key=rk),
        ex(b, (-1, None), prompt="P", text="bad", request_key=rk),
    ]
    assert export(data, "sft").rows == [
        {"messages": [SYSTEM, {"role": "user", "content": "P"}, {"role": "assistant", "content": "good"}]}
    ]
    assert sorted(export(data, "kto").rows, key=lambda r: not r["label"]) == [
        {
            "prompt": [SYSTEM, {"role": "user", "content": "P"}],
            "completion": [{"role": "assistant", "content": "good"}],
            "label": True,
        },
        {
            "prompt": [SYSTEM, {"role": "user", "content": "P"}],
            "completion": [{"role": "assistant", "content": "bad"}],
            "label": False,
        },
    ]
    assert export(data, "dpo").rows == [
        {
            "prompt": [SYSTEM, {"role": "user", "content": "P"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    ]


def test_kto_label_is_the_net_thumbs_and_ties_are_left_out() -> None:
    a, b, c = _ids_in("train", 3)
    rows = export([ex(a, (1, None), (1, None), (-1, None)), ex(b, (-1, 2)), ex(c, (1, None), (-1, None))], "kto").rows
    labels = {r["completion"][0]["content"]: r["label"] for r in rows}
    assert labels == {f"AAPL looks strong ({_tag(a)})": True, f"AAPL looks strong ({_tag(b)})": False}


def test_dpo_pairs_only_within_one_request_and_picks_best_and_worst() -> None:
    ids = _ids_in("train", 5)
    r1, r2, r3 = _key_in("train", "a"), _key_in("train", "b"), _key_in("train", "c")
    data = [
        ex(ids[0], (1, 3), request_key=r1),
        ex(ids[1], (1, 5), (1, 5), request_key=r1),
        ex(ids[2], (-1, 2), request_key=r1),
        ex(ids[3], (1, 5), request_key=r2),  # no rejected explanation for r2
        ex(ids[4], (-1, 1), request_key=r3),  # no preferred explanation for r3
    ]
    result = export(data, "dpo")
    assert len(result.rows) == 1
    assert result.rows[0]["chosen"][0]["content"] == f"AAPL looks strong ({_tag(ids[1])})"
    assert result.rows[0]["rejected"][0]["content"] == f"AAPL looks strong ({_tag(ids[2])})"
    assert result.feedback_ids == {f"f-{ids[1]}-0", f"f-{ids[1]}-1", f"f-{ids[2]}-0"}


def test_identical_explanations_are_exported_once_with_pooled_votes() -> None:
    a, b = _ids_in("train", 2)
    rk = _key_in("train")
    data = [
        ex(a, (1, 5), prompt="same", text="same text", request_key=rk),
        ex(b, (1, None), prompt="same", text="same text", request_key=rk),
    ]
    result = export(data, "sft")
    assert len(result.rows) == 1
    assert result.feedback_ids == {f"f-{a}-0", f"f-{b}-0"}


def test_pii_is_scrubbed_from_prompts_and_completions() -> None:
    (a,) = _ids_in("train", 1)
    data = [ex(a, (1, 5), prompt="Context: mail jane.doe@example.com, call +1 415 555 0100", text="Sent to 10.0.0.1")]
    row = export(data, "sft").rows[0]
    text = str(row)
    assert "jane.doe@example.com" not in text and "555 0100" not in text and "10.0.0.1" not in text
    assert "[email]" in row["messages"][1]["content"] and "[ip]" in row["messages"][2]["content"]


def test_heldout_split_is_deterministic_disjoint_and_about_ten_percent() -> None:
    data = [ex(_id(n), (1, 5), request_key=f"r{n}") for n in range(1, 2001)]
    pool = domain.examples(data, frozenset(), scrub_pii)
    train = domain.build_export(pool, "sft", "train", RULES)
    heldout = domain.build_export(pool, "sft", "heldout", RULES)
    assert set(train.example_ids).isdisjoint(heldout.example_ids)
    assert len(train.rows) + len(heldout.rows) == 2000
    assert 150 <= len(heldout.rows) <= 250
    assert domain.build_export(pool, "sft", "heldout", RULES) == heldout


def test_heldout_explanations_never_enter_any_training_format() -> None:
    data = []
    for n in range(1, 401):
        data.append(ex(_id(n), (1, 5) if n % 2 else (-1, None), request_key=f"r{n // 2}"))
    pool = domain.examples(data, frozenset(), scrub_pii)
    heldout_texts = {e.completion for e in pool if domain.is_heldout(e.request_key, RULES.heldout_percent)}
    assert heldout_texts
    for fmt in domain.FORMATS:
        rows = domain.build_export(pool, fmt, "train", RULES).rows
        assert rows
        completions = {
            m["content"]
            for r in rows
            for key in ("messages", "completion", "chosen", "rejected")
            for m in r.get(key, [])
            if m["role"] == "assistant"
        }
        assert completions and heldout_texts.isdisjoint(completions)


def test_votes_of_erased_sessions_are_never_exported() -> None:
    a, b = _ids_in("train", 2)
    data = [ex(a, (1, 5), session="erased"), ex(b, (1, 5), (1, 5), session="kept")]
    result = export(data, "sft", erased=frozenset({"erased0", "kept1"}))
    assert [r["messages"][-1]["content"] for r in result.rows] == [f"AAPL looks strong ({_tag(b)})"]
    assert result.feedback_ids == {f"f-{b}-0"}


def test_unknown_format_or_split_is_a_value_error() -> None:
    import pytest

    with pytest.raises(ValueError, match="format must be one of"):
        domain.build_export([], "ppo", "train", RULES)
    with pytest.raises(ValueError, match="split must be one of"):
        domain.build_export([], "sft", "test", RULES)


def test_data_problems_name_the_reason() -> None:
    assert "empty export" in (domain.enough_data_problem("sft", 0, 0, 0) or "")
    assert "too little data: 3 SFT training examples, at least 500 needed" in (
        domain.enough_data_problem("sft", 3, 1, 500) or ""
    )
    assert "held-out split has no KTO rows" in (domain.enough_data_problem("kto", 30, 0, 10) or "")
    assert domain.enough_data_problem("sft", 30, 3, 30) is None


def test_model_ids_are_deterministic_per_job_and_named_local() -> None:
    assert domain.model_id_for("job-1") == domain.model_id_for("job-1") != domain.model_id_for("job-2")
    assert domain.model_name("ft-abc") == "local/ft-abc"
    assert domain.float_metrics({"a": 1, "b": True, "c": None, "d": 0.5, "e": "x"}) == {"a": 1.0, "d": 0.5}


def test_deduplication_happens_before_scrubbing_so_different_explanations_stay_apart() -> None:
    """Two explanations that differ only in what the scrubber replaces, with opposite votes, are two examples
    (scrubbing first merged them into one with a tie)."""
    a, b = _ids_in("train", 2)
    rk = _key_in("train")
    data = [
        ex(a, (1, None), prompt="P", text="Ask jane@example.com about AAPL", request_key=rk),
        ex(b, (-1, None), prompt="P", text="Ask john@example.com about AAPL", request_key=rk),
    ]
    pool = domain.examples(data, frozenset(), scrub_pii)
    assert len(pool) == 2
    assert sorted(e.label for e in pool if e.label is not None) == [False, True]
    assert all("[email]" in e.completion for e in pool)


def test_no_prompt_is_on_both_sides_and_a_new_duplicate_never_moves_an_example() -> None:
    data = []
    for n in range(1, 401):  # 200 requests, two explanations each, same prompt per request
        data.append(ex(_id(n), (1, 5), request_key=f"req{n // 2}", prompt=f"Explain request {n // 2}"))
    pool = domain.examples(data, frozenset(), scrub_pii)
    train = [e for e in pool if domain.in_split(e, "train", RULES)]
    held = [e for e in pool if domain.in_split(e, "heldout", RULES)]
    assert held and train
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held})
    before = {e.example_id: domain.in_split(e, "heldout", RULES) for e in pool}
    # a duplicate of every explanation arrives, with a smaller id than the original (it becomes the group's id)
    dups = [ex("0" + e.explanation_id, (1, None), request_key=e.request_key, prompt=e.prompt_text, text=e.text)
            for e in data]  # fmt: skip
    after_pool = domain.examples(data + dups, frozenset(), scrub_pii)
    after = {e.request_key: domain.in_split(e, "heldout", RULES) for e in after_pool}
    moved = [i for i, e in enumerate(pool) if after[e.request_key] != before[e.example_id]]
    assert moved == []


def test_offline_template_and_fallback_explanations_are_not_trained_on_unless_configured() -> None:
    a, b, c = _ids_in("train", 3)
    data = [
        Explanation(a, _rk(a), "P1", "written by the assigned model", (Vote("f1", "s1", 1, 5),), model="local/ft-x"),
        Explanation(b, _rk(b), "P2", "offline template text", (Vote("f2", "s2", 1, 5),), model="offline/template-v1"),
        Explanation(c, _rk(c), "P3", "a fallback wrote this", (Vote("f3", "s3", 1, 5),), "openai/x", True),
    ]
    kept = domain.examples(data, frozenset(), scrub_pii, RULES)
    assert [e.completion for e in kept] == ["written by the assigned model"]
    everything = ExportRules(exclude_model_prefixes=(), exclude_fallback=False)
    assert len(domain.examples(data, frozenset(), scrub_pii, everything)) == 3


def test_rows_carry_the_system_message_the_router_sends() -> None:
    from services.router import providers

    (a,) = _ids_in("train", 1)
    row = export([ex(a, (1, 5))], "sft").rows[0]
    assert row["messages"][0] == {"role": "system", "content": providers._SYSTEM}


def test_a_model_beats_its_base_only_on_a_measured_gain() -> None:
    assert domain.beats_base({"offline_margin_gain": 0.2, "offline_good_ll_gain": -1.0}) is True
    assert domain.beats_base({"offline_margin_gain": -0.1, "offline_good_ll_gain": 1.0}) is False
    assert domain.beats_base({"offline_good_ll_gain": 0.3}) is True
    assert domain.beats_base({"improved": False}) is False
    assert domain.beats_base({}) is None
