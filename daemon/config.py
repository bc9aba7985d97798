"""One TOML file becomes frozen, typed dataclasses here, at the edge; no config dict travels further.

Every key has a default, a one-line doc (in the field's metadata) and its unit in its name. The reference
`config.toml` and `devtune init` are rendered from these classes, so the docs cannot drift from the code.
Unknown keys are errors, and every error in a file is reported at once with the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCE_KINDS = ("continue", "tabby", "git")
HTTP_SOURCE = "continue-http"  # the source name of Continue's HTTP destination inbox ([continue_http])
DEVICES = ("auto", "cpu", "cuda")
PREFERENCE_STAGES = ("auto", "dpo", "kto", "none")
GATE_METRICS = ("edit_similarity", "exact_match", "heldout_loss", "preference_accuracy")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_CONFIG_PATHS = ("config.toml", "/etc/devtune/config.toml")


def key(default: Any, doc: str) -> Any:
    """A config key: its default and the one-line comment `config.toml` shows beside it."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def required(doc: str) -> Any:
    return field(metadata={"doc": doc, "required": True})


@dataclass(frozen=True)
class SourceConfig:
    """One `[[sources]]` table: a folder of IDE logs or a git repository to harvest."""

    kind: str = required('"continue" (path = the folder holding dev_data/), "tabby" (path = a Tabby root, the '
                         'folder holding events/) or "git" (path = a repository)')
    path: Path = required("the folder to read; ~ and paths relative to this file work")
    name: str = key("", "stable id for cursors and status; default \"<kind>:<absolute path>\"")
    developer: str = key("", "whose data the folder holds (email or id); overrides the ids in the log")


@dataclass(frozen=True)
class DeveloperConfig:
    """One `[[developers]]` table: one person, and every identity their tools log for them."""

    id: str = required("the developer's canonical id (e.g. an email): what suggestions.developer and "
                       "commits.developer hold for everything below")
    aliases: tuple[str, ...] = key((), "other identities of the same person: Continue uniqueId/userId, Tabby user "
                                   "ids, other git author emails, X-Developer header values")


@dataclass(frozen=True)
class TeamConfig:
    """One `[[teams]]` table: who and which repositories belong to a team."""

    name: str = required("team name; adapters are served as team:<name>")
    members: tuple[str, ...] = key((), "developer ids ([[developers]] id or alias), emails, Continue or Tabby ids")
    repos: tuple[str, ...] = key((), "repositories as \"owner/name\" (or a git source's folder name)")
    cycle_cron: str = key("", "when this team's cycle runs (crontab); empty = [schedule] cycle_cron")


@dataclass(frozen=True)
class CollectConfig:
    interval_s: float = key(300.0, "collect every source this often even when no file event arrives")
    watch: bool = key(True, "watch log folders and git refs, and collect soon after they change")
    debounce_s: float = key(5.0, "after a file event, wait this long for more before collecting")
    batch_events: int = key(2000, "events per store transaction; the cursor is saved with each batch")
    max_line_bytes: int = key(1 << 20, "log lines longer than this are quarantined without being parsed")
    max_file_bytes: int = key(512 * 1024, "committed files and diffs larger than this are not stored")
    exclude_paths: tuple[str, ...] = key(
        (".env*", "*.pem", "*.key", "id_rsa*", "**/secrets/**"),
        "file globs whose content is never stored (matched against the path and its file name)")
    opt_out: tuple[str, ...] = key((), "developers (emails or ids) whose data is never stored")
    # The top-level [[developers]] tables: collecting is where identities are mapped, so they travel with
    # this section (filled in by parse_config, not written under [collect]).
    developers: tuple[DeveloperConfig, ...] = field(default=(), metadata={"internal": True})


@dataclass(frozen=True)
class ContinueHttpConfig:
    enabled: bool = key(False, "accept Continue's `data:` POSTs at http://<[api] host>:<[api] port>/continue/devdata")
    token_file: str = key("", "file holding the bearer token Continue must send (its apiKey); empty = "
                              "<state_dir>/continue.token, created (mode 0600) when the service starts")
    max_body_bytes: int = key(1_000_000, "larger POST bodies are refused with 413 (at most [collect] "
                                       "max_line_bytes - 512: an accepted event must fit one inbox line)")


