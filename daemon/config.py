"""The TOML edge: one config file is read and checked into the dataclasses of `pipelines.config`.

No config dict travels further. The reference `config.toml` and `devtune init` are rendered from those
classes, so the docs cannot drift from the code. Unknown keys are errors, and every error in a file is
reported at once with the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collectors import COLLECTORS
from pipelines.config import (
    ApiConfig,
    CollectConfig,
    Config,
    ContinueHttpConfig,
    DatasetsConfig,
    DeveloperConfig,
    EvaluateConfig,
    GateConfig,
    OnlineConfig,
    PretrainConfig,
    PublishConfig,
    RayConfig,
    ScheduleConfig,
    ServeConfig,
    SourceConfig,
    TeamConfig,
    TrainConfig,
)

HTTP_SOURCE = "continue-http"  # the source name of Continue's HTTP destination inbox ([continue_http])
HTTP_KIND = "continue_http"  # its collector (collectors/continue_http.py)
GATEWAY_SOURCE = "gateway"  # the source name of the gateway's request log ([serve] enabled)
GATEWAY_KIND = "gateway"  # its collector (collectors/gateway_log.py)
SERVE_BACKENDS = ("builtin", "vllm")
DEVICES = ("auto", "cpu", "cuda")
PREFERENCE_STAGES = ("auto", "dpo", "kto", "none")
TRAIN_BACKENDS = ("local", "ray")
PRETRAIN_OUTPUTS = ("adapter", "base")
GATE_METRICS = ("edit_similarity", "exact_match", "heldout_loss", "preference_accuracy")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_CONFIG_PATHS = ("config.toml", "/etc/devtune/config.toml")


SECTIONS: dict[str, type] = {
    "collect": CollectConfig, "continue_http": ContinueHttpConfig, "schedule": ScheduleConfig,
    "datasets": DatasetsConfig, "train": TrainConfig, "pretrain": PretrainConfig, "evaluate": EvaluateConfig,
    "gate": GateConfig, "api": ApiConfig, "publish": PublishConfig, "serve": ServeConfig, "online": OnlineConfig,
    "ray": RayConfig,
}
ARRAYS: dict[str, type] = {"sources": SourceConfig, "developers": DeveloperConfig, "teams": TeamConfig}


class ConfigError(Exception):
    """Every problem found in one config file, each naming the key, the bad value and the fix."""

    def __init__(self, path: Path | str, errors: list[str]):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{path}: {len(errors)} configuration error(s):\n{lines}")


def load_config(path: Path | str) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem."""
    path = Path(path).expanduser().resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, ["file not found: create one with `devtune init DIR` or pass --config FILE"]) \
            from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> Config:
    errors: list[str] = []
    base = path.parent
    top: dict[str, Any] = {}
    for name, value in data.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                errors.append(f"[{name}] must be a table, got {_toml_type(value)}")
                continue
            top[name] = _build(SECTIONS[name], value, f"[{name}] ", base, errors)
        elif name in ARRAYS:
            if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                errors.append(f"{name} must be written as [[{name}]] tables")
                continue
            top[name] = tuple(_build(ARRAYS[name], v, f"[[{name}]] #{i + 1} ", base, errors)
                              for i, v in enumerate(value))
        else:
            top[name] = value
    plain = {k: v for k, v in top.items() if k not in SECTIONS and k not in ARRAYS}
    cfg = _build(Config, plain, "", base, errors, extra={"path": path})
    # Values that failed their type check fell back to defaults, so the semantic checks below can run on
    # the rest and every problem in the file is reported in one go.
    cfg = dataclasses.replace(cfg, **{k: v for k, v in top.items() if k in SECTIONS or k in ARRAYS})
    cfg = dataclasses.replace(cfg, sources=tuple(
        dataclasses.replace(s, name=s.name or f"{s.kind}:{s.path}") for s in cfg.sources))
    errors.extend(_check(cfg))
    if errors:
        raise ConfigError(path, errors)
    if cfg.continue_http.enabled:
        # The HTTP destination's inbox is collected like any folder of logs (collectors/continue_http.py).
        inbox = SourceConfig(kind=HTTP_KIND, path=inbox_dir(cfg.state_dir), name=HTTP_SOURCE)
        cfg = dataclasses.replace(cfg, sources=(*cfg.sources, inbox))
    if cfg.serve.enabled:
        # The gateway appends one line per request, in or out of this process (collectors/gateway_log.py).
        requests = SourceConfig(kind=GATEWAY_KIND, path=gateway_dir(cfg.state_dir), name=GATEWAY_SOURCE)
        cfg = dataclasses.replace(cfg, sources=(*cfg.sources, requests))
    return cfg


