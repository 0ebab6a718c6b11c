"""The finetune service's training edge: LoRA SFT / KTO / DPO on a local base model with TRL.

One of the only three modules in the project that touch torch / transformers / peft / trl (with ``tinymodel`` and
``serving``). They are imported lazily inside functions, so ``import services.finetune.training`` stays cheap for
the finetune API process; only ``train`` and ``evaluate_likelihood`` pay for them.

Row formats are exactly what the export produces:

- SFT: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``
- KTO: ``{"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}], "label": True|False}``
- DPO: ``{"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}``

The sequence length comes from the data: the longest row (prompt + completion, in tokens of the base model's chat
template) sets ``max_length``, so no completion is cut; rows longer than ``max_seq_length`` (the ceiling, also
bounded by the model's context) are left out and counted (``rows_too_long``), never truncated. LoRA targets every
linear layer by default (``all-linear``: works for fused-QKV models too), with a rank the serving engine covers
(``domain.MAX_SERVED_LORA_RANK``, vLLM's ``--max-lora-rank``). The ``Recipe`` and its checks live in the finetune
domain (``services.finetune.domain``); this module runs one.

SFT rows are turned into conversational prompt / completion pairs (everything before the last assistant turn is the
prompt), so the loss is computed on the explanation only, whatever the base model's chat template looks like.

The plan's top risk is overfitting to feedback noise, so every run evaluates the held-out rows before training and
every ``eval_every_steps``, stops when the validation loss has not improved for ``early_stopping_patience``
evaluations, and keeps the adapter from the best evaluation. The adapter is written to a temporary directory beside
``output_dir`` and renamed into place at the end, so a cancelled, failed or killed run never leaves a half-written
adapter at ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import Trainer

from services.finetune.domain import Recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
RUN_FILE = "training_run.json"  # recipe + metrics, written beside the adapter weights

ProgressFn = Callable[[float, dict], None]
CancelFn = Callable[[], bool]


class TrainingCancelled(Exception):
    """should_cancel() returned True; no adapter was left at output_dir."""


class TrainingInputError(ValueError):
    """Bad inputs (base model, rows, recipe, output dir), raised before any training starts."""


@dataclass(frozen=True)
class TrainResult:
    adapter_path: str
    recipe: dict
    # train_loss_first, train_loss_last, eval_loss_first, eval_loss_best, eval_loss_last, best_step, improved,
    # steps, stopped_early, train_losses, eval_losses ([step, loss] pairs), device, dtype, seconds, train_tokens,
    # tokens_per_s, train_rows, eval_rows, method, torch (+ peak_memory_bytes on CUDA)
    metrics: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Validation (pure Python: no heavy imports, raised before anything is loaded)


def validate_base_model(path: str) -> None:
    """Raise TrainingInputError unless ``path`` is a local Hugging Face model directory with a tokenizer."""
    p = Path(path)
    if not str(path) or not p.exists():
        raise TrainingInputError(f"base model path {path!r} does not exist")
    if not p.is_dir():
        raise TrainingInputError(f"base model path {path!r} is not a directory")
    if not (p / "config.json").is_file():
        raise TrainingInputError(f"base model path {path!r} has no config.json")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise TrainingInputError(f"base model path {path!r}: tokenizer missing (none of {', '.join(TOKENIZER_FILES)})")


def _check_messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise TrainingInputError(f"{where} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TrainingInputError(f"{where}[{i}] must be a dict with string 'role' and 'content'")
    return value


def split_row(row: Any, where: str = "row") -> tuple[list[dict], list[dict]]:
    """(prompt messages, completion messages) of an SFT or KTO row; TrainingInputError when malformed."""
    if not isinstance(row, dict):
        raise TrainingInputError(f"{where} must be a dict, got {type(row).__name__}")
    if "messages" in row:
        messages = _check_messages(row["messages"], f"{where}.messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise TrainingInputError(f"{where}.messages must end with an assistant message after a prompt")
        return messages[:-1], messages[-1:]
    if "prompt" in row and "completion" in row:
        return _check_messages(row["prompt"], f"{where}.prompt"), _check_messages(
            row["completion"], f"{where}.completion"
        )
    raise TrainingInputError(f"{where} needs 'messages' (SFT) or 'prompt' and 'completion' (KTO); has {sorted(row)}")


def dpo_parts(row: Any, where: str = "row") -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a DPO row; TrainingInputError when malformed."""
    if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= set(row):
        raise TrainingInputError(f"{where} is missing one of 'prompt', 'chosen', 'rejected' (DPO rows)")
    return (
        _check_messages(row["prompt"], f"{where}.prompt"),
        _check_messages(row["chosen"], f"{where}.chosen"),
        _check_messages(row["rejected"], f"{where}.rejected"),
    )


