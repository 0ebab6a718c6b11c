"""Variant generation: new versions of a prompt template, from OpenAI (the plan's meta-prompt) when a key is
set, else from a deterministic offline rewriter. Guardrails and the rate limit are applied by the handler
(`search.generate_variants`); a generator only proposes.

Generation remembers: every call gets the prompt's `SearchHistory` (the versions tried, with the result of
their latest experiment: rate, relative lift and interval; the proposals the guardrails rejected and why).
The offline generator walks its space of style-trait combinations with it (untried single traits first, then
combinations ranked by what the traits measured, never a combination that already exists or was rejected,
never one with a trait that clearly hurt) and says when nothing is left (`GenerationResult.exhausted`); the
OpenAI generator shows the model the same history (the best versions with their scores, what lost, what was
rejected), in the manner of OPRO's meta-prompt.

Only `OpenAIGenerator.generate` imports openai, so the service runs without it when no key is set.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.optimizer.config import OptimizerSettings


@dataclass(frozen=True)
class Candidate:
    template: str
    rationale: str


@dataclass(frozen=True)
class GenerationResult:
    source: str  # "offline" | "openai"
    model: str
    candidates: tuple[Candidate, ...]
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    exhausted: bool = False  # the generator has nothing left to propose for this champion and history
    note: str = ""  # why it is exhausted, or what it is exploring


class GenerationFailed(RuntimeError):
    """The generator could not produce anything (provider down, unreadable answer)."""


def fingerprint(template: str) -> str:
    """A short hash of a template with its whitespace normalised: the identity of a proposal, so one that
    exists or was rejected is recognised when it comes back."""
    return hashlib.sha256(" ".join(template.split()).encode()).hexdigest()[:16]


# Outcomes of a version in the search (the latest experiment it was a treatment in decides).
OUTCOME_CHAMPION = "champion"
OUTCOME_WON = "won"  # shipped (it may have been replaced later)
OUTCOME_LOST = "lost"  # its experiment ended without shipping it
OUTCOME_TESTING = "testing"  # in an experiment that is running or queued
OUTCOME_UNTESTED = "untested"  # a candidate no experiment has used yet
OUTCOME_STOPPED = "stopped"  # its experiment was stopped or paused without a verdict


@dataclass(frozen=True)
class TriedVersion:
    """One version of the prompt and what is known about it."""

    version: str
    template: str
    source: str = "offline"
    parent_version: str | None = None
    outcome: str = OUTCOME_UNTESTED
    experiment_id: str | None = None
    control_version: str | None = None  # the control it was measured against
    rate: float | None = None  # its positive rate (or mean stars) in that experiment
    n: int = 0  # feedback behind `rate`
    lift: float | None = None  # relative lift against the control
    diff_ci: tuple[float, float] | None = None  # interval on the absolute difference against the control
    reason: str = ""  # why it was made (lineage)


@dataclass(frozen=True)
class RejectedProposal:
    reason: str
    rationale: str = ""
    preview: str = ""
    fingerprint: str | None = None


@dataclass(frozen=True)
class SearchHistory:
    """What a generator is told about a prompt's search so far."""

    prompt_name: str
    champion_version: str
    versions: tuple[TriedVersion, ...] = ()
    rejected: tuple[RejectedProposal, ...] = ()
    empty_generations: int = 0  # generations in a row for this champion that added no candidate

    def template_of(self, version: str | None) -> str | None:
        return next((v.template for v in self.versions if v.version == version), None)

    def known_fingerprints(self) -> set[str]:
        """Every proposal that must not come back: the versions that exist (any status) and the rejected."""
        return {fingerprint(v.template) for v in self.versions} | {
            r.fingerprint for r in self.rejected if r.fingerprint
        }

    def measured(self) -> list[TriedVersion]:
        """The versions with a verdict and a measured lift (the champion too, when it won its place)."""
        verdicts = (OUTCOME_WON, OUTCOME_LOST, OUTCOME_CHAMPION)
        return [v for v in self.versions if v.lift is not None and v.outcome in verdicts]


