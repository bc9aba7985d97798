"""Training and evaluation as Ray jobs (`[train] backend = "ray"`), through Ray's Jobs API.

Each stage of a run is one job on the cluster at `[ray] address`: the same entry point as the local child
(`python -m pipelines.train RUN_DIR`), with `[ray] cpus_per_run` CPUs and `[train] gpus_per_run` GPUs reserved
for it (`entrypoint_num_cpus` / `entrypoint_num_gpus`). A run that needs more GPUs than one node has
(`[ray] gpus_per_node`) runs through Ray Train's TorchTrainer instead (pipelines/train/ray_train.py).

Submission ids. Training is submitted as the run id itself, evaluation as `<run id>-evaluate`. Ray refuses an
id twice, and an id freed by `delete_job` was not safe to reuse (the old job's supervisor actor, named after
it, outlived the delete: the resubmitted job failed at once on Ray 2.60), so a later attempt of the same
stage (after a failed or stopped one) is `<id>-2`, `<id>-3`, .... The id is written to the run directory's
`ray.json` *before* the job is submitted, so a service that is killed and restarted finds its job: one that
is pending or running is watched again (re-attached), one that succeeded has its results fetched, and only
one that failed or was stopped is submitted again (it resumes from its checkpoint, as a local child does).

Files. A job reads and writes a run directory that the cluster can reach. With `[ray] shared_dir` empty that
is the service's own `state_dir/runs/<run_id>` (a head on this host, or state_dir mounted at the same path on
every node). With `shared_dir` set, the run's inputs (config.json, data/, and the adapters it starts from
and is gated against) are staged into `<shared_dir>/runs/<run_id>` and the job trains there, checkpoints
included, so a retry on another node resumes; progress.json is copied back while it runs, the adapter and
train.json/eval.json when it succeeds (the adapter renamed into place whole, never half-copied), and the
staged folder is removed once evaluation is back. The job's output is streamed from the Jobs API into the
run's train.log / eval.log. Ray's Jobs API has no file download, so results cannot come back through a
`working_dir` upload alone: a folder both sides see is the one requirement (Ray Train asks the same of its
`storage_path`).

Stopping. A job past its timeout (counted from its submission, so a re-attach does not restart the clock),
every job on service shutdown (`stop_all`), and a cancelled run's job (`cancel`) are stopped with
`stop_job`: Ray sends SIGTERM to the job's processes and SIGKILL `RAY_JOB_STOP_WAIT_TIME_S` later, which each
job sets to the local backend's grace so the trainer can finish its checkpoint. A service that is killed
(SIGKILL, OOM, power) stops nothing: its jobs go on and the restarted service re-attaches.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import child
from pipelines.config import RayConfig, TrainConfig
from pipelines.files import read_json, write_json_atomic

log = logging.getLogger("devtune.ray")

RECORD = "ray.json"  # in the service's run directory: {stage: {"submission_id", "address", "log_chars"}}
TICK_S = 30.0  # the cycle's progress line, as often as for a local child
# What each stage leaves that the cycle reads, fetched back from a staged run directory when the job succeeds.
RESULTS = {"train": ("adapter", "train.json", "progress.json"), "evaluate": ("eval.json",)}
LIVE = ("PENDING", "RUNNING")
UNREACHABLE_S = 120.0  # a job is given up on (not stopped) when the cluster stays silent this long

_watching: dict[str, tuple[str, str]] = {}  # submission id -> (address, run id): jobs this process waits on
_lock = threading.Lock()


def run_job(stage: str, module: str, run_dir: Path, log_path: Path, train: TrainConfig, ray: RayConfig,
            timeout_s: float, on_tick: Callable[[], None] | None = None) -> float:
    """Run (or re-attach to) the Ray job of `stage` (`python -m <module> RUN_DIR`) for the run in `run_dir`
    until it ends, its output appended to `log_path`; returns the job's seconds. Raises ChildFailed with the
    log's last lines when it fails, is stopped or times out."""
    client = connect(ray.address)
    remote = job_dir(run_dir, ray)
    if remote != run_dir:
        stage_inputs(run_dir, remote)
    sid = attach_or_submit(client, stage, module, run_dir, log_path, remote, train, ray)
    with _lock:
        _watching[sid] = (ray.address, run_dir.name)
    try:
        info = watch(client, sid, stage, module, run_dir, log_path, remote, timeout_s, ray.poll_s, on_tick)
    finally:
        with _lock:
            _watching.pop(sid, None)
    status = str(info.status)
    if status == "SUCCEEDED":
        if remote != run_dir:
            fetch_results(stage, remote, run_dir)
        return ((info.end_time or 0) - (info.start_time or 0)) / 1000
    if status == "STOPPED":
        why = " (stopped: the next cycle resumes training from its last checkpoint)" if stage == "train" else ""
        raise child.ChildFailed(f"{module} (Ray job {sid}) was stopped{why}; last lines of {log_path}:\n"
                                + child.tail(log_path, 20))
    meaning = child.EXIT_MEANINGS.get(info.driver_exit_code, "") if info.driver_exit_code is not None else ""
    first = (info.message or "").splitlines()[0] if info.message else ""
    raise child.ChildFailed(f"{module} failed as Ray job {sid} ({first}){meaning}; last lines of {log_path}:\n"
                            + child.tail(log_path, 20))


