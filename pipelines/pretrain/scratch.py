"""Pretraining from scratch: a byte-level BPE tokenizer with a family's FIM tokens and a Llama-shaped model
sized from a parameter or compute budget, trained on a folder of code, with checkpoints and resume.

    python -m pipelines.pretrain.scratch OUT_DIR CORPUS_DIR [--params N | --flops F] [--tokens N] [--family F]

(`devtune pretrain --from-scratch CORPUS --out DIR` runs this as a child process: the service never imports
torch.) OUT_DIR becomes a model directory any `base_model` key can name: `config.json`, `model.safetensors` and
the tokenizer, loaded through the same `from_pretrained` path as a Qwen2.5-Coder or StarCoder checkpoint. The
demo's base model and the tests' are this with a small budget; no machine here can download weights.

Sizing. With a compute budget C (FLOPs, counted as 6 x parameters x tokens) and no token count, the model takes
Chinchilla's proportion (Hoffmann et al. 2022: about 20 tokens per parameter), N = sqrt(C / 120); with a
parameter budget the tokens default to 20 x N. The shape for N is Llama's (SwiGLU MLP of 8/3 the width, grouped
KV heads, RoPE) at a depth that grows with the width (d / 40 layers, at least 2: deep and thin wins at small
sizes, MobileLLM 2024), with heads of 32 (under 512 wide) or 64 dimensions, and a vocabulary that grows with N
(1,024 tokens at 0.5M parameters, 4,096 at 5M, 32,768 from about 1B).

Resume. OUT_DIR/scratch.json records the plan; a checkpoint (weights, optimizer, step) is written every
`--checkpoint-every` steps and on SIGTERM, under a temporary name and renamed, so a kill -9 leaves the
previous one. Running the same command again continues from the newest; the data order is a function of
the seed and the step, so a resumed run sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.datasets.quality import VENDORED_DIRS, file_problem
from pipelines.files import read_json, write_json_atomic
from pipelines.pretrain.samples import FimShape, chunk_lines, sample_text
from pipelines.progress import format_seconds

log = logging.getLogger("devtune.pretrain.scratch")

# family -> (end-of-sequence token, padding token, special tokens). The FIM sentinels are spelled as the
# family's own tokenizer spells them, so pipelines.tokens finds them and lays prompts out the family's way.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "qwen2.5-coder": ("<|endoftext|>", "<|pad|>", ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                                                   "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
    "starcoder": ("<|endoftext|>", "<fim_pad>", ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<filename>",
                                                 "<gh_stars>")),
    "codellama": ("</s>", "<pad>", ("<s>", "<PRE>", "<SUF>", "<MID>", "<EOT>")),
    "deepseek-coder": ("<｜end▁of▁sentence｜>", "<pad>", ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")),
}
TOKENS_PER_PARAMETER = 20  # Chinchilla's compute-optimal proportion
MAX_FILE_BYTES = 1 << 20  # larger files in a corpus folder are data, not code
TOKENIZER_SAMPLE_BYTES = 8_000_000  # BPE merges learned from this much of the corpus (seconds, not minutes)


# -- sizing --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped decoder (untied input and output embeddings)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048

    def parameters(self) -> int:
        """Trainable parameters, embeddings included (what `sum(p.numel())` of the model gives)."""
        d, head = self.hidden_size, self.hidden_size // self.num_attention_heads
        attention = 2 * d * d + 2 * d * head * self.num_key_value_heads
        layer = attention + 3 * d * self.intermediate_size + 2 * d
        return 2 * self.vocab_size * d + self.num_hidden_layers * layer + d


def vocab_for(params: int) -> int:
    """A vocabulary that grows with the model: 1,024 at 0.5M parameters, 4,096 at 5M, 32,768 at 1B."""
    return int(min(32768, max(512, 2 ** round(math.log2(max(params, 1)) / 2 + 0.4))))


def shape_of(hidden: int, layers: int, vocab_size: int, max_position: int = 2048) -> ModelShape:
    head = 32 if hidden < 512 else 64
    heads = max(1, hidden // head)
    return ModelShape(vocab_size=vocab_size, hidden_size=hidden,
                      intermediate_size=max(32, round(hidden * 8 / 3 / 32) * 32), num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2 if heads % 2 == 0 else 1,
                      max_position_embeddings=max_position)


def shape_for(params: int, vocab_size: int | None = None, max_position: int = 2048) -> ModelShape:
    """The shape whose parameter count is closest to `params`: widths in steps of 32, each at about d / 40
    layers (one more or less allowed, at least 2)."""
    vocab = vocab_size or vocab_for(params)
    shapes = [shape_of(h, layers, vocab, max_position) for h in range(64, 8193, 32)
              for layers in {max(2, round(h / 40) + k) for k in (-1, 0, 1)}]
    return min(shapes, key=lambda s: (abs(math.log(s.parameters() / params)), s.hidden_size))


@dataclass(frozen=True)
class Budget:
    shape: ModelShape
    tokens: int  # training tokens (sequence positions, padding excluded)

    @property
    def flops(self) -> float:
        return 6.0 * self.shape.parameters() * self.tokens


def plan_budget(params: int | None = None, flops: float | None = None, tokens: int | None = None,
                vocab_size: int | None = None, max_position: int = 2048) -> Budget:
    """Model shape and token count from a parameter budget or a compute budget (see the module docstring)."""
    if (params is None) == (flops is None):
        raise ValueError("give a parameter budget or a compute budget (one of them)")
    if flops is not None:
        target = flops / (6 * tokens) if tokens else math.sqrt(flops / (6 * TOKENS_PER_PARAMETER))
        shape = shape_for(max(int(target), 50_000), vocab_size, max_position)
        return Budget(shape, tokens or int(flops / (6 * shape.parameters())))
    assert params is not None
    shape = shape_for(params, vocab_size, max_position)
    return Budget(shape, tokens or TOKENS_PER_PARAMETER * shape.parameters())


# -- the corpus ----------------------------------------------------------------------------------------------

def read_corpus(folder: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                max_bytes: int = 0, seed: int = 0) -> list[tuple[str, str]]:
    """(relative path, text) of the code files under `folder`: UTF-8 text only, no vendored, generated, lock,
    minified or binary files (the dataset builder's rules, pipelines/datasets/quality.py), exact duplicates
    once. `include`/`exclude` are globs on the relative path; `max_bytes` > 0 keeps a seeded random subset
    of files up to that size, so a cap does not keep only the alphabetically first packages."""
    paths: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d.lower() not in VENDORED_DIRS and not d.startswith("."))
        for name in sorted(files):
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            if include and not any(fnmatch.fnmatch(rel, g) for g in include):
                continue
            if any(fnmatch.fnmatch(rel, g) for g in exclude):
                continue
            paths.append((rel, path))
    random.Random(seed).shuffle(paths)
    out: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    size = 0
    for rel, path in paths:
        try:
            if path.stat().st_size > MAX_FILE_BYTES or path.is_symlink():
                continue
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if not text.strip() or digest in seen or file_problem(rel, text) is not None:
            continue
        seen.add(digest)
        out.append((rel, text))
        size += len(text)
        if max_bytes and size >= max_bytes:
            break
    return out


def stdlib_folder() -> Path:
    """CPython's standard library: on every machine that runs devtune, and none of a team's code (its
    site-packages is skipped as vendored)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


# The standard library's own code, not its tests (half its size, and mostly fixtures) nor IDLE and lib2to3.
STDLIB_INCLUDE = ("*.py",)
STDLIB_EXCLUDE = ("test/*", "*/test/*", "*/tests/*", "idlelib/*", "lib2to3/*")


def stdlib_texts(max_bytes: int, seed: int = 0) -> list[str]:
    """Generic Python for small base models: a seeded sample of the standard library's modules."""
    return [t for _, t in read_corpus(stdlib_folder(), STDLIB_INCLUDE, STDLIB_EXCLUDE, max_bytes, seed)]


# -- the tokenizer and the initial model ---------------------------------------------------------------------

def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path, family: str = "qwen2.5-coder",
                    max_position: int = 2048) -> None:
    """Train a byte-level BPE on `texts` with `family`'s special tokens; save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos, pad, specials = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos, pad, *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=list(specials), model_max_length=max_position)
    fast.save_pretrained(out_dir)


def build_model(out_dir: Path, shape: ModelShape, seed: int = 0) -> Any:
    """A randomly initialised Llama-shaped causal LM matching the tokenizer in `out_dir` (not saved)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# -- training ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScratchPlan:
    """Everything a from-scratch run depends on (OUT_DIR/scratch.json): a resume must find the same plan."""

    family: str
    shape: ModelShape
    tokens: int
    seq_len: int = 512
    batch_size: int = 8
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    fim: FimShape = field(default_factory=lambda: FimShape(fim_rate=0.5, spm_rate=0.5, max_middle_lines=6,
                                                           max_block_lines=30, block_fraction=0.3))
    seed: int = 0

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScratchPlan:
        return cls(**{**data, "shape": ModelShape(**data["shape"]), "fim": FimShape(**data["fim"])})


