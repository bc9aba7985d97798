"""The vLLM backend: forward completions to a vLLM OpenAI server, each version loaded under its served name.

vLLM serves many LoRA adapters over one base (`vllm serve BASE --enable-lora --max-loras N --max-lora-rank
R`) and loads more at run time when started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True. The requests follow
vLLM's own code (vllm/entrypoints/serve/lora/api_router.py, protocol.py; entrypoints/openai/models/serving.py):

    POST /v1/load_lora_adapter    {"lora_name": NAME, "lora_path": PATH}   200 text "Success: ..."; a name
                                  already loaded is a 400 "... has already been loaded ..." (no load_inplace)
    POST /v1/unload_lora_adapter  {"lora_name": NAME}                      200; 404 when it is not loaded
    POST /v1/completions          {"model": NAME, "prompt", ...}           404 "The model `NAME` does not exist."
                                  when NAME is not loaded (the error body: {"error": {"message", "type",
                                  "code"}}, or the same fields at the top level in older versions)

Both adapter routes take JSON only (Content-Type: application/json, else 415). What devtune does with them:
- a version is loaded under its served name before its first request; names are never reused, so a name
  is never reloaded with other weights (vLLM's prefix cache would serve the old weights' state);
- runtime loads are lost when vLLM restarts: a completion answered 404 "does not exist" for a loaded name
  means vLLM forgot it, so it is loaded again and the request retried once;
- a version that no scope serves any more is unloaded once nobody has used it for `unload_grace_s`;
- a version vLLM refuses to load is answered by the base model (the request log says so), so an editor
  keeps getting completions.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from pipelines.serve.backend import Adapter, BackendError, Delta, Event, Finished, Job, Started

log = logging.getLogger("devtune.serve.vllm")

ADMIN_TIMEOUT_S = 120.0  # loading an adapter reads its weights onto the GPU


class VllmBackend:
    name = "vllm"

    def __init__(self, url: str, base_name: str, served_names: Callable[[], set[str]], unload_grace_s: float,
                 request_timeout_s: float):
        parts = urlsplit(url)
        self.url, self.base_name, self.served_names = url, base_name, served_names
        self.secure = parts.scheme == "https"
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or (443 if self.secure else 80)
        self.prefix = parts.path.rstrip("/")
        self.unload_grace_s, self.request_timeout_s = unload_grace_s, request_timeout_s
        self._loaded: dict[str, float] = {}  # served name -> last used (monotonic)
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._adopted = False
        self._sweeper = threading.Thread(target=self._sweep_loop, name="vllm-unload", daemon=True)
        self._sweeper.start()

    def ready(self) -> bool:
        try:
            status, _ = self._call("GET", "/v1/models", None, timeout_s=2.0)
        except BackendError:
            return False
        return status == 200

    def close(self) -> None:
        self._stop.set()

    def loaded(self) -> set[str]:
        """The served names this gateway loaded (or found loaded) on vLLM."""
        with self._lock:
            return set(self._loaded)

    def complete(self, job: Job) -> Iterator[Event]:
        adapter, note = job.adapter, ""
        if adapter is not None:
            try:
                self._ensure_loaded(adapter)
            except BackendError as e:
                log.warning("%s: %s; answering with the base model", adapter.label, e)
                note = f"{adapter.label} could not be loaded on vLLM: {e}"
                adapter = None
        model = adapter.name if adapter is not None else self.base_name
        with self._lock:
            self._in_flight[model] += 1
        try:
            response = self._open_completion(job, model)
            if response.status == 404 and adapter is not None:
                body = response.read()
                if b"does not exist" not in body:
                    raise BackendError(f"vLLM answered 404 to a completion for {model}: {_error_message(body)[:200]}")
                # vLLM restarted and forgot its runtime loads: load the version again, once.
                log.info("vLLM no longer knows %s (restarted?): loading it again", model)
                with self._lock:
                    self._loaded.pop(model, None)
                self._ensure_loaded(adapter)
                response = self._open_completion(job, model)
            if response.status != 200:
                raise BackendError(f"vLLM answered {response.status} to a completion for {model}: "
                                   f"{_error_message(response.read())[:200]}")
            yield Started(adapter, note)
            yield from self._stream(response)
        finally:
            with self._lock:
                self._in_flight[model] -= 1
                if adapter is not None and model in self._loaded:
                    self._loaded[model] = time.monotonic()

    # -- loading and unloading -------------------------------------------------------------------------------

    def _ensure_loaded(self, adapter: Adapter) -> None:
        with self._lock:
            lock = self._load_locks.setdefault(adapter.name, threading.Lock())
        with lock:  # one load per name at a time: a burst of first requests loads it once
            with self._lock:
                if adapter.name in self._loaded:
                    return
            status, body = self._call("POST", "/v1/load_lora_adapter",
                                      {"lora_name": adapter.name, "lora_path": str(adapter.vllm_path)},
                                      timeout_s=ADMIN_TIMEOUT_S)
            message = _error_message(body)
            if status != 200 and not (status == 400 and "already been loaded" in message):
                raise BackendError(f"vLLM answered {status} to loading {adapter.name} from {adapter.vllm_path}: "
                                   f"{message[:300]}")
            # "already been loaded": this gateway restarted while vLLM kept it; the name means these weights.
            log.info("vLLM: %s %s (%s)", "loaded" if status == 200 else "already had", adapter.name, adapter.label)
            with self._lock:
                self._loaded[adapter.name] = time.monotonic()

    def sweep(self) -> list[str]:
        """Unload every loaded version no scope serves that nobody used for unload_grace_s; returns their names."""
        self._adopt()
        served = self.served_names()
        now = time.monotonic()
        with self._lock:
            idle = [n for n, used in self._loaded.items()
                    if n not in served and not self._in_flight[n] and now - used >= self.unload_grace_s]
        done = []
        for name in idle:
            try:
                status, body = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name},
                                          timeout_s=ADMIN_TIMEOUT_S)
            except BackendError as e:
                log.warning("vLLM: could not unload %s: %s", name, e)
                continue
            if status in (200, 404):  # 404: vLLM no longer had it (restarted)
                with self._lock:
                    if not self._in_flight[name]:
                        self._loaded.pop(name, None)
                done.append(name)
                log.info("vLLM: unloaded %s (served to nobody, unused for %.0fs)", name, self.unload_grace_s)
            else:
                log.warning("vLLM answered %d to unloading %s: %s", status, name, _error_message(body)[:200])
        return done

    def _adopt(self) -> None:
        """Once: take over the devtune adapters vLLM already holds (loaded before this gateway started), so
        that the ones nobody is served get unloaded too."""
        if self._adopted:
            return
        try:
            status, body = self._call("GET", "/v1/models", None, timeout_s=10.0)
        except BackendError:
            return
        self._adopted = True
        if status != 200:
            return
        now = time.monotonic()
        names = [m.get("id", "") for m in json.loads(body).get("data", []) if isinstance(m, dict)]
        with self._lock:
            for name in names:
                if name.startswith("devtune-") and name != self.base_name:
                    self._loaded.setdefault(name, now)

    def _sweep_loop(self) -> None:
        interval = max(0.05, min(30.0, self.unload_grace_s / 2))
        while not self._stop.wait(interval):
            try:
                self.sweep()
            except (OSError, ValueError) as e:
                log.warning("vLLM unload sweep failed: %s", e)

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.secure else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout_s)

    def _call(self, method: str, path: str, body: dict[str, Any] | None, timeout_s: float) -> tuple[int, bytes]:
        conn = self._connection(timeout_s)
        try:
            conn.request(method, self.prefix + path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"} if body is not None else {})
            response = conn.getresponse()
            return response.status, response.read()
        except OSError as e:
            raise BackendError(f"cannot reach vLLM at {self.url}: {e}") from None
        finally:
            conn.close()

    def _open_completion(self, job: Job, model: str) -> http.client.HTTPResponse:
        # Always streamed from vLLM, whatever the editor asked: one code path, and the time to the first token.
        body: dict[str, Any] = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens,
                                "temperature": job.temperature, "top_p": job.top_p, "stream": True,
                                "stream_options": {"include_usage": True}}
        if job.stop:
            body["stop"] = list(job.stop)
        conn = self._connection(self.request_timeout_s)
        try:
            conn.request("POST", self.prefix + "/v1/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
            return conn.getresponse()  # the connection closes with the response
        except OSError as e:
            conn.close()
            raise BackendError(f"cannot reach vLLM at {self.url}: {e}") from None

    def _stream(self, response: http.client.HTTPResponse) -> Iterator[Event]:
        finish, prompt_tokens, completion_tokens = "stop", 0, 0
        try:
            while True:
                try:
                    raw = response.readline()
                except OSError as e:
                    raise BackendError(f"vLLM stopped answering: {e}") from None
                if not raw:
                    break
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BackendError(f"vLLM failed mid-completion: {_error_message(data)[:200]}")
                usage = chunk.get("usage") or {}
                prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                completion_tokens = usage.get("completion_tokens", completion_tokens)
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        yield Delta(choice["text"])
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        finally:
            with contextlib.suppress(OSError):
                response.close()
        yield Finished(finish, prompt_tokens, completion_tokens)


def _error_message(body: bytes) -> str:
    """vLLM's error message: {"error": {"message"}} (current) or {"message"} (older), else the text."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body.decode("utf-8", "replace")
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(data.get("message"), str):
            return str(data["message"])
        if isinstance(data.get("detail"), str):
            return str(data["detail"])
    return body.decode("utf-8", "replace")