def inbox_dir(state_dir: Path) -> Path:
    """Where the service keeps the events Continue POSTs until they are collected."""
    return state_dir / "inbox" / "continue"


def gateway_dir(state_dir: Path) -> Path:
    """Where the serving gateway logs its requests (requests-YYYY-MM-DD.jsonl) until they are collected."""
    return state_dir / "gateway"


def http_token_file(cfg: Config) -> Path:
    return resolve_path(cfg.continue_http.token_file, cfg.path.parent) if cfg.continue_http.token_file \
        else cfg.state_dir / "continue.token"


def _build(cls: type, table: dict[str, Any], where: str, base: Path, errors: list[str],
           extra: dict[str, Any] | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values: dict[str, Any] = dict(extra or {})
    for name, value in table.items():
        if name not in known:
            close = [k for k in known if k.startswith(name[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            errors.append(f"{where}unknown key '{name}'{hint}: remove it; valid keys are {', '.join(known)}")
            continue
        converted = _convert(hints[name], value, base)
        if isinstance(converted, _Bad):
            errors.append(f"{where}{name} = {_show(value)}: {converted.why}")
        else:
            values[name] = converted
    for name, f in known.items():
        if f.metadata.get("required") and name not in table:
            errors.append(f"{where}missing required key '{name}': {f.metadata['doc']}")
            values[name] = _placeholder(hints[name])
    return cls(**values)


@dataclass(frozen=True)
class _Bad:
    why: str


def _convert(hint: Any, value: Any, base: Path) -> Any:
    if hint is bool:
        return value if isinstance(value, bool) else _Bad(f"must be true or false, got {_toml_type(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return _Bad(f"must be a whole number, got {_toml_type(value)}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return _Bad(f"must be a number, got {_toml_type(value)}")
    if hint is str:
        return value if isinstance(value, str) else _Bad(f"must be a string, got {_toml_type(value)}")
    if hint is Path:
        if not isinstance(value, str) or not value:
            return _Bad(f"must be a non-empty path string, got {_toml_type(value)}")
        return resolve_path(value, base)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        return _Bad("must be a list of strings, e.g. [\"a\", \"b\"]")
    raise AssertionError(f"config type {hint} has no converter")


def _placeholder(hint: Any) -> Any:
    return Path() if hint is Path else ""


def resolve_path(value: str, base: Path) -> Path:
    """`~` and environment variables expand; relative paths are taken from the config file's folder."""
    p = Path(os.path.expandvars(value)).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _toml_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else '"' + value + '"'
    return text if len(text) <= 60 else text[:57] + "..."


def _check(cfg: Config) -> list[str]:
    """Semantic checks that types alone cannot express."""
    errors = []
    if cfg.log_level not in LOG_LEVELS:
        errors.append(f"log_level = {_show(cfg.log_level)}: use one of {', '.join(LOG_LEVELS)}")
    if not cfg.base_model:
        errors.append('base_model = "": set a Hugging Face id (e.g. "Qwen/Qwen2.5-Coder-1.5B") or a local dir')
    if not cfg.default_team:
        errors.append('default_team = "": give the team for unmapped developers a name, e.g. "default"')
    seen: set[str] = set()
    for i, s in enumerate(cfg.sources):
        where = f"[[sources]] #{i + 1} "
        if s.kind and s.kind not in source_kinds():
            errors.append(f"{where}kind = {_show(s.kind)}: use one of {', '.join(source_kinds())}")
        if s.name in seen or s.name in (HTTP_SOURCE, GATEWAY_SOURCE):
            errors.append(f"{where}name = {_show(s.name)}: two sources share it; give each a distinct name"
                          + (" (the HTTP destination's inbox is named so)" if s.name == HTTP_SOURCE else "")
                          + (" (the gateway's request log is named so)" if s.name == GATEWAY_SOURCE else ""))
        seen.add(s.name)
    ids: dict[str, str] = {}
    for i, d in enumerate(cfg.developers):
        where = f"[[developers]] #{i + 1} "
        for identity in (d.id, *d.aliases):
            owner = ids.get(identity.strip().lower())
            if owner is not None and owner != d.id:
                errors.append(f"{where}{identity!r} is also listed for developer {owner!r}: an identity can "
                              "belong to one developer only")
            ids[identity.strip().lower()] = d.id
        if not d.id.strip():
            errors.append(f"{where}id = \"\": give the developer an id, e.g. their email")
    teams: set[str] = set()
    for i, t in enumerate(cfg.teams):
        where = f"[[teams]] #{i + 1} "
        if t.name and not t.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            errors.append(f"{where}name = {_show(t.name)}: use letters, digits, '-', '_' or '.'")
        if t.name in teams:
            errors.append(f"{where}name = {_show(t.name)}: team names must be unique")
        teams.add(t.name)
        if t.cycle_cron:
            errors.extend(f"{where}{e}" for e in _check_cron("cycle_cron", t.cycle_cron))
    errors.extend(f"[schedule] {e}" for e in _check_cron("cycle_cron", cfg.schedule.cycle_cron))
    if cfg.pretrain.cron:
        errors.extend(f"[pretrain] {e}" for e in _check_cron("cron", cfg.pretrain.cron))
    if cfg.schedule.timezone:
        try:
            import zoneinfo

            zoneinfo.ZoneInfo(cfg.schedule.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            errors.append(f"[schedule] timezone = {_show(cfg.schedule.timezone)}: use an IANA name such as "
                          "\"Europe/Berlin\" or leave it empty")
    errors.extend(_check_ranges(cfg))
    return errors


def _check_cron(name: str, expr: str) -> list[str]:
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expr)
    except ValueError as e:
        return [f"{name} = {_show(expr)}: not a crontab expression ({e}); e.g. \"0 2 * * *\" for 02:00"]
    return []


# (section, key, lowest allowed, highest allowed); None = unbounded.
_RANGES: list[tuple[str, str, float | None, float | None]] = [
    ("collect", "interval_s", 1, None), ("collect", "debounce_s", 0, None),
    ("collect", "batch_events", 1, None), ("collect", "max_line_bytes", 1024, None),
    ("collect", "max_file_bytes", 1024, None),
    ("datasets", "max_prefix_chars", 0, None), ("datasets", "max_suffix_chars", 0, None),
    ("datasets", "max_middle_lines", 1, None), ("datasets", "fim_spans_per_file", 0, None),
    ("datasets", "max_row_tokens", 16, None), ("datasets", "heldout_fraction", 0.01, 0.9),
    ("datasets", "min_train_rows", 1, None), ("datasets", "min_heldout_rows", 1, None),
    ("datasets", "max_block_lines", 1, None), ("datasets", "block_fraction", 0, 1),
    ("datasets", "spm_fraction", 0, 1), ("datasets", "link_window_h", 0, None),
    ("datasets", "link_min_similarity", 0.5, 1), ("datasets", "max_pairs_per_context", 1, None),
    ("datasets", "near_dup_threshold", 0.5, 1), ("datasets", "heldout_days", 0, None),
    ("datasets", "min_dev_examples", 1, None),
    ("train", "lora_r", 1, None), ("train", "lora_alpha", 1, None), ("train", "lora_dropout", 0, 0.9),
    ("train", "learning_rate", 1e-8, 1.0), ("train", "epochs", 0.01, None), ("train", "max_steps", 0, None),
    ("train", "batch_size", 1, None), ("train", "grad_accum_steps", 1, None),
    ("train", "warmup_ratio", 0, 0.5), ("train", "weight_decay", 0, 1), ("train", "train_timeout_s", 1, None),
    ("train", "logging_steps", 1, None), ("train", "min_preference_rows", 1, None),
    ("train", "preference_learning_rate", 1e-8, 1.0), ("train", "preference_epochs", 0.01, None),
    ("train", "preference_max_steps", 0, None), ("train", "beta", 1e-4, 100), ("train", "replay_share", 0, 0.9),
    ("train", "preference_sft_weight", 0, 100),
    ("train", "gpus_per_run", 1, 64), ("train", "checkpoint_every_steps", 1, None),
    ("train", "resume_attempts", 0, None),
    ("pretrain", "max_tokens", 1, None), ("pretrain", "max_epochs", 0.01, None), ("pretrain", "seq_tokens", 16, None),
    ("pretrain", "batch_size", 1, None), ("pretrain", "grad_accum_steps", 1, None),
    ("pretrain", "learning_rate", 1e-8, 1.0), ("pretrain", "warmup_ratio", 0, 0.5), ("pretrain", "fim_rate", 0, 1),
    ("pretrain", "min_corpus_chars", 0, None), ("pretrain", "min_improvement_rel", 0, 1),
    ("pretrain", "checkpoint_every_steps", 1, None), ("pretrain", "timeout_s", 1, None),
    ("evaluate", "batch_size", 1, None), ("evaluate", "max_rows", 1, None), ("evaluate", "generate_rows", 0, None),
    ("evaluate", "generate_batch_size", 1, None), ("evaluate", "max_new_tokens", 1, 4096),
    ("evaluate", "eval_timeout_s", 1, None), ("gate", "min_improvement", -1, 1),
    ("gate", "heldout_loss_tolerance_rel", 0, 10), ("gate", "edit_similarity_tolerance", 0, 1),
    ("gate", "exact_match_tolerance", 0, 1), ("gate", "preference_accuracy_tolerance", 0, 1),
    ("gate", "generated_length_tolerance", 0, 10),
    ("api", "port", 0, 65535), ("schedule", "retrain_after_accepted", 0, None),
    ("schedule", "min_retrain_interval_h", 0, None), ("api", "lock_timeout_s", 0, None),
    ("ray", "cpus_per_run", 0, None), ("ray", "gpus_per_node", 1, 1024), ("ray", "max_jobs", 1, 10_000),
    ("ray", "poll_s", 0.1, 600),
    ("continue_http", "max_body_bytes", 1024, None),
    ("publish", "export_timeout_s", 1, None),
    ("online", "canary_share", 0, 1), ("online", "min_shown", 1, None), ("online", "min_linked", 1, None),
    ("online", "acceptance_margin", 0, 1), ("online", "persistence_margin", 0, 1), ("online", "max_canary_h", 0, None),
    ("online", "personal_lookback_h", 1, None),
    ("serve", "port", 0, 65535), ("serve", "max_batch_size", 1, 256), ("serve", "batch_window_ms", 0, 1000),
    ("serve", "max_loaded_adapters", 1, None), ("serve", "unload_grace_s", 0, None), ("serve", "cpu_threads", 0, 256),
    ("serve", "default_max_tokens", 1, None), ("serve", "max_tokens_limit", 1, None),
    ("serve", "request_timeout_s", 1, None), ("serve", "start_timeout_s", 1, None),
]


def _check_ranges(cfg: Config) -> list[str]:
    errors = []
    for section, name, low, high in _RANGES:
        value = getattr(getattr(cfg, section), name)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            default = next(f.default for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
            errors.append(f"[{section}] {name} = {value}: must be {bounds} (default {default})")
    limit = cfg.collect.max_line_bytes - 512
    if cfg.continue_http.enabled and cfg.continue_http.max_body_bytes > limit:
        errors.append(f"[continue_http] max_body_bytes = {cfg.continue_http.max_body_bytes}: must be at most "
                      f"[collect] max_line_bytes - 512 = {limit}, or an accepted event could not be read back; "
                      "lower it or raise max_line_bytes")
    if cfg.train.device not in DEVICES:
        errors.append(f"[train] device = {_show(cfg.train.device)}: use one of {', '.join(DEVICES)}")
    if cfg.pretrain.output not in PRETRAIN_OUTPUTS:
        errors.append(f"[pretrain] output = {_show(cfg.pretrain.output)}: use one of {', '.join(PRETRAIN_OUTPUTS)}")
    if cfg.train.preference not in PREFERENCE_STAGES:
        errors.append(f"[train] preference = {_show(cfg.train.preference)}: use one of {', '.join(PREFERENCE_STAGES)}")
    if cfg.train.backend not in TRAIN_BACKENDS:
        errors.append(f"[train] backend = {_show(cfg.train.backend)}: use one of {', '.join(TRAIN_BACKENDS)}")
    if cfg.train.backend == "ray":
        if not cfg.ray.address.startswith(("http://", "https://")):
            errors.append(f"[ray] address = {_show(cfg.ray.address)}: give the head's Jobs API URL, e.g. "
                          "\"http://ray-head:8265\" (the dashboard port; not the GCS port 6379 or ray://)")
        if cfg.ray.shared_dir and not Path(cfg.ray.shared_dir).is_absolute():
            errors.append(f"[ray] shared_dir = {_show(cfg.ray.shared_dir)}: use an absolute path, mounted at the "
                          "same place on this host and every node, or leave it empty")
        if not cfg.ray.python:
            errors.append('[ray] python = "": name the nodes\' Python, e.g. "python" or "/opt/devtune/bin/python"')
    if cfg.gate.primary_metric not in GATE_METRICS:
        errors.append(f"[gate] primary_metric = {_show(cfg.gate.primary_metric)}: use one of {', '.join(GATE_METRICS)}")
    if cfg.train.qlora and cfg.train.device == "cpu":
        errors.append('[train] qlora = true needs CUDA (bitsandbytes 4-bit kernels): set device = "auto" or '
                      '"cuda", or qlora = false on a CPU machine')
    if cfg.train.gpus_per_run > 1 and cfg.train.device == "cpu":
        errors.append(f"[train] gpus_per_run = {cfg.train.gpus_per_run} with device = \"cpu\": set gpus_per_run = 1 "
                      "or use CUDA")
    errors.extend(_check_serve(cfg))
    if any(m in ("lm_head", "embed_out", "output") for m in cfg.train.target_modules):
        errors.append(f"[train] target_modules = {_show(list(cfg.train.target_modules))}: the LM head cannot get an "
                      "adapter (training computes its logits only where the loss needs them); remove it")
    return errors


def _check_serve(cfg: Config) -> list[str]:
    s = cfg.serve
    errors = []
    if s.backend not in SERVE_BACKENDS:
        errors.append(f"[serve] backend = {_show(s.backend)}: use one of {', '.join(SERVE_BACKENDS)}")
    if s.device not in DEVICES:
        errors.append(f"[serve] device = {_show(s.device)}: use one of {', '.join(DEVICES)}")
    if not s.model_name or any(c.isspace() for c in s.model_name):
        errors.append(f"[serve] model_name = {_show(s.model_name)}: give the one name editors ask for, without "
                      "spaces, e.g. \"devtune\"")
    if not s.host:
        errors.append('[serve] host = "": use "127.0.0.1" (loopback) or an address of this machine')
    if s.backend == "vllm" and not s.vllm_url.startswith(("http://", "https://")):
        errors.append(f"[serve] vllm_url = {_show(s.vllm_url)}: give the vLLM server's URL, e.g. "
                      "\"http://127.0.0.1:8000\"")
    if s.default_max_tokens > s.max_tokens_limit:
        errors.append(f"[serve] default_max_tokens = {s.default_max_tokens}: must be at most max_tokens_limit = "
                      f"{s.max_tokens_limit}")
    if s.port and s.port == cfg.api.port and s.host == cfg.api.host:
        errors.append(f"[serve] port = {s.port}: the local API already listens there ([api] port); pick another")
    return errors


def source_kinds() -> list[str]:
    """The `kind`s a [[sources]] table may name: every entry of the `COLLECTORS` table but the service's own
    HTTP inbox and the gateway's request log, which `[continue_http] enabled` and `[serve] enabled` add."""
    return [kind for kind in COLLECTORS if kind not in (HTTP_KIND, GATEWAY_KIND)]


def find_config(explicit: str | None) -> Path:
    """--config FILE, else $DEVTUNE_CONFIG, else ./config.toml, else /etc/devtune/config.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DEVTUNE_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_CONFIG_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    return Path(DEFAULT_CONFIG_PATHS[0])


# ---------------------------------------------------------------------------------------------------------
# The reference config.toml, rendered from the dataclasses above.

HEADER = """\
# devtune configuration. Every key is listed with its default and what it does; delete what you keep.
# Relative paths are taken from this file's folder. Units are in the names: _s seconds, _bytes, _chars.
"""

EXAMPLES = {
    "sources": (
        "# One [[sources]] table per developer's Continue folder or per repository, for example:\n"
        "#\n"
        "# [[sources]]\n"
        "# kind = \"continue\"\n"
        "# path = \"/home/alice/.continue\"\n"
        "# developer = \"alice@example.com\"\n"
        "#\n"
        "# [[sources]]\n"
        "# kind = \"tabby\"\n"
        "# path = \"/var/lib/tabby\"         # the Tabby server's root ($TABBY_ROOT, default ~/.tabby)\n"
        "#\n"
        "# [[sources]]\n"
        "# kind = \"git\"\n"
        "# path = \"/srv/git/payments\"\n"
    ),
    "developers": (
        "# One [[developers]] table per person whose tools log several identities, for example:\n"
        "#\n"
        "# [[developers]]\n"
        "# id = \"alice@example.com\"\n"
        "# aliases = [\"alice@users.noreply.github.com\", \"3f9a...machine-id\", \"tabby-user-8a1b\"]\n"
    ),
    "teams": (
        "# One [[teams]] table per team; developers and repositories no team names go to default_team.\n"
        "#\n"
        "# [[teams]]\n"
        "# name = \"payments\"\n"
        "# members = [\"alice@example.com\", \"bob@example.com\"]\n"
        "# repos = [\"acme/payments\"]\n"
    ),
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        return _toml_value(str(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def _render_keys(cls: type, prefix: str = "", overrides: dict[str, Any] | None = None) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or f.name in SECTIONS or f.name in ARRAYS:
            continue
        value = (overrides or {}).get(f.name, "" if f.metadata.get("required") else _default(f))
        lines.append(f"{prefix}{f.name} = {_toml_value(value)}  # {f.metadata['doc']}")
    return lines


def render_config(overrides: dict[str, dict[str, Any]] | None = None,
                  sources: list[dict[str, Any]] | None = None,
                  teams: list[dict[str, Any]] | None = None,
                  developers: list[dict[str, Any]] | None = None) -> str:
    """The commented config file: defaults, or `overrides` per section ("" = top level)."""
    overrides = overrides or {}
    out = [HEADER, *_render_keys(Config, overrides=overrides.get("")), ""]
    for name, cls in ARRAYS.items():
        items = {"sources": sources, "developers": developers, "teams": teams}[name]
        out.append(EXAMPLES[name].rstrip("\n"))
        out.append(f"# Keys of a [[{name}]] table:")
        out.extend(_render_keys(cls, prefix="#   "))
        for item in items or []:
            out.append("")
            out.append(f"[[{name}]]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
        out.append("")
    for name, cls in SECTIONS.items():
        out.append(f"[{name}]")
        out.extend(_render_keys(cls, overrides=overrides.get(name)))
        out.append("")
    return "\n".join(out)
