"""The service's local HTTP API (127.0.0.1 by default), and the client the CLI uses to reach it.

While the service runs it owns the DuckDB file (one writer process per file; in DuckDB 2.0 another process
cannot even open it read-only), so CLI commands are forwarded here instead of opening the store. Every
/api/ route needs the bearer token the service writes to <state_dir>/api.token (mode 0600): whoever can
read that file may drive the service.

Inbound routes (Continue's `data:` destination) take developers' own tokens (daemon/auth.py), which let a
client post events as that developer and nothing else; the token and the body size are checked before the
body is read.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import os
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipelines.files import read_json, write_json_atomic

log = logging.getLogger("devtune.api")

MAX_BODY_BYTES = 1 << 20
Route = Callable[[dict[str, Any]], tuple[int, Any]]


class ApiError(Exception):
    """The service answered with an error, or could not be reached."""


def ensure_token(path: Path) -> str:
    """The token in `path`, created (random, mode 0600) when the file does not exist."""
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


@dataclass(frozen=True)
class Inbound:
    """A POST route for events from outside (not the CLI): its own callers, its own body limit."""

    caller: Callable[[str], str | None]  # bearer token -> who is calling; None = refused (401)
    max_body_bytes: int
    handle: Callable[[str, Mapping[str, str], bytes], tuple[int, Any]]  # (caller, lower-cased headers, body)


@dataclass(frozen=True)
class WebRequest:
    """A request for a page outside /api/ (the dashboard, /metrics): the handler does its own access check."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # lower-cased names
    body: bytes
    client: str


@dataclass(frozen=True)
class WebResponse:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


WEB_MAX_BODY_BYTES = 4096  # the login form is the only body a page takes


