"""The configuration as frozen, typed dataclasses: the ground floor every layer may import.

Every key has a default, a one-line doc (in the field's metadata) and its unit in its name. daemon/config.py
reads a TOML file into these classes (unknown keys are errors, every error reported at once) and renders the
reference `config.toml` from them, so the docs cannot drift from the code. No config dict travels past that
edge, and nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    scrub_workers: int = key(0, "processes that parse and scrub a log source with over 64 MB to read (a first "
                             "backfill) while the collect stores; 0 = one per CPU core, at most 4; 1 = none")
    max_line_bytes: int = key(1 << 20, "log lines longer than this are quarantined without being parsed")
    max_file_bytes: int = key(512 * 1024, "committed files and diffs larger than this are not stored")
    exclude_paths: tuple[str, ...] = key(
        (".env*", "*.pem", "*.key", "id_rsa*", "**/secrets/**"),
        "file globs whose content is never stored (matched against the path and its file name)")
    opt_out: tuple[str, ...] = key((), "developers (emails or ids) whose data is never stored; adding one removes "
                                   "what was stored of them at the next collect, as `devtune forget` does")
    exclude_authors: tuple[str, ...] = key(
        ("*[bot]*", "*-bot", "*-bot@*", "dependabot*", "renovate*", "github-actions*", "snyk-bot*",
         "semantic-release-bot*", "pre-commit-ci*", "Travis CI*", "GitLab CI*", "Jenkins*"),
        "bots and CI identities (globs on author name and email or any logged id; * and ? only, [ ] are literal): "
        "their IDE events are not stored, their commits keep only sha and time, they get no adapter")


@dataclass(frozen=True)
class ContinueHttpConfig:
    enabled: bool = key(False, "accept Continue's `data:` POSTs at http://<[api] host>:<[api] port>/continue/devdata, "
                        "each with its developer's own token (devtune token issue DEVELOPER) as the apiKey")
    shared_token: bool = key(False, "also accept one team-wide token (token_file) and take the developer from the "
                             "X-Developer header: single-user setups only, since its holder can write as anyone")
    token_file: str = key("", "the team-wide token's file when shared_token = true; empty = "
                              "<state_dir>/continue.token, created (mode 0600) when the service starts")
    max_body_bytes: int = key(1_000_000, "larger POST bodies are refused with 413 (at most [collect] "
                                       "max_line_bytes - 512: an accepted event must fit one inbox line)")


@dataclass(frozen=True)
class ScheduleConfig:
    cycle_cron: str = key("0 2 * * *", "default nightly cycle time per team (crontab: min hour dom mon dow)")
    timezone: str = key("", "IANA zone for the crons, e.g. \"Europe/Berlin\"; empty = the server's zone")
    retrain_after_accepted: int = key(0, "also start a team's cycle once it has this many accepted suggestions "
                                      "ingested since its last run (checked after each collect); 0 = the cron only")
    min_retrain_interval_h: float = key(6.0, "a retrain on new data waits at least this long after the team's last "
                                        "run started")


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
    gpus_per_run: int = key(1, "GPUs one training run uses; more than 1 runs it under `accelerate launch` (on Ray: "
                            "across nodes when it exceeds [ray] gpus_per_node)")
    checkpoint_every_steps: int = key(50, "save a resumable checkpoint this often (a kill loses at most this many)")
    resume_attempts: int = key(3, "later cycles resume an interrupted run from its checkpoint this many times")
    train_timeout_s: float = key(4 * 3600.0, "a training run still going after this is stopped and failed")
    logging_steps: int = key(10, "write progress every this many optimizer steps")
    seed: int = key(0, "seed for LoRA init, data order and replay sampling")
    backend: str = key("local", "where training and evaluation run: \"local\" (child processes on this machine's GPU "
                       "slots) or \"ray\" (a Ray job per run on the cluster at [ray] address)")


@dataclass(frozen=True)
class PretrainConfig:
    """Continued pretraining (`devtune pretrain`): causal-LM training on the team's repositories as of the
    held-out cutoff, gated on held-out loss against the base model (pipelines/pretrain/)."""

    output: str = key("adapter", "\"adapter\": the team's adapter starts from it (served on the stock base, as "
                      "before); \"base\": merged into a new base, base:<team>/vNNNN, that the team's server serves")
    max_tokens: int = key(20_000_000, "token budget of one run (the corpus is repeated up to max_epochs to fill it)")
    max_epochs: float = key(4.0, "most passes over the team's code in one run, whatever the budget")
    seq_tokens: int = key(1024, "tokens per training sequence: files are cut at line starts into chunks this long")
    batch_size: int = key(8, "sequences per device per micro-step (halved automatically on out-of-memory)")
    grad_accum_steps: int = key(1, "micro-steps per optimizer step")
    learning_rate: float = key(4e-4, "peak AdamW learning rate (warmup, then cosine decay); the LoRA is [train]'s")
    warmup_ratio: float = key(0.03, "share of the steps spent warming the learning rate up")
    fim_rate: float = key(0.5, "share of chunks laid out as FIM examples in the base's own FIM tokens; the rest "
                          "is plain text")
    min_corpus_chars: int = key(50_000, "a team with less code than this (after filters) is not pretrained")
    min_improvement_rel: float = key(0.01, "held-out loss must fall at least this share below the base's, or the "
                                     "run is not used")
    checkpoint_every_steps: int = key(200, "save a resumable checkpoint this often")
    timeout_s: float = key(24 * 3600.0, "a pretraining run still going after this is stopped (it resumes next time)")
    cron: str = key("", "when the service runs each team's continued pretraining (crontab), e.g. \"0 3 * * 6\" "
                    "for Saturdays at 03:00; empty = only when `devtune pretrain` is run")
    seed: int = key(0, "seed for the LoRA init, chunk order and FIM draws")


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
class RayConfig:
    """Where `[train] backend = "ray"` sends each run's training and evaluation (one Ray job each)."""

    address: str = key("http://127.0.0.1:8265", "the cluster's Jobs API: the head's dashboard URL, http://HEAD:8265")
    shared_dir: str = key("", "a folder this host and every node mount at the same path (NFS): runs are staged in "
                          "<shared_dir>/runs/<run_id> and their adapter copied back; empty = the runs under "
                          "state_dir themselves (a head on this host, or state_dir mounted alike on every node)")
    python: str = key("python", "the Python on the nodes that has devtune's dependencies (torch, transformers, peft)")
    ship_code: bool = key(True, "ship this service's pipelines/ package with each job (runtime_env py_modules), so "
                          "nodes run the same code as the service whatever devtune they have installed")
    cpus_per_run: float = key(4.0, "CPU cores reserved for each job (entrypoint_num_cpus; Ray also sets its "
                              "OMP_NUM_THREADS to this); GPUs come from [train] gpus_per_run, none with device = "
                              "\"cpu\"")
    gpus_per_node: int = key(8, "GPUs of one node: a run whose [train] gpus_per_run exceeds it spans nodes through "
                             "Ray Train's TorchTrainer")
    max_jobs: int = key(4, "runs on the cluster at once (about its GPUs / gpus_per_run); the others wait in "
                        "devtune's queue, since Ray fails a job left pending past its start timeout (15 min)")
    poll_s: float = key(2.0, "read each job's status, log and progress this often")


