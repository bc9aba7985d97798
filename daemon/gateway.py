"""The serving gateway (`devtune serve`, or inside `devtune run` when `[serve] enabled`): an OpenAI-compatible
completions API where every developer calls one stable model name forever.

    POST /v1/completions   {"model": "<[serve] model_name>", "prompt", "suffix"?, "max_tokens"?, "temperature"?,
                           "top_p"?, "stop"?, "stream"?}   plain JSON, or server-sent events ending `data: [DONE]`
    GET  /v1/models        the stable name
    GET  /healthz          {"ok": true, "ready": the backend has loaded its model}

The caller is their devtune token (`Authorization: Bearer dt_...`, issued by `devtune token issue`): a wrong,
missing or revoked one gets 401. They are answered by what they are served right now: their own promoted
version, else their team's, else the base model (pipelines/serve/backend.py Router), and the answer says
which in `X-Devtune-Adapter: team:payments/v0003` (or `base`). A promotion counts at the next request.

A prompt is taken as rendered (Continue renders the FIM prompt with the template `devtune continue-config`
hands out); with a `suffix`, the prompt is the text before the cursor and the gateway renders the base
family's FIM prompt itself.

Every authenticated request is appended to `<state_dir>/gateway/requests-YYYY-MM-DD.jsonl` (who, when,
which version, latency, token counts; never the code) and collected into the store by the service
(collectors/gateway_log.py): the gateway never opens the store, so it runs the same inside the service
or as its own process. Nothing here imports torch: the builtin backend generates in a child process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from collectors.base import GatewayRequest
from collectors.gateway_log import append_request
from daemon.api import bearer
from daemon.auth import TokenBook
from daemon.config import gateway_dir
from pipelines.config import Config
from pipelines.ingest.identity import Directory
from pipelines.serve.backend import Adapter, Backend, BackendError, Delta, Event, Finished, Job, Router, Started
from pipelines.serve.builtin import BuiltinBackend
from pipelines.serve.vllm import VllmBackend
from pipelines.tokens import FimTokens, load_base_tokenizer

log = logging.getLogger("devtune.gateway")

MAX_BODY_BYTES = 4 << 20  # a FIM prompt of a few thousand tokens is tens of KB
MAX_STOP = 16


class RequestError(Exception):
    """A request the gateway refuses: its HTTP status and OpenAI-style error."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Completion:
    """A /v1/completions body, checked."""

    prompt: str  # as the backend gets it (rendered with FIM tokens)
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_completion(body: Any, cfg: Config, fim: FimTokens) -> Completion:
    """The request as the backend needs it, or a RequestError naming the field and the fix."""
    s = cfg.serve
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    model = body.get("model")
    if model != s.model_name:
        raise RequestError(HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist: devtune serves every "
                           f"developer under the one name {s.model_name!r}", param="model", code="model_not_found")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(HTTPStatus.BAD_REQUEST, "prompt must be a non-empty string (one prompt per request)",
                           param="prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise RequestError(HTTPStatus.BAD_REQUEST, "suffix must be a string", param="suffix")
    for name, allowed in (("n", 1), ("best_of", 1), ("echo", False)):
        if body.get(name) not in (None, allowed):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} = {body[name]!r} is not supported: leave it out",
                               param=name)
    if body.get("logprobs") is not None:
        raise RequestError(HTTPStatus.BAD_REQUEST, "logprobs are not supported: leave them out", param="logprobs")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = s.default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, "max_tokens must be a positive integer", param="max_tokens")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops) or len(stops) > MAX_STOP:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"stop must be a string or a list of at most {MAX_STOP} strings",
                           param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(HTTPStatus.BAD_REQUEST, "stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    return Completion(prompt=fim.psm(prompt, suffix) if suffix is not None else prompt,
                      max_tokens=min(max_tokens, s.max_tokens_limit), temperature=temperature, top_p=top_p,
                      stop=tuple(x for x in stops if x), stream=stream,
                      include_usage=bool(isinstance(options, dict) and options.get("include_usage")))


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be a number between {low:g} and {high:g}",
                           param=name)
    return float(value)


