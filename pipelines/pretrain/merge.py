"""Merge a run's continued-pretraining adapter into its base: `python -m pipelines.pretrain.merge RUN_DIR`.

For `[pretrain] output = "base"`: the result, RUN_DIR/base/, is a complete model directory (weights in the base's
dtype, config, tokenizer, generation config) that `from_pretrained` loads like any checkpoint; the registry
keeps it as base:<team>/vNNNN. The merged weights compute what base + adapter computed (peft's
merge_and_unload). Written beside, then renamed: RUN_DIR/base appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.train.rundir import RunConfig


def merge_run(run_dir: Path) -> Path:
    run = RunConfig.read(run_dir)
    base = AutoModelForCausalLM.from_pretrained(run.base_model, dtype="auto")
    dtype = next(base.parameters()).dtype
    # Merge in fp32 so a bf16 base does not lose the adapter's small deltas to rounding twice.
    merged = PeftModel.from_pretrained(base.float(), run_dir / "adapter").merge_and_unload().to(dtype)
    partial, final = run_dir / "base.partial", run_dir / "base"
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial)
    AutoTokenizer.from_pretrained(run.base_model).save_pretrained(partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.pretrain.merge RUN_DIR", file=sys.stderr)
        return 2
    with torch.no_grad():
        out = merge_run(Path(args[0]))
    print(f"merged base model: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
