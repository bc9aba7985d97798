from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face hub: one that tries fails at once instead of hanging on the network.
# Set before anything imports huggingface_hub; child processes inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-shaped model and tokenizer, built and briefly pretrained once per test session.

    60 pretraining steps (~3 s) on generic code give a base whose logits are not flat, so a few LoRA steps
    move held-out loss measurably, as they do on a real base model.
    """
    from pipelines.sample import generic_corpus
    from pipelines.tiny import TinyShape, build_tiny

    out = tmp_path_factory.mktemp("tiny-model")
    shape = TinyShape(vocab_size=512, hidden_size=64, intermediate_size=160)
    build_tiny(out, generic_corpus(limit_bytes=400_000), shape, pretrain_steps=60)
    return out