class Gateway:
    """The HTTP server, the caller's identity and route, and the request log; generation is the backend's."""

    def __init__(self, cfg: Config, backend: Backend, host: str, port: int):
        self.cfg, self.backend = cfg, backend
        self.book = TokenBook(cfg.state_dir)
        self.directory = Directory.from_config(cfg)
        self.router = Router(cfg.state_dir, cfg.base_model)
        self.fim = load_base_tokenizer(cfg.base_model).fim
        self.log_dir = gateway_dir(cfg.state_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._busy = 0  # requests being answered or logged
        self._idle = threading.Condition()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive for plain answers; streams are chunked

            def setup(self) -> None:
                super().setup()
                # Headers and body go out as two writes: with Nagle's algorithm the second waits for the
                # client's delayed ACK, 40 ms on Linux (measured: +35-42 ms per request). Streamed chunks too.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

            def do_GET(self) -> None:
                gateway._get(self)

            def do_POST(self) -> None:
                gateway._post(self)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Gateway:
        self.thread.start()
        log.info("gateway on %s/v1 (model %r, %s backend)", self.url, self.cfg.serve.model_name, self.backend.name)
        return self

    def stop(self) -> None:
        """Stop accepting, let the requests being answered finish and be logged (a bounded wait), then stop."""
        self.httpd.shutdown()
        self.wait_idle(self.cfg.serve.request_timeout_s)
        self.httpd.server_close()
        self.backend.close()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is being answered or logged; False if some still are after `timeout_s`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=timeout_s)

    # -- routes ----------------------------------------------------------------------------------------------

    def _get(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/healthz":
            return _reply(req, HTTPStatus.OK, {"ok": True, "ready": self.backend.ready(), "backend": self.backend.name})
        if path == "/v1/models":
            if self._caller(req, 0) is None:
                return None
            return _reply(req, HTTPStatus.OK, {"object": "list", "data": [
                {"id": self.cfg.serve.model_name, "object": "model", "created": 0, "owned_by": "devtune"}]})
        return _reply(req, HTTPStatus.NOT_FOUND, RequestError(HTTPStatus.NOT_FOUND, f"no route GET {path}").body())

    def _post(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        length_header = req.headers.get("Content-Length")
        length = int(length_header) if length_header is not None and length_header.isdigit() else -1
        if path != "/v1/completions":
            _discard(req, length)
            return _reply(req, HTTPStatus.NOT_FOUND, RequestError(HTTPStatus.NOT_FOUND, f"no route POST {path}").body())
        developer = self._caller(req, length)
        if developer is None:
            return None
        self._complete(req, developer, length)

    def _caller(self, req: BaseHTTPRequestHandler, length: int) -> str | None:
        """The developer whose token the request carries; answers 401 (and returns None) otherwise."""
        developer = self.book.developer(bearer(req.headers.get("Authorization", "")))
        if developer is None:
            _discard(req, length)  # never parsed, never kept
            _reply(req, HTTPStatus.UNAUTHORIZED, RequestError(
                HTTPStatus.UNAUTHORIZED, "missing, wrong or revoked token: set the model's apiKey to your devtune "
                "token (devtune token issue YOUR_ID on the server; devtune continue-config YOUR_ID shows the "
                "config)", code="invalid_api_key").body(), {"WWW-Authenticate": "Bearer"})
        return developer

    def _complete(self, req: BaseHTTPRequestHandler, developer: str, length: int) -> None:
        with self._idle:
            self._busy += 1
        try:
            self._answer(req, developer, length)
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _answer(self, req: BaseHTTPRequestHandler, developer: str, length: int) -> None:
        started, received = time.monotonic(), datetime.now(UTC).replace(tzinfo=None)
        request_id = "cmpl-" + secrets.token_hex(12)
        team = self.directory.team(developer, None)
        record = _Record(request_id, received, developer, team, self.cfg.serve.model_name, self.backend.name)
        try:
            body = _read_json(req, length)
            completion = parse_completion(body, self.cfg, self.fim)
            record.stream = completion.stream
            adapter = self.router.adapter_for(developer, team)
            job = Job(id=request_id, prompt=completion.prompt, adapter=adapter, max_tokens=completion.max_tokens,
                      temperature=completion.temperature, top_p=completion.top_p, stop=completion.stop)
            events = self.backend.complete(job)
            try:
                first = next(events)
            except (BackendError, StopIteration) as e:
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"the {self.backend.name} backend cannot "
                                   f"answer now: {e}", kind="server_error") from None
            assert isinstance(first, Started), first
            record.adapter = first.adapter
            if first.note:
                record.error = first.note
            if completion.stream:
                self._stream(req, record, completion, events, started)
            else:
                self._plain(req, record, events, started)
        except RequestError as e:
            record.status, record.finish_reason = e.status, "error"
            record.error = record.error or str(e)[:300]
            if not record.headers_sent:
                _reply(req, e.status, e.body())
        except Exception as e:  # a bug answers 500 and is logged with its request, instead of hanging up
            log.exception("gateway: request %s of %s failed", request_id, developer)
            record.status, record.finish_reason = HTTPStatus.INTERNAL_SERVER_ERROR, "error"
            record.error = type(e).__name__
            if not record.headers_sent:
                _reply(req, HTTPStatus.INTERNAL_SERVER_ERROR, RequestError(
                    HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__} (the gateway log has the traceback)",
                    kind="server_error").body())
        finally:
            self._log(record, started)

    def _plain(self, req: BaseHTTPRequestHandler, record: _Record, events: Iterator[Event], started: float) -> None:
        text: list[str] = []
        try:
            for event in events:
                if isinstance(event, Delta):
                    if record.first_token_ms is None and event.text:
                        record.first_token_ms = (time.monotonic() - started) * 1000
                    text.append(event.text)
                elif isinstance(event, Finished):
                    record.finished(event)
        except BackendError as e:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"the {self.backend.name} backend failed: {e}",
                               kind="server_error") from None
        finally:
            _close(events)
        record.status = HTTPStatus.OK
        _reply(req, HTTPStatus.OK, {
            "id": record.id, "object": "text_completion", "created": int(record.received.timestamp()),
            "model": record.model, "choices": [{"index": 0, "text": "".join(text), "logprobs": None,
                                                "finish_reason": record.finish_reason}],
            "usage": record.usage()}, {"X-Devtune-Adapter": record.label})

    def _stream(self, req: BaseHTTPRequestHandler, record: _Record, completion: Completion, events: Iterator[Event],
                started: float) -> None:
        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {"id": record.id, "object": "text_completion", "created": int(record.received.timestamp()),
                    "model": record.model, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                        "finish_reason": finish}]}

        try:
            req.send_response(HTTPStatus.OK)
            for name, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                ("Transfer-Encoding", "chunked"), ("X-Devtune-Adapter", record.label)):
                req.send_header(name, value)
            req.end_headers()
            record.headers_sent, record.status = True, HTTPStatus.OK
            try:
                for event in events:
                    if isinstance(event, Delta) and event.text:
                        if record.first_token_ms is None:
                            record.first_token_ms = (time.monotonic() - started) * 1000
                        _send_event(req, chunk(event.text, None))
                    elif isinstance(event, Finished):
                        record.finished(event)
                        _send_event(req, chunk(None, event.finish_reason))
                        if completion.include_usage:
                            _send_event(req, {**chunk(None, None), "choices": [], "usage": record.usage()})
            except BackendError as e:
                record.finish_reason, record.error = "error", f"the {self.backend.name} backend failed: {e}"[:300]
                _send_event(req, RequestError(HTTPStatus.SERVICE_UNAVAILABLE, record.error, kind="server_error").body())
            _send_chunk(req, b"data: [DONE]\n\n")
            _send_chunk(req, b"")
        except (BrokenPipeError, ConnectionResetError):
            # The editor moved on (Continue aborts most requests while its developer types): stop generating.
            record.finish_reason = "cancelled"
            req.close_connection = True
        finally:
            _close(events)

    def _log(self, record: _Record, started: float) -> None:
        adapter = record.adapter
        request = GatewayRequest(
            key=record.id, received_at=record.received,
            developer=record.developer, team=record.team, scope=adapter.scope if adapter else None,
            version=adapter.version if adapter else None, served_name=adapter.name if adapter else None,
            model=record.model, backend=record.backend, stream=record.stream, status=int(record.status),
            latency_ms=round((time.monotonic() - started) * 1000, 3),
            first_token_ms=round(record.first_token_ms, 3) if record.first_token_ms is not None else None,
            prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
            finish_reason=record.finish_reason, error=record.error)
        try:
            append_request(self.log_dir, request)
        except OSError as e:
            log.error("gateway: cannot append to the request log in %s (%s): free space or fix its permissions",
                      self.log_dir, e.strerror)