@dataclass(frozen=True)
class ScheduleConfig:
    cycle_cron: str = key("0 2 * * *", "default nightly cycle time per team (crontab: min hour dom mon dow)")
    timezone: str = key("", "IANA zone for the crons, e.g. \"Europe/Berlin\"; empty = the server's zone")


@dataclass(frozen=True)
class DatasetsConfig:
    max_prefix_chars: int = key(3000, "FIM prefix kept before the middle (cut at a line start)")
    max_suffix_chars: int = key(1000, "FIM suffix kept after the middle (cut at a line end)")
    max_middle_lines: int = key(6, "longest line-granularity middle cut from committed code, in lines")
    max_block_lines: int = key(30, "longest block-granularity middle (an indented block) cut from committed code")
    fim_spans_per_file: int = key(2, "FIM rows cut from the lines each commit added to a file")
    block_fraction: float = key(0.3, "share of committed-code middles that are a whole indented block, not lines")
    spm_fraction: float = key(0.5, "share of committed-code rows laid out suffix-first (SPM), where the family has it")
    max_row_tokens: int = key(1280, "longest row in base-tokenizer tokens; context is cut to fit, long middles dropped")
    exact_token_counts: bool = key(
        False, "count every row's tokens; false = count only rows a byte estimate puts near max_row_tokens")
    link_window_h: float = key(72.0, "an accepted suggestion is linked to its developer's commits this long after it")
    link_min_similarity: float = key(
        0.8, "committed text at least this similar (0-1, whitespace ignored) to a suggestion counts as kept")
    max_pairs_per_context: int = key(4, "most DPO pairs taken from one context (developer, file, prefix, suffix)")
    near_dup_threshold: float = key(0.85, "rows whose estimated Jaccard similarity reaches this are near-duplicates")
    heldout_fraction: float = key(0.1, "share of each scope's most recent rows held out for the gate")
    heldout_days: float = key(0.0, "hold out each scope's last this many days instead; 0 = use heldout_fraction")
    min_train_rows: int = key(32, "a scope with fewer training rows is skipped (with the reason)")
    min_heldout_rows: int = key(8, "a scope with fewer held-out rows is skipped (with the reason)")
    min_dev_examples: int = key(200, "a developer's own dataset is built only from this many training rows (all sets)")
    seed: int = key(0, "seed for span sampling, so a rebuild of the same data gives the same rows")


