"""Where a run's training and evaluation execute: the one seam between the cycle and the machines.

`[train] backend = "local"` runs each stage as a child process on this machine, on the GPU slot the service's
queue gave the run (pipelines/child.py). `"ray"` runs it as a Ray job on a cluster
(pipelines/train/ray_backend.py). Either way the stage is the same entry point reading only the run
directory (`python -m pipelines.train RUN_DIR`), and either way a failure raises `ChildFailed` with the end
of the stage's log, so the cycle around it does not know which one ran.

Neither this module nor ray_backend.py imports ray (or torch) at import time: the service imports them to
stop running work on SIGTERM, and ray is imported only when a Ray job is submitted or watched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipelines import child
from pipelines.config import RayConfig, TrainConfig
from pipelines.train import ray_backend

# stage -> (the child's module, the log file in the run directory)
STAGES = {"train": ("pipelines.train", "train.log"), "evaluate": ("pipelines.evaluate", "eval.log")}
CANCELLED = "cancelled"  # a marker in the run directory, written by `cancel`
PRELOAD = {"train": "pipelines.train.train", "evaluate": "pipelines.evaluate.evaluate"}  # what a primed child imports


def prime_stage(stage: str, run_dir: Path, train: TrainConfig) -> child.Primed | None:
    """The local child of `stage` started now, to import while the run's datasets are built (run_stage then
    hands it over); None where a stage does not run as one local process (Ray, several GPUs per run)."""
    if train.backend != "local" or train.gpus_per_run > 1:
        return None
    module, log_name = STAGES[stage]
    run_dir.mkdir(parents=True, exist_ok=True)
    return child.Primed(module, [str(run_dir)], run_dir / log_name, PRELOAD[stage])


def run_stage(stage: str, run_dir: Path, train: TrainConfig, ray: RayConfig, timeout_s: float,
              gpus: tuple[str, ...] = (), on_tick: Callable[[], None] | None = None,
              primed: child.Primed | None = None) -> float:
    """Run `stage` ("train" or "evaluate") of the run in `run_dir` to its end; returns seconds taken.

    `gpus` is the local slot's GPU ids (the local backend's CUDA_VISIBLE_DEVICES; unused on Ray, where the
    cluster picks the GPUs); `primed` is the stage's child from `prime_stage`. Raises ChildFailed, with the
    log's last lines, when the stage fails."""
    module, log_name = STAGES[stage]
    if cancelled(run_dir):
        raise child.ChildFailed(f"{module}: run {run_dir.name} was cancelled (devtune cancel) and is not resumed")
    try:
        if train.backend == "ray":
            return ray_backend.run_job(stage, module, run_dir, run_dir / log_name, train, ray, timeout_s, on_tick)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}
        processes = len(gpus) if stage == "train" and train.gpus_per_run > 1 else 1
        return child.run_child(module, [str(run_dir)], run_dir / log_name, timeout_s, on_tick=on_tick,
                               processes=processes, env=env, primed=primed)
    except child.ChildFailed as e:
        if cancelled(run_dir):  # not "stopped: the next cycle resumes", which the stop itself reads as
            raise child.ChildFailed(f"{module}: run {run_dir.name} was cancelled (devtune cancel) and is not "
                                    f"resumed; last lines of {run_dir / log_name}:\n"
                                    + child.tail(run_dir / log_name, 10)) from e
        raise


def cancel(run_dir: Path) -> int:
    """Cancel a run (`devtune cancel`): its running stage is stopped, a local child or a Ray job alike, no
    later stage starts and no later cycle resumes it. Returns how many processes or jobs were stopped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CANCELLED).touch()  # first: a stage starting right now sees it
    return child.stop_matching(str(run_dir)) + ray_backend.cancel(run_dir.name)


def cancelled(run_dir: Path) -> bool:
    return (run_dir / CANCELLED).exists()


def stop_all() -> int:
    """Stop every stage this process runs, local children and Ray jobs alike (service shutdown); returns how
    many there were. Stopped training resumes from its checkpoint at the scope's next cycle."""
    return child.stop_all() + ray_backend.stop_all()
