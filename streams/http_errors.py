"""JSON error answers for the API routes: ``{"error": "<what was wrong>"}`` with a 4xx/5xx status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON_ROUTES = ("/offer", "/stats", "/loras")


def json_error(
    status: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    field: str | None = None,
) -> web.Response:
    """``{"error": message}``, with the ``field`` to blame when one is known."""
    body = {"error": message} if field is None else {"error": message, "field": field}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (405, 413 …) on the JSON routes come back as JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if request.path not in JSON_ROUTES or exc.status < 400:
            raise
        return json_error(
            exc.status,
            exc.reason,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
