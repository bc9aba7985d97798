"""A LoRA adapter as a llama.cpp GGUF adapter file, for llama.cpp (`--lora`) and Ollama (`ADAPTER`).

Written the way llama.cpp's own convert_lora_to_gguf.py writes it, with the `gguf` package llama.cpp
maintains (the same writer that script uses), so what llama.cpp's loader (src/llama-adapter.cpp) checks
holds by construction:

- general.architecture is the base model's llama.cpp architecture ("model arch and LoRA arch mismatch"
  otherwise); general.type = "adapter"; adapter.type = "lora".
- adapter.lora.alpha is a float32: the loader reads it with gguf_get_val_f32, which aborts on any other
  type, so an int written by a careless writer crashes llama.cpp. llama.cpp scales each pair by
  alpha / rank, rank read from the tensor (lora_b's ne[0]), as peft does without rsLoRA.
- Tensors are named like the base tensor they adapt plus ".lora_a" / ".lora_b" (blk.0.attn_q.weight.lora_a),
  names from the `gguf` package's own HF -> GGUF table. lora_a keeps peft's (rank, in) and lora_b its
  (out, rank) numpy layout; the writer reverses them into ggml's ne order, which the loader checks against
  the base tensor ("has incorrect shape" / "lora_a tensor is not transposed" otherwise).
- For Llama-family models llama.cpp's convert_hf_to_gguf.py reorders the rows of the q and k weights
  (LlamaModel.permute: from Hugging Face's half-split rotary layout back to the interleaved one llama.cpp's
  rope expects). A LoRA delta B @ A adds to those rows, so B's rows must move the same way (A multiplies the
  input and is left alone): convert_lora_to_gguf.py gets exactly this through its LoraTorchTensor, whose
  reshape/permute act on B only. Without it the file loads and every attention score is silently wrong.
- Tensors are float32 (convert_lora_to_gguf.py's default --outtype): a rank-16 adapter on a 1.5B model is
  ~70 MB in f32, small next to the base, and exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class GgufArch:
    """How llama.cpp's converter treats a Hugging Face architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool  # convert_hf_to_gguf.py permutes q/k rows (LlamaModel.undo_permute = True)


# The Hugging Face architectures (config.json "architectures") whose GGUF conversion is known here, with
# what llama.cpp's convert_hf_to_gguf.py does to them: LlamaModel (registered for Llama and Mistral)
# permutes q and k; Qwen2Model and Qwen3Model (Qwen2.5-Coder, Qwen3) do not, their rope is NEOX-style in
# llama.cpp. Any other architecture is refused rather than guessed: a wrong guess gives a file that loads
# and answers wrongly.
GGUF_ARCHITECTURES: dict[str, GgufArch] = {
    "LlamaForCausalLM": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": GgufArch(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    "Qwen3ForCausalLM": GgufArch(gguf.MODEL_ARCH.QWEN3, permute_qk=False),
}


@dataclass(frozen=True)
class BaseShape:
    """What the GGUF adapter needs to know of its base model (from its config.json)."""

    architecture: str  # Hugging Face class name, a key of GGUF_ARCHITECTURES
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: `module` as Hugging Face names it (model.layers.0.self_attn.q_proj),
    A as (rank, in) and B as (out, rank), B already carrying any scaling beyond alpha / rank."""

    module: str
    a: F32
    b: F32


def permute_rows(weights: F32, n_head: int) -> F32:
    """llama.cpp's LlamaModel.permute on the rows of a q or k weight (or of its LoRA B): within each head,
    the half-split rotary pairs (i, i + d/2) become adjacent rows (2i, 2i + 1)."""
    rows = weights.shape[0]
    return np.ascontiguousarray(
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape))


def write_lora_gguf(path: Path, pairs: list[LoraPair], alpha: float, base: BaseShape, name: str) -> int:
    """Write `pairs` as a GGUF LoRA adapter for `base` at `path`; returns the number of tensors written."""
    kind = GGUF_ARCHITECTURES[base.architecture]
    # The llama.cpp name of the base weight each module adapts (model.layers.3.mlp.down_proj ->
    # blk.3.ffn_down.weight): the `gguf` package's table, as convert_hf_to_gguf.py uses it.
    names = gguf.get_tensor_name_map(kind.arch, base.num_hidden_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[kind.arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    count = 0
    for pair in pairs:
        b = pair.b
        if kind.permute_qk and pair.module.endswith(".q_proj"):
            b = permute_rows(b, base.num_attention_heads)
        elif kind.permute_qk and pair.module.endswith(".k_proj"):
            # LlamaModel.permute(w, n_head, n_head_kv) uses the KV head count for k under GQA.
            b = permute_rows(b, base.num_key_value_heads)
        target = names.get_name(pair.module + ".weight", try_suffixes=(".weight",))
        assert target is not None, f"llama.cpp has no tensor for {pair.module}"  # checked by check_adapter
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(pair.a, dtype=np.float32))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        count += 2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count
