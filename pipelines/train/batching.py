"""Rows as token ids, optimizer steps as length-grouped row lists, and micro-batches as right-padded tensors.

Three choices make devtune's training step cheaper than TRL's on the same rows (bench/README.md):
- Length grouping: each optimizer step takes rows of similar length (sorted within a shuffled megabatch of
  16 steps), so a batch pads to a width close to its rows' own. With random batches of the sample data
  only 58-86% of the tokens a step computed were real.
- Right padding with no attention mask: under a causal mask a real token never attends to a pad token
  placed after it, so batches need no padding mask and SDPA takes its `is_causal` kernel. The positions
  are 0..n-1 per row, as unpadded rows have them; no row attends to another (unlike `wrapped` packing).
- Targets only where the loss is: the middle of a FIM row (about 11% of its tokens in the sample data).
  The LM head and the cross-entropy run on those positions only (see pipelines/train/losses.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Steps per megabatch for length grouping: 16 keeps batches about as even as sorting everything, while the
# order of steps (and so the data each part of the learning-rate schedule sees) stays random.
MEGABATCH_STEPS = 16


@dataclass(frozen=True)
class Encoded:
    """One training sequence: the prompt's tokens, then the completion's (the only tokens with a loss)."""

    ids: list[int]
    n_prompt: int

    @property
    def n_target(self) -> int:
        return len(self.ids) - self.n_prompt


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [rows, width], right-padded
    targets: torch.Tensor  # [rows, width]: the next token where a loss applies, -100 elsewhere
    tokens: int  # real (non-padding) tokens in the batch


def encode(tokenizer: Any, prompts: list[str], completions: list[str], max_tokens: int,
           add_special_tokens: bool = True) -> list[Encoded | None]:
    """Tokenize prompt and completion separately, as evaluation does; None for a row whose completion alone
    does not fit. A row over `max_tokens` loses the start of its prompt: the dataset builder already fits
    rows to max_row_tokens, so this only guards against a tokenizer that counts differently.
    `add_special_tokens=False` is for text that carries its own (a rendered chat template)."""
    prompt_ids = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"] if prompts else []
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
    out: list[Encoded | None] = []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        if not p or not c or len(c) >= max_tokens:  # the first middle token is predicted from the prompt's last
            out.append(None)
            continue
        if len(p) + len(c) > max_tokens:
            p = p[len(p) + len(c) - max_tokens:]
        out.append(Encoded(ids=list(p) + list(c), n_prompt=len(p)))
    return out


def plan_steps(lengths: Sequence[int], rows_per_step: int, n_steps: int, seed: int) -> list[list[int]]:
    """`n_steps` optimizer steps of `rows_per_step` row indices each, length-grouped, epoch after epoch.

    The step holding the longest row goes first, so a batch that does not fit in memory fails (and is
    split, see pipelines/train/fit.py) in the first seconds, not hours in.
    """
    n = len(lengths)
    if n == 0 or n_steps <= 0:
        return []
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < n_steps:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(n))
        rng.shuffle(order)
        mega = rows_per_step * MEGABATCH_STEPS
        epoch_steps: list[list[int]] = []
        for start in range(0, n, mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
            epoch_steps += [chunk[k:k + rows_per_step] for k in range(0, len(chunk), rows_per_step)]
        rng.shuffle(epoch_steps)
        longest = max(range(len(epoch_steps)), key=lambda k: max(lengths[i] for i in epoch_steps[k]))
        epoch_steps.insert(0, epoch_steps.pop(longest))
        steps += epoch_steps
        epoch += 1
    return steps[:n_steps]


def steps_for(n_rows: int, rows_per_step: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps for a stage: `max_steps` when set, else enough for `epochs` passes."""
    if max_steps > 0:
        return max_steps
    return max(1, round(n_rows * epochs / rows_per_step)) if n_rows else 0


def micro_batches(rows: Sequence[int], lengths: Sequence[int], micro: int) -> list[list[int]]:
    """Split one step's rows into micro-batches of at most `micro` rows, longest first."""
    ordered = sorted(rows, key=lambda i: -lengths[i])
    return [ordered[k:k + micro] for k in range(0, len(ordered), micro)]


def collate(seqs: Sequence[Encoded], pad_id: int, device: torch.device) -> Batch:
    """Right-padded input ids and next-token targets at completion positions (position t predicts t+1)."""
    width = max(len(s.ids) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids = torch.tensor(s.ids, dtype=torch.long)
        input_ids[row, : len(s.ids)] = ids
        targets[row, s.n_prompt - 1: len(s.ids) - 1] = ids[s.n_prompt:]
    return Batch(input_ids=input_ids.to(device, non_blocking=True), targets=targets.to(device, non_blocking=True),
                 tokens=sum(len(s.ids) for s in seqs))
