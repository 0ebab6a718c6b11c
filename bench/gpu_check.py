"""GPU check of the finetune edge: what a user would run, measured in one run, as JSON.

``python -m bench.gpu_check [--out FILE] [--tiny] [--budget-s 400]``

On CUDA (the default shape; ``--tiny`` for a smoke run, the default without CUDA):

1. a ~1.2B Llama-shaped random model (hidden 2048, 16 layers, 32 heads with 8 KV heads, intermediate 8192, vocab
   49152, untied embeddings) in bf16, saved like a real base model;
2. LoRA SFT through ``services.finetune.training.train`` (what a job runs: trl's SFTTrainer) with r=16 on every
   linear layer, batch 16 x ~512 tokens, 30 steps: tokens/s WITHOUT the evaluation time, model FLOPs utilisation
   against the device's bf16 peak, peak memory;
3. the same model, LoRA config, rows and batches in a plain PyTorch + peft loop, in the same run: the baseline
   (target: trl >= 0.9x of it);
4. KTO and DPO for a few steps each (seconds per step, loss first/last, peak memory);
5. the fallback server (``services.finetune.serving``) in-process: 8 sequential and 8 concurrent requests.

Model FLOPs per trained token (LoRA: frozen weights need no weight gradients):
``4 * N_linear + 6 * N_lora + 12 * layers * hidden * seq`` (forward 2N, backward to the activations 2N, LoRA
weights forward + both backward halves, attention scores and values forward + backward). MFU = tokens/s x that /
the device's dense bf16 peak (a table by device name; unknown devices get no MFU). The earlier plain-loop figure
on an H200 (about 36k tokens/s, ~20% of peak) is on this definition.

Each phase is skipped (and says so) once the time budget is spent, so the whole run ends in time (7 minutes on an
H100/H200 is the requirement; the default budget leaves margin). The GPU image lacks trl / datasets / fastapi:
they are installed from ``bench/wheels`` (``bench/fetch_gpu_wheels.sh``) with no index and no dependency
resolution, only where a distribution is missing or does not satisfy what the installed packages require.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "bench" / "wheels"
NEEDED = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "fastapi", "pydantic", "httpx")

SHAPES: dict[str, dict[str, Any]] = {
    "full": {
        "hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 49152,
        "batch": 16, "seq": 512, "steps": 30, "pref_steps": 4, "pref_batch": 8, "gen_tokens": 64, "requests": 8,
    },
    "tiny": {
        "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 256, "vocab": 512,
        "batch": 4, "seq": 96, "steps": 4, "pref_steps": 2, "pref_batch": 2, "gen_tokens": 4, "requests": 8,
    },
}  # fmt: skip

#: Dense bf16 tensor-core peak (FLOP/s, no sparsity) by a substring of torch.cuda.get_device_name().
BF16_PEAK = (
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165.2e12),
)


# --------------------------------------------------------------------------------------------------------------
# Dependencies from bench/wheels


def _missing_modules() -> list[str]:
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _wheel_meta(wheel: Path) -> tuple[str, str, list[str]]:
    """(distribution, version, Requires-Dist lines) read from the wheel itself."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    name = version = ""
    requires = []
    for line in text.splitlines():
        if line.startswith("Name: "):
            name = line[6:].strip()
        elif line.startswith("Version: "):
            version = line[9:].strip()
        elif line.startswith("Requires-Dist: "):
            requires.append(line[15:].strip())
        elif not line.strip():
            break
    return _norm(name), version, requires