def connect(address: str) -> Any:
    """A JobSubmissionClient for the cluster (ray is imported here, and only when a job is run)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise child.ChildFailed(f"cannot reach the Ray cluster's Jobs API at {address} ({e}): start the head "
                                "(`ray start --head`) or fix [ray] address") from None


def job_dir(run_dir: Path, ray: RayConfig) -> Path:
    """The run directory as the job sees it: the service's own, or its staged copy under `[ray] shared_dir`."""
    return Path(ray.shared_dir) / "runs" / run_dir.name if ray.shared_dir else run_dir


def stage_inputs(run_dir: Path, remote: Path) -> None:
    """Copy what the job reads into `remote` (once: a resumed or re-attached run finds it there, with its
    checkpoints). The adapters the run starts from and is gated against are copied in too, and the staged
    config.json points at those copies, so nodes need the base model but not this host's registry."""
    if (remote / "config.json").is_file():
        return
    tmp = remote.with_name(f".{remote.name}.staging")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "data", tmp / "data")
    config = read_json(run_dir / "config.json")
    for key, name in (("served_adapter", "served"), ("init_adapter", "init")):
        if config.get(key):
            # The adapter's own files only: a registry version's exports/ (GGUF, vLLM folder) is not read.
            (tmp / "inputs" / name).mkdir(parents=True)
            for f in Path(config[key]).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / "inputs" / name / f.name)
            config[key] = str(remote / "inputs" / name)
    write_json_atomic(tmp / "config.json", config)
    os.replace(tmp, remote)


def entrypoint(stage: str, module: str, remote: Path, train: TrainConfig, ray: RayConfig
               ) -> tuple[list[str], float, float]:
    """The job's command (`python -m <module> RUN_DIR`, or across nodes), and the CPUs and GPUs it reserves."""
    gpus = 0 if train.device == "cpu" else (train.gpus_per_run if stage == "train" else 1)
    if gpus > ray.gpus_per_node:
        # The driver only starts Ray Train's workers, each of which reserves its own GPU.
        return [ray.python, "-m", "pipelines.train.ray_train", str(remote), "--workers", str(gpus)], 1.0, 0.0
    if gpus > 1:
        return [ray.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", "-m",
                module, str(remote)], ray.cpus_per_run, float(gpus)
    return [ray.python, "-m", module, str(remote)], ray.cpus_per_run, float(gpus)


def submission_ids(run_id: str, stage: str) -> Callable[[str | None], str]:
    """The next submission id after `previous` (None: the stage's first)."""
    first = run_id if stage == "train" else f"{run_id}-{stage}"

    def following(previous: str | None) -> str:
        if previous is None:
            return first
        attempt = int(previous[len(first) + 1:]) if previous != first else 1
        return f"{first}-{attempt + 1}"

    return following


