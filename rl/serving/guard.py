"""The ASGI middleware in front of every route of the ``exitrl serve`` front end (``Guard``), and
the routes it lets through (``ROUTES``)."""

from __future__ import annotations

import secrets

from rl.serving.front_end import FrontEnd, FrontMetrics, error_body

OPEN_ROUTES = ("/health",)
ROUTES = {  # path -> its one method
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/metrics": "GET",
    "/health": "GET",
}
MAX_BODY_BYTES = 8 << 20


def _content_length(headers: dict) -> int:
    """The declared body size (0 when absent or not a number: the body read enforces the limit too)."""
    v = headers.get(b"content-length", b"")
    return int(v) if v.isdigit() else 0


class Guard:
    """ASGI middleware in front of every route: unknown paths 404, the key (401, compared as bytes:
    any header byte is a wrong key, never an error), the route's method (405), ``application/json``
    POSTs (415), body size (413 by Content-Length); counts responses by route and status."""

    def __init__(self, app, fe: FrontEnd, metrics: FrontMetrics):
        self.app, self.fe, self.metrics = app, fe, metrics
        self.want = f"Bearer {fe.api_key}".encode() if fe.api_key is not None else None

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, message) of a request the routes never see, else None."""
        path, headers = scope["path"], dict(scope["headers"])
        refuse = None
        if path not in ROUTES:
            refuse = (404, f"no route {path}")
        elif self.want is not None and path not in OPEN_ROUTES:
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.want):
                refuse = (401, "missing or wrong API key")
        if refuse is None and scope["method"] != ROUTES[path]:
            refuse = (405, f"{path} takes {ROUTES[path]}")
        if refuse is None and scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                refuse = (415, "the request body must be application/json (Content-Type)")
            elif _content_length(headers) > MAX_BODY_BYTES:
                refuse = (413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        return refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        refuse = self.refusal(scope)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(route, str(message["status"])).inc()
            await send(message)

        if refuse is not None:
            status, msg = refuse
            return await JSONResponse(error_body(status, msg), status_code=status)(scope, receive, counted)
        return await self.app(scope, receive, counted)