class VariantGenerator(Protocol):
    def generate(self, template: str, count: int, history: SearchHistory | None = None) -> GenerationResult: ...


# --------------------------------------------------------------------------------------------------------
# Offline: deterministic rewrites
# --------------------------------------------------------------------------------------------------------

# Style traits, in the order the offline generator tries them, with the cue a template carries once it has
# the trait (the router's offline provider honours the same cues, so users can tell the variants apart).
TRAITS: tuple[tuple[str, str, str], ...] = (
    ("bullets", "bullet", "format as bullet points, one per key indicator"),
    ("risk", "risk note", "add a risk note: what would make the signal wrong"),
    ("concise", "concise", "more concise"),
    ("plain", "plain language", "plain language for a beginner"),
)

_LEAD_DEFAULT = (
    "Explain in 3-4 sentences why the indicators support a {signal} signal for {ticker}. "
    "Mention the most important indicator first."
)
_LEADS = {
    frozenset(): _LEAD_DEFAULT,
    frozenset({"bullets"}): (
        "Answer with exactly 3 bullet points, one per key indicator (strongest first), each showing how it "
        "backs the {signal} call on {ticker}."
    ),
    frozenset({"concise"}): (
        "Be concise: two short sentences at most on what drives the {signal} call on {ticker}, strongest "
        "indicator first, no filler."
    ),
    frozenset({"bullets", "concise"}): (
        "Be concise: 3 terse bullet points of at most 12 words, one per key indicator, on why {ticker} is a {signal}."
    ),
}
_PLAIN = (
    "Use plain language a beginner understands: no jargon, and say in everyday words what each indicator "
    "means for the price."
)
_RISK = (
    "Close with a one-line risk note naming the main thing that would have to happen for this {signal} call "
    "to turn out wrong."
)


def traits_of(template: str) -> set[str]:
    low = template.lower()
    return {name for name, cue, _ in TRAITS if cue in low}


def _split(template: str) -> tuple[str, str]:
    """(data block up to and including the indicators, instructions after it)."""
    idx = template.find("{indicators}")
    if idx < 0:
        return template.rstrip() + "\n", ""
    end = template.find("\n", idx)
    if end < 0:
        return template + "\n", ""
    return template[: end + 1], template[end + 1 :].strip()


def render_with_traits(template: str, traits: set[str]) -> str:
    """The template with its instructions rewritten for these style traits (the data block is kept)."""
    head, _ = _split(template)
    parts = [_LEADS[frozenset(traits & {"bullets", "concise"})]]
    if "plain" in traits:
        parts.append(_PLAIN)
    if "risk" in traits:
        parts.append(_RISK)
    return head + "\n" + " ".join(parts)


TRAIT_NAMES: tuple[str, ...] = tuple(name for name, _, _ in TRAITS)
_TRAIT_LABEL = {"bullets": "bullet points", "risk": "a risk note", "concise": "more concise", "plain": "plain language"}


@dataclass(frozen=True)
class TraitEvidence:
    """What the history says about each trait: its mean relative lift where it was added on its own to the
    control it was measured against (or shared among the traits added together), and the traits that
    clearly hurt (added alone, the interval of the difference lies entirely below zero)."""

    score: dict[str, float] = field(default_factory=dict)
    tests: dict[str, int] = field(default_factory=dict)
    harmful: frozenset[str] = frozenset()


def trait_evidence(history: SearchHistory) -> TraitEvidence:
    sums: dict[str, float] = {}
    tests: dict[str, int] = {}
    harmful: set[str] = set()
    for v in history.measured():
        control = history.template_of(v.control_version)
        if control is None or v.lift is None:
            continue
        added = traits_of(v.template) - traits_of(control)
        for t in added:
            sums[t] = sums.get(t, 0.0) + v.lift / len(added)
            tests[t] = tests.get(t, 0) + 1
        if len(added) == 1 and v.diff_ci is not None and v.diff_ci[1] < 0:
            harmful |= added
    return TraitEvidence({t: sums[t] / tests[t] for t in sums}, tests, frozenset(harmful))


