"""Causal attention on CPU in query blocks, so that keys after a block are never computed.

torch's CPU SDPA kernel took as long with `is_causal=True` as without a mask (8 x 4 heads x 512 positions:
88.9 against 83.7 ms forward, 302 against 288 ms forward and backward, one thread): half of its work is on scores
the mask then discards. Here the queries go in blocks of BLOCK_QUERIES: block i computes scores against keys
0..end(i) only, its last (diagonal) part with a causal mask, so about (n + 1) / 2n of the scores are computed for
n blocks instead of all of them. Forward and backward, 8 x 4 heads (2 KV heads), head dim 64, one thread, CPU
seconds, one run each under a load of ~9 on 2 cores: 86.6 -> 65.6 ms at 512 positions, 52.0 -> 39.5 at 384, 45.9 ->
21.5 at 256 (bench/README.md, "Training").

It is registered with transformers' AttentionInterface as "devtune_sdpa" (with SDPA's mask creation) and
loaded only on CPU; CUDA keeps SDPA, whose kernels skip the masked blocks themselves. Anything but a batch
without a mask or with a mask contained in the causal one (devtune's right-padded rows, and its shared-prompt
rows, see pipelines/train/batching.py) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "devtune_sdpa"
# Queries per block. Measured on the shapes above (forward and backward, ms at 256 / 384 / 512 positions):
# 64: 34.7 / 45.9 / 66.5; 128: 21.5 / 39.5 / 65.6; 256: (one block, plain SDPA) / 42.7 / 71.3. Smaller blocks skip
# more keys but run more, smaller kernels.
BLOCK_QUERIES = 128


def blocked_causal_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [batch, heads, q, dim], key and value [batch, kv heads,
    k, dim]; returns [batch, q, heads, dim]. A boolean `attention_mask` must not let a query see a later key
    (devtune's masks never do); blocks then skip the keys after them exactly."""
    q_length, k_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (attention_mask is None and causal) or (attention_mask is not None and attention_mask.dtype == torch.bool)
    if (not plain or q_length != k_length or q_length <= BLOCK_QUERIES or dropout > 0.0
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and attention_mask is not None:  # SDPA takes enable_gqa only without a mask on CPU
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    gqa = {"enable_gqa": True} if groups > 1 and attention_mask is None else {}
    outputs = []
    for start in range(0, q_length, BLOCK_QUERIES):
        end = min(q_length, start + BLOCK_QUERIES)
        if attention_mask is not None:
            mask: torch.Tensor | None = attention_mask[:, :, start:end, :end]
        elif start == 0:
            mask = None
        else:
            mask = torch.ones(end - start, end, dtype=torch.bool, device=query.device).tril(start)
        out = F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                                             attn_mask=mask, is_causal=start == 0 and attention_mask is None,
                                             scale=scaling, **gqa)
        outputs.append(out.transpose(1, 2))
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(NAME, blocked_causal_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
