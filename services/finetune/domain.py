"""Fine-tuning rules, free of any framework: which explanations become training rows, in which format and
split, and the life of a job.

Export rules
- Only explanations with feedback are exported; votes of an erased session are never used (the session key is
  remembered, so a vote of that session that arrives later is ignored too).
- One vote per feedback id (a replaced vote counts once; the newer wins, handled by the store).
- Not trained on: explanations written by the offline template writer (models starting with one of
  ``exclude_model_prefixes``) and, with ``exclude_fallback``, those a fallback model wrote in place of the one
  assigned: the model would learn from text it did not write.
- Deduplicated BEFORE scrubbing: explanations with the same raw prompt and text are one example, with their votes
  pooled; its id is the smallest explanation id of the group. (Scrubbing first merged different explanations that
  only differed in what the scrubber replaced.)
- Held-out split: deterministic by a hash of the request key (``heldout_percent`` of requests): every example of one
  request, so every copy of one prompt, is on one side, and a new duplicate never moves an example. A held-out
  example never enters a training row of any format, and DPO pairs are built within one request, so one split.
- Every row carries the system message the router sends when serving (shared.serving.SYSTEM_MESSAGE).
- SFT: examples whose top votes (stars >= ``sft_min_stars``; a thumbs up without stars when
  ``sft_accept_thumbs_up``) outnumber their thumbs down.
- KTO: unpaired rows labelled by the net thumbs (up > down: True; down > up: False; ties left out).
- DPO: per request (``request_key``), the best-rated positive example is chosen and the worst-rated negative
  one rejected (one pair per request); the prompt is the chosen example's.
- PII is scrubbed from prompts and completions (the prompt carries the caller's context).

The recipe
- `Recipe`: the hyper-parameters a job trains with, stored with the job and the run; `Recipe.problems()` says what
  is wrong with them (checked when the job is started, before any data or model is loaded). The training edge
  (training.py) only runs a recipe it is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from shared.clock import as_utc
from shared.contracts import derived_id
from shared.serving import SYSTEM_MESSAGE

Format = Literal["sft", "kto", "dpo"]
Split = Literal["train", "heldout"]
FORMATS: tuple[str, ...] = ("sft", "kto", "dpo")
SPLITS: tuple[str, ...] = ("train", "heldout")

# Job states
QUEUED, EXPORTING, TRAINING, EVALUATING = "queued", "exporting", "training", "evaluating"
REGISTERED, FAILED, CANCELLED = "registered", "failed", "cancelled"
ACTIVE_STATES = frozenset({EXPORTING, TRAINING, EVALUATING})
TERMINAL_STATES = frozenset({REGISTERED, FAILED, CANCELLED})
WORKER_LOST = "worker lost"


@dataclass(frozen=True)
class Vote:
    feedback_id: str
    session_key: str
    rating: int  # 1 or -1
    stars: int | None = None


@dataclass(frozen=True)
class Explanation:
    explanation_id: str
    request_key: str
    prompt_text: str
    text: str
    votes: tuple[Vote, ...] = ()
    model: str = ""
    fallback_used: bool = False


@dataclass(frozen=True)
class ExportRules:
    sft_min_stars: int = 5
    sft_accept_thumbs_up: bool = True
    heldout_percent: int = 10
    exclude_model_prefixes: tuple[str, ...] = ("offline/",)
    exclude_fallback: bool = True

    def excluded(self, e: Explanation) -> bool:
        return (self.exclude_fallback and e.fallback_used) or any(
            e.model.startswith(p) for p in self.exclude_model_prefixes if p
        )


@dataclass(frozen=True)
class Example:
    """One deduplicated, scrubbed explanation with the usable votes of every copy of it."""

    example_id: str
    request_key: str
    prompt: str
    completion: str
    votes: tuple[Vote, ...]

    @property
    def ups(self) -> int:
        return sum(1 for v in self.votes if v.rating == 1)

    @property
    def downs(self) -> int:
        return sum(1 for v in self.votes if v.rating == -1)

    @property
    def mean_stars(self) -> float:
        stars = [v.stars for v in self.votes if v.stars is not None]
        return sum(stars) / len(stars) if stars else 0.0

    @property
    def label(self) -> bool | None:
        """Net thumbs: True (more up), False (more down), None (tie)."""
        if self.ups == self.downs:
            return None
        return self.ups > self.downs


@dataclass(frozen=True)
class Export:
    format: str
    split: str
    rows: list[dict[str, Any]]
    feedback_ids: frozenset[str] = field(default_factory=frozenset)
    example_ids: tuple[str, ...] = ()


def is_heldout(request_key: str, percent: int) -> bool:
    """Deterministic split by request: the first 8 bytes of sha256(key) modulo 100 below `percent` are held out."""
    digest = hashlib.sha256(request_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def is_top_vote(vote: Vote, rules: ExportRules) -> bool:
    if vote.rating != 1:
        return False
    if vote.stars is not None:
        return vote.stars >= rules.sft_min_stars
    return rules.sft_accept_thumbs_up


def examples(
    explanations: Iterable[Explanation],
    erased_sessions: frozenset[str] | set[str],
    scrub: Callable[[str], str],
    rules: ExportRules | None = None,
) -> list[Example]:
    """Drop excluded explanations and votes of erased sessions, merge copies of the same raw (prompt, text), then
    scrub; only examples with at least one usable vote are kept. Sorted by id, so every export is deterministic."""
    rules = rules or ExportRules()
    groups: dict[tuple[str, str], list[tuple[Explanation, list[Vote]]]] = {}
    for e in explanations:
        if rules.excluded(e):
            continue
        votes = [v for v in e.votes if v.session_key not in erased_sessions]
        if not votes:
            continue
        key = (e.prompt_text.strip(), e.text.strip())
        if not key[0] or not key[1]:
            continue
        groups.setdefault(key, []).append((e, votes))
    out = []
    for (raw_prompt, raw_completion), members in groups.items():
        prompt, completion = scrub(raw_prompt).strip(), scrub(raw_completion).strip()
        if not prompt or not completion:
            continue
        first = min(members, key=lambda m: m[0].explanation_id)[0]
        seen: dict[str, Vote] = {}
        for _, votes in members:
            for v in votes:
                seen[v.feedback_id] = v
        out.append(
            Example(
                example_id=first.explanation_id,
                request_key=first.request_key,
                prompt=prompt,
                completion=completion,
                votes=tuple(sorted(seen.values(), key=lambda v: v.feedback_id)),
            )
        )
    return sorted(out, key=lambda x: x.example_id)


def in_split(ex: Example, split: str, rules: ExportRules) -> bool:
    return is_heldout(ex.request_key, rules.heldout_percent) == (split == "heldout")


def qualifies_for_sft(ex: Example, rules: ExportRules) -> bool:
    top = sum(1 for v in ex.votes if is_top_vote(v, rules))
    return top >= 1 and top > ex.downs


def _user(content: str) -> list[dict[str, str]]:
    """The prompt as the router sends it: its system message, then the rendered prompt."""
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": content}]


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def sft_row(ex: Example) -> dict[str, Any]:
    return {"messages": [*_user(ex.prompt), *_assistant(ex.completion)]}


def kto_row(ex: Example, label: bool) -> dict[str, Any]:
    return {"prompt": _user(ex.prompt), "completion": _assistant(ex.completion), "label": label}


def dpo_row(chosen: Example, rejected: Example) -> dict[str, Any]:
    return {
        "prompt": _user(chosen.prompt),
        "chosen": _assistant(chosen.completion),
        "rejected": _assistant(rejected.completion),
    }


def _rank(ex: Example) -> tuple[int, float, str]:
    return (ex.ups - ex.downs, ex.mean_stars, ex.example_id)


def build_export(pool: list[Example], fmt: str, split: str, rules: ExportRules) -> Export:
    """The rows of one format and split, with the feedback ids that went into them."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    part = [ex for ex in pool if in_split(ex, split, rules)]
    used: list[Example] = []
    rows: list[dict[str, Any]] = []
    if fmt == "sft":
        used = [ex for ex in part if qualifies_for_sft(ex, rules)]
        rows = [sft_row(ex) for ex in used]
    elif fmt == "kto":
        for ex in part:
            label = ex.label
            if label is not None:
                used.append(ex)
                rows.append(kto_row(ex, label))
    else:
        by_request: dict[str, list[Example]] = {}
        for ex in part:
            by_request.setdefault(ex.request_key, []).append(ex)
        for request_key in sorted(by_request):
            group = by_request[request_key]
            positives = [ex for ex in group if ex.label is True]
            negatives = [ex for ex in group if ex.label is False]
            if not positives or not negatives:
                continue
            chosen = max(positives, key=_rank)
            rejected = min(negatives, key=_rank)
            if chosen.completion == rejected.completion:
                continue
            used += [chosen, rejected]
            rows.append(dpo_row(chosen, rejected))
    return Export(
        format=fmt,
        split=split,
        rows=rows,
        feedback_ids=frozenset(v.feedback_id for ex in used for v in ex.votes),
        example_ids=tuple(ex.example_id for ex in used),
    )


