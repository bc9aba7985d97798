"""llama.cpp runs an exported adapter.gguf as transformers + peft run the adapter: same greedy next tokens.

    pip install -e '.[llama]'         # llama-cpp-python: builds llama.cpp from source, 7 min on 2 cores
    python bench/gguf_llamacpp.py [--prompts 12] [--new-tokens 16] [--llama-cpp-src DIR]

Not a test: llama.cpp takes too long to build for the suite. Steps, all on the tests' tiny Llama (2 layers,
width 64, 4 query and 2 KV heads, so GQA's k permutation is exercised):

1. the base model, built and pretrained as tests/conftest.py's `tiny_model` (160 steps);
2. three adapters on every q/k/v/o/gate/up/down projection: one trained by devtune's trainer
   (`python -m pipelines.train`, 60 SFT steps on tests/runs.py's FIM rows), one with random A and B, one
   random rsLoRA (r 16, alpha 4, scaled by alpha / sqrt(r));
3. each exported by the real child (`python -m pipelines.publish.exports`);
4. the base written as GGUF with the `gguf` package, as llama.cpp's convert_hf_to_gguf.py writes a Llama
   (its own script refuses this tokenizer: its pre-tokenizer hash is not in its table);
5. llama.cpp (llama-cpp-python) on base.gguf alone and with each adapter.gguf, fed the same token ids as
   transformers (so tokenizers cannot differ), against transformers + peft: the argmax at every position of
   each prompt (teacher forced), and a greedy continuation of --new-tokens from each prompt;
6. a control: the same adapter written without the q/k row permutation must disagree, or the check above
   could not fail;
7. with --llama-cpp-src (a llama.cpp tree, e.g. the one vendored in the llama-cpp-python sdist:
   `pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`), the PEFT export is also converted
   by llama.cpp's own convert_lora_to_gguf.py and the two files compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("DEVTUNE_GGUF_BENCH_DIR", "/tmp/devtune-bench-gguf"))
sys.path.insert(0, str(ROOT / "tests"))  # tests/runs.py: the FIM rows and run directories the tests train on


def build_base(out: Path, arch: str) -> Path:
    """The tests' tiny model (tests/conftest.py tiny_model), built once; with arch "qwen2" the same shape
    as a Qwen2 (q/k/v biases, no q/k permutation in llama.cpp), the family of Qwen2.5-Coder."""
    from pipelines.pretrain.samples import FimShape
    from pipelines.pretrain.scratch import ModelShape, ScratchPlan, pretrain, stdlib_texts

    if not (out / "model.safetensors").is_file():
        shape = ModelShape(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
        plan = ScratchPlan(family="qwen2.5-coder", shape=shape, tokens=160 * 8 * 128, seq_len=128,
                           learning_rate=6e-3, fim=FimShape(0.0, 0.0, 6, 30, 0.3))
        pretrain(out, stdlib_texts(400_000), plan)
        if arch == "qwen2":  # same shape, random weights: the conversion, not the model, is under test
            build_qwen2(out, shape)
    return out


def build_qwen2(out: Path, shape: Any) -> None:
    """Replace the Llama pipelines.pretrain.scratch saved in `out` by a Qwen2 of the same shape."""
    import torch
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    llama = AutoConfig.from_pretrained(out)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=llama.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings,
        eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id, bos_token_id=None,
        tie_word_embeddings=False))
    model.save_pretrained(out)


def trained_adapter(base: Path, work: Path) -> Path:
    """An adapter trained by devtune's own trainer for 60 SFT steps (a few minutes on 2 cores)."""
    from runs import fim_rows, make_run, run_module, train_config

    run_dir = work / "run"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        make_run(run_dir, base, train_config(max_steps=60, preference="none", checkpoint_every_steps=1000,
                                             logging_steps=10),
                 {"sft.jsonl": fim_rows(96, seed=0), "heldout.jsonl": fim_rows(16, seed=2, start_day=25)})
        run_module("pipelines.train", run_dir, timeout=1800)
    return run_dir / "adapter"