def _label(traits: Iterable[str]) -> str:
    return " + ".join(_TRAIT_LABEL[t] for t in TRAIT_NAMES if t in set(traits)) or "no style trait"


class OfflineGenerator:
    """Rewrites the champion with style traits (bullet points, a risk note, more concise, plain language).
    Free, deterministic, needs no key.

    With a history (`remember=True`, the default) it walks every combination of traits the champion does not
    have yet: pairs of traits already tried alone first, then the untried single traits, then the larger
    combinations, each level ranked by the traits' measured lifts (then in the order above). Pairs go before a
    new trait because a pair worth something only together cannot be seen in its traits alone, and the pairs
    of what was tried are few (three after a first round of three): a new trait waits one round for them.
    It skips every combination a version already has or
    a rejected proposal had, and every one containing a trait that clearly hurt on its own. A trait is
    combined only once it has been tried alone. When none is left, the result is `exhausted`.
    `remember=False` is the generator as it was before it had a memory (one trait per variant in a fixed
    order, whatever was tried): bench/search_loop.py runs it as "today's loop"."""

    source = "offline"

    def __init__(self, *, remember: bool = True) -> None:
        self.remember = remember

    def plan(self, template: str, history: SearchHistory | None, *, waiting: bool = False) -> list[Candidate]:
        """The proposals open now for this champion, best first (`waiting`: also the combinations that wait
        for one of their traits to be tried alone)."""
        have = frozenset(traits_of(template))
        if not self.remember or history is None:
            return [
                Candidate(render_with_traits(template, set(have | {name})), why)
                for name, _, why in TRAITS
                if name not in have
            ]
        taken = {frozenset(traits_of(v.template)) for v in history.versions}
        known = history.known_fingerprints()
        evidence = trait_evidence(history)
        remaining = [t for t in TRAIT_NAMES if t not in have and t not in evidence.harmful]

        def open_(traits: frozenset[str]) -> bool:
            return traits not in taken and fingerprint(render_with_traits(template, set(traits))) not in known

        # A trait whose single step from the champion is still untried is tried alone before it is combined.
        pending = {t for t in remaining if open_(have | {t})}
        options: list[tuple[int, float, int, frozenset[str], str]] = []
        for size in range(1, len(remaining) + 1):
            for order, combo in enumerate(itertools.combinations(remaining, size)):
                traits = have | frozenset(combo)
                if not open_(traits) or (size > 1 and not waiting and pending & set(combo)):
                    continue
                candidate = render_with_traits(template, set(traits))
                score = sum(evidence.score.get(t, 0.0) for t in combo)
                options.append((size, -score, order, frozenset(combo), candidate))
        # pairs of traits tried alone, then untried single traits, then larger combinations
        options.sort(key=lambda o: (o[0] if o[0] != 1 else 2.5, o[1], o[2]))
        out = []
        for size, _, _, added, candidate in options:
            measured = [
                f"{_TRAIT_LABEL[t]} {evidence.score[t]:+.1%}" for t in TRAIT_NAMES if t in evidence.score and t in added
            ]
            if size == 1 and not measured:
                why = f"add {_label(added)} (not tried yet)"
            elif size == 1:
                why = f"add {_label(added)} to the new champion (measured before: {', '.join(measured)})"
            else:
                why = f"combine {_label(added)}" + (f" (measured alone: {', '.join(measured)})" if measured else "")
            out.append(Candidate(candidate, why))
        return out

    def remaining(self, template: str, history: SearchHistory | None) -> int | None:
        """How many combinations are left to try (None: unknown, e.g. without a memory)."""
        return len(self.plan(template, history, waiting=True)) if self.remember and history is not None else None

    def generate(self, template: str, count: int, history: SearchHistory | None = None) -> GenerationResult:
        plan = self.plan(template, history)
        note = ""
        exhausted = self.remember and history is not None and not plan
        if exhausted:
            assert history is not None
            evidence = trait_evidence(history)
            skipped = f"; left out as clearly harmful: {_label(evidence.harmful)}" if evidence.harmful else ""
            note = (
                f"every combination of style traits on top of the champion {history.champion_version} "
                f"({_label(traits_of(template))}) has been tried{skipped}"
            )
        elif plan:
            left = len(self.plan(template, history, waiting=True)) if self.remember and history else len(plan)
            note = f"{left} combinations left to try; proposing {min(count, len(plan))}"
        return GenerationResult(
            source=self.source,
            model="offline/rewriter-v2" if self.remember else "offline/rewriter-v1",
            candidates=tuple(plan[:count]),
            exhausted=exhausted,
            note=note,
        )


