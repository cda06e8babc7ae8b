"""Security headers on every HTTP answer of the server (not on websocket upgrades).

- ``Content-Security-Policy``: the page's own scripts, styles and connections only (no
  inline script, no third party, no plugins); it may be framed only by its own origin.
  ``'unsafe-eval'`` is allowed because browser automation (Playwright's ``wait_for_function``,
  used by the browser tests and ``bench/e2e.py``) evaluates strings in the page; the page
  itself never evaluates strings, and inline or third-party scripts stay blocked.
  Media from the camera and the peer connection (``srcObject``) is not a URL and needs no
  source; ``blob:``/``mediastream:`` cover snapshots.
- ``X-Content-Type-Options: nosniff``: files are what their ``Content-Type`` says.
- ``Referrer-Policy: no-referrer``: a ``?token=`` in the page's URL never travels in a
  ``Referer`` header.
"""

from __future__ import annotations

from aiohttp import web

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-eval'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob: mediastream:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` signal handler."""
    if response.status == 101:
        return
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
