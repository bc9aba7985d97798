"""One training at a time per GPU slot, first come first served, visible while it waits."""

from __future__ import annotations

import threading

import pytest

from daemon.runner import QueueClosed, TrainingQueue, gpu_slots
from support import wait_until


def test_runs_wait_their_turn_in_arrival_order() -> None:
    queue = TrainingQueue([("0",)])
    order: list[str] = []
    release = threading.Event()
    entered = threading.Event()

    def first() -> None:
        with queue.turn("r1", "team:a") as gpus:
            assert gpus == ("0",)
            order.append("r1")
            entered.set()
            release.wait(10)

    def later(run_id: str) -> None:
        with queue.turn(run_id, "team:b"):
            order.append(run_id)

    t1 = threading.Thread(target=first)
    t1.start()
    assert entered.wait(10)
    t2 = threading.Thread(target=later, args=("r2",))
    t2.start()
    wait_until(lambda: len(queue.snapshot()) == 2, timeout=10, step=0.01)
    t3 = threading.Thread(target=later, args=("r3",))
    t3.start()
    wait_until(lambda: len(queue.snapshot()) == 3, timeout=10, step=0.01)
    snap = queue.snapshot()
    assert [(e["run_id"], e["state"]) for e in snap] == [("r1", "running"), ("r2", "waiting"), ("r3", "waiting")]
    assert snap[0]["gpus"] == ["0"] and snap[1]["gpus"] == []
    release.set()
    for t in (t1, t2, t3):
        t.join(10)
    assert order == ["r1", "r2", "r3"] and queue.snapshot() == []


def test_two_gpus_run_two_trainings_at_once_and_close_releases_waiters() -> None:
    queue = TrainingQueue([("0",), ("1",)])
    with queue.turn("a", "team:a") as g1, queue.turn("b", "team:b") as g2:
        assert {g1, g2} == {("0",), ("1",)}
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                with queue.turn("c", "team:c"):
                    pass
            except QueueClosed as e:
                errors.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        wait_until(lambda: len(queue.snapshot()) == 3, timeout=10, step=0.01)
        queue.close()
        t.join(10)
        assert len(errors) == 1 and "service stopped" in str(errors[0])


@pytest.mark.parametrize(("visible", "per_run", "slots"), [
    ("", 1, [()]), ("-1", 1, [()]), ("0", 1, [("0",)]), ("0,1,2,3", 2, [("0", "1"), ("2", "3")]),
    ("2,3", 1, [("2",), ("3",)]), ("0", 4, [("0",)]),
])
def test_gpu_slots_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, visible: str, per_run: int,
                                               slots: list[tuple[str, ...]]) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_slots(per_run) == slots


def test_several_gpus_per_run_launch_the_same_entry_point_under_accelerate() -> None:
    from pipelines.child import child_command

    assert child_command("pipelines.train", ["RUN"], 1)[1:] == ["-m", "pipelines.train", "RUN"]
    launch = child_command("pipelines.train", ["RUN"], 2)
    assert launch[1:3] == ["-m", "accelerate.commands.launch"] and launch[-3:] == ["--module", "pipelines.train", "RUN"]
    assert launch[launch.index("--num_processes") + 1] == "2" and int(launch[launch.index("--main_process_port") + 1])