# --------------------------------------------------------------------------------------------------------
# OpenAI: the plan's meta-prompt
# --------------------------------------------------------------------------------------------------------

META_SYSTEM = (
    "You improve prompt templates for an assistant that explains trading signals (BUY/SELL/HOLD) to retail "
    "investors. You answer with JSON only."
)
META_USER = (
    "Here is the current prompt template, between the markers:\n<<<\n{template}\n>>>\n\n"
    "Generate {count} variants of this prompt template that are clearer or more concise, each trying a "
    "different idea (for example bullet points, a short risk note, plain language, a tighter length limit). "
    "Every variant must keep the placeholders {{ticker}}, {{signal}} and {{indicators}} exactly as written, "
    "use no other curly-brace placeholders, and stay under {max_chars} characters.\n"
    'Answer as JSON: {{"variants": [{{"template": "...", "rationale": "one line: what changed and why"}}]}}'
)
META_HISTORY = (
    "\n\nWhat has been tried on this prompt so far, with how users rated it (thumbs-up rate; lift is relative "
    "to the control of the experiment it ran in). Build on what scored best, avoid what lost, and do not "
    "propose any of these templates again, nor anything close to them:\n{history}"
)
HISTORY_TOP = 3  # best versions shown in full
HISTORY_LOST = 6  # latest losers shown
HISTORY_REJECTED = 5  # latest rejected proposals shown
HISTORY_SNIPPET = 300  # characters of a losing or rejected template shown


def _score(v: TriedVersion) -> str:
    parts = []
    if v.rate is not None:
        parts.append(f"rate {v.rate:.1%} over {v.n} votes")
    if v.lift is not None:
        parts.append(f"lift {v.lift:+.1%} vs {v.control_version}")
    if v.diff_ci is not None:
        parts.append(f"interval of the difference [{v.diff_ci[0]:+.3f}, {v.diff_ci[1]:+.3f}]")
    return "; ".join(parts) or "not measured yet"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def history_text(history: SearchHistory) -> str:
    """The history section of the meta-prompt: the champion and the best measured versions in full (OPRO
    shows earlier prompts with their scores), then what lost and what the guardrails rejected, shortened."""
    lines: list[str] = []
    champion = next((v for v in history.versions if v.version == history.champion_version), None)
    ranked = sorted(history.measured(), key=lambda v: v.lift if v.lift is not None else 0.0, reverse=True)
    top = ([champion] if champion else []) + [v for v in ranked if v.outcome == OUTCOME_WON and v is not champion]
    if top:
        lines.append("Best versions (the current champion first):")
        for v in top[:HISTORY_TOP]:
            tag = "current champion" if v.version == history.champion_version else "won"
            lines.append(f"- {v.version} ({tag}; {_score(v)}):\n<<<\n{v.template}\n>>>")
    lost = [v for v in ranked if v.outcome == OUTCOME_LOST]
    if lost:
        lines.append("Versions that lost (did not beat their control):")
        lines += [f"- {v.version} ({_score(v)}): {_one_line(v.template, HISTORY_SNIPPET)}" for v in lost[:HISTORY_LOST]]
    if history.rejected:
        lines.append("Proposals rejected by the guardrails, and why:")
        lines += [
            f"- {_one_line(r.reason, 160)}: {_one_line(r.preview, HISTORY_SNIPPET)}"
            for r in history.rejected[:HISTORY_REJECTED]
        ]
    return "\n".join(lines)