def random_adapter(base: Path, out: Path, **lora: Any) -> Path:
    """Random A and B (std 0.15) on every projection: far from the base, as a long-trained adapter is."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if not (out / "adapter_config.json").is_file():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                               LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                                             "task_type": "CAUSAL_LM", **lora}))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
        model.save_pretrained(out)
    return out


def export(adapter: Path, base: Path, version: str, out: Path) -> Path:
    if not (out / "exports.json").is_file():
        subprocess.run([sys.executable, "-m", "pipelines.publish.exports", str(adapter), "--base-model", str(base),
                        "--scope", "team:bench", "--version", version, "--out", str(out)], check=True, cwd=ROOT)
    return out


def write_base_gguf(base: Path, out: Path) -> None:
    """The base model as an F32 GGUF, the way convert_hf_to_gguf.py's LlamaModel (or Qwen2Model) writes
    one: the hyperparameters, the BPE vocabulary ("gpt2" tokenizer model with its merges), tensor names
    from the `gguf` package's map, and for Llama q/k rows permuted (LlamaModel.permute)."""
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from pipelines.publish.lora_gguf import GGUF_ARCHITECTURES, permute_rows

    config = AutoConfig.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    kind = GGUF_ARCHITECTURES[config.architectures[0]]
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[kind.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("devtune-bench-base")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    added = set(tokenizer.get_added_vocab())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # byte-level BPE with GPT-2's split regex, as pipelines/tiny.py trains
    writer.add_token_list([vocab[i] for i in range(config.vocab_size)])
    writer.add_token_types([gguf.TokenType.CONTROL if vocab[i] in added else gguf.TokenType.NORMAL
                            for i in range(config.vocab_size)])
    gguf.SpecialVocab(base, load_merges=True).add_to_gguf(writer)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(kind.arch, config.num_hidden_layers)
    for name, tensor in load_file(str(base / "model.safetensors")).items():
        data = tensor.to(torch.float32).numpy()
        if kind.permute_qk and name.endswith("q_proj.weight"):
            data = permute_rows(data, heads)
        elif kind.permute_qk and name.endswith("k_proj.weight"):
            data = permute_rows(data, kv_heads)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, name
        writer.add_tensor(target, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_wrong_order_control(exported: Path, base: Path, out: Path) -> None:
    """adapter.gguf with q/k lora_b in the other row order: for Llama, Hugging Face's (what a writer that
    forgot the permutation produces); for Qwen2, permuted (a writer treating every model like Llama).
    It loads fine; only its outputs are wrong."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from pipelines.publish.lora_gguf import GGUF_ARCHITECTURES, permute_rows

    config = AutoConfig.from_pretrained(base)
    kind = GGUF_ARCHITECTURES[config.architectures[0]]
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    peft = load_file(str(exported / "peft" / "adapter_model.safetensors"))
    reader = gguf.GGUFReader(exported / "adapter.gguf")
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[kind.arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents()))
    for t in reader.tensors:
        data = np.array(t.data)
        layer, target = t.name.split(".")[1], t.name.split(".")[2]
        if t.name.endswith("lora_b") and target in ("attn_q", "attn_k"):
            data = peft[f"base_model.model.model.layers.{layer}.self_attn.{target[-1]}_proj.lora_B.weight"].numpy()
            if not kind.permute_qk:
                data = permute_rows(data, heads[target])
        writer.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def prompts(base: Path, n: int) -> list[list[int]]:
    """Token ids: held-out FIM prompts with their completion (the rows the trained adapter learned) and
    windows of generic code, 20-60 tokens each."""
    from transformers import AutoTokenizer

    from pipelines.pretrain.scratch import stdlib_texts
    from runs import fim_rows

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = fim_rows(n - n // 3, seed=7, start_day=25)
    texts = [r["prompt"] + r["completion"] for r in rows]
    code = "\n".join(stdlib_texts(40_000))
    texts += [code[i * 997: i * 997 + 200] for i in range(n // 3)]
    return [tokenizer(t)["input_ids"][:60] for t in texts]


class Transformers:
    def __init__(self, base: Path, adapter: Path | None) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, adapter) if adapter else model
        self.model.eval()

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids])).logits[0].numpy()

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = list(ids)
        for _ in range(n):
            out.append(int(self.logits(out)[-1].argmax()))
        return out[len(ids):]


class LlamaCpp:
    def __init__(self, base_gguf: Path, adapter_gguf: Path | None) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf) if adapter_gguf else None,
                         n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out


def compare(reference: Any, candidate: Any, data: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Argmax agreement at every position and at each prompt's last, greedy continuations that match
    exactly, and the largest logit difference."""
    same = total = last_same = max_diff = 0.0
    for ids in data:
        ref, cand = reference.logits(ids), candidate.logits(ids)
        same += float((ref.argmax(-1) == cand.argmax(-1)).sum())
        total += len(ids)
        last_same += float(ref[-1].argmax() == cand[-1].argmax())
        max_diff = max(max_diff, float(np.abs(ref - cand).max()))
    greedy = sum(reference.greedy(ids, new_tokens) == candidate.greedy(ids, new_tokens) for ids in data)
    return {"positions": int(total), "argmax_agree": same / total, "last_agree": f"{int(last_same)}/{len(data)}",
            "greedy_same": f"{greedy}/{len(data)}", "max_abs_logit_diff": max_diff}


def compare_with_llama_cpp_converter(src: Path, exported: Path, base: Path, out: Path) -> dict[str, Any]:
    """Convert the PEFT export with llama.cpp's own convert_lora_to_gguf.py and compare every tensor."""
    import gguf

    subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(base), "--outfile",
                    str(out), "--outtype", "f32", str(exported / "peft")], check=True, capture_output=True)
    ours, theirs = gguf.GGUFReader(exported / "adapter.gguf"), gguf.GGUFReader(out)
    a = {t.name: t for t in ours.tensors}
    b = {t.name: t for t in theirs.tensors}
    alpha = "adapter.lora.alpha"
    return {
        "same_names": sorted(a) == sorted(b),
        "same_shapes_and_types": all(list(a[n].shape) == list(b[n].shape) and a[n].tensor_type == b[n].tensor_type
                                     for n in a if n in b),
        "max_abs_value_diff": max(float(np.abs(np.array(a[n].data) - np.array(b[n].data)).max()) for n in a if n in b),
        "alpha": [ours.fields[alpha].contents(), theirs.fields[alpha].contents()],
        "alpha_types": [gguf.GGUFValueType(ours.fields[alpha].types[0]).name,
                        gguf.GGUFValueType(theirs.fields[alpha].types[0]).name],
        "general.architecture": [r.fields["general.architecture"].contents() for r in (ours, theirs)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--llama-cpp-src", type=Path, help="a llama.cpp source tree (convert_lora_to_gguf.py)")
    args = parser.parse_args()
    import llama_cpp

    work = WORK / args.arch
    work.mkdir(parents=True, exist_ok=True)
    base = build_base(work / "base", args.arch)
    base_gguf = work / "base.gguf"
    write_base_gguf(base, base_gguf)
    data = prompts(base, args.prompts)
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.arch}: {len(data)} prompts, "
          f"{sum(map(len, data))} positions", flush=True)
    hf_base = Transformers(base, None)
    results: dict[str, Any] = {"base": compare(hf_base, LlamaCpp(base_gguf, None), data, args.new_tokens)}
    print(f"base alone, llama.cpp vs transformers: {json.dumps(results['base'])}", flush=True)
    # rsLoRA: exported with sqrt(r) folded into lora_B, since llama.cpp only knows alpha / r.
    adapters = {"trained": trained_adapter(base, work), "random": random_adapter(base, work / "random-adapter"),
                "rslora": random_adapter(base, work / "rslora-adapter", r=16, lora_alpha=4, use_rslora=True)}
    for i, (kind, adapter) in enumerate(adapters.items(), start=1):
        exported = export(adapter, base, f"v{i:04d}", work / f"exports-{kind}")
        hf = Transformers(base, adapter)  # the adapter as trained (rsLoRA included), not the export
        effect = compare(hf_base, hf, data, args.new_tokens)
        control_path = work / f"wrong-qk-order-{kind}.gguf"
        write_wrong_order_control(exported, base, control_path)
        results[kind] = {
            "adapter_vs_base_in_transformers": effect,
            "llama_cpp_vs_transformers": compare(hf, LlamaCpp(base_gguf, exported / "adapter.gguf"), data,
                                                 args.new_tokens),
            "wrong_qk_order_control_vs_transformers": compare(hf, LlamaCpp(base_gguf, control_path), data,
                                                          args.new_tokens),
        }
        if args.llama_cpp_src:
            results[kind]["llama_cpp_converter"] = compare_with_llama_cpp_converter(
                args.llama_cpp_src, exported, base, work / f"converter-{kind}.gguf")
        for name, value in results[kind].items():
            print(f"{args.arch}, {kind} adapter, {name.replace('_', ' ')}: {json.dumps(value)}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
