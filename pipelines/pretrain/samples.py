"""Causal-LM training samples from source files: line-aligned chunks, a share rewritten as FIM examples.

Both pretraining paths use these: from scratch (pipelines/pretrain/scratch.py) and continued pretraining on a
team's code (pipelines/pretrain/cpt.py). A file is cut at line starts into chunks that fit one training
sequence; a `fim_rate` share of the chunks becomes a fill-in-the-middle example in the base tokenizer's own
layout (`FimTokens.psm`, or `spm` for a `spm_rate` share where the family has it), exactly the text the dataset
builder and an editor's prompt hold: prompt, then the middle, then the end-of-middle token. The rest stays plain
text, every token a target.

The middle is cut as the dataset builder cuts committed code (pipelines/datasets/sft.py): 1..max_middle_lines
whole lines, or for `block_fraction` of the draws the body of an indented block, and a quarter of the time it
starts inside its first line (a cursor after some typed characters). Code models are pretrained on random
character spans (StarCoder: fim_rate 0.5, spm 0.5); here the middles look like the completions devtune is
asked for, so a small base learns where a middle ends. Pure Python: the service may import it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipelines.datasets.sft import block_bodies
from pipelines.tokens import FimTokens

MID_LINE_SHARE = 0.25  # middles that start inside their first line


@dataclass(frozen=True)
class FimShape:
    """How samples are made: the share of FIM chunks and the middles cut in them."""

    fim_rate: float  # share of chunks laid out as FIM examples; the rest are plain text
    spm_rate: float  # share of those laid out suffix-first, when the family was trained on it
    max_middle_lines: int
    max_block_lines: int
    block_fraction: float


def chunk_lines(text: str, max_chars: int) -> list[str]:
    """`text` cut at line starts into pieces of at most `max_chars` (a longer line is cut where it must be)."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                out.append("".join(current))
                current, size = [], 0
            out.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            out.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        out.append("".join(current))
    return [c for c in out if c.strip()]


def sample_text(chunk: str, fim: FimTokens, shape: FimShape, rng: random.Random) -> str:
    """The chunk as a training text: a FIM example for `fim_rate` of draws (when it has lines to cut), else as is."""
    if rng.random() >= shape.fim_rate:
        return chunk
    lines = chunk.splitlines(keepends=True)
    if len(lines) < 2:
        return chunk
    span = _middle_span(lines, shape, rng)
    start, end = span  # 0-based, end exclusive
    prefix, middle, suffix = "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])
    if rng.random() < MID_LINE_SHARE:
        first = lines[start]
        indent = len(first) - len(first.lstrip())
        if len(first) - indent > 2:
            cut = rng.randint(indent + 1, len(first.rstrip("\n")) - 1)
            prefix, middle = prefix + first[:cut], middle[cut:]
    if not middle.strip():
        return chunk
    spm = fim.spm_supported and rng.random() < shape.spm_rate
    prompt = fim.spm(prefix, suffix) if spm else fim.psm(prefix, suffix)
    return prompt + middle + fim.eos


def _middle_span(lines: list[str], shape: FimShape, rng: random.Random) -> tuple[int, int]:
    if rng.random() < shape.block_fraction:
        blocks = block_bodies(lines, [(1, len(lines))], shape.max_block_lines)
        if blocks:
            first, last = rng.choice(blocks)  # 1-based, inclusive
            return first - 1, last
    candidates = [i for i, line in enumerate(lines) if line.strip()]
    start = rng.choice(candidates) if candidates else 0
    return start, min(len(lines), start + rng.randint(1, shape.max_middle_lines))