class _Record:
    """What the request log keeps of one request, filled in as it is answered."""

    def __init__(self, request_id: str, received: datetime, developer: str, team: str, model: str, backend: str):
        self.id, self.received, self.developer, self.team = request_id, received, developer, team
        self.model, self.backend = model, backend
        self.adapter: Adapter | None = None
        self.stream = False
        self.status: int = HTTPStatus.INTERNAL_SERVER_ERROR
        self.headers_sent = False
        self.first_token_ms: float | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def label(self) -> str:
        return self.adapter.label if self.adapter is not None else "base"

    def finished(self, event: Finished) -> None:
        self.finish_reason = event.finish_reason
        self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def start_gateway(cfg: Config, port: int | None = None) -> Gateway:
    """The gateway of `cfg` on `[serve] host`:`port` (default `[serve] port`), with its backend started."""
    s = cfg.serve
    backend: Backend
    if s.backend == "vllm":
        router = Router(cfg.state_dir, cfg.base_model)
        backend = VllmBackend(s.vllm_url, s.vllm_model or cfg.base_model, router.served_names, s.unload_grace_s,
                              s.request_timeout_s)
    else:
        backend = BuiltinBackend(cfg.base_model, s, gateway_dir(cfg.state_dir) / "worker.log").start()
    try:
        return Gateway(cfg, backend, s.host, s.port if port is None else port).start()
    except BaseException:
        backend.close()
        raise


