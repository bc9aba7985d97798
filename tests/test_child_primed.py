"""A stage's child started early (pipelines.child.Primed, pipelines/primed.py): real processes running a
stand-in stage module from a temporary folder. It imports while its parent works, then runs the stage in
that same process with the environment handed over; discarded, it runs nothing; gone, a fresh child runs."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import pytest

from pipelines import child
from support import process_running, wait_until

STAGE = '''
import json, os, sys
out = {"pid": os.getpid(), "argv": sys.argv[1:], "x": os.environ.get("DEVTUNE_TEST_X"),
       "preloaded": "slowimport" in sys.modules}
open(sys.argv[1], "w").write(json.dumps(out))
print("stage ran", flush=True)
sys.exit(int(os.environ.get("DEVTUNE_TEST_EXIT", "0")))
'''


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`stagemod` (a stage: writes what it saw to argv[1]) and `slowimport` (a slow import that leaves a mark),
    importable by children through PYTHONPATH."""
    root = tmp_path / "mods"
    (root / "stagemod").mkdir(parents=True)
    (root / "stagemod" / "__init__.py").write_text("")
    (root / "stagemod" / "__main__.py").write_text(STAGE)
    (root / "slowimport.py").write_text(
        f"import time, pathlib\ntime.sleep(0.5)\npathlib.Path({str(tmp_path / 'imported')!r}).touch()\n")
    monkeypatch.setenv("PYTHONPATH", str(root))
    return tmp_path


def test_a_primed_child_runs_the_stage_itself_with_the_environment_handed_over(modules: Path) -> None:
    result, log = modules / "result.json", modules / "stage.log"
    primed = child.Primed("stagemod", [str(result)], log, "slowimport")
    pid = primed.proc.pid if primed.proc else None
    # The import is done before the stage is asked for.
    wait_until((modules / "imported").exists, timeout=60, step=0.05)
    assert not result.exists()  # and the stage waits for it
    child.run_child("stagemod", [str(result)], log, 60, env={"DEVTUNE_TEST_X": "42"}, primed=primed)
    seen = json.loads(result.read_text())
    assert seen == {"pid": pid, "argv": [str(result)], "x": "42", "preloaded": True}
    text = log.read_text()
    assert "primed stagemod: slowimport imported in" in text and "stage ran" in text
    assert primed.take({}) is None  # once only
    with child._running_lock:
        assert not child._running


def test_a_primed_childs_failure_reads_as_the_stages(modules: Path) -> None:
    result, log = modules / "result.json", modules / "stage.log"
    primed = child.Primed("stagemod", [str(result)], log, "slowimport")
    with pytest.raises(child.ChildFailed, match=r"(?s)stagemod exited with status 4; .*stage ran"):
        child.run_child("stagemod", [str(result)], log, 60, env={"DEVTUNE_TEST_EXIT": "4"}, primed=primed)
    assert json.loads(result.read_text())["preloaded"] is True  # it was the primed child that failed


def test_a_discarded_child_runs_nothing_and_leaves_no_log(modules: Path) -> None:
    result, log = modules / "result.json", modules / "stage.log"
    primed = child.Primed("stagemod", [str(result)], log, "slowimport")
    proc = primed.proc
    assert proc is not None
    wait_until((modules / "imported").exists, timeout=60, step=0.05)
    primed.discard()
    assert proc.wait(timeout=10) == 0  # end of input: it exits by itself
    assert not result.exists() and not log.exists()
    with child._running_lock:
        assert proc not in child._running
    primed.discard()  # a second time is harmless


def test_a_child_discarded_while_it_imports_is_stopped(modules: Path) -> None:
    (modules / "mods" / "slowimport.py").write_text("import time\ntime.sleep(60)\n")
    primed = child.Primed("stagemod", [str(modules / "result.json")], modules / "stage.log", "slowimport")
    proc = primed.proc
    assert proc is not None
    began = time.monotonic()
    primed.discard()
    assert proc.returncode is not None and time.monotonic() - began < child.STOP_GRACE_S


@pytest.mark.parametrize("how", ["import fails", "stopped"])
def test_a_fresh_child_runs_the_stage_when_the_primed_one_is_gone(modules: Path, how: str) -> None:
    result, log = modules / "result.json", modules / "stage.log"
    preload = "no_such_module_here" if how == "import fails" else "slowimport"
    primed = child.Primed("stagemod", [str(result)], log, preload)
    proc = primed.proc
    assert proc is not None
    if how == "stopped":  # `devtune cancel` and the service's shutdown find it like any running child
        wait_until((modules / "imported").exists, timeout=60, step=0.05)
        assert child.stop_matching(str(result)) == 1
    proc.wait(timeout=60)
    child.run_child("stagemod", [str(result)], log, 60, env={"DEVTUNE_TEST_X": "7"}, primed=primed)
    seen = json.loads(result.read_text())
    assert seen["pid"] != proc.pid and seen["x"] == "7" and seen["preloaded"] is False
    if how == "import fails":
        assert "No module named 'no_such_module_here'" in log.read_text()  # the log says why


def test_the_launcher_is_importable_without_devtunes_heavy_modules() -> None:
    """pipelines/primed.py runs before anything is preloaded: it must not pull torch in itself."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import sys, pipelines.primed; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=True)
    assert out.stdout.strip() == "False"


def test_a_primed_child_whose_parent_is_killed_exits_by_itself(modules: Path) -> None:
    """kill -9 of the service (or of `devtune cycle`) while the child waits: its stdin ends, it runs nothing."""
    import os
    import subprocess

    result, log, imported = (str(modules / n) for n in ("result.json", "stage.log", "imported"))
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, time, pathlib\n"
        "from pipelines import child\n"
        f"p = child.Primed('stagemod', [{result!r}], pathlib.Path({log!r}), 'slowimport')\n"
        "print(p.proc.pid, flush=True)\n"
        f"while not pathlib.Path({imported!r}).exists(): time.sleep(0.05)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    out, _ = parent.communicate(timeout=60)
    assert parent.returncode == -9
    pid = int(out.strip())
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not process_running(pid), timeout=30, step=0.05)
    still = process_running(pid)
    if still:
        os.kill(pid, 9)
    assert not still and not (modules / "result.json").exists()


def test_a_child_reports_its_own_peak_memory_not_its_parents() -> None:
    """A stage reports `peak_rss_mb` (the training result, the build's stage lines). Linux's ru_maxrss carries a
    parent's peak into a child across fork and exec: a child of a parent that touched 300 MB would report 300 MB
    or more while using ~20, as the build measured in a child of its 2 GB preparing process did."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    inner = "from pipelines.progress import peak_rss_mb; print(peak_rss_mb())"
    outer = ("import subprocess, sys\n"
             "x = bytearray(300 << 20)\n"
             "for i in range(0, len(x), 4096): x[i] = 1\n"
             f"print(subprocess.run([sys.executable, '-c', {inner!r}], capture_output=True, text=True, check=True)"
             ".stdout.strip())")
    got = subprocess.run([sys.executable, "-c", outer], capture_output=True, text=True, check=True, cwd=root)
    peak = float(got.stdout)
    assert 0 < peak < 150, peak
