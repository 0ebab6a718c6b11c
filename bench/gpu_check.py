"""GPU check for the finetune edge: LoRA SFT + KTO and generation through the fallback server, GPU beside CPU.

``python -m bench.gpu_check [--out FILE] [--tiny] [--threads N]``

On a CUDA machine it builds a bigger random Llama (hidden 1024, 8 layers, vocab 8k by default), trains LoRA SFT and
KTO adapters for a few dozen steps in bf16 through ``services.finetune.training.train``, serves the SFT adapter
through the fallback OpenAI-compatible app in-process (httpx ``ASGITransport``), and prints training tokens/s,
generation tokens/s and peak GPU memory beside the same figures for the small model on the CPU (measured in a child
process with ``CUDA_VISIBLE_DEVICES=""``). Without CUDA it prints the CPU figures and says plainly that no GPU is
present. ``--tiny`` shrinks every size and step count, for a smoke run.

The GPU image has torch, transformers, peft and accelerate but not trl / datasets / fastapi: when an import is
missing, the wheels in ``bench/wheels/`` (fetched beforehand by ``bench/fetch_gpu_wheels.sh``) are installed with
``pip install --no-index --no-deps``, only for distributions that are missing or older than the wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "bench" / "wheels"
NEEDED = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "fastapi", "pydantic", "httpx")

SIZES = {
    # name: (hidden, layers, heads, vocab, steps, batch, seq, gen_tokens, gen_requests)
    "gpu": (1024, 8, 16, 8192, 40, 16, 512, 128, 8),
    "gpu-tiny": (256, 2, 4, 1024, 6, 4, 128, 16, 2),
    "cpu": (128, 2, 4, 512, 20, 4, 256, 32, 4),
    "cpu-tiny": (64, 2, 4, 512, 6, 4, 128, 8, 2),
}


# --------------------------------------------------------------------------------------------------------------
# Dependencies


def _missing_modules() -> list[str]:
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _wheel_dist(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return name.lower().replace("_", "-"), version


def _needs_install(dist: str, version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return True
    try:
        return Version(installed) < Version(version)
    except InvalidVersion:
        return False


def ensure_dependencies() -> None:
    """Install missing packages from bench/wheels (no index, no deps); exit with a clear message if that fails."""
    missing = _missing_modules()
    if not missing:
        return
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        sys.exit(f"missing Python packages {missing} and no wheels in {WHEELS}: run bench/fetch_gpu_wheels.sh")
    todo = [str(w) for w in wheels if _needs_install(*_wheel_dist(w))]
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
# One measurement: build, train SFT + KTO, generate through the app


def _rows(n: int, sentences: int, seed: int) -> tuple[list[dict], list[dict]]:
    from services.finetune.tinymodel import signal_explanation, signal_prompt

    rng = random.Random(seed)
    sft, kto = [], []
    for i in range(n):
        prompt, signal, rsi, macd = signal_prompt(rng)
        ticker = prompt.split(" for ")[1].split(".")[0]
        answer = " ".join(signal_explanation(signal, ticker, rsi, macd, rng) for _ in range(sentences))
        bad = f"{rng.choice(['BUY', 'SELL', 'HOLD'])} whatever, {ticker} is random. " * sentences
        sft.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        good = i % 2 == 0
        kto.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": answer if good else bad.strip()}],
                "label": good,
            }
        )
    return sft, kto


async def _generate(app: Any, model: str, requests: int, max_tokens: int) -> dict[str, float]:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://local", timeout=600) as client:

        async def one(i: int) -> dict:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"Explain the BUY signal for NVDA. RSI is {30 + i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()

        await one(0)  # warm-up: loads the model and the adapter
        started = time.perf_counter()
        tokens = 0
        for i in range(requests):
            tokens += (await one(i + 1))["usage"]["completion_tokens"]
        seconds = time.perf_counter() - started
    return {"gen_tokens": tokens, "gen_seconds": round(seconds, 3), "gen_tokens_per_s": round(tokens / seconds, 1)}


def measure(size: str, work: Path) -> dict[str, Any]:
    import torch

    from services.finetune import serving, training
    from services.finetune.tinymodel import build_tiny_model

    hidden, layers, heads, vocab, steps, batch, seq, gen_tokens, gen_requests = SIZES[size]
    cuda = torch.cuda.is_available()
    base = build_tiny_model(work / f"base-{size}", hidden_size=hidden, layers=layers, heads=heads, vocab_size=vocab)
    n_params = sum(p.numel() for p in _load_params(base))
    sentences = 6 if size == "gpu" else 2
    sft_rows, kto_rows = _rows(max(64, batch * 4), sentences, seed=1)
    sft_eval, kto_eval = _rows(max(16, batch * 2), sentences, seed=2)
    common = {
        "max_steps": steps,
        "per_device_batch_size": batch,
        "max_seq_length": seq,
        "eval_every_steps": max(2, steps // 2),
        "early_stopping_patience": 10,
        "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "lora_r": 16,
        "lora_alpha": 32,
        "learning_rate": 1e-3,
    }
    out: dict[str, Any] = {
        "size": size,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": {"hidden": hidden, "layers": layers, "heads": heads, "vocab": vocab, "params": n_params},
    }
    adapters: dict[str, str] = {}
    for method, rows, eval_rows in (("sft", sft_rows, sft_eval), ("kto", kto_rows, kto_eval)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        recipe = training.Recipe(method=method, **common)
        result = training.train(str(base), rows, eval_rows, recipe, work / f"{method}-{size}")
        m = result.metrics
        out[method] = {
            k: m.get(k)
            for k in (
                "train_loss_first",
                "train_loss_last",
                "eval_loss_first",
                "eval_loss_best",
                "steps",
                "dtype",
                "seconds",
                "train_tokens",
                "tokens_per_s",
            )
        }
        if cuda:
            out[method]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        adapters[f"{method}-adapter"] = result.adapter_path

    app = serving.create_serving_app(str(base), adapters)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out["generation"] = {
        "base": asyncio.run(_generate(app, base.name, gen_requests, gen_tokens)),
        "sft-adapter": asyncio.run(_generate(app, "sft-adapter", gen_requests, gen_tokens)),
        "max_tokens": gen_tokens,
    }
    if cuda:
        out["generation"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _load_params(base: Path):
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        return [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118 - safe_open is not a Mapping


def _cpu_in_child(size: str, threads: int | None) -> dict[str, Any]:
    """The CPU baseline in a child process that cannot see the GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "cpu.json"
        cmd = [sys.executable, "-m", "bench.gpu_check", "--cpu-child", str(result_file), "--size", size]
        if threads:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return json.loads(result_file.read_text())


