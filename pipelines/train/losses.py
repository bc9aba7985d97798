"""Per-token log-probabilities at the positions a loss needs, and the SFT, DPO and KTO losses built on them.

The model is run as decoder + LM head rather than through its `forward`: the head (the largest matmul of
a small model, and a 151k-wide one on Qwen2.5) is applied only where a target token is, about 11% of the
positions of a FIM row. TRL's fused LM head computes every position, and its entropy and accuracy metrics
besides; that took about half of each CPU step here (DESIGN.md).

On CUDA the head runs in chunks of `chunk_tokens` target positions, each recomputed in the backward pass,
so the logits of a long batch never exist all at once (8 rows x 200 middle tokens x 151,936 vocabulary in
fp32 would be 1 GB). On CPU memory is not the limit and recomputation would only cost time: one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipelines.train.batching import Batch


@dataclass(frozen=True)
class LM:
    """The parts of a (PEFT-wrapped) causal LM the losses call."""

    decoder: Any  # the transformer body: input ids -> hidden states
    head: Any  # hidden states -> logits
    softcap: float | None  # Gemma-2 style final logit soft-capping, applied as the model's own forward does
    chunk_tokens: int | None  # None = the whole batch's targets at once

    @classmethod
    def of(cls, model: Any, chunk_tokens: int | None) -> LM:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        softcap = getattr(base.config, "final_logit_softcapping", None)
        return cls(decoder=base.get_decoder(), head=base.get_output_embeddings(), softcap=softcap,
                   chunk_tokens=chunk_tokens)


def _target_logps(lm: LM, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm.head(hidden).float()
    if lm.softcap:
        logits = torch.tanh(logits / lm.softcap) * lm.softcap
    return -F.cross_entropy(logits, targets, reduction="none")


def token_logps(lm: LM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token, the batch row it belongs to), targets in row-major order.

    No attention mask: rows are right-padded, and under the causal mask no real token sees a pad after it.
    """
    hidden = lm.decoder(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    mask = batch.targets != -100
    rows = mask.nonzero()[:, 0]
    hidden, targets = hidden[mask], batch.targets[mask]
    if lm.chunk_tokens is None or len(targets) <= lm.chunk_tokens:
        return _target_logps(lm, hidden, targets), rows
    parts = [checkpoint(_target_logps, lm, hidden[k:k + lm.chunk_tokens], targets[k:k + lm.chunk_tokens],
                        use_reentrant=False)
             for k in range(0, len(targets), lm.chunk_tokens)]
    return torch.cat(parts), rows


def sequence_logps(lm: LM, batch: Batch) -> torch.Tensor:
    """Log-likelihood of each row's completion (sum over its tokens), shape [rows]."""
    logps, rows = token_logps(lm, batch)
    out = torch.zeros(batch.input_ids.shape[0], dtype=logps.dtype, device=logps.device)
    return out.index_add(0, rows, logps)


def sft_loss(lm: LM, batch: Batch, step_targets: float) -> torch.Tensor:
    """Summed NLL of the batch's middle tokens over the whole optimizer step's middle tokens, so gradient
    accumulation and several processes add up to the mean over the step, whatever the micro-batch size."""
    logps, _ = token_logps(lm, batch)
    return -logps.sum() / step_targets


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, chosen_tokens: torch.Tensor,
             sft_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss per pair plus `sft_weight` x the chosen completion's NLL per token (RPO, Pang et al.
    2024), and whether the implicit reward ranks the pair right.

    Pure DPO only widens the gap between chosen and rejected, and lowers both likelihoods doing it: on the
    tiny model (tests/runs.py rows, 12 steps at lr 3e-3 after SFT) it took held-out loss from 1.23 to 1.61,
    edit similarity from 0.87 to 0.64 and exact match from 0.29 to 0, an adapter the gate would refuse.
    With the NLL term (weight 1) the same steps gave 1.19, 0.87 and 0.29, and preference accuracy rose
    from 0.75 to 0.92 (0.88 without it).
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin) - sft_weight * policy_chosen / chosen_tokens, (margin > 0).float()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float, undesirable_weight: float, tokens: torch.Tensor,
             sft_weight: float) -> torch.Tensor:
    """KTO loss per row (Ethayarajh et al. 2024): value of the reward relative to the KL reference point,
    plus `sft_weight` x the NLL per token of desirable rows (as for DPO above).

    `kl` is the step's detached estimate of KL(policy || reference), from mismatched prompt/completion
    pairs, clamped at 0 as in the paper and TRL.
    """
    reward = policy - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (reward - kl))) - sft_weight * policy / tokens
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - reward)))
    return torch.where(desirable, good, bad)