class ApiServer:
    """A threaded HTTP server dispatching (method, path) to plain functions that return (status, body)."""

    def __init__(self, host: str, port: int, token: str, routes: dict[tuple[str, str], Route],
                 prefix_routes: dict[tuple[str, str], Callable[[str], tuple[int, Any]]],
                 inbound: dict[str, Inbound] | None = None,
                 web: Callable[[WebRequest], WebResponse | None] | None = None,
                 forward: Callable[[BaseHTTPRequestHandler, str], None] | None = None):
        self.token = token
        self.inbound = inbound or {}
        self.web, self.forward = web, forward
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_POST(self) -> None:
                server._handle(self, "POST")

        self.routes, self.prefix_routes = routes, prefix_routes
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="api", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/healthz":
            return reply(req, HTTPStatus.OK, {"ok": True})
        if path in self.inbound:
            return _handle_inbound(req, method, self.inbound[path])
        if self.forward is not None:  # the service's store worker answers the rest (daemon/front.py)
            return self.forward(req, method)
        if self.web is not None and not path.startswith("/api/"):
            return _handle_web(req, method, path, self.web)
        if not bearer_ok(req, self.token):
            return reply(req, HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token (see api.token "
                                                                  "in the state directory)"})
        length = int(req.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return reply(req, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY_BYTES} bytes"})
        body: dict[str, Any] = {}
        if length:
            try:
                body = json.loads(req.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return reply(req, HTTPStatus.BAD_REQUEST, {"error": "body is not JSON"})
        route = self.routes.get((method, path))
        if route is not None:
            return _answer(req, method, path, lambda: route(body))
        for (m, prefix), handler in self.prefix_routes.items():
            if m == method and path.startswith(prefix):
                rest = path[len(prefix):]
                return _answer(req, method, path, functools.partial(handler, rest))
        return reply(req, HTTPStatus.NOT_FOUND, {"error": f"no route {method} {path}"})


def _handle_web(req: BaseHTTPRequestHandler, method: str, path: str,
                web: Callable[[WebRequest], WebResponse | None]) -> None:
    length_header = req.headers.get("Content-Length") or "0"
    length = int(length_header) if length_header.isdigit() else -1
    if length < 0 or length > WEB_MAX_BODY_BYTES:
        req.close_connection = True
        return reply(req, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {WEB_MAX_BODY_BYTES} bytes"})
    headers = {k.lower(): v for k, v in req.headers.items()}
    # Behind the service's front (daemon/front.py) every peer is 127.0.0.1: the front names the real one. The
    # address is only logged (a login, a wrong token); access rests on the token alone.
    client = headers.get("x-forwarded-for", "") or req.client_address[0]
    request = WebRequest(method, path, req.path.partition("?")[2], headers,
                         req.rfile.read(length) if length else b"", client)
    try:
        response = web(request)
    except Exception as e:
        log.exception("%s %s failed", method, path)
        return reply(req, HTTPStatus.INTERNAL_SERVER_ERROR,
                      {"error": f"{type(e).__name__}: {e} (the service log has the traceback)"})
    if response is None:
        return reply(req, HTTPStatus.NOT_FOUND, {"error": f"no page {method} {path}"})
    send(req, response.status, [("Content-Type", response.content_type), *response.headers], response.body)


def _answer(req: BaseHTTPRequestHandler, method: str, path: str, call: Callable[[], tuple[int, Any]]) -> None:
    """Run a route; a bug in it answers 500 with the error (and logs the traceback) instead of hanging up."""
    try:
        status, payload = call()
    except Exception as e:
        log.exception("%s %s failed", method, path)
        return reply(req, HTTPStatus.INTERNAL_SERVER_ERROR,
                      {"error": f"{type(e).__name__}: {e} (the service log has the traceback)"})
    return reply(req, status, payload)


def bearer_ok(req: BaseHTTPRequestHandler, token: str) -> bool:
    return hmac.compare_digest(req.headers.get("Authorization", "").encode(), f"Bearer {token}".encode())


def bearer(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` header's value, or ""."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _handle_inbound(req: BaseHTTPRequestHandler, method: str, route: Inbound) -> None:
    if method != "POST":
        return reply(req, HTTPStatus.METHOD_NOT_ALLOWED, {"error": "POST events here"})
    length_header = req.headers.get("Content-Length")
    length = int(length_header) if length_header is not None and length_header.isdigit() else -1
    caller = route.caller(bearer(req.headers.get("Authorization", "")))
    if caller is None:
        _discard(req, length)  # never parsed, never kept
        return reply(req, HTTPStatus.UNAUTHORIZED, {"error": "missing, wrong or revoked bearer token: set the data "
                                                              "destination's apiKey to your own token (devtune "
                                                              "token issue YOUR_ID on the server)"})
    if length < 0:
        req.close_connection = True
        return reply(req, HTTPStatus.LENGTH_REQUIRED, {"error": "send a Content-Length"})
    if length > route.max_body_bytes:
        _discard(req, length)
        return reply(req, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                      {"error": f"body of {length} bytes is over the {route.max_body_bytes}-byte limit "
                                "([continue_http] max_body_bytes)"})
    headers = {k.lower(): v for k, v in req.headers.items()}
    status, payload = route.handle(caller, headers, req.rfile.read(length))
    return reply(req, status, payload)


DISCARD_MAX_BYTES = 16 << 20


def _discard(req: BaseHTTPRequestHandler, length: int) -> None:
    """Read and drop a refused body, so that closing the socket does not reset it before the client has read
    the answer (Linux sends RST when unread data remains); past 16 MiB, close instead of reading."""
    if length < 0 or length > DISCARD_MAX_BYTES:
        req.close_connection = True
        return
    while length > 0:
        chunk = req.rfile.read(min(length, 1 << 16))
        if not chunk:
            break
        length -= len(chunk)


def reply(req: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    send(req, status, [("Content-Type", "application/json")], json.dumps(payload, default=str).encode())


def send(req: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    """Answer with `body` and `headers` (Content-Length is added here); a client gone meanwhile is no error."""
    req.send_response(status)
    for name, value in headers:
        req.send_header(name, value)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        req.wfile.write(body)


# -- service discovery and client ----------------------------------------------------------------------------

def write_service_file(state_dir: Path, url: str) -> None:
    write_json_atomic(state_dir / "service.json", {"pid": os.getpid(), "url": url})


def remove_service_file(state_dir: Path) -> None:
    path = state_dir / "service.json"
    info = read_json(path)
    if info and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


class ApiClient:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    @classmethod
    def discover(cls, state_dir: Path) -> ApiClient | None:
        """A client for the service running on `state_dir`, or None when none is running."""
        info = read_json(state_dir / "service.json")
        if not info or not _alive(int(info.get("pid", 0))):
            return None
        try:
            token = (state_dir / "api.token").read_text().strip()
        except PermissionError:
            raise ApiError(f"the devtune service is running but {state_dir / 'api.token'} is not readable by "
                           "this user: run the command as the service's user, e.g. sudo -u devtune devtune ...") \
                from None
        return cls(info["url"], token)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 600) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            raise ApiError(f"the service answered {e.code} to {method} {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(f"cannot reach the devtune service at {self.url}: {e}") from None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
