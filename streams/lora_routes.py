"""``/loras``: the server's per-session LoRA library over HTTP (token-guarded, :mod:`.auth`).

- ``GET /loras`` — ``{"loras": [{name, source, slot, rank, layers, bytes, slot_bytes,
  ignored_text_encoder_keys, sessions}], "capacity": {max_loras, max_rank, slots_per_row,
  free_slots, slot_bytes, reserved_bytes} | null}`` (``null``: no library on this server).
- ``POST /loras`` with ``{"name", "source", "weight_name"?}`` — loads one (a ``.safetensors``
  file, a folder or a HF id as the server sees it); ``201`` with the loaded LoRA.
- ``DELETE /loras/{name}`` — unloads it; ``200`` with what was unloaded.

Errors are ``{"error", "field", "limit"?}``: ``400`` for a bad body or a file the loader
refuses (its message: no such file, a convolution LoRA, another family's shapes, a rank
above the server's maximum …), ``404`` for an unknown name, ``409`` for a name already
loaded, a full store (``limit``: the slots) and a LoRA that sessions use (``limit``: how many),
and for a server without a library.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from livediff.exceptions import (
    ConflictError,
    LivediffError,
    ModelLoadError,
    NotFoundError,
    ParameterError,
)
from livediff.streams import app_keys

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
BODY_KEYS = frozenset({"name", "source", "weight_name"})


def add_lora_routes(app: web.Application) -> None:
    app.router.add_get("/loras", list_loras)
    app.router.add_post("/loras", load_lora)
    app.router.add_delete("/loras/{name}", unload_lora)


async def list_loras(request: web.Request) -> web.Response:
    return web.json_response(request.app[app_keys.ENGINE].loras())


async def load_lora(request: web.Request) -> web.Response:
    try:
        body = await _body(request)
        loaded = await request.app[app_keys.ENGINE].load_lora(
            body["name"], body["source"], weight_name=body.get("weight_name")
        )
    except LivediffError as exc:
        return _refusal(exc, "load")
    log.info("LoRA %r loaded by %s into slot %d", loaded["name"], request.remote, loaded["slot"])
    return web.json_response(loaded, status=201)


async def unload_lora(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        unloaded = await request.app[app_keys.ENGINE].unload_lora(name)
    except LivediffError as exc:
        return _refusal(exc, "unload")
    log.info("LoRA %r unloaded by %s", name, request.remote)
    return web.json_response(unloaded)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ParameterError(
            f"the body is over {MAX_BODY_BYTES} bytes", field="body", limit=MAX_BODY_BYTES
        )
    try:
        body = json.loads(await request.text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParameterError(f"the body is not JSON: {exc}", field="body") from None
    if not isinstance(body, dict):
        raise ParameterError('expected {"name", "source", "weight_name"?}', field="body")
    unknown = sorted(set(body) - BODY_KEYS)
    if unknown:
        raise ParameterError(
            f"unknown key {unknown[0]!r}: a LoRA is loaded from name, source and weight_name",
            field=unknown[0],
        )
    for key in ("name", "source"):
        if key not in body:
            raise ParameterError(f"{key} is missing", field=key)
    return body


def _refusal(exc: LivediffError, what: str) -> web.Response:
    if isinstance(exc, NotFoundError):
        status = 404
    elif isinstance(exc, ConflictError):
        status = 409
    elif isinstance(exc, (ParameterError, ModelLoadError)):
        status = 400
    else:
        raise exc
    log.info("LoRA %s refused (%d): %s", what, status, exc)
    answer: dict[str, Any] = {"error": str(exc), "field": exc.field}
    if exc.limit is not None:
        answer["limit"] = exc.limit
    return web.json_response(answer, status=status)
