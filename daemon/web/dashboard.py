"""The dashboard and `/metrics` on the API's port: who may see them, and which page answers.

Both are read-only and behind the API token (the one in <state_dir>/api.token): a browser logs in once on
/login and gets a session cookie; Prometheus and curl send `Authorization: Bearer <token>`. The cookie is
`<expiry>.<HMAC-SHA256(token, expiry)>`: nothing is stored server-side, it survives a service restart, and
replacing api.token logs every browser out. It is HttpOnly (no script can read it) and SameSite=Strict
(another site cannot make a browser send it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any

from daemon import jobs
from daemon.api import WebRequest, WebResponse, bearer
from daemon.web import pages
from pipelines.config import Config
from pipelines.store.db import Store

log = logging.getLogger("devtune.dashboard")

COOKIE = "devtune_session"
SESSION_S = 12 * 3600  # a working day: a team lead logs in once a morning
WRONG_TOKEN_DELAY_S = 0.5  # each wrong token waits: guessing a 32-byte token was hopeless anyway, this keeps logs calm
HTML = "text/html; charset=utf-8"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format
# Nothing on a page comes from elsewhere (plots are inline SVG, styles inline), and the browser is told so.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"),
)
Page = Callable[[], str]


class Dashboard:
    """Answers /, /login, /logout, /dashboard[/runs|/developers] and /metrics; None for any other path."""

    def __init__(self, token: str, pages: dict[str, Page], metrics: Callable[[], bytes], metrics_type: str,
                 clock: Callable[[], float] = time.time):
        self.token, self.pages, self.metrics, self.metrics_type, self.clock = token, pages, metrics, metrics_type, clock

    def __call__(self, req: WebRequest) -> WebResponse | None:
        if req.path == "/":
            return _redirect("/dashboard")
        if req.path == "/login":
            if req.method == "POST":
                return self._login(req)
            return _html(HTTPStatus.OK, pages.login_page(next_path=_next(req.query)))
        if req.path == "/logout":
            return _redirect("/login", cookie=f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict")
        if req.path == "/metrics":
            if not self.allowed(req):
                return WebResponse(HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8",
                                   b"send Authorization: Bearer <the token in api.token>\n")
            return WebResponse(HTTPStatus.OK, self.metrics_type, self.metrics())
        page = self.pages.get(req.path)
        if page is None:
            return None
        if req.method != "GET":
            return _html(HTTPStatus.METHOD_NOT_ALLOWED, "<p>The dashboard is read-only.</p>")
        if not self.allowed(req):
            return _redirect("/login?" + urllib.parse.urlencode({"next": req.path}))
        return _html(HTTPStatus.OK, page())

    def allowed(self, req: WebRequest) -> bool:
        token = bearer(req.headers.get("authorization", ""))
        if token:
            return hmac.compare_digest(token.encode(), self.token.encode())
        cookie = SimpleCookie()
        try:
            cookie.load(req.headers.get("cookie", ""))
        except CookieError:  # a malformed Cookie header is no session
            return False
        morsel = cookie.get(COOKIE)
        return morsel is not None and self.valid_session(morsel.value)

    def session(self) -> str:
        expires = int(self.clock()) + SESSION_S
        return f"{expires}.{self._mac(expires)}"

    def valid_session(self, value: str) -> bool:
        expires, _, mac = value.partition(".")
        if not expires.isdigit() or int(expires) < self.clock():
            return False
        return hmac.compare_digest(mac.encode(), self._mac(int(expires)).encode())

    def _mac(self, expires: int) -> str:
        return hmac.new(self.token.encode(), f"dashboard-session:{expires}".encode(), hashlib.sha256).hexdigest()

    def _login(self, req: WebRequest) -> WebResponse:
        form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        target = _next("next=" + urllib.parse.quote((form.get("next") or ["/dashboard"])[0]))
        if not token or not hmac.compare_digest(token.encode(), self.token.encode()):
            log.warning("dashboard: a wrong token from %s", req.client)
            time.sleep(WRONG_TOKEN_DELAY_S)
            return _html(HTTPStatus.UNAUTHORIZED, pages.login_page("That is not the service's API token.", target))
        log.info("dashboard: logged in from %s", req.client)
        return _redirect(target, cookie=f"{COOKIE}={self.session()}; Max-Age={SESSION_S}; Path=/; HttpOnly; "
                                        "SameSite=Strict")


def _next(query: str) -> str:
    """Where to go after logging in: a dashboard page only (never another site)."""
    target = (urllib.parse.parse_qs(query).get("next") or ["/dashboard"])[0]
    return target if target in ("/dashboard", "/dashboard/runs", "/dashboard/developers") else "/dashboard"


def _html(status: int, text: str) -> WebResponse:
    return WebResponse(status, HTML, text.encode(), SECURITY_HEADERS)


def _redirect(location: str, cookie: str | None = None) -> WebResponse:
    headers = (("Location", location), *SECURITY_HEADERS) + ((("Set-Cookie", cookie),) if cookie else ())
    return WebResponse(HTTPStatus.SEE_OTHER, HTML, b"", headers)


def build_dashboard(store: Store, cfg: Config, token: str) -> Dashboard:
    """The dashboard of a running service: each page drawn on its own DuckDB cursor (one per request thread)."""

    def page(draw: Callable[[Store, Config, dict[str, Any]], str]) -> Page:
        def render() -> str:
            mine = store.cursor()
            return draw(mine, cfg, jobs.status(mine, cfg))
        return render

    def scrape() -> bytes:
        # prometheus_client costs 12 MB of the idle service's RSS: imported at the first scrape, not at start.
        from daemon.web import metrics

        return metrics.render(store.cursor(), cfg)

    return Dashboard(token, {"/dashboard": page(pages.overview), "/dashboard/runs": page(pages.runs),
                             "/dashboard/developers": page(pages.developers)}, scrape, METRICS_TYPE)
