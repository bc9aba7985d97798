"""Train one LoRA adapter from a run directory: `python -m pipelines.train RUN_DIR`.

Stages run on the same adapter: SFT on the FIM rows (and on chat rows when the tokenizer has a chat
template), then DPO when dpo.jsonl holds enough pairs, else KTO when kto.jsonl holds both labels. The
adapter starts from `init_adapter` when the run has one (tonight's run continues from the served adapter;
a developer's from their team's) and then trains on the rows that adapter has not seen plus a replay
sample of older ones (pipelines/train/replay.py); otherwise it starts fresh on every row.

Runs as a child of the service so GPU memory is returned when it exits and a crash cannot take the service
down; it reads only RUN_DIR (and the base model). The same entry point runs under `accelerate launch` or
`torchrun` for several GPUs. A killed run resumes from its last checkpoint when started again (see
pipelines/train/fit.py). The adapter appears as RUN_DIR/adapter only once it is complete (written beside it,
then renamed).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.config import TrainConfig
from pipelines.files import read_json, write_json_atomic
from pipelines.progress import format_seconds, peak_rss_mb
from pipelines.train import attention
from pipelines.train.batching import Encoded, Shared, collate, collate_shared, encode, plan_steps, steps_for
from pipelines.train.dropout import use_lane_dropout
from pipelines.train.fit import (
    Micro,
    Runtime,
    Settings,
    Stage,
    StageResult,
    Stopped,
    fit,
    install_stop_handlers,
    load_adapter_state,
)
from pipelines.train.lora_linear import CpuLoraLinear
from pipelines.train.losses import LM, dpo_loss, kto_loss, sft_loss, shared_logps
from pipelines.train.oom import OutOfMemory, free_memory, is_out_of_memory
from pipelines.train.replay import latest_ts, select_indices
from pipelines.train.rundir import RunConfig, read_line_index, read_rows, read_spans, scan_index, scan_lines

log = logging.getLogger("devtune.train")

# Target positions per LM-head chunk on CUDA: 2,048 x 151,936 (Qwen2.5's vocabulary) fp32 logits are
# 1.2 GB, recomputed in backward; on CPU one chunk (see pipelines/train/losses.py).
CUDA_HEAD_CHUNK_TOKENS = 2048


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("[train] device = \"cuda\" but torch sees no CUDA device: install a CUDA build of "
                         "torch or set device = \"auto\"")
    return device


def runtime(cfg: TrainConfig) -> Runtime:
    """This process's device and rank: one process, or one of several under `accelerate launch`/`torchrun`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kind = pick_device(cfg.device)
    device = torch.device(kind, int(os.environ.get("LOCAL_RANK", "0"))) if kind == "cuda" else torch.device(kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    rank = 0
    if world > 1:
        # The launcher (accelerate launch, torchrun) set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                             device_id=device if device.type == "cuda" else None)
        rank = torch.distributed.get_rank()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return Runtime(device=device, rank=rank, world=world, bf16=bf16)


def lora_config(cfg: TrainConfig) -> LoraConfig:
    """Our [train] table as peft's LoraConfig, field by field."""
    modules: str | list[str] = "all-linear" if cfg.target_modules == ("all-linear",) else list(cfg.target_modules)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, task_type="CAUSAL_LM")