# USD per 1M tokens (input, output); unknown models are priced like gpt-4o-mini.
PRICES_PER_M: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}


def price_usd(model: str, tokens_in: int, tokens_out: int) -> float:
    p_in, p_out = PRICES_PER_M.get(model, PRICES_PER_M["gpt-4o-mini"])
    return (tokens_in * p_in + tokens_out * p_out) / 1_000_000


def parse_variants(content: str) -> list[Candidate]:
    """Read the model's answer: the JSON asked for, or JSON inside a code fence."""
    text = content.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fence:
        text = fence.group(1).strip()
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GenerationFailed(f"the generator's answer is not JSON: {exc}") from exc
    items = data.get("variants") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise GenerationFailed("the generator's answer has no list of variants")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(Candidate(item, "generated"))
        elif isinstance(item, dict) and isinstance(item.get("template"), str):
            out.append(Candidate(item["template"], str(item.get("rationale") or "generated")[:300]))
    return out


class OpenAIGenerator:
    source = "openai"

    def __init__(
        self, api_key: str, *, model: str, base_url: str | None = None, timeout_s: float = 60.0, max_chars: int = 2000
    ) -> None:
        self.api_key = api_key
        self.model = model
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_chars = max_chars

    def remaining(self, template: str, history: SearchHistory | None) -> int | None:
        return None  # a language model's space has no end to count down; the search's patience decides

    def generate(self, template: str, count: int, history: SearchHistory | None = None) -> GenerationResult:
        import openai  # the only place the optimizer touches the OpenAI SDK

        from shared.answers import AnswerCut, answer_cut, bounded_http_client

        user = META_USER.format(template=template, count=count, max_chars=self.max_chars)
        past = history_text(history) if history is not None else ""
        if past:
            user += META_HISTORY.format(history=past)

        client = openai.OpenAI(
            api_key=self.api_key,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=1,
            http_client=bounded_http_client(openai, self.timeout_s),  # the whole answer within the timeout
        )
        try:
            response = client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": META_SYSTEM},
                    {"role": "user", "content": user},
                ],
                response_format={"type": "json_object"},
                temperature=0.8,
            )
        except Exception as exc:
            reason = answer_cut(exc) or exc  # an answer too slow or too large, or whatever the SDK raised
            if not isinstance(reason, openai.OpenAIError | AnswerCut):
                raise
            raise GenerationFailed(f"OpenAI variant generation failed: {type(reason).__name__}: {reason}") from exc
        finally:
            client.close()
        usage = response.usage
        tokens_in = int(usage.prompt_tokens) if usage else 0
        tokens_out = int(usage.completion_tokens) if usage else 0
        content = response.choices[0].message.content or "" if response.choices else ""
        return GenerationResult(
            source=self.source,
            model=self.model,
            candidates=tuple(parse_variants(content)[:count]),
            cost_usd=price_usd(self.model, tokens_in, tokens_out),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )


def make_generator(settings: OptimizerSettings) -> VariantGenerator:
    """OpenAI when OPENAI_API_KEY is set, the offline rewriter otherwise."""
    if settings.has_openai():
        assert settings.openai_api_key is not None
        return OpenAIGenerator(
            settings.openai_api_key.get_secret_value(),
            model=settings.generation_model,
            base_url=settings.openai_base_url,
            timeout_s=settings.generation_timeout_s,
            max_chars=settings.max_variant_chars,
        )
    return OfflineGenerator()
