"""The optimizer loop every training stage (SFT, DPO, KTO) runs: one plain function, `fit`.

It owns what a stage does not: AdamW and the warmup + cosine schedule, micro-batches adding up to one
optimizer step, the out-of-memory backoff (half the micro-batch, twice the micro-steps, same step),
resumable checkpoints, progress lines, and stopping cleanly on SIGTERM. What a stage computes is the
`loss` callable it passes in.

Several processes (`accelerate launch` / `torchrun`): each takes its share of a step's rows, gradients of
the (small) LoRA parameters are summed once per optimizer step, and one collective also carries the
out-of-memory and stop flags, so every process halves or stops together instead of hanging in a
collective the others never reach.

Checkpoints (RUN_DIR/checkpoints/<stage>/): `step-NNNNNN/` every `checkpoint_every` steps and on stop,
`done/` when the stage finishes; each is written under a temporary name and renamed, so a kill -9 at any
moment leaves the previous complete one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from pipelines.files import write_json_atomic
from pipelines.progress import format_seconds
from pipelines.train.batching import micro_batches
from pipelines.train.oom import OutOfMemory, free_memory, is_out_of_memory, out_of_memory_advice

log = logging.getLogger("devtune.fit")

# The gradient norm is clipped as transformers' Trainer does by default.
MAX_GRAD_NORM = 1.0


class Stopped(Exception):
    """SIGTERM (service shutdown, timeout) or the supervising service died: a checkpoint was saved."""


@dataclass(frozen=True)
class Runtime:
    """Where the loop runs: device, this process's rank among `world`, and the precision."""

    device: torch.device
    rank: int
    world: int
    bf16: bool  # autocast matmuls to bf16 (CUDA with bf16 units); CPU stays fp32 (bf16 matmul ~180x slower here)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


@dataclass(frozen=True)
class Stage:
    """A stage's plan: its optimizer steps (row indices, length-grouped) and its optimizer settings."""

    name: str  # "sft" | "dpo" | "kto": also its checkpoint folder
    steps: list[list[int]]
    lengths: list[int]  # tokens each row puts through the model (a pair counts both sequences)
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    micro_batch: int  # rows per micro-batch to start with (a checkpoint's smaller value wins)
    unit: str  # what a row is, for progress: "rows" | "pairs"
    metric: str | None = None  # name of the per-row statistic `loss` returns (e.g. reward_accuracy)
    # LoRA dropout on. Preference stages turn it off (p = 0, as TRL's disable_dropout_in_model does, not
    # eval mode, which would also turn gradient checkpointing off), so the policy's log-likelihoods are
    # comparable with the reference's, computed without dropout.
    dropout: bool = True


@dataclass(frozen=True)
class Micro:
    """What a stage's loss callable returns for one micro-batch."""

    loss: torch.Tensor  # already divided by the step's normaliser: summing micro-batches gives the step loss
    tokens: int  # real tokens put through the model
    metric_sum: float = 0.0  # summed per-row statistic (e.g. correctly ranked pairs)


@dataclass(frozen=True)
class StageResult:
    name: str
    steps: int
    rows: int  # distinct rows the stage trained on
    loss: float  # mean loss over the last `logging_steps` steps
    first_loss: float  # the first step's loss (to see that it went down)
    seconds: float  # this process's time in the stage (not counting a run before a resume)
    tokens: int  # real tokens processed by this process's part of the stage
    tokens_per_s: float
    rows_per_s: float
    resumed_from_step: int  # 0 when the stage started fresh
    oom_backoffs: int
    micro_batch: int  # rows per micro-batch at the end
    metric: float | None = None


@dataclass(frozen=True)
class Settings:
    """Loop settings shared by every stage of a run."""

    run_dir: Path
    logging_steps: int
    checkpoint_every: int
    stage_index: int  # 1-based, for progress ("stage 2/2")
    stage_count: int


Loss = Callable[[list[int], float], Micro]


