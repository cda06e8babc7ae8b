"""Checks of an offer's SDP before aiortc sees it, so that a bad offer gets a message that says what is wrong.

aiortc's parser trusts its input: a malformed line fails deep inside it with a bare
``AssertionError`` or ``IndexError``. :func:`check_offer_sdp` reads the text line by line
(RFC 8866's ``<type>=<value>`` grammar and the attributes aiortc parses) and raises
:class:`~livediff.exceptions.OfferError` naming the line and what was expected. It checks
shape, not meaning: an SDP that passes can still be refused by aiortc, and that error is
reported as aiortc's.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from livediff.exceptions import OfferError

MAX_LINES = 2000
_LINE = re.compile(r"^[a-z]=")
_MEDIA = re.compile(r"^m=([^ ]+) ([0-9]+)(?:/[0-9]+)? ([A-Za-z/]+) (.+)$")
_CONNECTION = re.compile(r"^IN (IP4|IP6) ([^ ]+)$")
_SETUP_ROLES = frozenset({"active", "passive", "actpass"})
FMTP_INTEGER_PARAMETERS = frozenset(
    {"apt", "max-fr", "max-fs", "maxplaybackrate", "minptime", "stereo", "useinbandfec"}
)
VIDEO_CODECS = frozenset({"vp8", "h264"})
FORBIDDEN_PAYLOAD_TYPES = range(64, 96)  # RFC 5761: they clash with RTCP packet types


def _excerpt(line: str, limit: int = 60) -> str:
    text = line if len(line) <= limit else line[: limit - 1] + "…"
    return ascii(text)  # never raw control characters or lone surrogates in an answer


def _integer(text: str, low: int = 0, high: int = 2**32) -> bool:
    return text.isascii() and text.isdigit() and low <= int(text) <= high


def _check_candidate(value: str) -> str | None:
    bits = value.split()
    if len(bits) < 8:
        return "a=candidate needs at least 8 fields: foundation component protocol priority ip port typ type"
    if not (_integer(bits[1], 1, 256) and _integer(bits[3]) and _integer(bits[5], 0, 65535)):
        return "a=candidate's component, priority and port must be integers"
    if bits[6] != "typ":
        return "a=candidate's seventh field must be 'typ'"
    for i in range(8, len(bits) - 1, 2):
        if bits[i] == "rport" and not _integer(bits[i + 1], 0, 65535):
            return "a=candidate's rport must be a port number"
    return None


def _check_pair(name: str, integer_first: bool = False) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        first, sep, rest = value.partition(" ")
        if not sep or not rest.strip() or (integer_first and not _integer(first, 0, 65535)):
            head = "<integer>" if integer_first else "<name>"
            return f"a={name} must be '{head} <value>'"
        return None

    return check


def _check_rtpmap(value: str) -> str | None:
    payload, sep, description = value.partition(" ")
    bits = description.split("/")
    if not sep or not _integer(payload, 0, 127) or len(bits) < 2 or not _integer(bits[1], 1):
        return "a=rtpmap must be '<payload type> <codec>/<clock rate>[/<channels>]'"
    if len(bits) > 2 and not _integer(bits[2], 1, 255):
        return "a=rtpmap's channel count must be an integer"
    return None


def _check_ssrc(value: str) -> str | None:
    ssrc, sep, description = value.partition(" ")
    if not sep or not _integer(ssrc) or ":" not in description:
        return "a=ssrc must be '<ssrc> <attribute>:<value>'"
    return None


def _check_ssrc_group(value: str) -> str | None:
    bits = value.split()
    if len(bits) < 2 or not all(_integer(b) for b in bits[1:]):
        return "a=ssrc-group must be '<semantics> <ssrc> ...'"
    return None


def _check_extmap(value: str) -> str | None:
    bits = value.split()
    ident = bits[0].split("/")[0] if bits else ""
    if len(bits) != 2 or not _integer(ident, 1, 255):
        return "a=extmap must be '<id>[/<direction>] <uri>'"
    return None


def _check_setup(value: str) -> str | None:
    return None if value in _SETUP_ROLES else "a=setup must be active, passive or actpass"


def _check_integer_value(name: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if _integer(value.split(" ", 1)[0]) else f"a={name} must be an integer"

    return check


def _check_rtcp(value: str) -> str | None:
    port, _, host = value.partition(" ")
    if not _integer(port, 0, 65535) or (host and not _CONNECTION.match(host)):
        return "a=rtcp must be '<port> [IN IP4|IP6 <address>]'"
    return None


def _check_fmtp(value: str) -> str | None:
    payload, sep, parameters = value.partition(" ")
    if not sep or not _integer(payload, 0, 127):
        return "a=fmtp must be '<payload type> <parameters>'"
    for parameter in parameters.split(";"):
        name, equals, number = parameter.partition("=")
        if equals and name in FMTP_INTEGER_PARAMETERS and not _integer(number.strip()):
            return f"a=fmtp parameter {name} must be an integer"
    return None


def _check_rtcp_fb(value: str) -> str | None:
    bits = value.split(" ", 2)
    if len(bits) < 2 or not (bits[0] == "*" or _integer(bits[0], 0, 127)):
        return "a=rtcp-fb must be '<payload type or *> <type> [<parameter>]'"
    return None


_ATTRIBUTES: dict[str, Callable[[str], str | None]] = {
    "candidate": _check_candidate,
    "fingerprint": _check_pair("fingerprint"),
    "extmap": _check_extmap,
    "rtpmap": _check_rtpmap,
    "fmtp": _check_fmtp,
    "rtcp-fb": _check_rtcp_fb,
    "sctpmap": _check_pair("sctpmap", integer_first=True),
    "sctp-port": _check_integer_value("sctp-port"),
    "max-message-size": _check_integer_value("max-message-size"),
    "ssrc": _check_ssrc,
    "ssrc-group": _check_ssrc_group,
    "setup": _check_setup,
    "rtcp": _check_rtcp,
}


def _check_attribute(line: str) -> str | None:
    name, sep, value = line[2:].partition(":")
    check = _ATTRIBUTES.get(name)
    if check is None:
        return None
    if not sep:
        return f"a={name} needs a value (a={name}:<value>)"
    return check(value)


def _check_media_line(line: str, payload_types: set[int]) -> str | None:
    match = _MEDIA.match(line)
    if match is None:
        return "a media line must be 'm=<kind> <port> <protocol> <formats>'"
    kind, formats = match.group(1), match.group(4).split()
    if kind in ("audio", "video"):
        if not all(_integer(f, 0, 127) for f in formats):
            return f"m={kind} formats must be payload types in [0, 127]"
        forbidden = [f for f in formats if int(f) in FORBIDDEN_PAYLOAD_TYPES]
        if forbidden:
            return f"m={kind} uses payload type {forbidden[0]}, which RTCP reserves (64–95)"
        payload_types.update(int(f) for f in formats)
    return None


def _check_video_codecs(lines: list[tuple[int, str]]) -> None:
    """A video section must offer a codec the server decodes and encodes."""
    codecs = [
        line[9:].split(" ", 1)[-1].split("/")[0]
        for _, line in lines
        if line.startswith("a=rtpmap:")
    ]
    media = [c for c in codecs if c.lower() not in ("rtx", "red", "ulpfec", "flexfec-03")]
    if not any(c.lower() in VIDEO_CODECS for c in media):
        offered = ", ".join(dict.fromkeys(media)) or "none"
        raise OfferError(
            f"the offer's video section has no codec the server supports (VP8, H264); it offers: "
            f"{_excerpt(offered)}",
            field="sdp",
        )


def _check_section_formats(lines: list[tuple[int, str]]) -> None:
    """An ``a=fmtp`` line must name a payload type that an ``a=rtpmap`` line of its section defines."""
    mapped = {line[9:].split(" ", 1)[0] for _, line in lines if line.startswith("a=rtpmap:")}
    for number, line in lines:
        if line.startswith("a=fmtp:") and line[7:].split(" ", 1)[0] not in mapped:
            raise OfferError(
                f"SDP line {number} ({_excerpt(line)}): a=fmtp names a payload type that no "
                "a=rtpmap line of its media section defines",
                field="sdp",
            )


def _first_media(lines: list[str]) -> int:
    return next((i for i, line in enumerate(lines) if line.startswith("m=")), len(lines))


def check_offer_sdp(sdp: str) -> None:
    """Raise :class:`OfferError` naming the first line that aiortc could not parse, or what is missing."""
    lines = [line.rstrip("\r") for line in sdp.strip().split("\n")]
    if len(lines) > MAX_LINES:
        raise OfferError(
            f"the SDP has {len(lines)} lines: at most {MAX_LINES}", field="sdp", limit=MAX_LINES
        )
    if lines[0].strip() != "v=0":
        raise OfferError(
            f"the SDP must start with 'v=0' (line 1 is {_excerpt(lines[0])}): "
            "is this a session description?",
            field="sdp",
        )
    seen: set[str] = set()
    media: list[str] = []
    sections: list[list[tuple[int, str]]] = []
    payload_types: set[int] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        problem: str | None = None
        if not _LINE.match(line):
            problem = "every SDP line must be '<letter>=<value>'"
        elif line.startswith("v=") and number > 1:
            problem = "only the first line may be a version line"
        elif line.startswith("m="):
            problem = _check_media_line(line, payload_types)
            media.append(line.split(" ", 1)[0][2:])
            sections.append([])
        elif line.startswith("c=") and not _CONNECTION.match(line[2:]):
            problem = "a connection line must be 'c=IN IP4 <address>' or 'c=IN IP6 <address>'"
        elif line.startswith("a="):
            problem = _check_attribute(line)
        if problem is not None:
            raise OfferError(f"SDP line {number} ({_excerpt(line)}): {problem}", field="sdp")
        if sections:
            sections[-1].append((number, line))
        else:
            seen.add(line[0])
    session_setup = any(line.startswith("a=setup:") for line in lines[: _first_media(lines)])
    for kind, section in zip(media, sections, strict=True):
        _check_section_formats(section)
        if kind == "video" and not any(line.startswith("m=video 0 ") for _, line in section[:1]):
            _check_video_codecs(section)
        if not session_setup and not any(line.startswith("a=setup:") for _, line in section):
            raise OfferError(
                f"the SDP's {kind} section has no DTLS role (a=setup:actpass, active or passive)",
                field="sdp",
            )
    missing = [f"'{t}='" for t in "ost" if t not in seen]
    if missing:
        raise OfferError(
            f"the SDP's session part lacks {', '.join(missing)} (origin, name and timing lines)",
            field="sdp",
        )
    if "video" not in media:
        found = ", ".join(media) if media else "no media sections at all"
        raise OfferError(
            f"the offer has no video section ({found}): add a sendrecv video transceiver",
            field="sdp",
        )
    if not all(
        any(line.startswith(key) for line in lines) for key in ("a=ice-ufrag:", "a=ice-pwd:")
    ):
        raise OfferError("the SDP has no ICE credentials (a=ice-ufrag, a=ice-pwd)", field="sdp")
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise OfferError("the SDP has no DTLS fingerprint (a=fingerprint)", field="sdp")
