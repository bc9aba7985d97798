"""Out-of-memory during a training step: recognise it, free what the failed step held, say what to do.

The loop in pipelines/train/fit.py answers an out-of-memory by halving the micro-batch and running twice as many
micro-batches for the same optimizer step, so the effective batch, the data order and the learning curve
stay what the config asked for; only when one row alone does not fit does the run fail, with this message.
"""

from __future__ import annotations

import gc

import torch


class OutOfMemory(RuntimeError):
    """Even one row per micro-batch does not fit; the message lists the settings that would make it fit."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator failing (a RuntimeError, e.g. under a memory limit)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def free_memory() -> None:
    """Drop the failed step's activations: the frames of the exception are gone once this runs."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory_advice(tokens: int, device: str) -> str:
    fixes = ["lower [datasets] max_row_tokens (the longest row decides)", "a smaller [train] lora_r"]
    if device == "cuda":
        fixes = ["[train] gradient_checkpointing = true", "[train] qlora = true (4-bit base weights)", *fixes]
    return (f"out of memory with one row ({tokens:,} tokens) per micro-batch on {device}: nothing left to halve. "
            f"Try {'; or '.join(fixes)}")
