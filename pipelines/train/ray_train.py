"""`python -m pipelines.train.ray_train RUN_DIR --workers N [--cpu]`: one training run across several nodes.

The Ray job the ray backend submits when a run's `[train] gpus_per_run` exceeds `[ray] gpus_per_node`
(pipelines/train/ray_backend.py). Ray Train's TorchTrainer places N workers, one GPU each, on as many nodes
as it takes; each worker then runs the usual entry point, `python -m pipelines.train RUN_DIR`, as one rank
of a torch.distributed job, exactly as under `torchrun` on one machine. Ray Train's own process group is
used only to agree on the trainer's rendezvous (rank 0's address and a free port there): the trainer forms
its group itself, so its checkpoints, stop handling and exit statuses are the same as everywhere else.

Every rank reads and writes RUN_DIR, so it must be on a folder all nodes share (`[ray] shared_dir`, or a
state_dir mounted at the same path). `--cpu` runs the workers without GPUs (gloo): how the tests check this
path on one machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: rank `world_rank` of the trainer, run as a child process."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipelines.child import free_port

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rendezvous = [f"{ray.util.get_node_ip_address()}:{free_port()}" if rank == 0 else ""]
    dist.broadcast_object_list(rendezvous, src=0)
    host, port = rendezvous[0].rsplit(":", 1)
    device = ray.train.torch.get_device()
    # Ray Train shows a node's workers all of that node's GPUs they were given; get_device() is this one's.
    local = device.index if device.type == "cuda" and device.index is not None else ctx.get_local_rank()
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
           "MASTER_ADDR": host, "MASTER_PORT": port, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.train", config["run_dir"]], env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rank {rank}: python -m pipelines.train exited with status {done.returncode}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train.ray_train")
    parser.add_argument("run_dir")
    parser.add_argument("--workers", type=int, required=True, help="ranks, one GPU each")
    parser.add_argument("--cpu", action="store_true", help="workers without GPUs (gloo), for tests")
    args = parser.parse_args(argv)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(args.run_dir).resolve()
    trainer = TorchTrainer(worker, train_loop_config={"run_dir": str(run_dir)},
                           scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=not args.cpu),
                           run_config=RunConfig(name="ray_train", storage_path=str(run_dir / "ray_train")))
    trainer.fit()  # raises when a worker failed: the job fails, with the workers' output in its log
    return 0


if __name__ == "__main__":
    sys.exit(main())
