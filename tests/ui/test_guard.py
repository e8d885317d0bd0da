"""The UI server's guard (`ui.guard`), driven as an ASGI server drives it: no Gradio, no network."""

from __future__ import annotations

import asyncio
import json
import socket

from multifusion.ui.guard import Guard, allowed, host_names, hostname


def test_which_hosts_pass():
    names = host_names("127.0.0.1")
    assert hostname("127.0.0.1:7860") == "127.0.0.1" and hostname("[::1]:7860") == "::1" and hostname("LocalHost") == "localhost"
    assert all(allowed(h, names) for h in ("127.0.0.1", "::1", "localhost", "192.168.1.20"))  # IP literals cannot be rebound
    assert not allowed("rebind.example", names) and not allowed("", names)
    assert socket.gethostname().lower() in host_names("0.0.0.0")  # every interface: the machine's own name too


def _call(headers: dict[str, str], method: str = "GET", app=None) -> tuple[int, dict | None]:
    sent = []

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http",
        "method": method,
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(Guard(app or ok, host_names("127.0.0.1"))(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], (json.loads(body) if body.startswith(b"{") else None)


def test_the_guard_refuses_foreign_hosts_and_cross_site_posts_and_shortens_errors():
    assert _call({"Host": "127.0.0.1:7860"})[0] == 200
    status, body = _call({"Host": "rebind.example:7860"})
    assert status == 400 and "unknown host 'rebind.example'" in body["detail"]
    # a post from another site's page is refused; one from the page itself, or a GET, passes
    assert _call({"Host": "127.0.0.1:7860", "Origin": "http://elsewhere.example"}, "POST")[0] == 403
    assert _call({"Host": "127.0.0.1:7860", "Origin": "null"}, "POST")[0] == 403
    assert _call({"Host": "127.0.0.1:7860", "Origin": "http://127.0.0.1:7860"}, "POST")[0] == 200
    assert _call({"Host": "127.0.0.1:7860", "Origin": "http://elsewhere.example"}, "GET")[0] == 200

    async def broken(scope, receive, send):
        raise KeyError(9999)  # as Gradio's routes do for a function index the page does not have

    status, body = _call({"Host": "127.0.0.1:7860"}, "POST", app=broken)
    assert status == 500 and body == {"detail": "the server could not answer this request"}
