"""`devtune cancel`: a run's running stage is stopped at once and the run is never resumed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipelines.child import ChildFailed
from pipelines.config import RayConfig
from pipelines.train.backends import cancel, run_stage
from runs import fim_rows, make_run, train_config
from support import write_config


def test_a_cancelled_local_run_stops_now_and_no_stage_starts_again(tmp_path: Path, tiny_model: Path) -> None:
    run_dir = make_run(tmp_path / "run", tiny_model, train_config(max_steps=5000, checkpoint_every_steps=1000),
                       {"sft.jsonl": fim_rows(48, seed=0)})
    failed: list[BaseException] = []

    def train() -> None:
        try:
            run_stage("train", run_dir, train_config(), RayConfig(), 600)
        except ChildFailed as e:
            failed.append(e)

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 120
    while not (run_dir / "progress.json").is_file():
        assert time.monotonic() < deadline and thread.is_alive(), (run_dir / "train.log").read_text()[-2000:]
        time.sleep(0.1)
    assert cancel(run_dir) == 1
    thread.join(60)
    assert len(failed) == 1 and "was cancelled (devtune cancel) and is not resumed" in str(failed[0])
    assert json.loads((run_dir / "progress.json").read_text())["step"] < 5000
    with pytest.raises(ChildFailed, match="cancelled"):  # the evaluation (or a resumed cycle) does not start
        run_stage("evaluate", run_dir, train_config(), RayConfig(), 600)


def test_cancel_needs_the_service_that_runs_the_run(tmp_path: Path) -> None:
    from support import run_devtune

    setup = write_config(tmp_path / "site", [])
    done = run_devtune("--config", str(setup.config), "cancel", "20261201-020000-team-x-0001")
    assert done.returncode == 1 and "no service is running" in done.stderr
