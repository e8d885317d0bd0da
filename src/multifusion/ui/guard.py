"""What the UI's server refuses before Gradio sees a request (an ASGI middleware; no Gradio).

- A Host header naming another site: a page on a DNS name the attacker controls, re-pointed to
  127.0.0.1 (DNS rebinding), would otherwise read and drive the UI as if it were its own. Hosts
  given as IP addresses cannot be rebound and pass, as do `localhost`, the name the server binds
  and, when it binds every interface, the machine's own names.
- A request that changes something (not GET, HEAD or OPTIONS) sent by a page of another origin:
  a browser sends a form post or upload across sites without asking, only its answer is hidden.
- An error inside Gradio's routes (a request naming a function the page does not have): a short
  answer, never a traceback or the server's paths.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
WILDCARD = ("0.0.0.0", "::", "")


def host_names(bind: str) -> set[str]:
    """The names a request's Host may give for a server bound to `bind` (IP literals pass anyway)."""
    names = {"localhost", bind.lower().strip("[]")}
    if bind in WILDCARD:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return names - {""}


def hostname(authority: str) -> str:
    """The host part of a Host header or an origin's authority: "[::1]:7860" -> "::1"."""
    return (urlsplit(f"//{authority}").hostname or "").lower()


def allowed(host: str, names: set[str]) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in names


class Guard:
    """ASGI middleware: refuses foreign Host headers (400) and state-changing requests from other
    origins (403); answers an unhandled error with a short 500."""

    def __init__(self, app, names: set[str]):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = hostname(headers.get("host", ""))
        why = None
        if not allowed(host, self.names):
            why = (400, f"unknown host {host!r}: open the UI at the address it prints")
        elif "origin" in headers and scope.get("method", "GET") not in SAFE_METHODS:
            origin = hostname(urlsplit(headers["origin"]).netloc)
            if not allowed(origin, self.names):
                why = (403, "a request from another site's page is refused")
        if why is not None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _answer(send, *why)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:  # noqa: BLE001 (any error of a route: the page gets a short answer)
            if started or scope["type"] != "http":
                raise
            log.warning("%s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(err).__name__, err)
            await _answer(send, 500, "the server could not answer this request")


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
