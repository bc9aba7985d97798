"""`python -m pipelines.primed PRELOAD MODULE ARGS...`: a stage's child started early (pipelines.child.Primed).

It imports PRELOAD (the stage's code, with torch, transformers and peft: 4.8-6.5 s on a 2-core machine) while
its parent still collects and builds the run's datasets, then reads one line from stdin: {"env": {...}}, the
environment to add, after which it runs `python -m MODULE ARGS...` in this process, exactly as a fresh child
would. End of input instead (the run was skipped, or the parent is gone) exits 0 without running anything.

The GPUs a local stage gets (CUDA_VISIBLE_DEVICES) are known only when its slot is granted, after the import.
CUDA reads that variable once, when it starts, so nothing may start CUDA before the line comes: torch's own
`torch.cuda.is_available()` is made to ask NVML instead while importing (PYTORCH_NVML_BASED_CUDA_CHECK), and
when CUDA was started all the same, the child exits with PRIMED_UNUSABLE and its parent starts a fresh one.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import time

# The exit that tells pipelines.child to start a fresh child instead (75 and 3 mean other things: child.py).
PRIMED_UNUSABLE = 78


def main() -> int:
    preload, module, *args = sys.argv[1:]
    began = time.monotonic()
    before = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    importlib.import_module(preload)
    imported = time.monotonic()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    if before is None:
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK")
    else:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = before
    env = json.loads(line)["env"]
    torch = sys.modules.get("torch")
    if "CUDA_VISIBLE_DEVICES" in env and torch is not None and torch.cuda.is_initialized():
        print(f"primed {module}: CUDA started while importing {preload}, before its GPUs were known; "
              "starting a fresh child", flush=True)
        return PRIMED_UNUSABLE
    os.environ.update(env)
    print(f"primed {module}: {preload} imported in {imported - began:.1f}s, then waited "
          f"{time.monotonic() - imported:.1f}s for its inputs", flush=True)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
