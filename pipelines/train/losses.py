"""Per-token log-probabilities at the positions a loss needs, and the SFT, DPO and KTO losses built on them.

The model is run as decoder + LM head rather than through its `forward`: the head (the largest matmul of
a small model, and a 151k-wide one on Qwen2.5) is applied only where a target token is, about 11% of the
positions of a FIM row. TRL's fused LM head computes every position, and its entropy and accuracy metrics
besides; that took about half of each CPU step here (DESIGN.md).

For the same reason the last decoder layer's MLP runs only at those positions: no later layer reads the
others, and the head does not either (`only_where_read`). That is the MLP of 1 layer in N over ~85% of the
positions: 15-20% of an SFT step on the bench's 4-layer model, about 2% on a 28-layer one (bench/README.md).

On CUDA the head runs in chunks of `chunk_tokens` target positions, each recomputed in the backward pass,
so the logits of a long batch never exist all at once (8 rows x 200 middle tokens x 151,936 vocabulary in
fp32 would be 1 GB). On CPU memory is not the limit and recomputation would only cost time: one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipelines.train.batching import Batch, SharedBatch


@dataclass(frozen=True)
class LM:
    """The parts of a (PEFT-wrapped) causal LM the losses call."""

    decoder: Any  # the transformer body: input ids -> hidden states
    head: Any  # hidden states -> logits
    softcap: float | None  # Gemma-2 style final logit soft-capping, applied as the model's own forward does
    chunk_tokens: int | None  # None = the whole batch's targets at once
    # The attention takes a boolean 4-D mask (SDPA, or its blocked form on CPU: pipelines/train/attention.py), so
    # completions can share their prompt's row (pipelines/train/batching.py, Shared); other attention
    # implementations (FlashAttention, eager) get one row per completion.
    shares_prompts: bool = False
    # The last decoder layer's dense MLP, run only where a loss reads (see `only_where_read`); None for MoE
    # layers (their router losses see every token) and under gradient checkpointing (its recomputation in
    # backward would run the MLP on every position).
    last_mlp: Any = None

    @classmethod
    def of(cls, model: Any, chunk_tokens: int | None) -> LM:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        softcap = getattr(base.config, "final_logit_softcapping", None)
        decoder = base.get_decoder()
        layers = getattr(decoder, "layers", None)
        mlp = getattr(layers[-1], "mlp", None) if layers else None
        dense = mlp is not None and hasattr(mlp, "down_proj") and not hasattr(mlp, "experts")
        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())
        return cls(decoder=decoder, head=base.get_output_embeddings(), softcap=softcap, chunk_tokens=chunk_tokens,
                   shares_prompts=getattr(base.config, "_attn_implementation", None) in ("sdpa", "devtune_sdpa"),
                   last_mlp=mlp if dense and not checkpointing else None)


@contextmanager
def only_where_read(lm: LM, flat: torch.Tensor) -> Iterator[None]:
    """Run the last layer's MLP only at `flat` (row * width + position, ascending) during this forward; its
    output elsewhere is zero, so the hidden state there is wrong, and read by nothing."""
    if lm.last_mlp is None:
        yield
        return
    shape: list[torch.Size] = []

    def gather(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        shape.append(args[0].shape)
        return (args[0].reshape(-1, args[0].shape[-1])[flat], *args[1:])

    def scatter(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        *lead, width = shape.pop()
        return out.new_zeros(math.prod(lead), width).index_copy(0, flat, out).view(*lead, width)

    handles = [lm.last_mlp.register_forward_pre_hook(gather), lm.last_mlp.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _target_logps(lm: LM, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm.head(hidden).float()
    if lm.softcap:
        logits = torch.tanh(logits / lm.softcap) * lm.softcap
    return -F.cross_entropy(logits, targets, reduction="none")


def _head_logps(lm: LM, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if lm.chunk_tokens is None or len(targets) <= lm.chunk_tokens:
        return _target_logps(lm, hidden, targets)
    parts = [checkpoint(_target_logps, lm, hidden[k:k + lm.chunk_tokens], targets[k:k + lm.chunk_tokens],
                        use_reentrant=False)
             for k in range(0, len(targets), lm.chunk_tokens)]
    return torch.cat(parts)


def token_logps(lm: LM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token, the batch row it belongs to), targets in row-major order.

    No attention mask: rows are right-padded, and under the causal mask no real token sees a pad after it.
    """
    read = (batch.targets != -100).view(-1).nonzero()[:, 0]
    with only_where_read(lm, read):
        hidden = lm.decoder(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    rows = read // batch.targets.shape[1]
    return _head_logps(lm, hidden.reshape(-1, hidden.shape[-1])[read], batch.targets.view(-1)[read]), rows


def shared_logps(lm: LM, batch: SharedBatch) -> torch.Tensor:
    """Log-likelihood of each completion of a `collate_shared` batch, shape [units * k] (unit-major)."""
    with only_where_read(lm, torch.unique(batch.at)):
        hidden = lm.decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.mask,
                            use_cache=False).last_hidden_state
    logps = _head_logps(lm, hidden.reshape(-1, hidden.shape[-1])[batch.at], batch.targets)
    return torch.zeros(batch.slots, dtype=logps.dtype, device=logps.device).index_add(0, batch.slot, logps)


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
