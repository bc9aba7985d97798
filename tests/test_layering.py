"""The layering rules from DESIGN.md, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import ROOT


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_service_and_cli_import_neither_torch_nor_transformers() -> None:
    loaded = modules_after("import daemon.service, daemon.cli, daemon.jobs, daemon.api, daemon.watch")
    heavy = {m for m in loaded if m.split(".")[0] in {"torch", "transformers", "peft", "trl", "accelerate"}}
    assert heavy == set(), f"the service imported {sorted(heavy)[:5]}"
    assert "pipelines.cycle" in loaded  # the check is meaningful: the cycle itself is imported


def test_collectors_import_neither_pipelines_nor_daemon() -> None:
    loaded = modules_after("import collectors, collectors.base, collectors.continue_dev, collectors.gitlog, "
                           "collectors.jsonl")
    assert "collectors.gitlog" in loaded
    assert not {m for m in loaded if m.split(".")[0] in {"pipelines", "daemon"}}


def test_daemon_package_is_ours_not_python_daemon() -> None:
    # The PyPI package python-daemon also installs a top-level `daemon`.
    import daemon

    assert Path(daemon.__file__).resolve().parent == ROOT / "daemon"


def test_no_test_folder_shadows_a_package() -> None:
    for pkg in ("daemon", "collectors", "pipelines"):
        assert not (ROOT / "tests" / pkg / "__init__.py").exists()
