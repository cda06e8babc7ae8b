"""Live-parameter control messages, shared by the websocket and the WebRTC data channel.

A control message is one JSON object (UTF-8 text) whose keys are live generation parameters::

    {"prompt": "a watercolor painting", "negative_prompt": "blurry", "seed": 7,
     "strength": 0.6, "guidance_scale": 1.2, "delta": 1.0, "id": 12}

- Parameter keys: the control keys of :class:`~livediff.engine.config.GenerationParams` (its
  settings declared ``live``; README's settings reference lists them): ``prompt`` (a string, or
  ``[[text, weight], ...]`` to blend), ``negative_prompt``, ``blend``, ``seed``, ``strength``,
  ``steps``, ``t_index_list``, ``guidance_scale``, ``delta``, ``similarity_threshold`` (``null``
  turns the filter off), ``max_skip_frames``. Every key is optional; at least one must be present.
- ``id`` (optional, a string or an integer) is echoed in the reply, to match replies to requests.

Each control message gets exactly one reply: ``{"ok": true}`` once the change is in effect for
the next frame, or ``{"error": "<what was wrong>"}`` and nothing changed (plus ``"id"`` when
the request had one). A refused change also names the key to blame, when there is one
(``"field": "guidance_scale"``), and the values the session keeps for the keys it tried to
change (``"current": {"guidance_scale": 1.0}``), so a client can show them again. Problems
with a control message never close the connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from livediff.engine.config import GenerationParams
from livediff.exceptions import ParameterError, ProtocolError
from livediff.settings import json_values, names, query_values
from livediff.streams.json_text import loads_bounded
from livediff.wire import error_reply as error_reply  # the reply builders are the wire's
from livediff.wire import ok_reply as ok_reply


@dataclass(frozen=True)
class ControlRequest:
    """A parsed control message: the parameter changes and the optional request id."""

    changes: dict[str, Any] = field(default_factory=dict)
    id: str | int | None = None


def parse_control(text: str | bytes, *, max_bytes: int = 64 * 1024) -> ControlRequest:
    """Parse one control message: JSON, an object, a valid ``id``, at least one other key.

    :class:`ParameterError` says what is wrong. Parameter names are checked afterwards, by
    :func:`session_params`, so that its error can carry the request's ``id``.
    """
    if len(text) > max_bytes:
        raise ParameterError(
            f"control message of {len(text)} bytes is too large: at most {max_bytes}"
        )
    try:
        message = loads_bounded(text, what="control message")
    except ProtocolError as exc:
        raise ParameterError(str(exc)) from None
    if not isinstance(message, dict):
        raise ParameterError(f"a control message must be a JSON object, not {_json_type(message)}")
    request_id = message.pop("id", None)
    if request_id is not None and (
        isinstance(request_id, bool)
        or not isinstance(request_id, (str, int))
        or (isinstance(request_id, int) and abs(request_id) >= 2**53)
        or (isinstance(request_id, str) and (len(request_id) > 128 or not _is_unicode(request_id)))
    ):
        raise ParameterError(
            "id must be an integer below 2**53 or a string of at most 128 characters", field="id"
        )
    if not message:
        raise ParameterError(
            "a control message needs at least one of: "
            + ", ".join(sorted(names(GenerationParams, "control")))
        )
    return ControlRequest(message, request_id)


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def session_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check parameter names (control keys) and JSON shapes; value ranges are checked by the engine."""
    return json_values(GenerationParams, values, "control")


def params_from_query(query: Mapping[str, str]) -> dict[str, Any]:
    """Session parameters from URL query strings (``?prompt=a%20cat&seed=3``), typed by declaration."""
    return query_values(GenerationParams, query)


def wire_params(params: GenerationParams) -> dict[str, Any]:
    """The live parameters as the protocol writes them (a single prompt as a string)."""
    prompt: Any = params.prompt
    if len(prompt) == 1 and prompt[0][1] == 1.0:
        prompt = prompt[0][0]
    else:
        prompt = [[text, weight] for text, weight in prompt]
    values = {f.name: getattr(params, f.name) for f in fields(params)}
    values.update(
        prompt=prompt,
        blend=params.blend.value,
        t_index_list=None if params.t_index_list is None else list(params.t_index_list),
        controlnets=[use.as_json() for use in params.controlnets],
        loras=[use.as_json() for use in params.loras],
    )
    return values


def refusal_reply(exc: ParameterError, request: ControlRequest, params: GenerationParams) -> str:
    """The reply to a control request the session refused: its error, the field and what stays."""
    live = wire_params(params)
    current = {key: live[key] for key in request.changes if key in live}
    return error_reply(str(exc), request.id, field=exc.field, current=current)
