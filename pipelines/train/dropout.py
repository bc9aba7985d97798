"""LoRA dropout on CPU: the same Bernoulli mask and 1/(1-p) scaling as torch's dropout, drawn four at a time.

peft puts a dropout in front of every LoRA A matrix: 7 per Llama layer, since the q, k and v projections (and
gate and up) each draw their own mask over the same input. On CPU, `torch.nn.Dropout` draws every mask element
with a call of its own to the Mersenne Twister (`bernoulli_`): on the bench's 5M Llama that was 12.6% of an SFT
step at one thread (bench/README.md). One 64-bit draw holds four independent 15-bit lanes, so a mask costs a
quarter of the generator calls: dropout forward and backward on 8 x 494 x 704 floats took 6.6 ms instead of
16.5 ms. On CUDA torch's fused dropout kernel is already cheap and stays.
"""

from __future__ import annotations

from typing import Any

import torch

# Each lane is a uniform integer in [0, 2**15): an element is dropped when its lane is below round(p * 2**15).
LANE = 1 << 15


class LaneDropout(torch.nn.Dropout):
    """`nn.Dropout` (its subclass, so everything that finds or switches off dropout by type still does, e.g.
    the preference stages' p = 0) with p rounded to a multiple of 1/32,768 (0.05 -> 0.049988) and the kept
    elements scaled by 1/(1 - that p), so the expected output is still the input. Draws from torch's default
    generator, whose state checkpoints save, so a resumed run draws the same masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = round(self.p * LANE)
        if not self.training or threshold == 0:
            return x
        if threshold >= LANE:
            return x * 0.0
        return x * (self.keep(x) * self.scale).to(x.dtype)

    @property
    def scale(self) -> float:
        """What a kept element is multiplied by: 1 / (1 - p), p as rounded."""
        return LANE / (LANE - round(self.p * LANE))

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """The boolean mask `forward` applies to x (the same draws): True where an element is kept.
        For 0 < p < 1 only."""
        n = x.numel()
        lanes = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_().view(torch.int16)
        return lanes[:n].view(x.shape).bitwise_and_(LANE - 1) >= round(self.p * LANE)


def use_lane_dropout(model: Any) -> int:
    """Replace the LoRA dropouts of a peft model with LaneDropout of the same p; returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = LaneDropout(p=dropout.p)
                replaced += 1
    return replaced