def validate_rows(rows: Any, method: str, name: str = "train_rows") -> None:
    """Raise TrainingInputError unless rows are a non-empty list in the format ``method`` trains on."""
    if not isinstance(rows, list) or not rows:
        raise TrainingInputError(f"{name} is empty: nothing to train or evaluate on")
    for i, row in enumerate(rows):
        where = f"{name}[{i}]"
        if method == "dpo":
            dpo_parts(row, where)
            continue
        if method == "sft":
            if not isinstance(row, dict) or "messages" not in row:
                raise TrainingInputError(f"{where} is missing 'messages' (SFT rows are {{'messages': [...]}})")
        elif not isinstance(row, dict) or not {"prompt", "completion", "label"} <= set(row):
            raise TrainingInputError(f"{where} is missing one of 'prompt', 'completion', 'label' (KTO rows)")
        elif not isinstance(row["label"], bool):
            raise TrainingInputError(f"{where}.label must be true or false, got {row['label']!r}")
        split_row(row, where)


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise TrainingInputError(f"output_dir {str(output_dir)!r} already exists and is not empty")
    parent = output_dir.parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise TrainingInputError(f"cannot write into {str(parent)!r}")


# --------------------------------------------------------------------------------------------------------------
# Training


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _device_and_dtype() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def _make_callback(
    recipe: Recipe,
    best_dir: Path,
    on_progress: ProgressFn | None,
    should_cancel: CancelFn | None,
):
    """A TrainerCallback that reports progress, honours cancellation, keeps the best adapter and stops early."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def __init__(self) -> None:
            self.train_losses: list[tuple[int, float]] = []
            self.eval_losses: list[tuple[int, float]] = []
            self.best: float = math.inf
            self.best_step: int | None = None
            self.bad_evals = 0
            self.stopped_early = False
            # inside trainer.train() but not training: evaluations and saving the best adapter
            self.eval_seconds = 0.0
            # (step, tokens seen so far, training seconds so far) at each training log: every step, and each log
            # waits for the step's loss, so the clock reads the step's end; evaluation time is taken out
            self.marks: list[tuple[int, int, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if should_cancel is not None and should_cancel():
                raise TrainingCancelled(f"training cancelled at step {state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.train_losses.append((state.global_step, float(logs["loss"])))
                now = time.perf_counter() - self.eval_seconds
                self.marks.append((state.global_step, int(logs.get("num_tokens", 0)), now))
                self._progress(state)

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            self.eval_seconds += float((metrics or {}).get("eval_runtime") or 0.0)
            loss = (metrics or {}).get("eval_loss")
            if loss is None or model is None:
                return
            loss = float(loss)
            self.eval_losses.append((state.global_step, loss))
            if loss < self.best - 1e-6:
                self.best, self.best_step, self.bad_evals = loss, state.global_step, 0
                started = time.perf_counter()
                model.save_pretrained(best_dir)
                self.eval_seconds += time.perf_counter() - started
            else:
                self.bad_evals += 1
                if self.bad_evals >= recipe.early_stopping_patience and state.global_step < state.max_steps:
                    self.stopped_early = True
                    control.should_training_stop = True
            self._progress(state)

        def _progress(self, state) -> None:
            if on_progress is None:
                return
            on_progress(
                min(1.0, state.global_step / max(1, state.max_steps)),
                {
                    "step": state.global_step,
                    "loss": self.train_losses[-1][1] if self.train_losses else None,
                    "eval_loss": self.eval_losses[-1][1] if self.eval_losses else None,
                },
            )

    return _Callback()


def _trainer_args(recipe: Recipe, device: str, dtype: Any, work_dir: Path, max_length: int) -> dict[str, Any]:
    """TrainingArguments shared by SFT, KTO and DPO, overriding TRL's GPU-minded defaults explicitly."""
    import torch

    cuda = device == "cuda"
    return {
        "output_dir": str(work_dir / "trainer"),
        "max_steps": recipe.max_steps,
        "per_device_train_batch_size": recipe.per_device_batch_size,
        "per_device_eval_batch_size": recipe.per_device_batch_size,
        "learning_rate": recipe.learning_rate,
        "max_length": max_length,
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": recipe.eval_every_steps,
        "eval_on_start": True,  # eval_loss_first is the base model's loss on the held-out rows
        "save_strategy": "no",  # the callback saves the best adapter itself: no optimizer-state checkpoints
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": not cuda,
        "bf16": cuda and dtype == torch.bfloat16,
        "fp16": cuda and dtype == torch.float16,
        "dataset_num_proc": None,
    }


