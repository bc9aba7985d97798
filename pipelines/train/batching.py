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


@dataclass(frozen=True)
class Shared:
    """One prompt and the completions scored after it (DPO: chosen and rejected; KTO: the row's own completion
    and another row's, for the KL estimate). With `share`, `collate_shared` lays them out as one row in which
    each completion sees the prompt and its own tokens but not the other completions, so the prompt goes
    through the model once instead of once per completion."""

    prompt: list[int]
    completions: tuple[list[int], ...]

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)


@dataclass(frozen=True)
class SharedBatch:
    input_ids: torch.Tensor  # [rows, width], right-padded
    position_ids: torch.Tensor | None  # [rows, width]: every completion continues the prompt's positions
    mask: torch.Tensor | None  # [rows, 1, width, width] bool, True where a query may attend to a key
    at: torch.Tensor  # [targets]: flat index (row * width + position) of the hidden state predicting each target
    targets: torch.Tensor  # [targets]: the token predicted there
    slot: torch.Tensor  # [targets]: the completion it belongs to, unit * k + completion index
    slots: int  # units * k
    tokens: int  # real (non-padding) tokens put through the model


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


def collate_shared(units: Sequence[Shared], pad_id: int, device: torch.device, share: bool) -> SharedBatch:
    """Units of k completions each as one batch: with `share`, one row per unit (the completions one after
    another behind the prompt, each one's positions continuing the prompt's, a mask keeping it to the prompt and
    to itself); without, one ordinary right-padded row per completion (no mask, positions 0..n-1), for attention
    implementations that take no mask (FlashAttention)."""
    k = len(units[0].completions)
    assert all(len(u.completions) == k for u in units), "every unit holds the same number of completions"
    rows: list[tuple[list[int], list[int], list[int]]] = []  # ids, positions, segments (0: prompt, c + 1: completion c)
    at: list[tuple[int, int]] = []
    targets: list[int] = []
    slot: list[int] = []
    for u, unit in enumerate(units):
        p = len(unit.prompt)
        for c, completion in enumerate(unit.completions):
            if c == 0 or not share:
                rows.append((list(unit.prompt), list(range(p)), [0] * p))
            r = len(rows) - 1
            ids, positions, segments = rows[r]
            start = len(ids)
            ids += completion
            positions += range(p, p + len(completion))
            segments += [c + 1] * len(completion)
            # Its first token is predicted at the prompt's last position, token j at its own token j - 1.
            at += [(r, p - 1)] + [(r, h) for h in range(start, start + len(completion) - 1)]
            targets += completion
            slot += [u * k + c] * len(completion)
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, (ids, _, _) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    position_ids = mask = None
    if share:
        position_ids = torch.arange(width).repeat(len(rows), 1)
        # Pads are a segment of their own (-1) that sees the prompt and earlier pads, so no query row is empty:
        # an all-masked row gives NaN, and NaN times a zero attention weight is still NaN.
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, (ids, positions, segs) in enumerate(rows):
            position_ids[r, : len(ids)] = torch.tensor(positions, dtype=torch.long)
            segments[r, : len(ids)] = torch.tensor(segs, dtype=torch.long)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (causal & ((segments[:, :, None] == segments[:, None, :]) | (segments == 0)[:, None, :]))[:, None]
        position_ids, mask = position_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return SharedBatch(input_ids=input_ids.to(device, non_blocking=True), position_ids=position_ids, mask=mask,
                       at=torch.tensor([r * width + h for r, h in at], dtype=torch.long).to(device),
                       targets=torch.tensor(targets, dtype=torch.long).to(device),
                       slot=torch.tensor(slot, dtype=torch.long).to(device), slots=len(units) * k,
                       tokens=sum(len(ids) for ids, _, _ in rows))