class Stopped(Exception):
    """SIGTERM arrived: a checkpoint was saved and the next run resumes from it."""


_stop = {"requested": False}


def _request_stop(signum: int, frame: Any) -> None:
    _stop["requested"] = True


def pretrain(out_dir: Path, texts: list[str], plan: ScratchPlan, checkpoint_every: int = 200,
             logging_steps: int = 25, device: str = "auto") -> dict[str, Any]:
    """Build (or resume) the tokenizer and model in `out_dir` and train it on `texts`; returns its metrics,
    also written to OUT_DIR/pretrain.json once the model is saved."""
    import torch
    from transformers import AutoTokenizer

    from pipelines.tokens import load_base_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    done = read_json(out_dir / "pretrain.json")
    saved = read_json(out_dir / "scratch.json")
    if saved is not None and ScratchPlan.from_dict(saved) != plan:
        raise SystemExit(f"{out_dir} holds a from-scratch run with another plan ({out_dir / 'scratch.json'}): "
                         "use another output folder, or repeat the same command to resume it")
    if done is not None and (out_dir / "model.safetensors").is_file():
        log.info("%s is already trained (%s)", out_dir, out_dir / "pretrain.json")
        return dict(done)
    if saved is None:
        build_tokenizer(_sample(texts, TOKENIZER_SAMPLE_BYTES), plan.shape.vocab_size, out_dir, plan.family,
                        plan.shape.max_position_embeddings)
        write_json_atomic(out_dir / "scratch.json", plan.as_dict())
    kind = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    dev = torch.device(kind)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    fim = load_base_tokenizer(str(out_dir)).fim
    chars_per_token = _chars_per_token(tokenizer, texts)
    # 4 sentinel tokens and a denser-than-average chunk must still fit: chunks are cut at 90% of the window.
    max_chars = max(64, int((plan.seq_len - 4) * chars_per_token * 0.9))
    chunks = [c for t in texts for c in chunk_lines(t, max_chars)]
    if not chunks:
        raise SystemExit("the corpus holds no text to train on")

    model = build_model(out_dir, plan.shape, plan.seed).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": plan.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=plan.learning_rate,
                                  betas=(0.9, 0.95), fused=dev.type == "cuda")
    ckpt = out_dir / "checkpoints"
    start = _load_checkpoint(ckpt, model, optimizer)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    pad_id = tokenizer.pad_token_id
    total = plan.steps
    warmup = max(1, math.ceil(plan.warmup_ratio * total))
    orders: dict[int, list[int]] = {}
    signal.signal(signal.SIGTERM, _request_stop)
    log.info("from scratch: %s parameters (%d layers x %d wide, vocabulary %d), %s tokens in %d steps of %d x %d, "
             "%d chunks (%.2f characters/token)%s", f"{sum(p.numel() for p in model.parameters()):,}",
             plan.shape.num_hidden_layers, plan.shape.hidden_size, len(tokenizer), f"{plan.tokens:,}", total,
             plan.batch_size, plan.seq_len, len(chunks), chars_per_token,
             f"; resuming at step {start}" if start else "")
    started = time.monotonic()
    tokens = 0
    losses: list[float] = []
    first_loss = float("nan")
    model.train()
    for step in range(start, total):
        lr = _lr(plan, step, warmup, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        texts_in_step = [_sample_for(plan, chunks, orders, step * plan.batch_size + j, fim)
                         for j in range(plan.batch_size)]
        ids = tokenizer(texts_in_step, add_special_tokens=False)["input_ids"]
        batch, labels, real = _batch(ids, plan.seq_len, pad_id)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch.to(dev), labels=labels.to(dev)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.item())
        first_loss = value if step == start else first_loss
        losses.append(value)
        tokens += real
        finished = step + 1
        if finished % logging_steps == 0 or finished == total:
            _progress(out_dir, finished, total, losses[-logging_steps:], tokens, time.monotonic() - started, start)
        if finished < total and (finished % checkpoint_every == 0 or _stop["requested"]):
            _save_checkpoint(ckpt, model, optimizer, finished)
        if _stop["requested"]:
            raise Stopped(f"stopped at step {finished}/{total}; run the same command again to resume")
    seconds = time.monotonic() - started
    model.save_pretrained(out_dir)
    window = losses[-logging_steps:] or [float("nan")]
    metrics = {"parameters": sum(p.numel() for p in model.parameters()), "shape": asdict(plan.shape),
               "family": plan.family, "steps": total, "resumed_from_step": start, "tokens": tokens,
               "planned_tokens": plan.tokens, "loss": sum(window) / len(window), "first_loss": first_loss,
               "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0, "chunks": len(chunks),
               "corpus_chars": sum(map(len, texts)), "chars_per_token": chars_per_token,
               "flops": 6.0 * plan.shape.parameters() * plan.tokens}
    write_json_atomic(out_dir / "pretrain.json", metrics)
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def _sample(texts: list[str], max_bytes: int) -> Iterable[str]:
    size = 0
    for t in texts:
        yield t
        size += len(t)
        if size >= max_bytes:
            return


