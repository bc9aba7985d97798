"""A LoRA linear layer for CPU training whose scaling, dropout scale and residual add ride inside one GEMM.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling`: besides the two small matmuls, that is a pass
over x for the dropout mask and another to apply it, then a multiply and an add over the full output, and
the multiply again in backward. On a small model those elementwise passes cost about as much as the matmuls
they decorate (width 256: the seven LoRA layers of a block put 2,240 input and 2,432 output features
through them per token). Here the same sum is one `addmm`: the base output is its input, B's product is
added with `alpha = scaling / (1 - p)`, and the dropout is the bare boolean mask (LaneDropout's own draws,
pipelines/train/dropout.py), its 1 / (1 - p) moved into alpha because B(A(x * m * s)) = s * B(A(x * m)). The
mask is saved for backward as bytes instead of floats. On the bench model (8 rows x 427 tokens, one thread, CPU
seconds, 5 alternating runs) three forward+backward passes took 2.34 s instead of 2.54 (-8%), with gradients
equal within 1.2e-6 relative (bench/README.md, "Training").

It is peft's own `lora.Linear` (registered through LoraConfig's custom-module mapping, the documented way to
give peft another layer class): weights, state dict, merging and saving are peft's, and any case this
forward does not cover (several or disabled adapters, DoRA and other variants, a LoRA bias, a dtype cast,
extra arguments) is peft's forward unchanged. CUDA keeps peft's layer: there the elementwise work is cheap.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from pipelines.train.dropout import LANE, LaneDropout


class CpuLoraLinear(LoraLinear):
    """peft's LoRA linear layer with one adapter's forward as a single addmm (see the module docstring)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.active_adapters
        name = names[0] if len(names) == 1 else None
        if (args or kwargs or self.disable_adapters or self.merged or name is None or name not in self.lora_A
                or name in self.lora_variant or self.lora_bias.get(name, False)
                or self.lora_A[name].weight.dtype != x.dtype):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        dropout = self.lora_dropout[name]
        alpha = self.scaling[name]
        if isinstance(dropout, LaneDropout) and dropout.training and 0 < round(dropout.p * LANE) < LANE:
            x = x * dropout.keep(x)
            alpha *= dropout.scale
        else:
            x = dropout(x)  # identity when p = 0 or not training
        h = self.lora_A[name](x)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                          self.lora_B[name].weight.t(), alpha=alpha)
        return out.view(result.shape)