# --------------------------------------------------------------------------------------------------------------
# Report


def _row(label: str, gpu: Any, cpu: Any) -> str:
    return f"{label:<34}{gpu!s:>22}{cpu!s:>22}"


def report(gpu: dict[str, Any] | None, cpu: dict[str, Any]) -> str:
    g = gpu or {}

    def get(d: dict, *path: str) -> Any:
        for p in path:
            d = d.get(p, {}) if isinstance(d, dict) else {}
        return d if d != {} else "-"

    lines = [_row("", (g.get("device") or "no GPU")[:21], "cpu"), "-" * 78]
    lines.append(_row("model params", get(g, "model", "params"), get(cpu, "model", "params")))
    for method in ("sft", "kto"):
        lines.append(_row(f"{method} train tokens/s", get(g, method, "tokens_per_s"), get(cpu, method, "tokens_per_s")))
        lines.append(
            _row(
                f"{method} loss first -> last",
                f"{_f(get(g, method, 'train_loss_first'))} -> {_f(get(g, method, 'train_loss_last'))}",
                f"{_f(get(cpu, method, 'train_loss_first'))} -> {_f(get(cpu, method, 'train_loss_last'))}",
            )
        )
        lines.append(
            _row(
                f"{method} seconds ({get(g, method, 'steps')} / {get(cpu, method, 'steps')} steps)",
                get(g, method, "seconds"),
                get(cpu, method, "seconds"),
            )
        )
        lines.append(_row(f"{method} peak GPU memory GiB", get(g, method, "peak_memory_gib"), "-"))
    for name in ("base", "sft-adapter"):
        lines.append(
            _row(
                f"generation tokens/s ({name})",
                get(g, "generation", name, "gen_tokens_per_s"),
                get(cpu, "generation", name, "gen_tokens_per_s"),
            )
        )
    lines.append(_row("generation peak GPU memory GiB", get(g, "generation", "peak_memory_gib"), "-"))
    if gpu is None:
        lines.append("NO GPU IS PRESENT: torch.cuda.is_available() is False, so only the CPU figures were measured.")
    return "\n".join(lines)


def _f(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LoRA SFT/KTO + generation on the GPU beside the CPU")
    parser.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and few steps (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the CPU baseline")
    parser.add_argument("--cpu-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ensure_dependencies()
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.cpu_child is not None:
        with tempfile.TemporaryDirectory() as tmp:
            args.cpu_child.write_text(json.dumps(measure(args.size, Path(tmp))))
        return

    cpu_size = "cpu-tiny" if args.tiny else "cpu"
    gpu: dict[str, Any] | None = None
    started = time.perf_counter()
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            gpu = measure("gpu-tiny" if args.tiny else "gpu", Path(tmp))
        cpu = _cpu_in_child(cpu_size, args.threads)
    else:
        print(f"No GPU is present (torch {torch.__version__}, CUDA unavailable): measuring the CPU only.", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            cpu = measure(cpu_size, Path(tmp))
    text = report(gpu, cpu)
    print(text)
    print(f"total {time.perf_counter() - started:.1f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"gpu": gpu, "cpu": cpu, "gpu_present": gpu is not None}, indent=2))


if __name__ == "__main__":
    main()