def _checkpointing_arg(config_cls: type, enabled: bool) -> dict[str, bool]:
    """TRL turns gradient checkpointing on by default; set it explicitly under whichever name this version uses
    (transformers 5.2x renamed it ``activation_checkpointing`` and warns about the old name)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _sft_dataset(rows: list[dict]):
    from datasets import Dataset

    pairs = [split_row(r) for r in rows]
    return Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])


def _dpo_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([dict(zip(("prompt", "chosen", "rejected"), dpo_parts(r), strict=True)) for r in rows])


def row_lengths(tokenizer: Any, rows: list[dict], method: str) -> list[int]:
    """Tokens of each row as the trainer sees it: the chat template over prompt + completion (for DPO the longer
    of chosen and rejected)."""

    def n(messages: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    out = []
    for row in rows:
        if method == "dpo":
            prompt, chosen, rejected = dpo_parts(row)
            out.append(max(n(prompt + chosen), n(prompt + rejected)))
        else:
            prompt, completion = split_row(row)
            out.append(n(prompt + completion))
    return out


def fit_rows(tokenizer: Any, rows: list[dict], method: str, ceiling: int, name: str) -> tuple[list[dict], int, int]:
    """(the rows that fit in `ceiling` tokens, how many were left out, the longest kept length)."""
    lengths = row_lengths(tokenizer, rows, method)
    kept = [r for r, n in zip(rows, lengths, strict=True) if n <= ceiling]
    if not kept:
        raise TrainingInputError(
            f"every one of the {len(rows)} {name} is longer than {ceiling} tokens (max_seq_length / the context)"
        )
    return kept, len(rows) - len(kept), max(n for n in lengths if n <= ceiling)


def _kto_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])} for r in rows]
    )


def _trl_method(recipe: Recipe) -> tuple[Any, Any, Callable[[list[dict]], Any], dict[str, Any]]:
    """What differs between the recipe's methods: trl's config and trainer classes, the dataset builder, and the
    config arguments of that method alone."""
    if recipe.method == "sft":
        from trl import SFTConfig, SFTTrainer

        sft_args = {"packing": recipe.packing, "completion_only_loss": True, "shuffle_dataset": True}
        return SFTConfig, SFTTrainer, _sft_dataset, sft_args
    if recipe.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer, _dpo_dataset, {"beta": recipe.dpo_beta}
    from trl import KTOConfig, KTOTrainer

    return KTOConfig, KTOTrainer, _kto_dataset, {"beta": recipe.kto_beta}


def _load_tokenizer(base_model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise TrainingInputError(f"base model {base_model_path!r} has no chat template")
    return tokenizer


def train(
    base_model_path: str,
    train_rows: list[dict],
    eval_rows: list[dict],
    recipe: Recipe,
    output_dir: Path,
    *,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> TrainResult:
    """Train a LoRA adapter with ``recipe.method`` and leave the best one (by validation loss) at output_dir.

    Raises TrainingInputError before loading anything when the inputs are wrong, TrainingCancelled when
    ``should_cancel()`` turns true (checked after every step); in both cases nothing is left at output_dir.
    """
    if not isinstance(recipe, Recipe):
        raise TrainingInputError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    if problems := recipe.problems():
        raise TrainingInputError("bad recipe: " + "; ".join(problems))
    validate_base_model(base_model_path)
    validate_rows(train_rows, recipe.method, "train_rows")
    validate_rows(eval_rows, recipe.method, "eval_rows")
    output_dir = Path(output_dir)
    _check_output_dir(output_dir)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback, set_seed

    device, dtype = _device_and_dtype()
    set_seed(recipe.seed)
    tokenizer = _load_tokenizer(base_model_path)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    work_dir.mkdir()
    best_dir = work_dir / "adapter"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_model_path, dtype=dtype, attn_implementation=recipe.attn_implementation
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        context = int(getattr(model.config, "max_position_embeddings", 0) or recipe.max_seq_length)
        ceiling = min(recipe.max_seq_length, context)
        train_rows, train_too_long, train_longest = fit_rows(
            tokenizer, train_rows, recipe.method, ceiling, "train rows"
        )
        eval_rows, eval_too_long, eval_longest = fit_rows(tokenizer, eval_rows, recipe.method, ceiling, "eval rows")
        max_length = max(train_longest, eval_longest)
        targets = list(recipe.target_modules)
        peft_config = LoraConfig(
            r=recipe.lora_r,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        callback = _make_callback(recipe, best_dir, on_progress, should_cancel)
        common = _trainer_args(recipe, device, dtype, work_dir, max_length)
        trainer: Trainer  # SFT, DPO or KTO: trl's trainers share transformers' Trainer
        config_cls, trainer_cls, dataset, method_args = _trl_method(recipe)
        common |= _checkpointing_arg(config_cls, device == "cuda" and recipe.gradient_checkpointing)
        trainer = trainer_cls(
            model=model,
            args=config_cls(**common, **method_args),
            train_dataset=dataset(train_rows),
            eval_dataset=dataset(eval_rows),
            processing_class=tokenizer,
            peft_config=peft_config,  # DPO's reference model is the base: the adapter disabled
            callbacks=[callback],
        )

        trainer.remove_callback(PrinterCallback)  # tqdm is off; don't print every log dict to stdout
        started = time.perf_counter()
        trainer.train()
        last_eval_step = callback.eval_losses[-1][0] if callback.eval_losses else -1
        if last_eval_step != trainer.state.global_step:
            trainer.evaluate()  # the callback compares it with the best so far
        seconds = time.perf_counter() - started
        train_seconds = max(1e-9, seconds - callback.eval_seconds)

        if not best_dir.is_dir():
            raise RuntimeError("training finished without any evaluation: no adapter was saved")
        train_tokens = max((int(h.get("num_tokens", 0)) for h in trainer.state.log_history), default=0)
        metrics = {
            "method": recipe.method,
            "train_loss_first": callback.train_losses[0][1] if callback.train_losses else None,
            "train_loss_last": callback.train_losses[-1][1] if callback.train_losses else None,
            "eval_loss_first": callback.eval_losses[0][1],
            "eval_loss_best": callback.best,
            "eval_loss_last": callback.eval_losses[-1][1],
            "best_step": callback.best_step,
            # False when no evaluation beat the untrained adapter (step 0): the kept adapter is then a no-op.
            "improved": callback.best < callback.eval_losses[0][1],
            "steps": trainer.state.global_step,
            "stopped_early": callback.stopped_early,
            "train_losses": [loss for _, loss in callback.train_losses],
            "eval_losses": [[step, loss] for step, loss in callback.eval_losses],
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(seconds, 3),
            "eval_seconds": round(callback.eval_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "train_tokens": train_tokens,
            "tokens_per_s": round(train_tokens / seconds, 1) if seconds > 0 else None,
            "train_tokens_per_s": round(train_tokens / train_seconds, 1),  # without evaluation time
            "steady_tokens_per_s": steady_rate(callback.marks),
            "activation_checkpointing": _checkpointing_on(trainer.model),
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "max_length": max_length,
            "rows_too_long": train_too_long + eval_too_long,
            "torch": torch.__version__,
        }
        if device == "cuda":
            metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        (best_dir / RUN_FILE).write_text(json.dumps({"recipe": recipe.to_dict(), "metrics": metrics}, indent=2))
        if hasattr(trainer, "accelerator"):
            trainer.accelerator.free_memory()
        del trainer, model
        if output_dir.exists():
            output_dir.rmdir()  # checked empty above
        os.replace(best_dir, output_dir)  # atomic on one filesystem
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        _free_memory()
    return TrainResult(adapter_path=str(output_dir), recipe=recipe.to_dict(), metrics=metrics)


def steady_rate(marks: list[tuple[int, int, float]]) -> float | None:
    """Tokens/s from the end of the first third of the steps (at least 2) to the last: the first steps also pay
    for loading kernels and warming the allocator. None with fewer than 4 marks."""
    if len(marks) < 4:
        return None
    start = max(2, len(marks) // 3) - 1
    (_, tokens0, t0), (_, tokens1, t1) = marks[start], marks[-1]
    return round((tokens1 - tokens0) / (t1 - t0), 1) if t1 > t0 and tokens1 > tokens0 else None


def _checkpointing_on(model: Any) -> bool | None:
    """Whether the trained model recomputed activations (TRL turns it on unless told not to)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return bool(getattr(model, name))
        except AttributeError:
            continue
    return None


