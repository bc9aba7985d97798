"""`[train] backend = "ray"`: real Ray jobs on a real local head (`ray start --head` on 127.0.0.1).

Two runs train at once as Ray jobs and their adapters come back whole; a service killed mid-run is
restarted, watches the same job again and promotes once; a failing job is reported with its log's tail; a
run across "nodes" goes through Ray Train's TorchTrainer (two CPU workers on this one machine).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from daemon.api import ApiClient
from pipelines.child import ChildFailed
from pipelines.config import RayConfig
from runs import fim_rows, make_run, train_config
from support import ROOT, local_ray_head, write_config

ray_job_submission = pytest.importorskip("ray.job_submission", reason="install the extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head on 127.0.0.1 for this file's tests (tests/support.py local_ray_head); yields its Jobs API."""
    with local_ray_head(cpus=4) as address:
        yield address


def _ray(address: str, **overrides: Any) -> RayConfig:
    return RayConfig(**{"address": address, "cpus_per_run": 1.0, "poll_s": 0.5, **overrides})


def _small_run(run_dir: Path, tiny_model: Path, seed: int = 0, **train: Any) -> Path:
    cfg = train_config(backend="ray", max_steps=train.pop("max_steps", 30), checkpoint_every_steps=10, **train)
    return make_run(run_dir, tiny_model, cfg,
                    {"sft.jsonl": fim_rows(48, seed=seed), "heldout.jsonl": fim_rows(16, seed=seed + 1, start_day=25)})


