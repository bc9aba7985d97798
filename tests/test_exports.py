"""Exports of a registry version: the vLLM PEFT folder, adapter.gguf, Modelfile and exports.json.

Checked with the consumers' own code where it installs here: the `gguf` package's reader (llama.cpp's
Python side) for the GGUF file, peft for the PEFT folder. llama.cpp itself runs in bench/gguf_llamacpp.py
(it builds from source for many minutes, too long for the suite).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from pipelines.publish.exports import ExportError, export_version, served_name
from support import ROOT

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11]])


def make_version(base: Path, version_dir: Path, seed: int = 0, **lora: Any) -> Path:
    """A registry version as the cycle registers it: peft's adapter files plus lineage.json. The LoRA
    weights are random (peft starts B at zero, which would export the base unchanged and hide a wrong
    row order), large enough to change the model's predictions."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **lora}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    peft_model.save_pretrained(version_dir)
    (version_dir / "lineage.json").write_text(json.dumps({"scope": "team:payments", "version": version_dir.name,
                                                          "base_model": str(base)}))
    return version_dir


def logits(base: Path, adapter: Path | None) -> torch.Tensor:
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(input_ids=PROMPT).logits[0]


@pytest.fixture(scope="module")
def version(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_version(tiny_model, tmp_path_factory.mktemp("registry") / "v0003")


@pytest.fixture(scope="module")
def exported(version: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version exported by the child entry point, as the service runs it; a stale temp folder of a
    killed export lies beside the target."""
    out = tmp_path_factory.mktemp("exports") / "exports"
    stale = out.parent / ".exports.incoming-4194305"  # above Linux's largest pid: its process is gone
    (stale / "peft").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "pipelines.publish.exports", str(version), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "devtune-team-payments-v0003" in result.stdout
    return out


def test_the_export_is_complete_and_every_file_is_listed_with_its_hash(exported: Path, tiny_model: Path) -> None:
    manifest = json.loads((exported / "exports.json").read_text())
    assert manifest["served_name"] == "devtune-team-payments-v0003"
    assert manifest["base_model"] == str(tiny_model) and manifest["gguf_architecture"] == "llama"
    on_disk = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()} - {"exports.json"}
    assert set(manifest["files"]) == on_disk == {"peft/adapter_config.json", "peft/adapter_model.safetensors",
                                                  "adapter.gguf", "Modelfile"}
    for rel, entry in manifest["files"].items():
        data = (exported / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    # Nothing half-written is left beside it, not even the killed export's folder.
    assert [p.name for p in exported.parent.iterdir()] == ["exports"]
    modelfile = (exported / "Modelfile").read_text()
    assert f"FROM {tiny_model}\n" in modelfile and "ADAPTER ./adapter.gguf\n" in modelfile


def test_the_gguf_reads_back_as_llama_cpp_loads_it(exported: Path, version: Path, tiny_model: Path) -> None:
    reader = gguf.GGUFReader(exported / "adapter.gguf")
    fields = {name: field for name, field in reader.fields.items()}

    def value(key: str) -> Any:
        return fields[key].contents()

    assert value("general.architecture") == "llama" and value("general.type") == "adapter"
    assert value("adapter.type") == "lora" and value("general.name") == "devtune-team-payments-v0003"
    # llama.cpp reads alpha with gguf_get_val_f32, which aborts on an int.
    assert [gguf.GGUFValueType(t) for t in fields["adapter.lora.alpha"].types] == [gguf.GGUFValueType.FLOAT32]
    assert value("adapter.lora.alpha") == 16.0

    config = AutoConfig.from_pretrained(tiny_model)
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    out_in = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden),
              "ffn_down": (hidden, inter)}
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == layers * len(out_in) * 2 == 28
    for layer in range(layers):
        for kind, (n_out, n_in) in out_in.items():
            a, b = tensors[f"blk.{layer}.{kind}.weight.lora_a"], tensors[f"blk.{layer}.{kind}.weight.lora_b"]
            # ggml order: the base weight is ne = [in, out]; the loader wants a = [in, rank], b = [rank, out].
            assert (list(a.shape), list(b.shape)) == ([n_in, 8], [8, n_out])
            assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32

    # Values: A as trained; B as trained except that q's and k's rows follow llama.cpp's interleaved rotary
    # layout: within a head of d rows, Hugging Face row i < d/2 becomes row 2i and row d/2 + i row 2i + 1.
    trained = load_file(str(version / "adapter_model.safetensors"))

    def peft_tensor(module: str, half: str) -> np.ndarray:
        return trained[f"base_model.model.model.layers.1.self_attn.{module}.lora_{half}.weight"].numpy()

    def interleaved(b: np.ndarray, heads: int) -> np.ndarray:
        out = np.empty_like(b)
        for h in range(heads):
            for i in range(head_dim // 2):
                out[h * head_dim + 2 * i] = b[h * head_dim + i]
                out[h * head_dim + 2 * i + 1] = b[h * head_dim + head_dim // 2 + i]
        return out

    def gguf_tensor(kind: str, half: str) -> np.ndarray:
        return np.asarray(tensors[f"blk.1.{kind}.weight.lora_{half}"].data)

    np.testing.assert_array_equal(gguf_tensor("attn_q", "a"), peft_tensor("q_proj", "A"))
    np.testing.assert_array_equal(gguf_tensor("attn_q", "b"), interleaved(peft_tensor("q_proj", "B"),
                                                                            config.num_attention_heads))
    np.testing.assert_array_equal(gguf_tensor("attn_k", "b"), interleaved(peft_tensor("k_proj", "B"),
                                                                            config.num_key_value_heads))
    assert not np.array_equal(gguf_tensor("attn_q", "b"), peft_tensor("q_proj", "B"))
    np.testing.assert_array_equal(gguf_tensor("attn_v", "b"), peft_tensor("v_proj", "B"))


def test_the_peft_folder_is_what_vllm_takes_and_computes_the_same(exported: Path, version: Path,
                                                                  tiny_model: Path) -> None:
    config = json.loads((exported / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    assert config["modules_to_save"] is None and config["use_rslora"] is False and config["use_dora"] is False
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    base, trained, served = logits(tiny_model, None), logits(tiny_model, version), logits(tiny_model,
                                                                                         exported / "peft")
    torch.testing.assert_close(served, trained)
    assert (trained.argmax(-1) != base.argmax(-1)).any()  # the adapter matters, so the comparison can fail


def test_rslora_scaling_is_folded_into_lora_b(tiny_model: Path, tmp_path: Path) -> None:
    version = make_version(tiny_model, tmp_path / "v0001", seed=1, r=16, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "v_proj"])
    manifest = export_version(version, str(tiny_model), "team:payments", "v0001", tmp_path / "exports")
    assert manifest["lora"]["rslora_folded_into_lora_b"] is True
    assert manifest["lora"]["target_modules"] == ["q_proj", "v_proj"]
    # vLLM without use_rslora, and llama.cpp always, scale by alpha / r: the same function as rsLoRA's
    # alpha / sqrt(r) once lora_B carries sqrt(r).
    torch.testing.assert_close(logits(tiny_model, tmp_path / "exports" / "peft"), logits(tiny_model, version))
    trained = load_file(str(version / "adapter_model.safetensors"))
    reader = gguf.GGUFReader(tmp_path / "exports" / "adapter.gguf")
    v_b = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight.lora_b")
    np.testing.assert_allclose(np.asarray(v_b.data), math.sqrt(16) * trained[
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].numpy(), rtol=1e-6)
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0


def test_an_adapter_no_server_can_take_is_refused_with_every_reason(tiny_model: Path, tmp_path: Path) -> None:
    version = make_version(tiny_model, tmp_path / "v0002", target_modules=["q_proj", "lm_head"],
                           modules_to_save=["embed_tokens"])
    out = tmp_path / "exports"
    with pytest.raises(ExportError) as refused:
        export_version(version, str(tiny_model), "team:payments", "v0002", out)
    message = str(refused.value)
    assert "modules_to_save" in message and "lm_head" in message and "target_modules" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0002"]  # no exports folder, no temp folder


def test_an_adapter_for_another_base_is_refused(version: Path, tmp_path: Path) -> None:
    from pipelines.pretrain.scratch import ModelShape, build_model, build_tokenizer

    other = tmp_path / "other-base"
    build_tokenizer(["def f(x):\n    return x\n"] * 50, 300, other)
    build_model(other, ModelShape(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(ExportError, match="another base model"):
        export_version(version, str(other), "team:payments", "v0003", tmp_path / "exports")


def test_exporting_an_exported_version_changes_nothing(exported: Path, version: Path, tiny_model: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in exported.rglob("*")}
    again = export_version(version, str(tiny_model), "team:payments", "v0003", exported)
    assert again == json.loads((exported / "exports.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in exported.rglob("*")} == before
    assert oct((exported / "adapter.gguf").stat().st_mode & 0o777) == "0o444"


def test_served_names_are_unique_and_valid_for_vllm_and_ollama() -> None:
    assert served_name("team:payments", "v0003") == "devtune-team-payments-v0003"
    assert served_name("dev:bob", "v0012") == "devtune-dev-bob-v0012"
    scopes = ["team:payments", "team:Payments", "dev:alice@example.com", "dev:alice-example.com",
              "dev:alice+ci@example.com", "dev:a..b", "team:" + "x" * 200, "team:" + "x" * 201]
    names = [served_name(s, v) for s in scopes for v in ("v0001", "v0002")]
    assert len(set(names)) == len(names)
    # Ollama (types/model/name.go): [A-Za-z0-9_.-], no "..", at most 128 bytes; compared case-insensitively.
    assert all(re.fullmatch(r"[a-z0-9_.-]+", n) and ".." not in n and len(n) <= 100 for n in names)
    assert len({n.lower() for n in names}) == len(names)


def test_the_service_can_name_versions_without_importing_torch() -> None:
    # The gateway needs served_name(); the service never imports torch (DESIGN.md), only the child does.
    code = ("import sys, pipelines.publish.names as n; n.served_name('team:a', 'v0001'); "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'transformers', 'peft', 'safetensors', 'gguf'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