def attach_or_submit(client: Any, stage: str, module: str, run_dir: Path, log_path: Path, remote: Path,
                     train: TrainConfig, ray: RayConfig) -> str:
    """The submission id of the stage's job: the recorded one if it is pending, running or succeeded (a
    restarted service re-attaches), else a newly submitted job."""
    record = read_json(run_dir / RECORD) or {}
    previous = (record.get(stage) or {}).get("submission_id")
    if previous is not None:
        info = job_info(client, previous)
        if info is None:  # recorded, then the service died before (or while) submitting it
            return submit(client, previous, stage, module, run_dir, remote, train, ray, record)
        if str(info.status) in (*LIVE, "SUCCEEDED"):
            log.info("run %s %s: re-attached to Ray job %s (%s)", run_dir.name, stage, previous, info.status)
            note(log_path, f"re-attached to Ray job {previous} ({info.status})")
            return str(previous)
    return submit(client, submission_ids(run_dir.name, stage)(previous), stage, module, run_dir, remote, train,
                  ray, record)


def submit(client: Any, sid: str, stage: str, module: str, run_dir: Path, remote: Path, train: TrainConfig,
           ray: RayConfig, record: dict[str, Any]) -> str:
    command, cpus, gpus = entrypoint(stage, module, remote, train, ray)
    runtime_env: dict[str, Any] = {"env_vars": {
        "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
        # Ray's default is 3 s between SIGTERM and SIGKILL: too short for a trainer to write its checkpoint.
        "RAY_JOB_STOP_WAIT_TIME_S": str(int(child.STOP_GRACE_S))}}
    if ray.ship_code:
        # Uploaded once per content hash (Ray caches it); the job imports this package before any installed one.
        runtime_env["py_modules"] = [str(child.PROJECT_ROOT / "pipelines")]
        runtime_env["excludes"] = ["__pycache__"]
    record[stage] = {"submission_id": sid, "address": ray.address, "log_chars": 0}
    write_json_atomic(run_dir / RECORD, record)  # before submitting: a restart must find the job
    client.submit_job(entrypoint=shlex.join(command), submission_id=sid, runtime_env=runtime_env,
                      entrypoint_num_cpus=cpus, entrypoint_num_gpus=gpus,
                      metadata={"devtune_run": run_dir.name, "stage": stage})
    log.info("run %s %s: submitted Ray job %s (%g CPUs, %g GPUs) to %s", run_dir.name, stage, sid, cpus, gpus,
             ray.address)
    return sid


def watch(client: Any, sid: str, stage: str, module: str, run_dir: Path, log_path: Path, remote: Path,
          timeout_s: float, poll_s: float, on_tick: Callable[[], None] | None) -> Any:
    """Follow the job until it ends, appending its new output to `log_path` and copying progress back;
    stops it past `timeout_s` after its submission. Returns its final JobDetails."""
    last_tick = last_answer = time.monotonic()
    shown = ""
    while True:
        try:
            info = client.get_job_info(sid)
            append_logs(client, sid, stage, run_dir, log_path)
        except OSError as e:  # requests' ConnectionError and timeouts: a head restarting, a network blip
            if time.monotonic() - last_answer > UNREACHABLE_S:
                raise child.ChildFailed(f"{module} (Ray job {sid}): the cluster has not answered for "
                                        f"{UNREACHABLE_S:.0f}s ({e}); the next cycle re-attaches to the job "
                                        "if it is still there") from None
            time.sleep(poll_s)
            continue
        last_answer = time.monotonic()
        if str(info.status) != shown:  # the job's status goes into the log too, between its own lines
            shown = str(info.status)
            note(log_path, f"Ray job {sid}: {shown}" + (f" ({info.message})" if info.message and shown in LIVE else ""))
        if str(info.status) not in LIVE:
            return info
        if remote != run_dir and stage == "train":
            progress = read_json(remote / "progress.json")
            if progress:
                write_json_atomic(run_dir / "progress.json", progress)
        if on_tick is not None and time.monotonic() - last_tick >= TICK_S:
            on_tick()
            last_tick = time.monotonic()
        if info.start_time and time.time() - info.start_time / 1000 >= timeout_s:
            stop(client, sid)
            append_logs(client, sid, stage, run_dir, log_path)
            raise child.ChildFailed(f"{module} (Ray job {sid}) ran past its {timeout_s:.0f}s timeout and "
                                    f"was stopped; raise the timeout in the config or see {log_path}")
        time.sleep(poll_s)