def _chars_per_token(tokenizer: Any, texts: list[str]) -> float:
    sample = list(_sample(texts, 200_000))
    chars = sum(map(len, sample))
    tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    return chars / max(tokens, 1)


def _sample_for(plan: ScratchPlan, chunks: list[str], orders: dict[int, list[int]], index: int, fim: Any) -> str:
    """The training text at global sample `index`: epoch after epoch over a seeded permutation of the chunks,
    FIM or plain by a draw seeded with the index (a resumed run makes the same samples)."""
    epoch, at = divmod(index, len(chunks))
    if epoch not in orders:
        order = list(range(len(chunks)))
        random.Random(f"{plan.seed}:epoch:{epoch}").shuffle(order)
        orders.clear()
        orders[epoch] = order
    return sample_text(chunks[orders[epoch][at]], fim, plan.fim, random.Random(f"{plan.seed}:sample:{index}"))


def _batch(ids: list[list[int]], seq_len: int, pad_id: int) -> tuple[Any, Any, int]:
    """Right-padded inputs and labels (-100 on padding); no attention mask is needed under the causal mask."""
    import torch

    rows = [r[:seq_len] for r in ids]
    width = max(len(r) for r in rows)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = torch.tensor(r)
        labels[i, :len(r)] = torch.tensor(r)
    return batch, labels, sum(len(r) for r in rows)