def fit(stage: Stage, model: Any, loss: Loss, normaliser: Callable[[list[int]], float], settings: Settings,
        rt: Runtime, begin_step: Callable[[list[int]], None] | None = None) -> StageResult:
    """Train `model`'s trainable parameters through `stage.steps`, resuming from the stage's checkpoint."""
    ckpt = settings.run_dir / "checkpoints" / stage.name
    done = _load_done(ckpt, model)
    if done is not None:
        log.info("stage %s finished in an earlier attempt: reusing it", stage.name)
        return done
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=stage.weight_decay,
                                  fused=rt.device.type == "cuda")
    state = _load_step(ckpt, model, optimizer)
    start = state["step"] if state else 0
    micro = min(stage.micro_batch, state["micro_batch"]) if state else stage.micro_batch
    if state:
        log.info("stage %s resumes at step %d/%d from %s (micro-batch %d)", stage.name, start, len(stage.steps),
                 state["path"], micro)
    total, warmup = len(stage.steps), math.ceil(stage.warmup_ratio * len(stage.steps))
    started = time.monotonic()
    tokens = rows_done = backoffs = 0
    losses: list[float] = []
    metric_sum = metric_rows = 0.0
    model.train()
    if not stage.dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    for step in range(start, total):
        for group in optimizer.param_groups:
            group["lr"] = _lr(stage.learning_rate, step, warmup, total)
        rows = stage.steps[step]
        mine = rows[rt.rank::rt.world]
        norm = normaliser(rows)
        while True:
            oom = 0.0
            step_loss = torch.zeros((), dtype=torch.float64, device=rt.device)
            step_tokens, step_metric = 0, 0.0
            try:
                if begin_step is not None:
                    begin_step(mine)
                for part in micro_batches(mine, stage.lengths, micro):
                    with rt.autocast():
                        out = loss(part, norm)
                    out.loss.backward()
                    step_loss += out.loss.detach()
                    step_tokens += out.tokens
                    step_metric += out.metric_sum
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                oom = 1.0
            if oom:
                optimizer.zero_grad(set_to_none=True)
                free_memory()
            # One collective per step: the out-of-memory and stop flags, the loss and the token count.
            stats = rt.all_reduce(torch.tensor([oom, float(_stop_requested()), step_loss.item(), step_tokens,
                                                step_metric], dtype=torch.float64, device=rt.device))
            if stats[0] == 0:
                break
            optimizer.zero_grad(set_to_none=True)
            if micro == 1:
                raise OutOfMemory(out_of_memory_advice(max(stage.lengths[i] for i in rows), rt.device.type))
            micro //= 2
            backoffs += 1
            log.warning("out of memory at %s step %d: micro-batch halved to %d rows (%d micro-steps per step)",
                        stage.name, step + 1, micro, math.ceil(len(rows) / rt.world / micro))
        _sum_gradients(params, rt)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(stats[2]))
        tokens += int(stats[3])
        rows_done += len(rows)
        metric_sum += float(stats[4])
        metric_rows += len(rows)
        elapsed = time.monotonic() - started
        finished = step + 1
        if rt.main and (finished % settings.logging_steps == 0 or finished == total):
            _progress(settings, stage, finished, total, losses, tokens, rows_done, elapsed, micro,
                      metric_sum / metric_rows if stage.metric and metric_rows else None, start)
        stop = bool(stats[1])
        if finished < total and (finished % settings.checkpoint_every == 0 or stop):
            _save_step(ckpt, model, optimizer, {"stage": stage.name, "step": finished, "micro_batch": micro}, rt)
        if stop:
            raise Stopped(f"stopped at {stage.name} step {finished}/{total}; the next attempt resumes there")
    seconds = time.monotonic() - started
    window = losses[-settings.logging_steps:] or [float("nan")]
    result = StageResult(
        name=stage.name, steps=total, rows=len({i for s in stage.steps for i in s}),
        loss=sum(window) / len(window), first_loss=losses[0] if losses else float("nan"), seconds=seconds,
        tokens=tokens, tokens_per_s=tokens / seconds if seconds else 0.0,
        rows_per_s=rows_done / seconds if seconds else 0.0, resumed_from_step=start, oom_backoffs=backoffs,
        micro_batch=micro, metric=metric_sum / metric_rows if stage.metric and metric_rows else None)
    _save_done(ckpt, model, result, rt)
    return result