def test_two_runs_train_at_once_as_ray_jobs_and_their_adapters_come_back(tmp_path: Path, tiny_model: Path,
                                                                        ray_head: str) -> None:
    from pipelines.train.backends import run_stage
    from pipelines.train.rundir import RunConfig

    shared = tmp_path / "shared"  # stands for a folder every node mounts: runs are staged there
    ray = _ray(ray_head, shared_dir=str(shared))
    runs = [_small_run(tmp_path / "runs" / f"20261201-020000-team-t{i}-00{i}", tiny_model, seed=i) for i in (1, 2)]
    outcomes: dict[str, Any] = {}

    def train(run_dir: Path) -> None:
        cfg = RunConfig.read(run_dir).train
        try:
            outcomes[run_dir.name] = run_stage("train", run_dir, cfg, ray, 600)
        except ChildFailed as e:  # reported below, with the job's log
            outcomes[run_dir.name] = e

    threads = [threading.Thread(target=train, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert all(isinstance(v, float) for v in outcomes.values()), outcomes
    client = ray_job_submission.JobSubmissionClient(ray_head)
    jobs = {r.name: client.get_job_info(r.name) for r in runs}  # submission id = the run id
    first, second = sorted(jobs.values(), key=lambda j: j.start_time)
    assert second.start_time < first.end_time, "the two runs' jobs did not overlap on the cluster"
    for run_dir in runs:
        record = json.loads((run_dir / "ray.json").read_text())
        assert record["train"]["submission_id"] == run_dir.name
        staged = shared / "runs" / run_dir.name
        # the adapter came back whole, as the job left it, and never half-written under its own name
        assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == \
            (staged / "adapter" / "adapter_model.safetensors").read_bytes()
        assert not list(run_dir.glob(".adapter*"))
        assert json.loads((run_dir / "train.json").read_text())["steps"] == 30
        assert json.loads((run_dir / "progress.json").read_text())["step"] == 30
        log = (run_dir / "train.log").read_text()
        assert "trained 30 steps" in log and log.count("trained 30 steps") == 1  # streamed once
        assert (staged / "checkpoints").is_dir() and not (run_dir / "checkpoints").exists()

    # Evaluation runs the same way; once its report is back the staged copy is removed.
    cfg = RunConfig.read(runs[0]).train
    run_stage("evaluate", runs[0], cfg, ray, 600)
    assert json.loads((runs[0] / "eval.json").read_text())["candidate"]
    assert "Running entrypoint" in (runs[0] / "eval.log").read_text()
    assert not (shared / "runs" / runs[0].name).exists()
    assert client.get_job_info(f"{runs[0].name}-evaluate").status == "SUCCEEDED"


def test_a_failing_job_is_reported_with_its_log_tail_and_retried_under_a_new_id(tmp_path: Path, tiny_model: Path,
                                                                              ray_head: str) -> None:
    from pipelines.train.backends import run_stage
    from pipelines.train.rundir import RunConfig

    run_dir = _small_run(tmp_path / "20261201-020000-team-broken-0001", tiny_model)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "base_model": str(tmp_path / "no-such-model")}))
    train = RunConfig.read(run_dir).train
    with pytest.raises(ChildFailed) as failed:
        run_stage("train", run_dir, train, _ray(ray_head), 300)
    message = str(failed.value)
    assert f"Ray job {run_dir.name}" in message and "no-such-model" in message.split("last lines of", 1)[1]

    # The next attempt (the scope's next cycle) is a new job: Ray never takes a submission id twice.
    (run_dir / "config.json").write_text(json.dumps(config))
    run_stage("train", run_dir, train, _ray(ray_head), 300)
    assert json.loads((run_dir / "ray.json").read_text())["train"]["submission_id"] == f"{run_dir.name}-2"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_run_across_nodes_goes_through_ray_trains_torch_trainer(tmp_path: Path, tiny_model: Path,
                                                                   ray_head: str) -> None:
    from pipelines.train.ray_backend import entrypoint

    run_dir = _small_run(tmp_path / "20261201-020000-team-wide-0001", tiny_model, max_steps=8)
    train = replace(train_config(), device="cuda", gpus_per_run=16)
    command, cpus, gpus = entrypoint("train", "pipelines.train", run_dir, train, _ray(ray_head, gpus_per_node=8))
    assert command[1:4] == ["-m", "pipelines.train.ray_train", str(run_dir)] and command[-2:] == ["--workers", "16"]
    assert (cpus, gpus) == (1.0, 0.0)  # the driver holds no GPU: each worker reserves its own
    # One machine has no GPUs to span: the same entry point with two CPU workers (gloo) instead.
    client = ray_job_submission.JobSubmissionClient(ray_head)
    sid = client.submit_job(entrypoint=f"{sys.executable} -m pipelines.train.ray_train {run_dir} --workers 2 --cpu",
                            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, entrypoint_num_cpus=0)
    status = _wait(lambda: (s := client.get_job_status(sid)).is_terminal() and s, 600)
    assert status == "SUCCEEDED", client.get_job_logs(sid)[-4000:]
    trained = json.loads((run_dir / "train.json").read_text())
    assert trained["processes"] == 2 and trained["steps"] == 8
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_service_killed_mid_run_reattaches_to_its_ray_job_and_promotes_once(tmp_path: Path, tiny_model: Path,
                                                                                ray_head: str) -> None:
    from daemon.sample import DEVELOPERS, make_sample

    sample = make_sample(tmp_path / "sample", n_commits=16, n_events=60)
    setup = write_config(tmp_path / "site", [{"kind": "git", "path": str(sample.repo), "name": "repo"}],
                         teams=[{"name": "payments", "members": [e for _, e in DEVELOPERS]}], overrides={
        "": {"base_model": str(tiny_model)},
        "collect": {"interval_s": 3600.0, "watch": False}, "schedule": {"cycle_cron": "0 3 1 1 *"},
        "datasets": {"max_row_tokens": 256, "max_prefix_chars": 400, "max_suffix_chars": 100,
                     "min_train_rows": 8, "min_heldout_rows": 2},
        "train": {"backend": "ray", "device": "cpu", "max_steps": 120, "batch_size": 4, "learning_rate": 5e-3,
                  "logging_steps": 1, "checkpoint_every_steps": 10, "dev_adapters": False},
        "ray": {"address": ray_head, "cpus_per_run": 1.0, "poll_s": 0.5},
        "evaluate": {"generate_rows": 4, "max_new_tokens": 8},
        # The gate is waived: this test is about the job, not the gate (see tests/test_resume_cycle.py).
        "gate": {"primary_metric": "heldout_loss", "min_improvement": -1.0, "edit_similarity_tolerance": 1.0,
                 "exact_match_tolerance": 1.0, "preference_accuracy_tolerance": 1.0,
                 "generated_length_tolerance": 10.0}})
    service = _start_service(setup.config)
    try:
        api = _wait(lambda: ApiClient.discover(setup.state_dir), 60)
        run_id = api.call("POST", "/api/cycle", {"team": "payments"})["run_id"]  # answers at once; runs on
        run_dir = setup.state_dir / "runs" / run_id
        # mid-run: the job is training (progress written) and the service shows it in its queue
        _wait(lambda: (json.loads(p.read_text()) if (p := run_dir / "progress.json").is_file() else {})
              .get("step", 0) >= 3, 300)
        queue = _devtune(setup.config, "status", "--json")["training_queue"]
        assert [(q["run_id"], q["state"], q["backend"]) for q in queue] == [(run_id, "running", "ray")]
    finally:
        service.kill()  # SIGKILL: nothing is stopped, the job goes on without its service
        service.wait()
    client = ray_job_submission.JobSubmissionClient(ray_head)
    assert client.get_job_status(run_id) == "RUNNING"

    service = _start_service(setup.config)
    try:
        # The killed service's service.json names a dead process: commands use the store until the new one is up.
        _wait(lambda: ApiClient.discover(setup.state_dir), 60)
        run = _wait(lambda: (r := _devtune(setup.config, "status", "--json")["runs"][0])["status"] == "succeeded"
                    and r, 400)
        assert run["run_id"] == run_id and run["summary"]["version"] and run["attempts"] == 2
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
    ours = [j for j in client.list_jobs() if (j.metadata or {}).get("devtune_run") == run_id]
    assert sorted(j.submission_id for j in ours) == [run_id, f"{run_id}-evaluate"]  # one training job, re-attached
    record = json.loads((run_dir / "ray.json").read_text())
    assert record["train"]["submission_id"] == run_id
    versions = list((setup.state_dir / "registry" / "team:payments").iterdir())
    assert [v.name for v in versions if v.is_dir()] == [run["summary"]["version"]]  # promoted once
    log = (run_dir / "train.log").read_text()
    assert log.count("Running entrypoint for job") == 1 and "trained 120 steps" in log
    # Still running when the new service asked, or finished while it was starting (seen at a load of 10).
    assert re.search(rf"re-attached to Ray job {run_id} \((RUNNING|SUCCEEDED)\)", log), log[-2000:]
    assert f"Ray job {run_id}: SUCCEEDED" in log