# -- HTTP helpers --------------------------------------------------------------------------------------------

def _read_json(req: BaseHTTPRequestHandler, length: int) -> Any:
    if length < 0:
        req.close_connection = True
        raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
    if length > MAX_BODY_BYTES:
        _discard(req, length)
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes is over {MAX_BODY_BYTES}")
    try:
        return json.loads(req.rfile.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None


def _discard(req: BaseHTTPRequestHandler, length: int) -> None:
    """Read and drop a refused body, so that the client reads the answer before the socket closes."""
    if length < 0 or length > MAX_BODY_BYTES:
        req.close_connection = True
        return
    while length > 0:
        chunk = req.rfile.read(min(length, 1 << 16))
        if not chunk:
            break
        length -= len(chunk)


def _reply(req: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(payload).encode()
    req.send_response(status)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        req.send_header(name, value)
    req.end_headers()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        req.wfile.write(data)


def _close(events: Iterator[Event]) -> None:
    """Close a backend's event stream: a completion left unfinished is cancelled."""
    close = getattr(events, "close", None)
    if close is not None:
        close()


def _send_event(req: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
    _send_chunk(req, b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")


def _send_chunk(req: BaseHTTPRequestHandler, data: bytes) -> None:
    """One HTTP/1.1 chunk (the empty one ends the stream)."""
    req.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    req.wfile.flush()
