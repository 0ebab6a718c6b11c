"""A tiny, randomly initialised Llama with its own tokenizer, for tests and benchmarks without a model hub.

``build_tiny_model`` trains a byte-level BPE tokenizer on generated text about trading signals (tickers,
BUY / SELL / HOLD, RSI / MACD figures, short explanations), gives it a chat template and pad / eos tokens, builds a
random ``LlamaForCausalLM`` of the requested size and saves both in Hugging Face format, so that
``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load it offline.
The same seed gives byte-identical weights and tokenizer.

CLI: ``python -m services.finetune.tinymodel OUT_DIR [--hidden 256 --layers 4 --heads 4 --vocab 512 --seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TICKERS = ("AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "GOOG", "META", "AMD", "NFLX", "JPM", "XOM", "KO", "SPY", "QQQ")
SIGNALS = ("BUY", "SELL", "HOLD")
PAD, EOS, BOS = "<pad>", "<|end|>", "<|begin|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOS, BOS, *ROLE_TOKENS)

# Prefix-consistent (rendering the prompt with add_generation_prompt gives a prefix of prompt + completion), with
# {% generation %} markers so trainers can mask the loss to assistant tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def signal_prompt(rng: random.Random) -> tuple[str, str, float, float]:
    """A user prompt asking to explain a signal, with the facts it contains."""
    ticker, signal = rng.choice(TICKERS), rng.choice(SIGNALS)
    rsi, macd = round(rng.uniform(10, 90), 1), round(rng.uniform(-3, 3), 2)
    prompt = f"Explain the {signal} signal for {ticker}. RSI is {rsi}, MACD is {macd}."
    return prompt, signal, rsi, macd


def signal_explanation(signal: str, ticker: str, rsi: float, macd: float, rng: random.Random) -> str:
    """A short, plausible explanation of a signal."""
    momentum = "positive" if macd > 0 else "negative"
    zone = "overbought" if rsi > 70 else "oversold" if rsi < 30 else "neutral"
    reasons = {
        "BUY": f"{ticker} shows {momentum} momentum and RSI {rsi} is {zone}, so the model expects upside.",
        "SELL": f"{ticker} looks {zone} at RSI {rsi} with MACD {macd}, so the model expects a pullback.",
        "HOLD": f"{ticker} has mixed signals: RSI {rsi} is {zone} and MACD {macd} is flat to {momentum}.",
    }
    tails = ("Watch the volume.", "Risk is moderate.", "Consider a stop loss.", "Trend may change quickly.")
    return f"{signal}: {reasons[signal]} {rng.choice(tails)}"


def generate_corpus(n: int, seed: int = 0) -> list[str]:
    """n lines of generated trading-signal text (prompts, explanations, indicator chatter)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n):
        prompt, signal, rsi, macd = signal_prompt(rng)
        ticker = prompt.split(" for ")[1].split(".")[0]
        lines.append(prompt)
        lines.append(signal_explanation(signal, ticker, rsi, macd, rng))
        lines.append(f"{ticker} closed at {rng.uniform(5, 900):.2f} with volume {rng.randint(10_000, 9_000_000)}.")
    return lines


def _train_tokenizer(vocab_size: int, seed: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generate_corpus(max(2000, vocab_size // 2), seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="left",  # batched generation pads on the left; trainers set their own collators
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    dtype: str = "float32",
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
) -> Path:
    """Build and save a random Llama + trained tokenizer at out_dir; return out_dir. The shape parameters make
    bigger Llama-shaped models for benchmarks (e.g. hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate
    8192, vocab 32000: ~1.2B parameters; saved in ``dtype``)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by heads {heads}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size, seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, EOS, BOS)}
    config = LlamaConfig(
        # The generated corpus may not fill a large vocabulary: the embedding is padded up to vocab_size then.
        vocab_size=max(len(tokenizer), vocab_size),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=ids[PAD],
        eos_token_id=ids[EOS],
        bos_token_id=ids[BOS],
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    device = "cuda" if dtype != "float32" and torch.cuda.is_available() else "cpu"  # big models init fast there
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        pad_token_id=ids[PAD], eos_token_id=ids[EOS], bos_token_id=ids[BOS], do_sample=False, max_new_tokens=64
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_model.json").write_text(
        json.dumps(
            {
                "hidden_size": hidden_size,
                "layers": layers,
                "heads": heads,
                "vocab_size": config.vocab_size,
                "seed": seed,
            },
            indent=2,
        )
    )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model(
        args.out_dir,
        hidden_size=args.hidden,
        layers=args.layers,
        heads=args.heads,
        vocab_size=args.vocab,
        seed=args.seed,
    )
    print(path)


if __name__ == "__main__":
    main()