def wheels_to_install(wheels: list[Path], installed: dict[str, str]) -> list[Path]:
    """The wheels to install: a distribution that is missing, or whose installed version does not satisfy a
    requirement of something being installed (or of the packages this check imports); repeated to a fixpoint."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    metas = {w: _wheel_meta(w) for w in wheels}
    by_name = {m[0]: w for w, m in metas.items()}
    chosen: set[Path] = {by_name[_norm(n)] for n in NEEDED if _norm(n) not in installed and _norm(n) in by_name}
    changed = True
    while changed:
        changed = False
        for w in list(chosen):
            for line in metas[w][2]:
                req = Requirement(line)
                if req.marker and not req.marker.evaluate({"extra": ""}):
                    continue
                name = _norm(req.name)
                if name not in by_name or by_name[name] in chosen:
                    continue
                have = installed.get(name)
                if have is None or Version(have) not in req.specifier:
                    chosen.add(by_name[name])
                    changed = True
    return sorted(chosen)


def ensure_dependencies() -> None:
    """Install what is missing from bench/wheels (no index, no deps); exit with a clear message if that fails."""
    missing = _missing_modules()
    if not missing:
        return
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        sys.exit(f"missing Python packages {missing} and no wheels in {WHEELS}: run bench/fetch_gpu_wheels.sh")
    installed = {_norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    todo = [str(w) for w in wheels_to_install(wheels, installed)]
    print(f"missing {missing}: installing {len(todo)} wheel(s) from {WHEELS}", flush=True)
    base = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    if todo and subprocess.run(base + todo).returncode != 0:
        target = Path(tempfile.gettempdir()) / "gpu_check_site"
        subprocess.run(base + ["--target", str(target), *todo], check=True)
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    if still := _missing_modules():
        sys.exit(f"still missing {still} after installing the wheels in {WHEELS}")


# --------------------------------------------------------------------------------------------------------------
# Data


def make_rows(tokenizer: Any, n: int, seq: int, seed: int) -> dict[str, list[dict]]:
    """n SFT rows filling ~seq tokens each (prompt + completion under the chat template), with KTO and DPO rows
    built from the same prompts."""
    from services.finetune import training
    from services.finetune.tinymodel import signal_explanation, signal_prompt

    rng = random.Random(seed)
    sft, kto, dpo = [], [], []
    for i in range(n):
        prompt, signal, rsi, macd = signal_prompt(rng)
        ticker = prompt.split(" for ")[1].split(".")[0]
        user = [{"role": "user", "content": prompt}]
        sentences: list[str] = []
        row: dict[str, Any] = {}
        while True:
            candidate = [*sentences, signal_explanation(signal, ticker, rsi, macd, rng)]
            trial = {"messages": [*user, {"role": "assistant", "content": " ".join(candidate)}]}
            if training.row_lengths(tokenizer, [trial], "sft")[0] > seq:
                break
            sentences, row = candidate, trial
            if len(sentences) > 400:
                break
        if not row:  # the prompt alone is about seq long: one sentence, cut by the ceiling later
            row = {
                "messages": [
                    *user,
                    {"role": "assistant", "content": signal_explanation(signal, ticker, rsi, macd, rng)},
                ]
            }
        good = row["messages"][-1]
        bad = {"role": "assistant", "content": f"{rng.choice(['BUY', 'SELL', 'HOLD'])} whatever, {ticker} is random."}
        sft.append(row)
        kto.append({"prompt": user, "completion": [good if i % 2 == 0 else bad], "label": i % 2 == 0})
        dpo.append({"prompt": user, "chosen": [good], "rejected": [bad]})
    return {"sft": sft, "kto": kto, "dpo": dpo}


# --------------------------------------------------------------------------------------------------------------
# Measurements


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def device_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK:
        if key in name:
            return peak
    return None


def count_params(base: Path, r: int) -> dict[str, int]:
    """Linear-layer weights (embedding lookups have no FLOPs) and the LoRA parameters of r on every linear
    layer but the LM head."""
    config = json.loads((base / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # q k v o gate up down
    linear = layers * sum(a * b for a, b in shapes) + h * config["vocab_size"]  # + the LM head
    lora = layers * sum(r * (a + b) for a, b in shapes)
    return {"linear": linear, "lora": lora, "layers": layers, "hidden": h}


def flops_per_token(params: dict[str, int], seq: float) -> float:
    return 4 * params["linear"] + 6 * params["lora"] + 12 * params["layers"] * params["hidden"] * seq


def plain_loop(
    base: Path,
    rows: list[dict],
    batch: int,
    steps: int,
    r: int,
    lr: float,
    dropout: float = 0.05,
    float32_adapters: bool = True,
    cast_inputs: bool = True,
) -> dict[str, Any]:
    """The baseline: the same rows and batches through a hand-written PyTorch + peft loop (no trl, no Trainer).

    peft keeps the adapters in float32 on a bf16 model (``float32_adapters``, its default and what the trainer
    gets); with False they stay in the model's dtype, so the adapted layers cast nothing. ``cast_inputs=False``
    keeps float32 adapters but leaves each adapted layer's input in the model's dtype (peft's
    ``disable_input_dtype_casting``) and runs the step under bf16 autocast on CUDA: the adapters' products in bf16
    with float32 weights and gradients, as mixed precision does."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.finetune import training

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    # Any: transformers types these as unions (of models, of encodings) this loop does not narrow
    tok: Any = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)
    model = get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"),
        autocast_adapter_dtype=float32_adapters,
    )
    adapter_dtype = str(next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)).removeprefix("torch.")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    encoded = [tok.apply_chat_template(r_["messages"], tokenize=True, return_dict=True)["input_ids"] for r_ in rows]
    pad = tok.pad_token_id
    tokens, losses, marks = 0, [], []
    _reset_peak()
    started = time.perf_counter()
    for step in range(steps):
        chunk = encoded[(step * batch) % len(encoded) :][:batch]
        width = max(len(x) for x in chunk)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
        labels = ids.masked_fill(mask == 0, -100)
        with contextlib.ExitStack() as stack:
            if not cast_inputs:
                stack.enter_context(disable_input_dtype_casting(model))
                if cuda:
                    stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        losses.append(loss.detach())
        if cuda:
            torch.cuda.synchronize()  # as the trainer's per-step loss log waits for the step
        marks.append((step + 1, tokens, time.perf_counter()))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    out = {
        "steps": steps,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "steady_tokens_per_s": training.steady_rate(marks),
        "adapter_dtype": adapter_dtype,
        "loss_first": float(losses[0]),
        "loss_last": float(losses[-1]),
        "peak_memory_bytes": _peak(),
    }
    del model, opt
    return out