@dataclass(frozen=True)
class TrainConfig:
    lora_r: int = key(16, "LoRA rank: the adapter's capacity (8-64 is typical for code completion)")
    lora_alpha: int = key(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = key(0.05, "dropout on the LoRA path (regularises small datasets)")
    target_modules: tuple[str, ...] = key(
        ("all-linear",), "modules that get adapters; \"all-linear\" = every linear layer but the LM head")
    learning_rate: float = key(2e-4, "peak AdamW learning rate of the SFT stage")
    epochs: float = key(1.0, "SFT passes over the training rows (ignored when max_steps > 0)")
    max_steps: int = key(0, "SFT optimizer steps; 0 = derive from epochs")
    batch_size: int = key(8, "sequences per device per micro-step (halved automatically on out-of-memory)")
    grad_accum_steps: int = key(1, "micro-steps per optimizer step (doubled when batch_size is halved)")
    warmup_ratio: float = key(0.03, "share of each stage's steps spent warming the learning rate up")
    weight_decay: float = key(0.0, "AdamW weight decay")
    preference: str = key("auto", "stage after SFT: \"auto\" (DPO if dpo.jsonl has enough pairs, else KTO), "
                          "\"dpo\", \"kto\" or \"none\"")
    min_preference_rows: int = key(16, "the DPO or KTO stage runs only with at least this many rows")
    preference_learning_rate: float = key(5e-5, "peak learning rate of the DPO/KTO stage")
    preference_epochs: float = key(1.0, "DPO/KTO passes over the rows (ignored when preference_max_steps > 0)")
    preference_max_steps: int = key(0, "DPO/KTO optimizer steps; 0 = derive from preference_epochs")
    beta: float = key(0.1, "DPO/KTO beta: how far the adapter may move from where the stage started")
    preference_sft_weight: float = key(1.0, "weight of the chosen/desirable completions' NLL added to the DPO/KTO "
                                       "loss (keeps them likely; 0 = pure DPO/KTO)")
    warm_start: bool = key(True, "continue from the scope's served adapter on new rows plus a replay sample; "
                           "false = full retrain from the base model on all rows")
    replay_share: float = key(0.25, "share of a warm-started run's rows drawn from rows the served adapter saw")
    dev_adapters: bool = key(True, "after a team's cycle, train a personal adapter for each of its developers "
                             "with enough data, starting from the team's adapter")
    device: str = key("auto", "\"auto\" (cuda when present), \"cuda\" or \"cpu\"")
    qlora: bool = key(False, "CUDA only: load the base model in 4-bit NF4 (needs bitsandbytes) to fit larger models")
    gradient_checkpointing: bool = key(False, "CUDA only: recompute activations in backward (less memory, ~30% "
                                       "slower); never used on CPU")
    gpus_per_run: int = key(1, "GPUs one training run uses; more than 1 runs it under `accelerate launch`")
    checkpoint_every_steps: int = key(50, "save a resumable checkpoint this often (a kill loses at most this many)")
    resume_attempts: int = key(3, "later cycles resume an interrupted run from its checkpoint this many times")
    train_timeout_s: float = key(4 * 3600.0, "a training run still going after this is stopped and failed")
    logging_steps: int = key(10, "write progress every this many optimizer steps")
    seed: int = key(0, "seed for LoRA init, data order and replay sampling")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = key(8, "held-out rows per forward pass when scoring loss")
    max_rows: int = key(1000, "held-out rows scored per model (the most recent first)")
    generate_rows: int = key(200, "held-out FIM rows completed by each model for exact match and edit similarity")
    generate_batch_size: int = key(16, "prompts completed together (left-padded) in one generate call")
    max_new_tokens: int = key(64, "longest generated middle, in tokens")
    eval_timeout_s: float = key(3600.0, "an evaluation still going after this is stopped and failed")


@dataclass(frozen=True)
class GateConfig:
    primary_metric: str = key("edit_similarity", "what must improve: edit_similarity, exact_match, heldout_loss "
                              "or preference_accuracy")
    min_improvement: float = key(0.01, "the primary metric must beat the champion's by this much, in its own units "
                                 "(heldout_loss: nats/token lower)")
    heldout_loss_tolerance_rel: float = key(0.02, "guardrail: held-out loss may rise at most this fraction")
    edit_similarity_tolerance: float = key(0.01, "guardrail: edit similarity may drop at most this much")
    exact_match_tolerance: float = key(0.02, "guardrail: exact match may drop at most this much")
    preference_accuracy_tolerance: float = key(0.02, "guardrail: replay preference accuracy may drop at most this")
    generated_length_tolerance: float = key(0.2, "guardrail: generated/reference length ratio may fall at most "
                                            "this below the champion's (capped at 1)")


@dataclass(frozen=True)
class ApiConfig:
    host: str = key("127.0.0.1", "the service's local API listens here (keep it on loopback)")
    port: int = key(8765, "TCP port of the local API; 0 = pick a free one")
    lock_timeout_s: float = key(30.0, "CLI commands wait this long for a store another process holds")


@dataclass(frozen=True)
class Config:
    """The whole configuration; `path` is the file it came from (relative paths resolve against it)."""

    path: Path = field(metadata={"internal": True})
    state_dir: Path = key(Path("devtune-state"), "store, runs, registry and served adapters")
    base_model: str = key("Qwen/Qwen2.5-Coder-1.5B", "Hugging Face id or local directory of the base model")
    default_team: str = key("default", "team of every developer and repository no [[teams]] entry names")
    log_level: str = key("info", "debug, info, warning or error")
    sources: tuple[SourceConfig, ...] = key((), "")
    developers: tuple[DeveloperConfig, ...] = key((), "")
    teams: tuple[TeamConfig, ...] = key((), "")
    collect: CollectConfig = field(default_factory=CollectConfig)
    continue_http: ContinueHttpConfig = field(default_factory=ContinueHttpConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    api: ApiConfig = field(default_factory=ApiConfig)

    def team(self, name: str) -> TeamConfig:
        for t in self.teams:
            if t.name == name:
                return t
        if name == self.default_team:
            return TeamConfig(name=name)
        raise KeyError(name)

    def team_names(self) -> list[str]:
        names = [t.name for t in self.teams]
        return names if self.default_team in names else [*names, self.default_team]

    def unknown_team(self, name: str) -> str | None:
        """What to say when `name` is not one of the teams, or None when it is."""
        if name in self.team_names():
            return None
        return f"no team {name!r}; teams are {', '.join(self.team_names())}"


SECTIONS: dict[str, type] = {
    "collect": CollectConfig, "continue_http": ContinueHttpConfig, "schedule": ScheduleConfig,
    "datasets": DatasetsConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "gate": GateConfig,
    "api": ApiConfig,
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
    cfg = dataclasses.replace(cfg, collect=dataclasses.replace(cfg.collect, developers=cfg.developers))
    if cfg.continue_http.enabled:
        # The HTTP destination's inbox is collected like any folder of logs (collectors/continue_http.py).
        inbox = SourceConfig(kind="continue_http", path=inbox_dir(cfg.state_dir), name=HTTP_SOURCE)
        cfg = dataclasses.replace(cfg, sources=(*cfg.sources, inbox))
    return cfg


def inbox_dir(state_dir: Path) -> Path:
    """Where the service keeps the events Continue POSTs until they are collected."""
    return state_dir / "inbox" / "continue"


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
        if s.kind and s.kind not in SOURCE_KINDS:
            errors.append(f"{where}kind = {_show(s.kind)}: use one of {', '.join(SOURCE_KINDS)}")
        if s.name in seen or s.name == HTTP_SOURCE:
            errors.append(f"{where}name = {_show(s.name)}: two sources share it; give each a distinct name"
                          + (" (the HTTP destination's inbox is named so)" if s.name == HTTP_SOURCE else ""))
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
    ("evaluate", "batch_size", 1, None), ("evaluate", "max_rows", 1, None), ("evaluate", "generate_rows", 0, None),
    ("evaluate", "generate_batch_size", 1, None), ("evaluate", "max_new_tokens", 1, 4096),
    ("evaluate", "eval_timeout_s", 1, None), ("gate", "min_improvement", -1, 1),
    ("gate", "heldout_loss_tolerance_rel", 0, 10), ("gate", "edit_similarity_tolerance", 0, 1),
    ("gate", "exact_match_tolerance", 0, 1), ("gate", "preference_accuracy_tolerance", 0, 1),
    ("gate", "generated_length_tolerance", 0, 10),
    ("api", "port", 0, 65535), ("api", "lock_timeout_s", 0, None),
    ("continue_http", "max_body_bytes", 1024, None),
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
    if cfg.train.preference not in PREFERENCE_STAGES:
        errors.append(f"[train] preference = {_show(cfg.train.preference)}: use one of {', '.join(PREFERENCE_STAGES)}")
    if cfg.gate.primary_metric not in GATE_METRICS:
        errors.append(f"[gate] primary_metric = {_show(cfg.gate.primary_metric)}: use one of {', '.join(GATE_METRICS)}")
    if cfg.train.qlora and cfg.train.device == "cpu":
        errors.append('[train] qlora = true needs CUDA (bitsandbytes 4-bit kernels): set device = "auto" or '
                      '"cuda", or qlora = false on a CPU machine')
    if cfg.train.gpus_per_run > 1 and cfg.train.device == "cpu":
        errors.append(f"[train] gpus_per_run = {cfg.train.gpus_per_run} with device = \"cpu\": set gpus_per_run = 1 "
                      "or use CUDA")
    if any(m in ("lm_head", "embed_out", "output") for m in cfg.train.target_modules):
        errors.append(f"[train] target_modules = {_show(list(cfg.train.target_modules))}: the LM head cannot get an "
                      "adapter (training computes its logits only where the loss needs them); remove it")
    return errors


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
