from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from daemon.config import ARRAYS, SECTIONS, ConfigError, load_config, parse_config, render_config
from pipelines.config import Config
from pipelines.ingest.identity import Directory
from support import ROOT, run_devtune


def test_reference_config_is_rendered_from_the_code() -> None:
    # config.toml at the top of the repo is the documentation of every key: it must match the dataclasses.
    assert (ROOT / "config.toml").read_text() == render_config(), \
        "config.toml is stale: regenerate it with `devtune init . --force`"


def test_every_key_has_a_default_and_a_comment_in_config_toml() -> None:
    text = (ROOT / "config.toml").read_text()
    classes = {"": Config, **SECTIONS, **ARRAYS}
    for cls in classes.values():
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or f.name in SECTIONS or f.name in ARRAYS:
                continue
            lines = [ln for ln in text.splitlines() if ln.lstrip("# ").startswith(f"{f.name} = ")]
            assert lines, f"{cls.__name__}.{f.name} is not in config.toml"
            assert any("  # " in ln and len(ln.split("  # ", 1)[1]) > 10 for ln in lines), \
                f"{cls.__name__}.{f.name} has no comment in config.toml"


def test_reference_config_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(render_config())
    cfg = load_config(path)
    assert cfg.state_dir == tmp_path / "devtune-state"  # relative to the config file, not the cwd
    assert cfg.train.lora_r == 16 and cfg.collect.exclude_paths[0] == ".env*"
    assert cfg.sources == () and cfg.team_names() == ["default"]


