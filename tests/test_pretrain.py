"""Pretraining: from scratch (sizing, family tokenizers, resume) and continued pretraining of a team's code
(corpus as of the cutoff, the CPT child, the gate, both outputs and the cycle that builds on them)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from daemon.sample import DEVELOPERS, make_sample
from pipelines.pretrain.samples import FimShape, chunk_lines, sample_text
from pipelines.pretrain.scratch import FAMILIES, ModelShape, build_tokenizer, plan_budget, shape_for
from pipelines.tokens import load_base_tokenizer
from support import ROOT, T0, CommitSpec, Setup, days, devtune_json, make_repo, run_devtune, write_config

# -- from scratch ------------------------------------------------------------------------------------------------

def test_a_parameter_budget_gives_a_llama_of_that_size() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    for params in (400_000, 5_000_000, 120_000_000):
        shape = shape_for(params)
        assert 0.8 < shape.parameters() / params < 1.25
        assert shape.num_attention_heads % shape.num_key_value_heads == 0 and shape.num_hidden_layers >= 2
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
                num_key_value_heads=shape.num_key_value_heads, tie_word_embeddings=False))
        assert sum(p.numel() for p in model.parameters()) == shape.parameters()
    assert shape_for(400_000).vocab_size < shape_for(5_000_000).vocab_size < shape_for(120_000_000).vocab_size


def test_a_compute_budget_is_split_as_chinchilla_does_unless_tokens_are_given() -> None:
    budget = plan_budget(flops=1e16)
    assert 15 < budget.tokens / budget.shape.parameters() < 27 and budget.flops == pytest.approx(1e16, rel=0.05)
    fixed = plan_budget(flops=1e14, tokens=20_000_000)
    assert fixed.tokens == 20_000_000 and 0.6e6 < fixed.shape.parameters() < 1.2e6
    assert plan_budget(params=1_000_000).tokens == 20 * plan_budget(params=1_000_000).shape.parameters()
    with pytest.raises(ValueError):
        plan_budget()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_tokenizer_has_the_fim_tokens_the_dataset_builder_finds(tmp_path: Path, family: str) -> None:
    build_tokenizer(["def f(x):\n    return x + 1\n"] * 50, 300, tmp_path, family)
    found = load_base_tokenizer(str(tmp_path))
    assert found.fim.family == family
    prompt = found.fim.psm("def f(x):\n", "\n")
    ids = found.tokenizer.encode(prompt + "    return x\n" + found.fim.eos, add_special_tokens=False).ids
    vocab = found.tokenizer.get_vocab(with_added_tokens=True)
    assert {vocab[found.fim.prefix], vocab[found.fim.suffix], vocab[found.fim.middle], vocab[found.fim.eos]} <= set(ids)


def test_samples_are_line_chunks_and_fim_examples_that_put_the_chunk_back_together() -> None:
    text = "".join(f"def f{i}(x):\n    if x:\n        return {i}\n    return -x\n\n" for i in range(40))
    chunks = chunk_lines(text, 200)
    assert "".join(chunks) == text and all(len(c) <= 200 for c in chunks)
    assert all(c.startswith("def") or c.startswith("\n") or c.startswith(" ") for c in chunks)
    fim = load_base_tokenizer_for_tests()
    shape = FimShape(fim_rate=1.0, spm_rate=0.0, max_middle_lines=3, max_block_lines=10, block_fraction=0.5)
    for seed in range(30):
        out = sample_text(chunks[1], fim, shape, random.Random(seed))
        head, middle = out.split(fim.middle)
        prefix, suffix = head.removeprefix(fim.prefix).split(fim.suffix)
        middle = middle.removesuffix(fim.eos)
        assert prefix + middle + suffix == chunks[1] and middle.strip()
    plain = FimShape(fim_rate=0.0, spm_rate=0.0, max_middle_lines=3, max_block_lines=10, block_fraction=0.5)
    assert sample_text(chunks[1], fim, plain, random.Random(0)) == chunks[1]


def load_base_tokenizer_for_tests() -> Any:
    from pipelines.tokens import FimTokens

    return FimTokens(family="qwen2.5-coder", prefix="<|fim_prefix|>", suffix="<|fim_suffix|>", middle="<|fim_middle|>",
                     eos="<|endoftext|>")


def test_from_scratch_is_stopped_then_resumed_and_ends_where_an_uninterrupted_run_does(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    rng = random.Random(0)
    for i in range(30):
        body = "".join(f"    value_{j} = compute({rng.randint(0, 99)}, {j})\n" for j in range(rng.randint(5, 30)))
        (corpus / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (corpus / f"pkg{i % 3}" / f"mod{i}.py").write_text(f"def function_{i}(x):\n{body}    return x\n")
    (corpus / "vendor").mkdir()
    (corpus / "vendor" / "lib.py").write_text("VENDORED = 1\n" * 50)  # skipped, as the datasets skip it
    args = ["--params", "60k", "--tokens", "40k", "--seq-len", "64", "--batch-size", "4", "--checkpoint-every", "3"]
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.pretrain.scratch", str(out), str(corpus), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, log[-2000:]
    assert not (out / "model.safetensors").exists()
    resumed = run_devtune("pretrain", "--from-scratch", str(corpus), "--out", str(out), "--params", "60k",
                          "--tokens", "40k", "--seq-len", "64", timeout=300)
    # the CLI passes only the flags it was given: a plan with another batch size is refused, not mixed in
    assert resumed.returncode != 0 and "another plan" in resumed.stdout + resumed.stderr
    again = subprocess.run([sys.executable, "-m", "pipelines.pretrain.scratch", str(out), str(corpus), *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    metrics = json.loads((out / "pretrain.json").read_text())
    assert metrics["resumed_from_step"] >= 3 and metrics["steps"] == 157 and metrics["loss"] < metrics["first_loss"]
    assert not (out / "checkpoints").exists()

    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "pipelines.pretrain.scratch", str(whole), str(corpus), *args], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    for k in a:  # same batches, same optimizer state: the same arithmetic
        assert torch.equal(a[k], b[k]), k
    assert "corpus: 30 files" in again.stdout  # vendor/lib.py skipped, as the dataset builder skips it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    # a small corpus may leave the BPE short of the planned vocabulary: the model matches its tokenizer
    assert sum(p.numel() for p in model.parameters()) == metrics["parameters"]
    assert metrics["parameters"] <= ModelShape(**metrics["shape"]).parameters()
    assert load_base_tokenizer(str(out)).fim.family == "qwen2.5-coder"


# -- continued pretraining ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpt_site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Setup:
    tmp = tmp_path_factory.mktemp("cpt")
    sample = make_sample(tmp / "sample", n_commits=30, n_events=160)
    sources = sample.sources()
    return write_config(tmp, sources, teams=[{"name": "payments", "members": [e for _, e in DEVELOPERS]}], overrides={
        "": {"base_model": str(tiny_model)},
        "datasets": {"max_row_tokens": 384, "max_prefix_chars": 800, "max_suffix_chars": 200,
                     "heldout_fraction": 0.15, "min_train_rows": 24, "min_heldout_rows": 4},
        "train": {"max_steps": 12, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 5, "lora_r": 8,
                  "dev_adapters": False},
        "pretrain": {"max_tokens": 60_000, "seq_tokens": 256, "learning_rate": 5e-3, "min_corpus_chars": 1000},
        "evaluate": {"max_rows": 40, "batch_size": 8, "generate_rows": 8, "max_new_tokens": 24},
        # The tests' tiny model is not FIM-trained: its completions are noise either way, so only loss decides.
        "gate": {"primary_metric": "heldout_loss", "edit_similarity_tolerance": 1.0, "exact_match_tolerance": 1.0},
    })


def test_continued_pretraining_is_promoted_and_the_next_cycle_starts_the_team_adapter_from_it(cpt_site: Setup) -> None:
    from daemon import jobs
    from daemon.config import load_config
    from pipelines.store.db import Store

    config = str(cpt_site.config)
    cfg = load_config(cpt_site.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        assert jobs.collect(store, cfg)["error"] is None
    finally:
        store.close()
    result = devtune_json("--config", config, "pretrain", "--team", "payments", "--json")[0]
    assert result["scope"] == "cpt:payments" and result["outcome"] == "promoted", result
    summary = result["summary"]
    manifest = json.loads((Path(summary["run_dir"]) / "data" / "manifest.json").read_text())
    assert summary["corpus"]["cutoff"] == manifest["heldout_cutoff"] and summary["corpus"]["files"] > 0
    assert summary["eval"]["candidate"]["heldout_loss"] < summary["eval"]["base"]["heldout_loss"]
    assert summary["train"]["stage"] == "cpt" and summary["train"]["steps"] > 0
    version = cpt_site.state_dir / "registry" / "cpt:payments" / "v0001"
    assert (version / "adapter_model.safetensors").is_file()
    assert json.loads((version / "lineage.json").read_text())["corpus"]["sha256"] == summary["corpus"]["sha256"]

    cycle = devtune_json("--config", config, "cycle", "--team", "payments", "--json")[0]
    start = cycle["summary"]["start"]
    assert start["init"]["scope"] == "cpt:payments" and start["data_until"] is None
    assert "warm start from" in cycle["summary"]["train"]["warm_start"]
    if cycle["outcome"] == "promoted":  # the next night continues warm from the team adapter, not the CPT again
        from pipelines.pretrain.serving import descends_from
        from pipelines.publish import registry

        served = registry.served(cpt_site.state_dir)
        assert descends_from(cpt_site.state_dir, served["team:payments"], served["cpt:payments"])


def test_the_corpus_is_the_repository_before_the_cutoff_without_vendored_or_duplicate_files(tmp_path: Path) -> None:
    from daemon import jobs
    from daemon.config import load_config
    from pipelines.pretrain.corpus import build_corpus
    from pipelines.store.db import Store

    # varied lines: MinHash needs more distinct shingles than a line repeated five times has
    code = "".join(f"def handler_{i}(event):\n    return event['body_{i}'] + {i * 7}\n" for i in range(30))
    make_repo(tmp_path / "repo", [
        CommitSpec({"app.py": "VERSION = 1\n" + code, "old.py": code + "# old\n", "vendor/dep.py": code + "# v\n",
                    "near.py": "VERSION = 1\n" + code}, when=T0),
        CommitSpec({"app.py": "VERSION = 2\n" + code, "same.py": "VERSION = 2\n" + code}, when=T0 + days(5)),
        CommitSpec({"old.py": None}, when=T0 + days(6)),
        CommitSpec({"app.py": "VERSION = 3\n" + code, "late.py": "LATE = True\n"}, when=T0 + days(20)),
    ])
    site = write_config(tmp_path, [{"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    cfg = load_config(site.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        assert jobs.collect(store, cfg)["error"] is None
        report = build_corpus(store, store.team_repos("default"), T0 + days(10), 0.85, tmp_path / "cpt.jsonl")
    finally:
        store.close()
    rows = [json.loads(line) for line in (tmp_path / "cpt.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == ["app.py"] and rows[0]["text"].startswith("VERSION = 2")
    assert report.dropped == {"duplicate": 1, "near_duplicate": 1, "vendored": 1} and report.files == 1


def test_output_base_registers_a_merged_model_that_the_team_then_trains_on(tmp_path: Path, cpt_site: Setup) -> None:
    import shutil

    from daemon import jobs
    from daemon.config import load_config
    from pipelines.pretrain.serving import pretrained_adapter, team_base
    from pipelines.store.db import Store

    folder = tmp_path / "site"  # the collected store, without the other test's runs and versions
    shutil.copytree(cpt_site.state_dir.parent, folder, ignore=shutil.ignore_patterns("runs", "registry", "served"))
    text = cpt_site.config.read_text().replace('output = "adapter"', 'output = "base"')
    (folder / "config.toml").write_text(text)
    cfg = load_config(folder / "config.toml")
    assert cfg.pretrain.output == "base" and team_base(cfg, "payments") == cfg.base_model
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:  # in-process (the CLI's path is the test above): a devtune process costs seconds of imports
        result = jobs.pretrain(store, cfg, "payments")
    finally:
        store.close()
    assert result["scope"] == "base:payments" and result["outcome"] == "promoted", result
    version = cfg.state_dir / "registry" / "base:payments" / "v0001"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in version.iterdir()}
    assert (version / "adapter" / "adapter_model.safetensors").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    merged = AutoModelForCausalLM.from_pretrained(version).eval()
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model)
    stacked = PeftModel.from_pretrained(base, version / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, stacked(ids).logits, rtol=1e-4, atol=1e-4)
    # every later cycle of the team (run_cycle takes its base from team_base) trains a fresh adapter on it
    assert team_base(cfg, "payments") == str(version) and pretrained_adapter(cfg, "payments") is None
    assert team_base(cfg, "platform") == cfg.base_model
    # a base that read a forgotten developer's files is not trained on until it is retrained
    assert team_base(cfg, "payments", {("base:payments", "v0001")}) == cfg.base_model