def _free_memory() -> None:
    """What a finished (or failed) run held goes back: Python objects, then the CUDA cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Offline evaluation


def _encode_pair(tokenizer, prompt: list[dict], completion: list[dict], max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion and the index where the completion starts."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    completion_text = full_text[len(prompt_text) :] if full_text.startswith(prompt_text) else full_text
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[-max_length:]
    return ids, max(1, len(ids) - len(c_ids))


def evaluate_likelihood(
    base_model_path: str,
    adapter_path: str | None,
    good_rows: list[dict],
    bad_rows: list[dict],
    *,
    max_length: int = 1024,
) -> dict[str, Any]:
    """Mean per-token log-likelihood of good (top-rated) vs bad (low-rated) completions.

    Rows may be SFT rows (the last assistant message is the completion) or KTO rows. The means are token-weighted
    over all completion tokens of each group; ``margin = good_ll - bad_ll`` (higher is better: a model that learned
    from feedback should prefer good explanations). A group with no rows gives None.
    """
    validate_base_model(base_model_path)
    if adapter_path is not None and not (Path(adapter_path) / "adapter_config.json").is_file():
        raise TrainingInputError(f"adapter path {adapter_path!r} has no adapter_config.json")
    if not good_rows and not bad_rows:
        raise TrainingInputError("good_rows and bad_rows are both empty")
    good = [split_row(r, f"good_rows[{i}]") for i, r in enumerate(good_rows)]
    bad = [split_row(r, f"bad_rows[{i}]") for i, r in enumerate(bad_rows)]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    device, dtype = _device_and_dtype()
    tokenizer = _load_tokenizer(base_model_path)
    # Any: with an adapter the model is a PeftModel; transformers types `to` through a decorator mypy misreads
    model: Any = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    model.to(device).eval()

    def mean_ll(pairs: list[tuple[list[dict], list[dict]]]) -> tuple[float | None, int]:
        total, count = 0.0, 0
        for prompt, completion in pairs:
            ids, start = _encode_pair(tokenizer, prompt, completion, max_length)
            x = torch.tensor([ids], device=device)
            with torch.inference_mode():
                logits = model(input_ids=x).logits.float()
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            target = x[0, 1:]
            token_ll = logp.gather(-1, target[:, None])[:, 0][start - 1 :]
            total += float(token_ll.sum())
            count += int(token_ll.numel())
        return (total / count if count else None), count

    good_ll, good_tokens = mean_ll(good)
    bad_ll, bad_tokens = mean_ll(bad)
    margin = good_ll - bad_ll if good_ll is not None and bad_ll is not None else None
    return {
        "good_ll": good_ll,
        "bad_ll": bad_ll,
        "margin": margin,
        "good_rows": len(good),
        "bad_rows": len(bad),
        "good_tokens": good_tokens,
        "bad_tokens": bad_tokens,
        "adapter_path": adapter_path,
    }