def test_all_errors_are_reported_together_with_key_value_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('bogus = 1\nlog_level = "loud"\n[train]\nlora_r = "16"\ndevice = "tpu"\nbatch_size = 0\n'
                    '[[sources]]\nkind = "svn"\n[[teams]]\nname = "a b"\ncycle_cron = "99 * * *"\n'
                    '[gate]\nmin_improvment = 0.1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    errors = info.value.errors
    expected = [
        "unknown key 'bogus'", 'log_level = "loud": use one of', '[train] lora_r = "16": must be a whole number',
        '[train] device = "tpu"', "[train] batch_size = 0: must be at least 1", "missing required key 'path'",
        '[[sources]] #1 kind = "svn"', '[[teams]] #1 name = "a b"', "cycle_cron = \"99 * * *\"",
        "unknown key 'min_improvment' (did you mean min_improvement?)",
    ]
    for fragment in expected:
        assert any(fragment in e for e in errors), f"no error mentions {fragment!r}: {errors}"
    assert len(errors) == len(expected)


def test_strings_are_not_coerced_to_numbers_or_booleans(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch = \"true\": must be true or false"):
        parse_config({"collect": {"watch": "true"}}, tmp_path / "c.toml")


def test_sources_get_stable_default_names_and_paths_resolve(tmp_path: Path) -> None:
    cfg = parse_config(tomllib.loads('[[sources]]\nkind = "git"\npath = "repos/a"\n'), tmp_path / "c.toml")
    assert cfg.sources[0].path == tmp_path / "repos" / "a"
    assert cfg.sources[0].name == f"git:{tmp_path / 'repos' / 'a'}"


def test_duplicate_source_names_are_an_error(tmp_path: Path) -> None:
    data = {"sources": [{"kind": "git", "path": "a", "name": "x"}, {"kind": "git", "path": "b", "name": "x"}]}
    with pytest.raises(ConfigError, match="two sources share it"):
        parse_config(data, tmp_path / "c.toml")


def test_init_writes_a_complete_config_and_refuses_to_overwrite(tmp_path: Path) -> None:
    result = run_devtune("init", str(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    cfg = load_config(tmp_path / "site" / "config.toml")
    assert cfg.state_dir == tmp_path / "site" / "devtune-state"
    again = run_devtune("init", str(tmp_path / "site"))
    assert again.returncode == 1 and "--force" in again.stderr


def test_cli_reports_config_errors_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlora_r = -3\n")
    result = run_devtune("--config", str(path), "status")
    assert result.returncode == 2
    assert "[train] lora_r = -3: must be at least 1 (default 16)" in result.stderr
    assert "Traceback" not in result.stderr


def test_init_adds_the_continue_and_tabby_folders_it_finds(tmp_path: Path) -> None:
    (tmp_path / "cont" / "dev_data").mkdir(parents=True)
    (tmp_path / "tabby" / "events").mkdir(parents=True)
    env = {"CONTINUE_GLOBAL_DIR": str(tmp_path / "cont"), "TABBY_ROOT": str(tmp_path / "tabby"),
           "HOME": str(tmp_path / "home")}
    result = run_devtune("init", str(tmp_path / "site"), env=env)
    assert result.returncode == 0, result.stderr
    assert "dev_data/ found at $CONTINUE_GLOBAL_DIR" in result.stdout
    cfg = load_config(tmp_path / "site" / "config.toml")
    assert [(s.kind, s.path) for s in cfg.sources] == [("continue", tmp_path / "cont"), ("tabby", tmp_path / "tabby")]
    # Without the variables and with nothing at the default places, no source is guessed.
    bare = run_devtune("init", str(tmp_path / "bare"), env={"CONTINUE_GLOBAL_DIR": "", "TABBY_ROOT": "",
                                                              "HOME": str(tmp_path / "home")})
    assert bare.returncode == 0 and load_config(tmp_path / "bare" / "config.toml").sources == ()


def test_identity_and_http_destination_keys_are_checked(tmp_path: Path) -> None:
    data = {"developers": [{"id": "a@x", "aliases": ["m1"]}, {"id": "b@x", "aliases": ["M1"]}],
            "sources": [{"kind": "continue_http", "path": "x"}],
            "continue_http": {"enabled": True, "max_body_bytes": 2_000_000}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path / "c.toml")
    errors = "\n".join(info.value.errors)
    assert "'M1' is also listed for developer 'a@x'" in errors
    assert 'kind = "continue_http": use one of continue, tabby, git' in errors
    assert "max_body_bytes = 2000000: must be at most [collect] max_line_bytes - 512" in errors
    cfg = parse_config({"continue_http": {"enabled": True}, "developers": [{"id": "a@x"}]}, tmp_path / "c.toml")
    assert [(s.kind, s.name) for s in cfg.sources] == [("continue_http", "continue-http")]
    assert Directory.from_config(cfg).canonical == {"a@x": "a@x"}  # collecting maps [[developers]] identities


def test_the_training_backend_and_ray_keys_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"train": {"backend": "slurm"}}, tmp_path / "c.toml")
    assert info.value.errors == ['[train] backend = "slurm": use one of local, ray']
    with pytest.raises(ConfigError) as info:
        parse_config({"train": {"backend": "ray"}, "ray": {"address": "ray://head:10001", "shared_dir": "nfs/runs",
                                                           "max_jobs": 0, "cpus_per_run": -1}}, tmp_path / "c.toml")
    errors = "\n".join(info.value.errors)
    assert '[ray] address = "ray://head:10001": give the head\'s Jobs API URL' in errors
    assert '[ray] shared_dir = "nfs/runs": use an absolute path' in errors
    assert "[ray] max_jobs = 0: must be between 1 and 10000" in errors and "[ray] cpus_per_run = -1.0" in errors
    cfg = parse_config({"train": {"backend": "ray"}, "ray": {"address": "http://head:8265", "shared_dir": "/mnt/dt"}},
                       tmp_path / "c.toml")
    assert cfg.ray.shared_dir == "/mnt/dt" and cfg.ray.max_jobs == 4
    # The ray section is checked only when it is used: a local service never looks at it.
    assert parse_config({"ray": {"address": "ray://x"}}, tmp_path / "c.toml").train.backend == "local"
