"""The README is a contract too: its commands are the ones CI runs and the CLI offers."""

from __future__ import annotations

import re

from daemon.cli import build_parser
from support import ROOT

README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    block = README.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    demo, tests = readme_commands()
    assert demo.endswith("devtune demo") and tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_every_cli_command_is_documented() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None
    for name in commands:
        assert re.search(rf"devtune[^\n`]* {name}\b", README), f"`devtune {name}` is not in the README"


def test_systemd_unit_matches_the_documented_contract() -> None:
    unit = (ROOT / "systemd" / "devtune.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "StateDirectory=devtune", "User=devtune",
                 "ExecStart=/usr/local/bin/devtune run --config /etc/devtune/config.toml", "NoNewPrivileges=yes"):
        assert line in unit.splitlines()