def _start_service(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config), "run"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def _devtune(config: Path, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _wait(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("condition not met in time")


def test_a_cancelled_run_stops_its_ray_job_with_the_trainers_grace(tmp_path: Path, tiny_model: Path,
                                                                   ray_head: str) -> None:
    from pipelines.train.backends import cancel, run_stage

    run_dir = _small_run(tmp_path / "20261201-020000-team-c-0001", tiny_model, max_steps=5000)
    failed: list[BaseException] = []

    def train() -> None:
        try:
            run_stage("train", run_dir, train_config(backend="ray"), _ray(ray_head), 600)
        except ChildFailed as e:
            failed.append(e)

    thread = threading.Thread(target=train)
    thread.start()
    _wait(lambda: (run_dir / "progress.json").is_file() or not thread.is_alive(), 120)
    assert cancel(run_dir) == 1
    thread.join(120)
    assert len(failed) == 1 and "cancelled (devtune cancel)" in str(failed[0])
    client = ray_job_submission.JobSubmissionClient(ray_head)
    assert client.get_job_status(run_dir.name) == "STOPPED"
    # Ray's SIGTERM reached the trainer, which had the time to stop at a step boundary with a checkpoint
    assert "stopping after this step with a checkpoint" in (run_dir / "train.log").read_text()