def _lr(peak: float, step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to zero (transformers' "cosine" schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _sum_gradients(params: list[torch.nn.Parameter], rt: Runtime) -> None:
    """Sum the LoRA gradients of all processes (each loss was divided by the whole step's normaliser)."""
    if rt.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = rt.all_reduce(torch.cat([g.flatten() for g in grads]))
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _progress(settings: Settings, stage: Stage, step: int, total: int, losses: list[float], tokens: int,
              rows: int, elapsed: float, micro: int, metric: float | None, start: int) -> None:
    window = losses[-settings.logging_steps:]
    done_here = step - start
    eta = (total - step) * elapsed / done_here if done_here else None
    progress: dict[str, Any] = {
        "stage": stage.name, "stage_index": settings.stage_index, "stages": settings.stage_count,
        "step": step, "max_steps": total, "loss": sum(window) / len(window), "tokens": tokens,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0, f"{stage.unit}_per_s": rows / elapsed if elapsed else 0.0,
        "elapsed_s": elapsed, "eta_s": eta, "micro_batch": micro, "pid": os.getpid(),
    }
    if metric is not None and stage.metric:
        progress[stage.metric] = metric
    write_json_atomic(settings.run_dir / "progress.json", progress)
    log.info("%s %d/%d: step %d/%d loss %.4f %s tokens/s ETA %s", stage.name, settings.stage_index,
             settings.stage_count, step, total, progress["loss"], f"{progress['tokens_per_s']:,.0f}",
             format_seconds(eta) if eta is not None else "-")


# -- checkpoints -----------------------------------------------------------------------------------------------

def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: Any, path: Path) -> None:
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", [])
    assert not unexpected, f"{path} holds weights this adapter does not have: {unexpected[:3]}"


def _write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory beside `final`, then rename it into place (what a kill -9 leaves is complete)."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _save_step(ckpt: Path, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any], rt: Runtime) -> None:
    if not rt.main:
        return
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()

    def write(d: Path) -> None:
        save_file(adapter_state(model), str(d / "adapter.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, d / "optimizer.pt")
        (d / "state.json").write_text(json.dumps(state) + "\n")

    final = ckpt / f"step-{state['step']:06d}"
    _write_dir(final, write)
    for old in ckpt.glob("step-*"):  # only the newest is needed to resume
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)


def _load_step(ckpt: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    found = sorted(ckpt.glob("step-[0-9]*")) if ckpt.is_dir() else []
    if not found:
        return None
    latest = found[-1]
    load_adapter_state(model, latest / "adapter.safetensors")
    saved = torch.load(latest / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    state: dict[str, Any] = json.loads((latest / "state.json").read_text())
    return {**state, "path": str(latest)}


def _save_done(ckpt: Path, model: Any, result: StageResult, rt: Runtime) -> None:
    if not rt.main:
        return

    def write(d: Path) -> None:
        save_file(adapter_state(model), str(d / "adapter.safetensors"))
        (d / "result.json").write_text(json.dumps(asdict(result)) + "\n")

    _write_dir(ckpt / "done", write)
    for old in ckpt.glob("step-*"):
        shutil.rmtree(old, ignore_errors=True)


def _load_done(ckpt: Path, model: Any) -> StageResult | None:
    if not (ckpt / "done" / "result.json").is_file():
        return None
    load_adapter_state(model, ckpt / "done" / "adapter.safetensors")
    result = StageResult(**json.loads((ckpt / "done" / "result.json").read_text()))
    return replace(result, seconds=0.0, tokens=0, tokens_per_s=0.0, rows_per_s=0.0)


# -- stopping ----------------------------------------------------------------------------------------------------

_stop = {"requested": False}


def install_stop_handlers() -> None:
    """SIGTERM (the service stopping, or a timeout) ends the run at the next step boundary with a checkpoint."""
    def request(signum: int, frame: Any) -> None:
        _stop["requested"] = True
        log.warning("signal %d: stopping after this step with a checkpoint", signum)

    signal.signal(signal.SIGTERM, request)


def _stop_requested() -> bool:
    """A stop was signalled, or the service that started this run is gone (a killed service's orphan must not
    keep training, and write into a run directory, while the restarted service resumes the same run)."""
    if _stop["requested"]:
        return True
    supervisor = int(os.environ.get("DEVTUNE_SUPERVISOR_PID", "0"))
    if supervisor > 0:
        try:
            os.kill(supervisor, 0)
        except ProcessLookupError:
            log.warning("the service (pid %d) that started this run is gone: stopping", supervisor)
            _stop["requested"] = True
        except PermissionError:
            pass
    return _stop["requested"]