def evaluation_rows(pool: list[Example], rules: ExportRules) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Held-out (good, bad) rows for the offline comparison: top-rated vs net-negative explanations."""
    heldout = [ex for ex in pool if in_split(ex, "heldout", rules)]
    good = [sft_row(ex) for ex in heldout if qualifies_for_sft(ex, rules)]
    bad = [sft_row(ex) for ex in heldout if ex.label is False]
    return good, bad


def enough_data_problem(method: str, train_rows: int, heldout_rows: int, min_examples: int) -> str | None:
    """Why a job may not start with this much data (None when it may)."""
    if train_rows == 0:
        return f"empty export: no {method.upper()} training rows (no explanation with qualifying feedback yet)"
    if train_rows < min_examples:
        return (
            f"too little data: {train_rows} {method.upper()} training examples, at least {min_examples} needed "
            "(FINETUNE_MIN_EXAMPLES or min_examples)"
        )
    if heldout_rows == 0:
        return f"empty export: the held-out split has no {method.upper()} rows to validate on"
    return None


def heartbeat_stale(heartbeat_at: datetime | None, now: datetime, timeout_s: float) -> bool:
    if heartbeat_at is None:
        return True
    return (as_utc(now) - as_utc(heartbeat_at)).total_seconds() > timeout_s


def model_id_for(job_id: str) -> str:
    return "ft-" + derived_id("finetune.model", job_id).hex[:12]


def model_name(model_id: str) -> str:
    """The system-wide name; the serving engine knows it by shared.serving.served_name(name) == model_id."""
    return f"local/{model_id}"


def beats_base(metrics: dict[str, Any]) -> bool | None:
    """Did the tuned adapter beat its base model on the held-out rows? The preference margin (good minus bad
    completion log-likelihood) when both kinds of held-out rows exist, else the likelihood of the good ones,
    else the held-out loss. None when nothing was measured."""
    for key in ("offline_margin_gain", "offline_good_ll_gain"):
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value > 0
    improved = metrics.get("improved")
    return improved if isinstance(improved, bool) else None


# Model statuses in the registry
MODEL_REGISTERED = "registered"  # beat its base: announced (ModelRegistered), served, tested live
MODEL_BELOW_BASE = "below_base"  # did not beat its base: kept, not served, not tested unless an operator forces it
MODEL_WITHDRAWN = "withdrawn"  # trained on an erased session's data: never served or tested again
MODEL_STATUSES = (MODEL_REGISTERED, MODEL_BELOW_BASE, MODEL_WITHDRAWN)


def cost_per_explanation(cost_per_1k_tokens_usd: float, mean_tokens: float) -> float:
    return cost_per_1k_tokens_usd * mean_tokens / 1000.0


def float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics (bools and None dropped) for the ModelRegistered event."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------------------------
# The fine-tuning recipe: the hyper-parameters a job trains with, and what is wrong with them

#: The highest LoRA rank the serving engine is started for (vLLM --max-lora-rank in docker-compose.yml); a recipe
#: above it would train an adapter that vLLM refuses to load.
MAX_SERVED_LORA_RANK = 64
MAX_RECIPE_INT = 1_000_000  # far above any sane rank, step count or length; keeps 64-bit stores and torch happy


@dataclass(frozen=True)
class Recipe:
    """Frozen hyper-parameters stored with each run (``to_dict`` / ``from_dict`` round-trip through JSON)."""

    method: str = "sft"  # "sft" | "kto" | "dpo"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    learning_rate: float = 2e-4
    max_steps: int = 60
    per_device_batch_size: int = 4
    max_seq_length: int = 2048  # a ceiling: the length used is the longest row's; longer rows are left out
    eval_every_steps: int = 10
    early_stopping_patience: int = 3
    seed: int = 0
    # Additions (defaults keep the original interface):
    kto_beta: float = 0.1  # KTO: how far the policy may move from the reference (higher = less)
    dpo_beta: float = 0.1  # DPO: the same for DPO
    gradient_checkpointing: bool = False  # CUDA only; always off on CPU
    packing: bool = False  # SFT: pack rows into full sequences (padding-free; wants a varlen attention kernel)
    attn_implementation: str = "sdpa"  # "sdpa", "eager", or "flash_attention_2" where flash-attn is installed

    def __post_init__(self) -> None:
        # A list from JSON becomes a tuple, so the recipe stays hashable and frozen.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Build from a stored dict; unknown keys (from a newer version) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def problems(self) -> list[str]:
        """What is wrong with these hyper-parameters (empty when fine)."""
        out = []
        if self.method not in FORMATS:
            out.append(f"method must be one of {FORMATS}, got {self.method!r}")
        for name in ("lora_r", "lora_alpha", "max_steps", "per_device_batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every_steps < 1:
            out.append(f"eval_every_steps must be >= 1, got {self.eval_every_steps}")
        if self.early_stopping_patience < 1:
            out.append(f"early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            out.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.target_modules:
            out.append("target_modules must not be empty")
        for name in ("kto_beta", "dpo_beta"):
            # NaN would also be stored with the job and make every later read of it fail to serialise.
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                out.append(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.lora_r > MAX_SERVED_LORA_RANK:
            out.append(
                f"lora_r must be <= {MAX_SERVED_LORA_RANK} (the serving engine's --max-lora-rank), got {self.lora_r}"
            )
        if not 0 <= self.seed < 2**32:
            out.append(f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("lora_r", "lora_alpha", "max_steps", "per_device_batch_size", "max_seq_length"):
            if getattr(self, name) > MAX_RECIPE_INT:
                out.append(f"{name} must be <= {MAX_RECIPE_INT}, got {getattr(self, name)}")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
            out.append(
                f"attn_implementation must be sdpa, eager or flash_attention_2/3, got {self.attn_implementation!r}"
            )
        if self.packing and self.method != "sft":
            out.append("packing is for SFT only")
        if self.method == "kto" and self.per_device_batch_size < 2:
            # TRL estimates KTO's KL term from mismatched pairs inside a batch.
            out.append("KTO needs per_device_batch_size >= 2 (the KL term is estimated within a batch)")
        return out
