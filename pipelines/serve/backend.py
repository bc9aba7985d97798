"""What the gateway asks of a serving backend, and which adapter answers whom.

A developer calls one stable model name forever; `Router.adapter_for` says what they are served right now:
their own promoted version, else their team's, else the base model (None). It reads two `served/` links
per request, so a promotion (an atomic link swap) counts at the next request, with no restart. A version's
files never change, so what is read of a version (lineage, served name) is kept.

A backend (`builtin.BuiltinBackend`, `vllm.VllmBackend`) completes a `Job` as a stream of events: first
`Started` (which adapter answers: a backend that cannot load the one asked for says so and answers with the
base model), then `Delta`s of text, then `Finished`. Closing the stream early cancels the completion.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.publish import registry
from pipelines.publish.names import served_name
from pipelines.publish.publish import exports_of

log = logging.getLogger("devtune.serve")


@dataclass(frozen=True)
class Adapter:
    """One registry version as a backend loads it."""

    scope: str  # team:NAME | dev:ID
    version: str  # vNNNN
    name: str  # its served name: never reused, so a backend never reloads a name with other weights
    path: Path  # the registry version folder (a PEFT adapter): what the builtin backend loads
    vllm_path: Path  # exports/peft when the version was exported (vLLM-ready), else the version folder

    @property
    def label(self) -> str:
        """What the X-Devtune-Adapter header says: "team:payments/v0003"."""
        return f"{self.scope}/{self.version}"


@dataclass(frozen=True)
class Job:
    """One completion to generate."""

    id: str  # the completion id the gateway answers with
    prompt: str  # already rendered with the base family's FIM tokens
    adapter: Adapter | None  # None = the base model
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    stop: tuple[str, ...]  # the completion ends before the first of these


@dataclass(frozen=True)
class Started:
    adapter: Adapter | None  # what answers (None = the base model)
    note: str  # why that is not the adapter the job asked for, or ""


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


Event = Started | Delta | Finished


class BackendError(Exception):
    """The backend cannot answer now (worker down or still loading, vLLM unreachable, timed out)."""


class Backend(Protocol):
    """A serving backend: the builtin worker process or a vLLM server."""

    name: str  # "builtin" | "vllm"

    def complete(self, job: Job) -> Iterator[Event]:
        """Started, Deltas, Finished; raises BackendError. Closing the iterator early cancels the job."""
        ...

    def ready(self) -> bool:
        """Whether a request now would be answered without waiting for the backend to start."""
        ...

    def close(self) -> None:
        ...


class Router:
    """Which adapter answers a developer now, read from the registry's `served/` links at each call."""

    def __init__(self, state_dir: Path, base_model: str):
        self.state_dir, self.base_model = state_dir, base_model
        self._versions: dict[Path, Adapter | None] = {}  # version folder -> its adapter (None: another base)
        self._lock = threading.Lock()

    def adapter_for(self, developer: str, team: str) -> Adapter | None:
        """Their own served version, else their team's, else None (the base model). A version trained on
        another base model than the one served is skipped, as the cycle skips it (pipelines/cycle.py)."""
        for scope in (f"dev:{developer}", f"team:{team}"):
            adapter = self.adapter_of(scope, developer)
            if adapter is not None:
                return adapter
        return None

    def adapter_of(self, scope: str, developer: str = "") -> Adapter | None:
        """What `scope` serves `developer` now: its canary when they are in its arm, else its served version."""
        served = registry.served_for(self.state_dir, scope, developer)
        if served is None:
            return None
        with self._lock:
            if served.path not in self._versions:
                self._versions[served.path] = self._adapter(served)
            return self._versions[served.path]

    def served_names(self) -> set[str]:
        """The served names of every version some scope serves now."""
        names = set()
        for scope in registry.served(self.state_dir):
            adapter = self.adapter_of(scope)
            if adapter is not None:
                names.add(adapter.name)
        return names

    def _adapter(self, served: registry.Served) -> Adapter | None:
        trained_on = served.lineage.get("base_model")
        if trained_on != self.base_model:
            log.warning("%s serves %s, trained on %s, not the served base model %s: it answers nobody (the "
                        "fallback does)", served.scope, served.version, trained_on, self.base_model)
            return None
        exports = exports_of(served.path)
        name = exports["served_name"] if exports else served_name(served.scope, served.version)
        vllm_path = served.path / "exports" / exports["peft_dir"] if exports else served.path
        return Adapter(scope=served.scope, version=served.version, name=name, path=served.path, vllm_path=vllm_path)