def load_base_model(base_model: str, cfg: TrainConfig, rt: Runtime) -> Any:
    """The frozen base: fp32 on CPU, its attention in causal query blocks (pipelines/train/attention.py); bf16
    on CUDA; 4-bit NF4 with `qlora` (CUDA and bitsandbytes only)."""
    cuda = rt.device.type == "cuda"
    if cfg.qlora:
        if not cuda:
            raise SystemExit("[train] qlora = true needs a CUDA device (bitsandbytes 4-bit kernels); this process "
                             "has none: set qlora = false, or run on a GPU machine")
        if importlib.util.find_spec("bitsandbytes") is None:  # fail here, with the fix, not deep in from_pretrained
            raise SystemExit("[train] qlora = true needs bitsandbytes: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base_model, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": rt.device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        # CPU stays fp32: this CPU runs bf16 matmul at ~1 GFLOP/s against ~180 in fp32 (DESIGN.md).
        dtype = torch.bfloat16 if rt.bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(rt.device)
        if not cuda and model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(attention.NAME)  # causal attention in query blocks
        if cfg.gradient_checkpointing and cuda:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    if cfg.gradient_checkpointing and not cuda:
        log.info("[train] gradient_checkpointing is ignored on CPU: it only trades time for memory there")
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def attach_adapter(model: Any, cfg: TrainConfig, init_adapter: str | None) -> tuple[Any, str | None, str]:
    """A LoRA from [train], with `init_adapter`'s weights when it has the same shape; on CPU its dropouts draw
    their masks four at a time (pipelines/train/dropout.py) and each layer's LoRA sum is one GEMM
    (pipelines/train/lora_linear.py).

    Returns (peft model, the adapter it started from or None, a note for the log and train.json).
    """
    config = lora_config(cfg)
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu:
        config._register_custom_module({torch.nn.Linear: CpuLoraLinear})  # not saved in adapter_config.json
    peft_model = get_peft_model(model, config)
    if cpu:
        use_lane_dropout(peft_model)
    if not init_adapter:
        return peft_model, None, "fresh adapter"
    weights = Path(init_adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return peft_model, None, f"warm start skipped: {weights} is missing; training a fresh adapter"
    saved = load_file(str(weights))
    ours = get_peft_model_state_dict(peft_model)
    if set(saved) != set(ours) or any(saved[k].shape != ours[k].shape for k in ours):
        return peft_model, None, (f"warm start skipped: {init_adapter} has another LoRA shape (lora_r or "
                                  "target_modules changed); training a fresh adapter on every row")
    load_adapter_state(peft_model, weights)
    return peft_model, init_adapter, f"warm start from {init_adapter}"


@dataclass(frozen=True)
class TrainingRows:
    sft: list[dict[str, Any]]  # prompt/completion strings (FIM, and chat rows rendered by the chat template)
    dpo: list[dict[str, Any]]
    kto: list[dict[str, Any]]
    counts: dict[str, dict[str, int]]  # file -> {"new", "replayed", "rows"}
    notes: list[str]  # what was skipped and why
    data_until: str | None  # the newest ts of any training row: what the adapter will have seen


def read_training_rows(run_dir: Path, cfg: TrainConfig, tokenizer: Any, data_until: str | None) -> TrainingRows:
    """The rows each stage trains on: new since `data_until` plus replay (or all rows when it is None)."""
    data = run_dir / "data"
    notes: list[str] = []
    chosen: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    newest: list[str | None] = []
    index = read_line_index(data) if data_until is not None else {}
    for name in ("sft", "chat", "dpo", "kto"):
        path = data / f"{name}.jsonl"
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            if chats := sum(1 for _ in scan_lines(path)):
                notes.append(f"chat.jsonl: {chats} rows skipped: the base model's tokenizer has no chat template "
                             "(a base/FIM model); they train on a model with one")
            rows, new, replayed = [], 0, 0
        elif data_until is None:  # a fresh adapter trains on every row
            rows = read_rows(path)
            new, replayed = len(rows), 0
            newest.append(latest_ts(rows))
        else:
            # Only the picked rows are parsed, and only their lines kept: a night picks its new rows and a
            # replay share of the old ones, so parsing every row (87k KTO rows, 0.39 s, at 100k suggestions)
            # or holding every line (1.8 GB of KTO rows at 1M) would cost in proportion to the whole history;
            # the lines are found through the build's data/lines.json, where it still describes the file.
            offsets, lengths, stamps = index.get(path.name) or scan_index(path)
            keep, new, replayed = select_indices(stamps, data_until, cfg.replay_share, cfg.seed)
            rows = [orjson.loads(line) for line in read_spans(path, [(offsets[i], lengths[i]) for i in keep])]
            newest.append(max(filter(None, stamps), default=None))
        chosen[name] = rows
        counts[name] = {"rows": len(rows), "new": new, "replayed": replayed}
    sft = [{"prompt": r["prompt"], "completion": r["completion"], "special": True} for r in chosen["sft"]]
    rendered, dropped = render_chat(tokenizer, chosen["chat"])
    if dropped:
        notes.append(f"chat.jsonl: {dropped} rows skipped: the chat template does not render their prompt as a "
                     "prefix of prompt + completion")
    return TrainingRows(sft=sft + rendered, dpo=chosen["dpo"], kto=chosen["kto"], counts=counts, notes=notes,
                        data_until=max(filter(None, newest), default=None))


def render_chat(tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """TRL conversational prompt/completion rows as prompt and completion text in the model's chat format."""
    out, dropped = [], 0
    for r in rows:
        prompt = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        if not full.startswith(prompt) or len(full) == len(prompt):
            dropped += 1
            continue
        # The template text carries its own special tokens (BOS and the like): tokenize it as it is.
        out.append({"prompt": prompt, "completion": full[len(prompt):], "special": False})
    return out, dropped


def encode_sft(tokenizer: Any, rows: list[dict[str, Any]], max_tokens: int) -> list[Encoded]:
    out: list[Encoded] = []
    for special in (True, False):
        part = [r for r in rows if r["special"] is special]
        if part:
            prompts, completions = [r["prompt"] for r in part], [r["completion"] for r in part]
            out += [e for e in encode(tokenizer, prompts, completions, max_tokens, special) if e is not None]
    return out


def choose_preference(cfg: TrainConfig, rows: TrainingRows) -> tuple[str | None, str]:
    """DPO or KTO after SFT, by what the data holds; (None, why) when neither can run."""
    labels = {bool(r["label"]) for r in rows.kto}
    if cfg.preference == "none":
        return None, "no preference stage: [train] preference = \"none\""
    if cfg.preference in ("auto", "dpo") and len(rows.dpo) >= cfg.min_preference_rows:
        return "dpo", f"DPO on {len(rows.dpo)} pairs"
    if cfg.preference in ("auto", "kto") and len(rows.kto) >= cfg.min_preference_rows and labels == {True, False}:
        return "kto", f"KTO on {len(rows.kto)} rows"
    return None, (f"no preference stage: {len(rows.dpo)} DPO pairs and {len(rows.kto)} KTO rows "
                  f"({'both labels' if labels == {True, False} else 'one label only'}); [train] "
                  f"min_preference_rows = {cfg.min_preference_rows}, preference = \"{cfg.preference}\"")


# -- stages --------------------------------------------------------------------------------------------------

def sft_stage(examples: list[Encoded], cfg: TrainConfig, model: Any, lm: LM, pad_id: int, settings: Settings,
              rt: Runtime) -> StageResult:
    lengths = [len(e.ids) for e in examples]
    per_step = cfg.batch_size * cfg.grad_accum_steps * rt.world
    steps = plan_steps(lengths, per_step, steps_for(len(examples), per_step, cfg.epochs, cfg.max_steps), cfg.seed)
    stage = Stage(name="sft", steps=steps, lengths=lengths, learning_rate=cfg.learning_rate,
                  warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, micro_batch=cfg.batch_size,
                  unit="rows")

    def loss(rows: list[int], step_targets: float) -> Micro:
        batch = collate([examples[i] for i in rows], pad_id, rt.device)
        return Micro(loss=sft_loss(lm, batch, step_targets), tokens=batch.tokens)

    return fit(stage, model, loss, lambda rows: float(sum(examples[i].n_target for i in rows)), settings, rt)


@torch.no_grad()
def no_grad_logps(model: Any, lm: LM, units: list[Shared], batch_size: int, pad_id: int, rt: Runtime) -> torch.Tensor:
    """Log-likelihood of every completion of every unit with the adapter as it is now (dropout off), halving
    the batch on out-of-memory; completion-major: [completion 0 of every unit, then completion 1, ...]. Each
    process scores its share of the units; the sum over processes fills every slot."""
    was_training = model.training
    model.eval()
    k = len(units[0].completions) if units else 1
    out = torch.zeros(len(units), k, dtype=torch.float32, device=rt.device)
    order = sorted(range(rt.rank, len(units), rt.world), key=lambda i: -units[i].n_tokens)
    start = 0
    while start < len(order):
        part = order[start:start + batch_size]
        try:
            with rt.autocast():
                batch = collate_shared([units[i] for i in part], pad_id, rt.device, lm.shares_prompts)
                out[part] = shared_logps(lm, batch).view(len(part), k).float()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e) or batch_size == 1:
                raise
            free_memory()
            batch_size //= 2
            continue
        start += len(part)
    model.train(was_training)
    return rt.all_reduce(out.T.reshape(-1))


def reference_logps(path: Path, compute: Any, rt: Runtime) -> torch.Tensor:
    """Reference log-likelihoods, computed once per stage and kept beside its checkpoints for a resume."""
    if path.is_file():
        cached: torch.Tensor = torch.load(path).to(rt.device)
        return cached
    ref: torch.Tensor = compute()
    if rt.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(ref.cpu(), tmp)
        os.replace(tmp, path)
    return ref


def shared_prompt(prompt_ids: list[int], completions: list[list[int]], max_tokens: int) -> Shared:
    """The prompt cut at its start until the longest completion fits in `max_tokens` with it, so that every
    completion is scored after the same prompt."""
    cut = max(0, len(prompt_ids) + max(len(c) for c in completions) - max_tokens)
    return Shared(prompt=prompt_ids[cut:], completions=tuple(completions))


def dpo_stage(rows: list[dict[str, Any]], tokenizer: Any, max_tokens: int, cfg: TrainConfig, model: Any, lm: LM,
              pad_id: int, settings: Settings, rt: Runtime) -> StageResult:
    """DPO with the adapter as SFT left it as the reference: its log-likelihoods are computed once, up front,
    instead of a second forward pass (adapter disabled) in every step as TRL does with a PEFT model. Chosen
    and rejected share one row behind their prompt (batching.Shared): FIM prompts are ~90% of a pair's tokens,
    so a pair costs about half of two separate sequences."""
    prompts = [r["prompt"] for r in rows]
    chosen = encode(tokenizer, prompts, [r["chosen"] for r in rows], max_tokens)
    rejected = encode(tokenizer, prompts, [r["rejected"] for r in rows], max_tokens)
    # encode cut each prompt to fit its own completion; the longer cut fits both.
    units = [shared_prompt(c.ids[: c.n_prompt] if c.n_prompt < r.n_prompt else r.ids[: r.n_prompt],
                           [c.ids[c.n_prompt:], r.ids[r.n_prompt:]], max_tokens)
             for c, r in zip(chosen, rejected, strict=True) if c is not None and r is not None]
    n = len(units)
    ref = reference_logps(settings.run_dir / "checkpoints" / "dpo" / "reference_logps.pt",
                          lambda: no_grad_logps(model, lm, units, 2 * cfg.batch_size, pad_id, rt), rt)
    # Steps are planned on the tokens of two separate sequences, as before prompts were shared: the same
    # batches, so the same training as then (bench/README.md, "Training").
    lengths = [2 * len(u.prompt) + len(u.completions[0]) + len(u.completions[1]) for u in units]
    per_step = cfg.batch_size * cfg.grad_accum_steps * rt.world
    n_steps = steps_for(n, per_step, cfg.preference_epochs, cfg.preference_max_steps)
    stage = Stage(name="dpo", steps=plan_steps(lengths, per_step, n_steps, cfg.seed), lengths=lengths,
                  learning_rate=cfg.preference_learning_rate, warmup_ratio=cfg.warmup_ratio,
                  weight_decay=cfg.weight_decay, micro_batch=cfg.batch_size, unit="pairs",
                  metric="reward_accuracy", dropout=False)

    def loss(idx: list[int], pairs_in_step: float) -> Micro:
        batch = collate_shared([units[i] for i in idx], pad_id, rt.device, lm.shares_prompts)
        logps = shared_logps(lm, batch).view(len(idx), 2)
        at = torch.tensor(idx, device=rt.device)
        chosen_tokens = torch.tensor([len(units[i].completions[0]) for i in idx], device=rt.device,
                                     dtype=logps.dtype)
        per_pair, right = dpo_loss(logps[:, 0], logps[:, 1], ref[at], ref[at + n], cfg.beta, chosen_tokens,
                                   cfg.preference_sft_weight)
        return Micro(loss=per_pair.sum() / pairs_in_step, tokens=batch.tokens, metric_sum=float(right.sum()))

    return fit(stage, model, loss, lambda idx: float(len(idx)), settings, rt)


def kto_stage(rows: list[dict[str, Any]], weights: dict[str, float], tokenizer: Any, max_tokens: int,
              cfg: TrainConfig, model: Any, lm: LM, pad_id: int, settings: Settings, rt: Runtime) -> StageResult:
    """KTO on unpaired rows, the reference again the adapter as the stage starts (computed once). The KL
    reference point pairs each prompt with another row's completion, as TRL does, estimated per step over
    this process's rows of the step. That completion shares its row with the prompt's own (batching.Shared),
    so the estimate comes out of the training forward pass itself instead of a second, no-grad pass over
    whole sequences: the prompts are ~94% of a KTO row's tokens."""
    encoded = encode(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], max_tokens)
    kept = [(e, bool(r["label"])) for e, r in zip(encoded, rows, strict=True) if e is not None]
    n = len(kept)
    shift = random.Random(cfg.seed).randrange(1, n) if n > 1 else 0
    own = [e.ids[e.n_prompt:] for e, _ in kept]
    # The mismatched completion sees the whole prompt its row is trained on, even where the two together are
    # longer than max_tokens (by at most one completion).
    units = [Shared(prompt=e.ids[: e.n_prompt], completions=(own[i], own[(i + shift) % n]))
             for i, (e, _) in enumerate(kept)]
    ref = reference_logps(settings.run_dir / "checkpoints" / "kto" / "reference_logps.pt",
                          lambda: no_grad_logps(model, lm, units, 2 * cfg.batch_size, pad_id, rt), rt)
    desirable = torch.tensor([label for _, label in kept], device=rt.device)
    lengths = [len(e.ids) for e, _ in kept]
    per_step = cfg.batch_size * cfg.grad_accum_steps * rt.world
    n_steps = steps_for(n, per_step, cfg.preference_epochs, cfg.preference_max_steps)
    stage = Stage(name="kto", steps=plan_steps(lengths, per_step, n_steps, cfg.seed), lengths=lengths,
                  learning_rate=cfg.preference_learning_rate, warmup_ratio=cfg.warmup_ratio,
                  weight_decay=cfg.weight_decay, micro_batch=cfg.batch_size, unit="rows", dropout=False)
    step: dict[str, Any] = {"rows": [], "kl": None}

    def begin_step(idx: list[int]) -> None:
        step["rows"], step["kl"] = idx, None

    def kl_before_backward() -> torch.Tensor:
        # The step is split into micro-batches (grad_accum_steps, or an out-of-memory backoff): the estimate
        # must cover all of this process's rows before the first backward, so it takes a no-grad pass of its
        # own. This process's rows only: a collective here could strand the others if this one ran out of memory.
        mine = step["rows"]
        mismatched = [Shared(prompt=units[i].prompt, completions=units[i].completions[1:]) for i in mine]
        policy = no_grad_logps(model, lm, mismatched, cfg.batch_size, pad_id, replace_world(rt))
        return (policy - ref[torch.tensor(mine, device=rt.device) + n]).mean().clamp(min=0)

    def loss(idx: list[int], rows_in_step: float) -> Micro:
        at = torch.tensor(idx, device=rt.device)
        whole = len(idx) == len(step["rows"])
        if not whole and step["kl"] is None:
            step["kl"] = kl_before_backward()
        part = [units[i] if whole else Shared(units[i].prompt, units[i].completions[:1]) for i in idx]
        batch = collate_shared(part, pad_id, rt.device, lm.shares_prompts)
        logps = shared_logps(lm, batch).view(len(idx), len(part[0].completions))
        if whole:  # the same estimate as a separate pass: dropout is off in preference stages
            step["kl"] = (logps[:, 1].detach() - ref[at + n]).mean().clamp(min=0)
        tokens = torch.tensor([len(own[i]) for i in idx], device=rt.device, dtype=logps.dtype)
        per_row = kto_loss(logps[:, 0], ref[at], desirable[at], step["kl"], cfg.beta, weights["desirable_weight"],
                           weights["undesirable_weight"], tokens, cfg.preference_sft_weight)
        return Micro(loss=per_row.sum() / rows_in_step, tokens=batch.tokens)

    return fit(stage, model, loss, lambda idx: float(len(idx)), settings, rt, begin_step=begin_step)


def replace_world(rt: Runtime) -> Runtime:
    """The same device as a single process: for work that must not wait on the other processes."""
    return Runtime(device=rt.device, rank=0, world=1, bf16=rt.bf16)


# -- the run ---------------------------------------------------------------------------------------------------

def train_adapter(run_dir: Path) -> dict[str, Any]:
    """Train the run's adapter into RUN_DIR/adapter and return its metrics (also in train.json)."""
    run = RunConfig.read(run_dir)
    cfg = run.train
    rt = runtime(cfg)
    torch.manual_seed(cfg.seed)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(run.base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model, init, note = attach_adapter(load_base_model(run.base_model, cfg, rt), cfg, run.init_adapter)
    log.info("%s", note)
    # A warm start trains on what its adapter has not seen (plus replay); a fresh adapter on every row.
    rows = read_training_rows(run_dir, cfg, tokenizer, run.data_until if init else None)
    for line in rows.notes:
        log.info("%s", line)
    examples = encode_sft(tokenizer, rows.sft, run.max_row_tokens)
    preference, why = choose_preference(cfg, rows)
    log.info("%s", why)
    if not examples and preference is None:
        raise SystemExit(f"nothing to train on in {run_dir / 'data'}: no SFT rows and {why}")
    lm = LM.of(model, CUDA_HEAD_CHUNK_TOKENS if rt.device.type == "cuda" else None)
    plan = (["sft"] if examples else []) + ([preference] if preference else [])
    results: list[StageResult] = []
    for index, name in enumerate(plan, start=1):
        settings = Settings(run_dir=run_dir, logging_steps=cfg.logging_steps,
                            checkpoint_every=cfg.checkpoint_every_steps, stage_index=index, stage_count=len(plan))
        if name == "sft":
            results.append(sft_stage(examples, cfg, model, lm, pad_id, settings, rt))
        elif name == "dpo":
            results.append(dpo_stage(rows.dpo, tokenizer, run.max_row_tokens, cfg, model, lm, pad_id, settings, rt))
        else:
            weights = (read_json(run_dir / "data" / "manifest.json") or {}).get("kto") or {}
            weights = {"desirable_weight": float(weights.get("desirable_weight", 1.0)),
                       "undesirable_weight": float(weights.get("undesirable_weight", 1.0))}
            results.append(kto_stage(rows.kto, weights, tokenizer, run.max_row_tokens, cfg, model, lm, pad_id,
                                     settings, rt))
    seconds = time.monotonic() - started
    head = results[0]
    metrics: dict[str, Any] = {
        "device": rt.device.type, "processes": rt.world, "bf16": rt.bf16, "qlora": cfg.qlora,
        "stages": [asdict(r) for r in results], "preference": why,
        "steps": sum(r.steps for r in results), "train_rows": rows.counts["sft"]["rows"] + rows.counts["chat"]["rows"],
        "rows": rows.counts, "notes": rows.notes, "init_adapter": init, "warm_start": note,
        "data_until": rows.data_until, "train_loss": head.loss, "first_loss": head.first_loss,
        "seconds": seconds, "tokens": sum(r.tokens for r in results), "tokens_per_s": head.tokens_per_s,
        "resumed_from_step": {r.name: r.resumed_from_step for r in results},
        "oom_backoffs": sum(r.oom_backoffs for r in results), "micro_batch": results[-1].micro_batch,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if rt.device.type == "cuda" else 0.0,
    }
    if rt.main:
        save_adapter(model, run_dir, metrics)
    return metrics


def save_adapter(model: Any, run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write RUN_DIR/adapter beside itself and rename it into place: never half an adapter under that name."""
    partial, final = run_dir / "adapter.partial", run_dir / "adapter"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    write_json_atomic(partial / "train.json", metrics)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    write_json_atomic(run_dir / "train.json", metrics)


def quiet_libraries() -> None:
    """Library advice would drown the progress lines in train.log."""
    import transformers

    transformers.logging.set_verbosity_warning()
    # transformers' own deprecation notices about its internals (e.g. is_gradient_checkpointing, called by
    # peft): nothing a devtune user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)


# Exit statuses the cycle can tell apart in train.log: a stop with a checkpoint, and an unfixable OOM.
EXIT_STOPPED = 75
EXIT_OUT_OF_MEMORY = 3


def run_child(argv: list[str] | None, module: str,
              work: Callable[[Path], dict[str, Any]]) -> tuple[int, dict[str, Any] | None]:
    """A training child's entry point (`python -m pipelines.train RUN_DIR`, and pipelines.pretrain's): the exit
    status the cycle tells apart, and the metrics to report where this is the main process (None elsewhere:
    under a launcher only rank 0 reports)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} RUN_DIR", file=sys.stderr)
        return 2, None
    quiet_libraries()
    install_stop_handlers()
    child_log = logging.getLogger(f"devtune.{module.rsplit('.', 1)[-1]}")  # devtune.train, devtune.pretrain
    try:
        metrics = work(Path(args[0]))
    except Stopped as e:
        child_log.warning("%s", e)
        return EXIT_STOPPED, None
    except OutOfMemory as e:
        child_log.error("%s", e)
        return EXIT_OUT_OF_MEMORY, None
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0, metrics if int(os.environ.get("RANK", "0")) == 0 else None


def main(argv: list[str] | None = None) -> int:
    status, metrics = run_child(argv, "pipelines.train", train_adapter)
    if metrics is not None:
        log.info("trained %d steps in %s: loss %.4f, %s tokens/s on %s", metrics["steps"],
                 format_seconds(metrics["seconds"]), metrics["train_loss"], f"{metrics['tokens_per_s']:,.0f}",
                 metrics["device"])
    return status


if __name__ == "__main__":
    sys.exit(main())