def run_trainer(base: Path, method: str, train: list[dict], heldout: list[dict], recipe: dict, out: Path) -> dict:
    from services.finetune import training
    from services.finetune.domain import Recipe

    _reset_peak()
    result = training.train(str(base), train, heldout, Recipe(method=method, **recipe), out)
    m = result.metrics
    return {
        "steps": m["steps"],
        "train_tokens": m["train_tokens"],
        "seconds_with_eval": m["seconds"],
        "eval_seconds": m["eval_seconds"],
        "train_seconds": m["train_seconds"],
        "tokens_per_s": m["train_tokens_per_s"],  # without evaluation time
        "steady_tokens_per_s": m["steady_tokens_per_s"],  # without the first third of the steps either
        "activation_checkpointing": m["activation_checkpointing"],
        "seconds_per_step": round(m["train_seconds"] / max(1, m["steps"]), 4),
        "loss_first": m["train_loss_first"],
        "loss_last": m["train_loss_last"],
        "max_length": m["max_length"],
        "peak_memory_bytes": _peak(),
        "adapter_path": result.adapter_path,
    }


async def serve(base: Path, adapter: str, requests: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    from services.finetune.serving import create_serving_app

    app = create_serving_app(str(base), {"sft": adapter}, max_tokens_ceiling=max_tokens)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://local", timeout=600) as client:

        async def one(i: int) -> int:
            body = {
                "model": "sft",
                "messages": [{"role": "user", "content": f"Explain the BUY signal for NVDA. RSI is {30 + i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        await one(0)  # warm-up: loads the model and the adapter
        started = time.perf_counter()
        seq_tokens = 0
        for i in range(requests):
            seq_tokens += await one(i + 1)
        seq_s = time.perf_counter() - started
        started = time.perf_counter()
        conc_tokens = sum(await asyncio.gather(*(one(100 + i) for i in range(requests))))
        conc_s = time.perf_counter() - started
    app.state.pool.executor.shutdown(wait=True)
    return {
        "requests": requests,
        "max_tokens": max_tokens,
        "sequential": {"tokens": seq_tokens, "seconds": round(seq_s, 3), "tokens_per_s": round(seq_tokens / seq_s, 1)},
        "concurrent": {
            "tokens": conc_tokens,
            "seconds": round(conc_s, 3),
            "tokens_per_s": round(conc_tokens / conc_s, 1),
        },
        "concurrent_vs_sequential": round((conc_tokens / conc_s) / (seq_tokens / seq_s), 3),
        "note": "the fallback server generates one request at a time (vLLM batches); concurrency shows queueing",
    }


def measure(shape_name: str, work: Path, budget_s: float) -> dict[str, Any]:
    import torch

    from services.finetune.tinymodel import build_tiny_model

    shape = SHAPES[shape_name]
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = device_peak(name) if cuda else None
    out: dict[str, Any] = {
        "shape": shape_name,
        "device": name,
        "torch": torch.__version__,
        "bf16_peak_flops": peak,
        "shape_params": shape,
    }

    def left() -> float:
        return budget_s - (time.perf_counter() - started)

    t0 = time.perf_counter()
    base = build_tiny_model(
        work / "base",
        hidden_size=shape["hidden"],
        layers=shape["layers"],
        heads=shape["heads"],
        kv_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"],
        vocab_size=shape["vocab"],
        dtype="bfloat16" if cuda else "float32",
        max_position_embeddings=max(2048, shape["seq"]),
        tie_word_embeddings=False,
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    n_train = shape["batch"] * shape["steps"]
    rows = make_rows(tok, n_train + shape["batch"], shape["seq"], seed=0)
    r = 16
    params = count_params(base, r)
    out["model"] = {
        "parameters_linear": params["linear"],
        "parameters_total": params["linear"] + shape["vocab"] * shape["hidden"],
        "lora_parameters": params["lora"],
    }
    out["setup_seconds"] = round(time.perf_counter() - t0, 2)
    recipe = {
        "lora_r": r, "lora_alpha": 2 * r, "learning_rate": 1e-4, "max_steps": shape["steps"],
        "per_device_batch_size": shape["batch"], "max_seq_length": shape["seq"], "eval_every_steps": shape["steps"],
        "early_stopping_patience": 10,
    }  # fmt: skip
    train, heldout = rows["sft"][:n_train], rows["sft"][n_train:]
    sft = run_trainer(base, "sft", train, heldout, recipe, work / "sft")
    seq_mean = sft["train_tokens"] / max(1, sft["steps"] * shape["batch"])
    fpt = flops_per_token(params, seq_mean)
    sft["mfu"] = _mfu(sft["tokens_per_s"], fpt, peak)
    sft["steady_mfu"] = _mfu(sft["steady_tokens_per_s"], fpt, peak)
    out["sft_trl"] = sft
    out["flops_per_token"] = fpt
    out["flops_formula"] = "4*N_linear + 6*N_lora + 12*layers*hidden*seq (LoRA: no weight gradients of frozen weights)"

    if left() > 0:
        plain = plain_loop(base, train, shape["batch"], shape["steps"], r, 1e-4)
        plain["mfu"] = _mfu(plain["tokens_per_s"], fpt, peak)
        plain["steady_mfu"] = _mfu(plain["steady_tokens_per_s"], fpt, peak)
        out["plain_loop"] = plain
        out["trl_vs_plain"] = round(sft["tokens_per_s"] / plain["tokens_per_s"], 3)
        if sft["steady_tokens_per_s"] and plain["steady_tokens_per_s"]:
            out["trl_vs_plain_steady"] = round(sft["steady_tokens_per_s"] / plain["steady_tokens_per_s"], 3)
    else:
        out["plain_loop"] = {"skipped": "time budget spent"}
    # What the plain loop gains without LoRA dropout (peft then skips the op), with twice the batch, with the
    # adapters in bf16, and with float32 adapters computed under bf16 autocast without input casts (a profile of
    # the plain loop on an H200 put the float32 adapter path at most of a step): where the remaining MFU is, for
    # the next recipe change.
    variants: dict[str, Any] = {}
    for label, batch, dropout, f32, cast in (
        ("no_dropout", shape["batch"], 0.0, True, True),
        ("batch_x2", 2 * shape["batch"], 0.05, True, True),
        ("bf16_adapters", shape["batch"], 0.05, False, True),
        ("autocast_no_input_casts", shape["batch"], 0.05, True, False),
    ):
        if left() <= 0:
            variants[label] = {"skipped": "time budget spent"}
            continue
        v = plain_loop(
            base,
            train * (batch // shape["batch"]),
            batch,
            shape["steps"],
            r,
            1e-4,
            dropout=dropout,
            float32_adapters=f32,
            cast_inputs=cast,
        )
        v["steady_mfu"] = _mfu(v["steady_tokens_per_s"], fpt, peak)
        variants[label] = {"batch": batch, "lora_dropout": dropout, "float32_adapters": f32, "cast_inputs": cast, **v}
    out["plain_loop_variants"] = variants
    pref = {**recipe, "max_steps": shape["pref_steps"], "eval_every_steps": shape["pref_steps"],
            "per_device_batch_size": shape["pref_batch"]}  # fmt: skip
    n_pref = shape["pref_batch"] * shape["pref_steps"]
    for method in ("kto", "dpo"):
        if left() <= 0:
            out[method] = {"skipped": "time budget spent"}
            continue
        data = rows[method]
        out[method] = run_trainer(base, method, data[:n_pref], data[n_pref : n_pref + shape["pref_batch"]], pref,
                                  work / method)  # fmt: skip
    if left() > 0:
        _reset_peak()
        out["serving"] = asyncio.run(serve(base, sft["adapter_path"], shape["requests"], shape["gen_tokens"]))
        out["serving"]["peak_memory_bytes"] = _peak()
    else:
        out["serving"] = {"skipped": "time budget spent"}
    # The targets read the steady figures: the trainer runs first, so its whole-run figure alone also pays for
    # loading every kernel; both whole-run figures stay in the JSON.
    ratio = out.get("trl_vs_plain_steady", out.get("trl_vs_plain"))
    mfu = sft.get("steady_mfu") or sft.get("mfu")
    out["targets"] = {
        "trl_vs_plain_at_least_0.9": None if ratio is None else ratio >= 0.9,
        "sft_mfu_at_least_0.30": None if not mfu else mfu >= 0.30,
    }
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    return out


def _mfu(tokens_per_s: float | None, flops_per_token: float, peak: float | None) -> float | None:
    return round(tokens_per_s * flops_per_token / peak, 4) if peak and tokens_per_s else None


def summary(result: dict[str, Any]) -> str:
    sft, plain = result["sft_trl"], result.get("plain_loop", {})

    def gib(b: Any) -> str:
        return "-" if not b else f"{b / 2**30:.1f} GiB"

    lines = [
        f"device {result['device']} ({result['shape']} shape, {result['model']['parameters_total'] / 1e9:.2f}B params)",
        f"trl SFT:     {sft['tokens_per_s']:>10.0f} tokens/s (eval {sft['eval_seconds']} s excluded), "
        f"MFU {sft.get('mfu')}, peak {gib(sft['peak_memory_bytes'])}; steady {sft.get('steady_tokens_per_s')} "
        f"tokens/s, MFU {sft.get('steady_mfu')}; activation checkpointing {sft.get('activation_checkpointing')}",
    ]
    if "tokens_per_s" in plain:
        lines.append(
            f"plain loop:  {plain['tokens_per_s']:>10.0f} tokens/s, MFU {plain.get('mfu')}, "
            f"peak {gib(plain['peak_memory_bytes'])}; trl/plain = {result['trl_vs_plain']}; steady "
            f"{plain.get('steady_tokens_per_s')} tokens/s, MFU {plain.get('steady_mfu')}, trl/plain "
            f"{result.get('trl_vs_plain_steady')}"
        )
    for label, v in result.get("plain_loop_variants", {}).items():
        if "steady_tokens_per_s" in v:
            lines.append(
                f"plain {label}: batch {v['batch']}, lora_dropout {v['lora_dropout']}, float32 adapters "
                f"{v['float32_adapters']}, input casts {v['cast_inputs']}: steady "
                f"{v['steady_tokens_per_s']} tokens/s, MFU {v['steady_mfu']}, peak {gib(v['peak_memory_bytes'])}"
            )
    for method in ("kto", "dpo"):
        m = result.get(method, {})
        if "seconds_per_step" in m:
            lines.append(
                f"{method.upper()}:         {m['seconds_per_step']} s/step, loss {m['loss_first']} -> {m['loss_last']}"
            )
    s = result.get("serving", {})
    if "sequential" in s:
        lines.append(
            f"serving:     {s['sequential']['tokens_per_s']} tokens/s sequential, {s['concurrent']['tokens_per_s']} "
            f"concurrent ({s['requests']} requests each)"
        )
    lines.append(f"targets: {result['targets']}; total {result['total_seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="LoRA SFT/KTO/DPO + serving on the GPU, with a plain-loop baseline")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_check.json", help="JSON figures")
    parser.add_argument("--tiny", action="store_true", help="tiny shape (the default without CUDA)")
    parser.add_argument("--full", action="store_true", help="the full shape even without CUDA (hours on a CPU)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip later phases once this is spent")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU, as a finetune worker trains (services.finetune.tasks)
    ensure_dependencies()
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = "tiny" if args.tiny or not (torch.cuda.is_available() or args.full) else "full"
    if not torch.cuda.is_available():
        print(f"No GPU is present (torch {torch.__version__}): the {shape} shape on the CPU only.", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(shape, Path(tmp), args.budget_s)
    result["command"] = "python -m bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=_json_default))
    print(summary(result))
    print(f"figures: {args.out}")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
