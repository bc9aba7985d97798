"""The faster training paths compute what the plain ones do: blocked causal attention, the last MLP only where
read, shared prompts, the KL estimate from the training forward, CPU dropout, the CPU LoRA layer's one GEMM."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import AutoTokenizer

from pipelines.train import attention
from pipelines.train.batching import Shared, collate, collate_shared, encode
from pipelines.train.dropout import LaneDropout, use_lane_dropout
from pipelines.train.fit import Settings, adapter_state
from pipelines.train.lora_linear import CpuLoraLinear
from pipelines.train.losses import LM, sequence_logps, shared_logps
from pipelines.train.train import attach_adapter, dpo_stage, kto_stage, load_base_model, lora_config, runtime
from runs import END, kto_rows, pair_rows, train_config

CPU = torch.device("cpu")


def adapter(tiny_model: Path, **overrides: Any) -> tuple[Any, LM, Any]:
    cfg = train_config(**overrides)
    torch.manual_seed(0)
    model, _, _ = attach_adapter(load_base_model(str(tiny_model), cfg, runtime(cfg)), cfg, None)
    for name, p in model.named_parameters():  # a trained adapter: lora_B is no longer zero
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model, LM.of(model, None), AutoTokenizer.from_pretrained(tiny_model)


def test_lane_dropout_drops_p_of_the_elements_and_keeps_the_mean() -> None:
    dropout = LaneDropout(p=0.1)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x)
    kept = y.detach()
    assert abs(float((kept == 0).float().mean()) - 0.1) < 0.003 and abs(float(kept.mean()) - 1.0) < 0.01
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, y.detach())  # the gradient is the same mask, same scale
    masks = [LaneDropout(p=0.5)(torch.ones(64)) for _ in range(2)]
    assert not torch.equal(masks[0], masks[1])
    dropout.eval()
    assert dropout(x) is x
    dropout.train()
    dropout.p = 0.0  # how preference stages switch dropout off
    assert dropout(x) is x


def test_cpu_adapters_draw_lora_dropout_four_lanes_at_a_time(tiny_model: Path) -> None:
    cfg = train_config(lora_dropout=0.1)
    model, _, _ = attach_adapter(load_base_model(str(tiny_model), cfg, runtime(cfg)), cfg, None)
    dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is LaneDropout and d.p == 0.1 for d in dropouts)


def units_and_sequences(tokenizer: Any, n: int) -> tuple[list[Shared], list[Any], list[Any]]:
    rows = pair_rows(n, seed=21)
    # Completions of different lengths, so rows pad differently in the two layouts.
    rows[0]["rejected"] = "    y = x\n    return y * 7 + x\n" + END
    prompts = [r["prompt"] for r in rows]
    chosen = encode(tokenizer, prompts, [r["chosen"] for r in rows], 256)
    rejected = encode(tokenizer, prompts, [r["rejected"] for r in rows], 256)
    units = [Shared(prompt=c.ids[: c.n_prompt], completions=(c.ids[c.n_prompt:], r.ids[r.n_prompt:]))
             for c, r in zip(chosen, rejected, strict=True) if c is not None and r is not None]
    return units, chosen, rejected


@pytest.mark.parametrize("share", [True, False])
def test_completions_behind_a_shared_prompt_score_and_train_like_separate_sequences(tiny_model: Path,
                                                                                    share: bool) -> None:
    model, lm, tokenizer = adapter(tiny_model)
    assert lm.shares_prompts  # SDPA takes the mask
    units, chosen, rejected = units_and_sequences(tokenizer, 6)
    params = [p for p in model.parameters() if p.requires_grad]

    separate = sequence_logps(lm, collate(chosen + rejected, tokenizer.pad_token_id, CPU)).view(2, -1).T
    separate.sum().backward()
    expected = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    model.zero_grad()
    batch = collate_shared(units, tokenizer.pad_token_id, CPU, share=share)
    together = shared_logps(lm, batch).view(-1, 2)
    together.sum().backward()

    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-4)
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    prompt_tokens = sum(len(u.prompt) for u in units)
    assert batch.tokens == sum(len(c.ids) + len(r.ids) for c, r in zip(chosen, rejected, strict=True)) - (
        prompt_tokens if share else 0)


def stage_run(tiny_model: Path, tmp_path: Path, stage: str, lm_change: dict[str, Any] | None = None,
              **overrides: Any) -> tuple[dict[str, torch.Tensor], Any]:
    cfg = train_config(preference_max_steps=4, preference_learning_rate=3e-2, **overrides)
    rt = runtime(cfg)
    torch.manual_seed(0)
    model, _, _ = attach_adapter(load_base_model(str(tiny_model), cfg, rt), cfg, None)
    lm = dataclasses.replace(LM.of(model, None), **(lm_change or {}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    settings = Settings(run_dir=tmp_path, logging_steps=1, checkpoint_every=1000, stage_index=1, stage_count=1)
    if stage == "dpo":
        result = dpo_stage(pair_rows(32, seed=22), tokenizer, 256, cfg, model, lm, tokenizer.pad_token_id, settings,
                           rt)
    else:
        result = kto_stage(kto_rows(32, seed=23), {"desirable_weight": 2.0, "undesirable_weight": 1.0}, tokenizer,
                           256, cfg, model, lm, tokenizer.pad_token_id, settings, rt)
    return adapter_state(model), result


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_stages_train_the_same_adapter_with_and_without_shared_prompts(tiny_model: Path, tmp_path: Path,
                                                                                  stage: str) -> None:
    shared, a = stage_run(tiny_model, tmp_path / "shared", stage)
    separate, b = stage_run(tiny_model, tmp_path / "separate", stage, {"shares_prompts": False})
    assert a.tokens < b.tokens  # the prompts went through the model once per unit, not once per completion
    assert a.loss == pytest.approx(b.loss, rel=1e-4) and a.first_loss == pytest.approx(b.first_loss, rel=1e-5)
    for k in separate:
        torch.testing.assert_close(shared[k], separate[k], rtol=1e-3, atol=1e-4)


def test_kto_split_steps_estimate_the_kl_point_as_whole_steps_do(tiny_model: Path, tmp_path: Path) -> None:
    # A step in one micro-batch takes its KL estimate from the training forward itself; a step split in two
    # (grad_accum_steps, or an out-of-memory backoff) needs it before the first backward, from a pass of its own.
    whole, a = stage_run(tiny_model, tmp_path / "whole", "kto", batch_size=8)
    split, b = stage_run(tiny_model, tmp_path / "split", "kto", batch_size=4, grad_accum_steps=2)
    assert a.loss == pytest.approx(b.loss, rel=1e-4)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_blocked_causal_attention_equals_sdpa(masked: bool) -> None:
    torch.manual_seed(0)
    length = 2 * attention.BLOCK_QUERIES + 37
    q = torch.randn(2, 4, length, 16, requires_grad=True)
    k = torch.randn(2, 2, length, 16, requires_grad=True)
    v = torch.randn(2, 2, length, 16, requires_grad=True)
    module = torch.nn.Module()
    module.num_key_value_groups = 2  # type: ignore[assignment]
    mask = None
    if masked:  # a shared-prompt mask: two completions after a 100-token prompt, each blind to the other
        segments = torch.tensor([0] * 100 + [1] * 150 + [2] * (length - 250))
        same = (segments[:, None] == segments[None, :]) | (segments == 0)[None, :]
        mask = (torch.ones(length, length, dtype=torch.bool).tril() & same).expand(2, 1, length, length)
    out, _ = attention.blocked_causal_attention(module, q, k, v, mask, scaling=0.25)
    out.sum().backward()
    got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]  # type: ignore[union-attr]
    for t in (q, k, v):
        t.grad = None
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=mask is None, scale=0.25)
    ref.transpose(1, 2).sum().backward()
    expected = [ref.transpose(1, 2).detach()] + [t.grad for t in (q, k, v)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_last_mlp_runs_only_where_a_loss_reads_and_changes_nothing_there(tiny_model: Path) -> None:
    model, lm, tokenizer = adapter(tiny_model)
    assert lm.last_mlp is not None
    _, chosen, rejected = units_and_sequences(tokenizer, 6)
    batch = collate(chosen + rejected, tokenizer.pad_token_id, CPU)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for variant in (lm, dataclasses.replace(lm, last_mlp=None)):
        model.zero_grad()
        logps = sequence_logps(variant, batch)
        logps.sum().backward()
        results.append([logps.detach()] + [p.grad.clone() for p in params])  # type: ignore[union-attr]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not lm.last_mlp._forward_hooks and not lm.last_mlp._forward_pre_hooks  # removed after the forward


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_cpu_lora_layer_computes_what_peft_s_does(tiny_model: Path, dropout: float) -> None:
    # The same adapter weights and the same dropout draws (LaneDropout's, from the same seed), through peft's
    # lora.Linear and through CpuLoraLinear: equal outputs and gradients, and the saved config is peft's own.
    cfg = train_config(lora_dropout=dropout)
    rt = runtime(cfg)
    ours, _, tokenizer = adapter(tiny_model, lora_dropout=dropout)
    torch.manual_seed(0)
    theirs = get_peft_model(load_base_model(str(tiny_model), cfg, rt), lora_config(cfg))
    use_lane_dropout(theirs)
    theirs.load_state_dict(ours.state_dict())
    layers = [m for m in ours.modules() if hasattr(m, "lora_A")]
    assert layers and all(type(m) is CpuLoraLinear for m in layers)
    assert all(type(m) is not CpuLoraLinear for m in theirs.modules())
    assert "_custom_modules" not in ours.peft_config["default"].to_dict()
    _, chosen, rejected = units_and_sequences(tokenizer, 6)
    batch = collate(chosen + rejected, tokenizer.pad_token_id, CPU)
    results = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(1)
        logps = sequence_logps(LM.of(model, None), batch)
        logps.sum().backward()
        results.append([logps.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float rounding: one sum order
