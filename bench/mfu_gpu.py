"""Model-FLOPs utilisation of LoRA SFT through devtune's training path on a Qwen2.5-0.5B-shaped model (GPU).

    python bench/mfu_gpu.py [--steps 20] [--batch 8] [--seq 1024] [--peak-tflops N]

The model is randomly initialised from Qwen2.5-0.5B's published shape (nothing is downloaded), bf16, LoRA
r 16 on every linear layer, rows of `--seq` tokens whose last quarter is the middle (the loss positions).
Throughput is measured after 3 warm-up steps. Model FLOPs per trained token:
- LoRA keeps the base frozen, so backward computes activation gradients only: 2N (forward) + 2N (backward)
  = 4N for the N non-embedding linear parameters, plus the LoRA matrices' own 6 r (in + out) per layer;
- attention scores and values: 4 * layers * seq * hidden forward (causal: half of that is skipped work
  but counted, as in the PaLM MFU definition), twice that in backward;
- the LM head only at middle positions (devtune never computes the others): 2 * 3 * hidden * vocab each.
MFU = model FLOPs / s / peak dense bf16 FLOP/s of the device (H100 SXM 989 TFLOP/s, H200 989, H100 PCIe 756,
A100 312; --peak-tflops overrides). `--device cpu --layers 2` runs a shrunken copy as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Qwen/Qwen2.5-0.5B config.json
QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu"}
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "A100": 312.0, "L40S": 362.0}


def model_flops_per_step(shape: dict[str, Any], batch: int, seq: int, middle: int, lora_r: int) -> float:
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = layers * (h * h * 2 + h * kv * 2 + 3 * h * i)  # q, o; k, v; gate, up, down
    lora = layers * lora_r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    tokens = batch * seq
    dense = 4 * linear * tokens + 6 * lora * tokens
    attention = 3 * 4 * layers * seq * h * tokens  # QK^T and AV, forward + 2x backward
    head = 6 * h * shape["vocab_size"] * batch * middle
    return float(dense + attention + head)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=0, help="fewer layers (smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    args = parser.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipelines.config import TrainConfig
    from pipelines.train.batching import Encoded, collate, plan_steps
    from pipelines.train.fit import Micro, Settings, Stage, fit
    from pipelines.train.losses import LM, sft_loss
    from pipelines.train.train import CUDA_HEAD_CHUNK_TOKENS, attach_adapter, runtime

    shape = dict(QWEN25_05B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (or --device cpu --layers 2 as a smoke test)")
    torch.manual_seed(0)
    warmup, steps = 3, args.steps
    cfg = TrainConfig(batch_size=args.batch, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, device=args.device)
    rt = runtime(cfg)  # bf16 autocast on a GPU with bf16 units, as a training run gets
    model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(torch.bfloat16 if rt.bf16 else torch.float32).to(rt.device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    model, _, _ = attach_adapter(model, cfg, None)
    lm = LM.of(model, CUDA_HEAD_CHUNK_TOKENS if rt.device.type == "cuda" else None)
    middle = args.seq // 4
    examples = [Encoded(ids=torch.randint(0, shape["vocab_size"], (args.seq,)).tolist(), n_prompt=args.seq - middle)
                for _ in range(args.batch * (warmup + steps))]
    lengths = [len(e.ids) for e in examples]
    stage = Stage(name="sft", steps=plan_steps(lengths, args.batch, warmup + steps, 0), lengths=lengths,
                  learning_rate=1e-4, warmup_ratio=0.0, weight_decay=0.0, micro_batch=args.batch, unit="rows")
    settings = Settings(run_dir=Path(tempfile.mkdtemp()), logging_steps=1000, checkpoint_every=100_000,
                        stage_index=1, stage_count=1)
    marks: list[float] = []

    def mark(_: list[int]) -> None:  # the loop calls this as each optimizer step starts
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    def loss(idx: list[int], step_targets: float) -> Micro:
        batch = collate([examples[i] for i in idx], 0, rt.device)
        return Micro(loss=sft_loss(lm, batch, step_targets), tokens=batch.tokens)

    fit(stage, model, loss, lambda idx: float(sum(examples[i].n_target for i in idx)), settings, rt, begin_step=mark)
    mark([])
    seconds = marks[-1] - marks[warmup]
    flops = model_flops_per_step(shape, args.batch, args.seq, middle, args.lora_r) * steps
    name = torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    result = {"device": name, "layers": shape["num_hidden_layers"], "batch": args.batch, "seq": args.seq,
              "steps": steps, "seconds": seconds, "tokens_per_s": steps * args.batch * args.seq / seconds,
              "model_tflops_per_s": flops / seconds / 1e12, "peak_tflops": peak,
              "mfu": flops / seconds / 1e12 / peak if peak else None,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if rt.device.type == "cuda" else 0.0}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