@dataclass(frozen=True)
class ApiConfig:
    host: str = key("127.0.0.1", "the service's local API listens here (keep it on loopback)")
    port: int = key(8765, "TCP port of the local API; 0 = pick a free one")
    lock_timeout_s: float = key(30.0, "CLI commands wait this long for a store another process holds")
    worker_idle_s: float = key(300.0, "the service's store worker (DuckDB, the API's answers, collects, cycles) stops "
                               "after this long without a request or work of its own, and starts again when "
                               "needed (~0.6 s): an idle service then holds ~41 MB instead of ~175")
    dashboard: bool = key(True, "serve the read-only dashboard (/dashboard) and Prometheus /metrics on this port, "
                          "behind the API token (a login page sets a session cookie)")


@dataclass(frozen=True)
class PublishConfig:
    export_timeout_s: float = key(900.0, "writing a promoted version's exports (vLLM folder, adapter.gguf, Modelfile) "
                                  "is stopped after this; a failed export is reported and the version is served")


@dataclass(frozen=True)
class ServeConfig:
    enabled: bool = key(False, "serve completions: the gateway's request log is collected, and `devtune run` starts "
                        "the gateway when in_service = true")
    in_service: bool = key(True, "`devtune run` starts the gateway; false = run `devtune serve` as its own process "
                           "(e.g. a second systemd unit)")
    host: str = key("127.0.0.1", "the gateway listens here (keep it on loopback; forward the port to editors)")
    port: int = key(8766, "TCP port of the gateway's OpenAI-compatible API; 0 = pick a free one")
    model_name: str = key("devtune", "the one model name every editor asks for; each caller gets what they are served")
    backend: str = key("builtin", "\"builtin\" (transformers + peft in a worker process: small teams, CPU, demo) or "
                       "\"vllm\" (forward to a vLLM server at vllm_url)")
    device: str = key("auto", "builtin: \"auto\" (cuda when present), \"cuda\" or \"cpu\"")
    max_batch_size: int = key(16, "builtin: most requests completed together in one batch")
    batch_window_ms: float = key(2.0, "builtin: after a request arrives, wait this long for others to batch with it")
    max_loaded_adapters: int = key(32, "builtin: adapters kept loaded beside the base; the least recently used goes")
    cpu_threads: int = key(0, "builtin on CPU: the worker's torch threads; 0 = one per core (on cores shared with "
                           "training or other services, 1 avoids OpenMP stalls: bench/README.md)")
    vllm_url: str = key("http://127.0.0.1:8000", "vllm: the vLLM OpenAI server (started with --enable-lora and "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
    vllm_model: str = key("", "vllm: the name vLLM serves the base model under (--served-model-name); "
                          "empty = base_model")
    unload_grace_s: float = key(600.0, "vllm: an adapter nobody is served any more is unloaded this long after its "
                                "last request")
    default_max_tokens: int = key(64, "tokens generated for a request that sets no max_tokens")
    max_tokens_limit: int = key(512, "a request's max_tokens is capped at this")
    request_timeout_s: float = key(60.0, "a completion not finished after this is answered with an error")
    start_timeout_s: float = key(600.0, "builtin: loading the base model may take this long before requests fail")


@dataclass(frozen=True)
class OnlineConfig:
    canary_share: float = key(0.5, "share of a team's developers served a newly promoted team version first (0 = "
                              "serve it to everyone at once); developers with an adapter of their own keep theirs")
    min_shown: int = key(2000, "suggestions each arm (canary and the rest; before and after, for a personal "
                         "version) must show before the field verdict")
    min_linked: int = key(200, "accepted suggestions with a decided link each arm needs before persistence counts")
    acceptance_margin: float = key(0.03, "a version is worse when its acceptance is lower by more than this "
                                   "(absolute, with 95% confidence); not worse when surely not")
    persistence_margin: float = key(0.05, "the same for the share of accepted suggestions still in the next commits")
    max_canary_h: float = key(72.0, "a canary still undecided after this is served to everyone (the held-out gate "
                              "passed it, and the field showed no harm)")
    judge_personal: bool = key(True, "roll back a personal version whose field numbers are worse than those of "
                               "the version it replaced")
    personal_lookback_h: float = key(168.0, "a personal version is compared with what the developer was served "
                                     "in this many hours before it")


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

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