def append_logs(client: Any, sid: str, stage: str, run_dir: Path, log_path: Path) -> None:
    """Append the part of the job's output not yet in `log_path` (the offset is kept in ray.json, so a
    re-attached job's output is not written twice)."""
    text = client.get_job_logs(sid)
    record = read_json(run_dir / RECORD) or {}
    entry = record.get(stage) or {}
    done = int(entry.get("log_chars", 0))
    if len(text) <= done:
        return
    with log_path.open("a", encoding="utf-8") as f:
        f.write(text[done:])
    record[stage] = {**entry, "log_chars": len(text)}
    write_json_atomic(run_dir / RECORD, record)


def note(log_path: Path, text: str) -> None:
    """A line of devtune's own in a stage's log (a job's status, a re-attach)."""
    with log_path.open("a", encoding="utf-8") as f:
        f.write(f"devtune {time.strftime('%Y-%m-%d %H:%M:%S')}: {text}\n")


def fetch_results(stage: str, remote: Path, run_dir: Path) -> None:
    """Copy a succeeded stage's results back from the staged run directory; a folder is renamed into place
    whole. After evaluation, the staged copy (checkpoints included) is removed."""
    for name in RESULTS[stage]:
        src, dst = remote / name, run_dir / name
        if src.is_dir():
            tmp, old = dst.with_name(f".{name}.fetching"), dst.with_name(f".{name}.old")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            if dst.exists():
                os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        elif src.is_file():
            tmp = dst.with_name(f".{name}.fetching")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    if stage == "evaluate":
        shutil.rmtree(remote, ignore_errors=True)


def job_info(client: Any, sid: str) -> Any:
    """The job's JobDetails, or None when the cluster has no such job."""
    try:
        return client.get_job_info(sid)
    except RuntimeError as e:  # the SDK's error for any non-200 answer; its text carries the status code
        if "status code 404" in str(e):
            return None
        raise


def stop(client: Any, sid: str) -> None:
    """Stop the job (SIGTERM, then SIGKILL after the grace) and wait until Ray reports it ended."""
    stop_jobs({sid: client})


def stop_jobs(jobs: dict[str, Any]) -> None:
    """Stop every job (submission id -> its client) at once, then wait for them all: their graces overlap."""
    for sid, client in jobs.items():
        client.stop_job(sid)
    deadline = time.monotonic() + child.STOP_GRACE_S + 30
    for sid, client in jobs.items():
        while time.monotonic() < deadline and str(client.get_job_status(sid)) in LIVE:
            time.sleep(0.5)


def stop_all() -> int:
    """Stop every job this process is watching (service shutdown); returns how many."""
    with _lock:
        watched = dict(_watching)
    stop_jobs({sid: connect(address) for sid, (address, _) in watched.items()})
    return len(watched)


def cancel(run_id: str) -> int:
    """Stop the jobs of `run_id` this process is watching (`devtune cancel`); returns how many."""
    with _lock:
        watched = {sid: address for sid, (address, run) in _watching.items() if run == run_id}
    stop_jobs({sid: connect(address) for sid, address in watched.items()})
    return len(watched)


def live_job(run_dir: Path, address: str) -> str | None:
    """The submission id of the run's recorded job when it is pending, running or succeeded on the cluster
    (a restarted service re-attaches to it), else None."""
    record = read_json(run_dir / RECORD) or {}
    client = None
    for stage in ("evaluate", "train"):
        sid = (record.get(stage) or {}).get("submission_id")
        if sid is None:
            continue
        client = client or connect(address)
        info = job_info(client, sid)
        return str(sid) if info is not None and str(info.status) in (*LIVE, "SUCCEEDED") else None
    return None