def _lr(plan: ScratchPlan, step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""
    if step < warmup:
        return plan.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return plan.learning_rate * (plan.min_lr_ratio + (1 - plan.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _progress(out_dir: Path, step: int, total: int, losses: list[float], tokens: int, elapsed: float,
              start: int) -> None:
    done_here = step - start
    eta = (total - step) * elapsed / done_here if done_here else None
    progress = {"stage": "scratch", "step": step, "max_steps": total, "loss": sum(losses) / len(losses),
                "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed else 0.0, "elapsed_s": elapsed,
                "eta_s": eta, "pid": os.getpid()}
    write_json_atomic(out_dir / "progress.json", progress)
    log.info("scratch: step %d/%d loss %.4f %s tokens/s ETA %s", step, total, progress["loss"],
             f"{progress['tokens_per_s']:,.0f}", format_seconds(eta) if eta is not None else "-")


def _save_checkpoint(ckpt: Path, model: Any, optimizer: Any, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    final = ckpt / f"step-{step:07d}"
    tmp = ckpt / f".step-{step:07d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in ckpt.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)


def _load_checkpoint(ckpt: Path, model: Any, optimizer: Any) -> int:
    import torch
    from safetensors.torch import load_file

    found = sorted(ckpt.glob("step-[0-9]*")) if ckpt.is_dir() else []
    if not found:
        return 0
    latest = found[-1]
    model.load_state_dict(load_file(str(latest / "model.safetensors"), device=str(next(model.parameters()).device)))
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=False)["optimizer"])
    step: int = json.loads((latest / "state.json").read_text())["step"]
    log.info("resuming from %s", latest)
    return step


# -- the command ---------------------------------------------------------------------------------------------

def parse_count(text: str) -> float:
    """"600k", "2.5M", "1e14", "3G" -> a number."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
    t = text.strip().lower()
    return float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.pretrain.scratch", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("corpus", type=Path, help="a folder of code (read recursively)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--params", type=parse_count, help="parameter budget, e.g. 600k or 5M")
    budget.add_argument("--flops", type=parse_count, help="compute budget in FLOPs (6 x parameters x tokens)")
    parser.add_argument("--tokens", type=parse_count, help="training tokens (default: 20 per parameter)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2.5-coder",
                        help="whose special and FIM tokens the tokenizer gets")
    parser.add_argument("--vocab-size", type=int, help="default: grows with the parameter budget")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--fim-rate", type=float, default=0.5, help="share of samples laid out as FIM")
    parser.add_argument("--include", action="append", default=[], help="glob on relative paths (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], help="glob on relative paths (repeatable)")
    parser.add_argument("--max-corpus-bytes", type=parse_count, default=0, help="0 = the whole folder")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    import transformers

    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum": files are chunked
    try:
        budget_ = plan_budget(params=int(args.params) if args.params else None, flops=args.flops,
                              tokens=int(args.tokens) if args.tokens else None, vocab_size=args.vocab_size,
                              max_position=max(2048, args.seq_len))
    except ValueError as e:
        parser.error(str(e))
    texts = [t for _, t in read_corpus(args.corpus, tuple(args.include), tuple(args.exclude),
                                       int(args.max_corpus_bytes), args.seed)]
    if not texts:
        print(f"no usable code files under {args.corpus}", file=sys.stderr)
        return 2
    plan = ScratchPlan(family=args.family, shape=budget_.shape, tokens=budget_.tokens, seq_len=args.seq_len,
                       batch_size=args.batch_size, learning_rate=args.learning_rate,
                       fim=FimShape(fim_rate=args.fim_rate, spm_rate=0.5, max_middle_lines=6, max_block_lines=30,
                                    block_fraction=0.3), seed=args.seed)
    log.info("corpus: %d files, %s characters from %s", len(texts), f"{sum(map(len, texts)):,}", args.corpus)
    try:
        metrics = pretrain(args.out_dir, texts, plan, checkpoint_every=args.checkpoint_every)
    except Stopped as e:
        log.warning("%s", e)
        return 75
    print(f"model: {metrics['parameters']:,} parameters, {metrics['tokens']:,} tokens, loss {metrics['loss']:.3f} "
          f"in {format_seconds(metrics['seconds'])} -> {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
