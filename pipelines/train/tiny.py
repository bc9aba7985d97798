"""A tiny Llama-shaped base model and tokenizer, built offline from a text corpus.

Nothing on a CI or demo machine can download weights, so the demo and the tests build their own
"base model" and save it with `save_pretrained`: every later stage then loads it through the same
`from_pretrained` path a real Qwen2.5-Coder or StarCoder checkpoint goes through.

Run as a child process so the service never imports transformers:
    python -m pipelines.train.tiny OUT_DIR CORPUS_FILE [CORPUS_FILE ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Qwen2.5-Coder's spelling, so the tiny tokenizer exercises the most common family in the FIM table.
EOS = "<|endoftext|>"
PAD = "<|pad|>"
FIM_SPECIALS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                "<|file_sep|>")


@dataclass(frozen=True)
class TinyShape:
    """Model shape; the defaults give ~0.4M parameters, enough to learn a codebase's surface statistics."""

    vocab_size: int = 1024
    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path,
                    specials: tuple[str, ...] = FIM_SPECIALS) -> None:
    """Train a byte-level BPE on `texts` and save it as a transformers fast tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(specials),
        model_max_length=TinyShape.max_position_embeddings,
    )
    fast.save_pretrained(out_dir)


def build_model(out_dir: Path, shape: TinyShape, seed: int = 0) -> int:
    """Save a randomly initialised Llama-shaped causal LM matching the tokenizer in `out_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def pretrain(out_dir: Path, texts: list[str], steps: int, seq_len: int = 256, batch_size: int = 8,
             learning_rate: float = 3e-3, seed: int = 0) -> float:
    """Full-parameter causal-LM training on random windows of `texts`; saves the model, returns last loss.

    A randomly initialised Llama cannot be adapted usefully: with 0.02-std weights its logits stay within
    about +-2 after the final norm, and a LoRA on it moved held-out loss 6.8 -> 6.4 in 60 steps here. A
    few hundred steps of pretraining on generic code give it a real starting point (loss ~6.9 -> ~3.6 in
    200 steps, 16 s on 2 cores), as a real base model has.
    """
    import math
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = torch.tensor(tokenizer("\n\n".join(texts), verbose=False)["input_ids"])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    warmup = max(1, steps // 10)
    started = time.monotonic()
    loss = float("nan")
    model.train()
    for step in range(steps):
        lr = learning_rate * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[i: i + seq_len] for i in starts.tolist()])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.monotonic() - started
            print(f"pretrain step {step + 1}/{steps} loss {loss:.3f} "
                  f"({(step + 1) * batch_size * seq_len / elapsed:,.0f} tokens/s)", flush=True)
    model.save_pretrained(out_dir)
    return loss


def build_tiny(out_dir: Path, texts: list[str], shape: TinyShape = TinyShape(), seed: int = 0,
               pretrain_steps: int = 0) -> int:
    """Build tokenizer and model into `out_dir` (pretrained for `pretrain_steps`); returns the parameter count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(texts, shape.vocab_size, out_dir)
    n_params = build_model(out_dir, shape, seed)
    if pretrain_steps:
        pretrain(out_dir, texts, pretrain_steps, seed=seed)
    return n_params


def generic_corpus(limit_bytes: int = 1_500_000) -> list[str]:
    """Generic Python for pretraining the demo's tiny base model: CPython's standard library, present on
    every machine that runs devtune and unrelated to the sample team's code."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for package in ("json", "email", "logging", "http", "urllib", "concurrent", "importlib", "asyncio",
                    "unittest", "xml"):
        for path in sorted((stdlib / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            size += len(text)
            if size >= limit_bytes:
                return texts
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("corpus", type=Path, nargs="+", help="text files the tokenizer (and model) learn from")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="full-model steps on the corpus")
    args = parser.parse_args(argv)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in args.corpus]
    n_params = build_tiny(args.out_dir, texts, pretrain_steps=args.pretrain_steps)
    print(f"tiny model: {n_params:,} parameters in {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
