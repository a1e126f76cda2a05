"""The MQTT wire protocol, version 1: topics and message codecs (pure, no I/O).

Topics (see docs/protocol.md)::

    edgeship/v1/req/<device>        device -> server   request (JSON)
    edgeship/v1/resp/<device>       server -> device   reply (framed header + body)
    edgeship/v1/hint                server -> all      retained "repository changed"
    edgeship/v1/state/<device>      device -> fleet    retained state
    edgeship/v1/presence/<device>   device -> fleet    retained online/offline (offline = last will)
    edgeship/v1/telemetry/<device>  device -> fleet
    edgeship/v1/events/<device>     device -> fleet

A server learns who asked from the topic, never from the payload: the broker's
ACL lets a device publish only to its own request topic, so a reply can only
go back to the device that asked.

Every decoder here is strict: size-bounded, exact keys, typed values. A
malformed message raises :class:`ProtocolError` and nothing else.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Literal, Union

from agent import safejson
from agent.config import KiB
from agent.errors import BadData, JsonError

PROTOCOL_VERSION = 1
PREFIX = "edgeship/v1"

DEFAULT_BLOCK = 256 * KiB
"""Bytes per block request of python-tuf's target reads (agent.trust.MqttFetcher); bundle downloads
ask for UpdateLimits.request_bytes."""
MAX_BLOCK = 1024 * KiB
MAX_REQUEST_BYTES = 1024
MAX_HEADER_BYTES = 4096
MAX_HINT_BYTES = 1024
MAX_OFFSET = 1 << 40

REPLY_MAGIC = b"ES1\x00"
_HDR = struct.Struct(">4sI")

SERVER_IDENTITIES = frozenset({"edgeship-server", "edgeship-fleet"})

_DEVICE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ID_RE = re.compile(r"[0-9a-f]{8,32}")
# Top-level TUF metadata, optionally version-prefixed: "timestamp.json", "3.root.json".
_META_RE = re.compile(r"(?:[1-9][0-9]{0,9}\.)?(?:root|timestamp|snapshot|targets)\.json")
# A target path: 1-4 components of [A-Za-z0-9._-], none of them "." or "..".
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")

Status = Literal["ok", "not_found", "bad_request", "error"]
STATUSES: tuple[Status, ...] = ("ok", "not_found", "bad_request", "error")


class ProtocolError(BadData):
    """A message on the wire is malformed, oversized or of an unknown version."""


# --- topics ---------------------------------------------------------------


def check_device_id(device: str) -> str:
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device) or device in {".", ".."}:
        raise ProtocolError(f"invalid device id {device!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    if device in SERVER_IDENTITIES:
        raise ProtocolError(f"device id {device!r} is reserved for the server side")
    return device


def req_topic(device: str) -> str:
    return f"{PREFIX}/req/{check_device_id(device)}"


def resp_topic(device: str) -> str:
    return f"{PREFIX}/resp/{check_device_id(device)}"


def state_topic(device: str) -> str:
    return f"{PREFIX}/state/{check_device_id(device)}"


def presence_topic(device: str) -> str:
    return f"{PREFIX}/presence/{check_device_id(device)}"


def telemetry_topic(device: str) -> str:
    return f"{PREFIX}/telemetry/{check_device_id(device)}"


def events_topic(device: str) -> str:
    return f"{PREFIX}/events/{check_device_id(device)}"


HINT_TOPIC = f"{PREFIX}/hint"
REQ_FILTER = f"{PREFIX}/req/+"
SHARED_GROUP = "edgeship"
SHARED_REQ_FILTER = f"$share/{SHARED_GROUP}/{REQ_FILTER}"
STATE_FILTER = f"{PREFIX}/state/+"
PRESENCE_FILTER = f"{PREFIX}/presence/+"
TELEMETRY_FILTER = f"{PREFIX}/telemetry/+"


def device_from_topic(topic: str, kind: str) -> str:
    """``edgeship/v1/<kind>/<device>`` -> device, or ProtocolError."""
    head = f"{PREFIX}/{kind}/"
    if not topic.startswith(head):
        raise ProtocolError(f"topic {topic!r} is not a {kind} topic")
    return check_device_id(topic[len(head):])


# --- names ----------------------------------------------------------------


def check_meta_name(name: object) -> str:
    if not isinstance(name, str) or not _META_RE.fullmatch(name):
        raise ProtocolError(f"invalid metadata name {name!r}")
    return name


def check_target_path(path: object) -> str:
    if not isinstance(path, str) or not 0 < len(path) <= 512:
        raise ProtocolError(f"invalid target path {path!r}")
    parts = path.split("/")
    if len(parts) > 4 or not all(_SEGMENT_RE.fullmatch(p) for p in parts):
        raise ProtocolError(f"invalid target path {path!r}")
    return path


# --- requests -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MetaRequest:
    id: str
    name: str
    op: Literal["meta"] = "meta"


@dataclass(frozen=True, kw_only=True)
class BlockRequest:
    id: str
    path: str
    offset: int
    length: int
    op: Literal["block"] = "block"

    def __post_init__(self) -> None:
        _check_span(self.offset, self.length)


Request = Union[MetaRequest, BlockRequest]


def _check_int(value: object, what: str) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an integer, got {type(value).__name__}")
    return value


def _check_span(offset: int, length: int) -> None:
    if not 0 <= offset <= MAX_OFFSET:
        raise ProtocolError(f"offset {offset} out of range")
    if not 0 < length <= MAX_BLOCK:
        raise ProtocolError(f"block length {length} out of range 1..{MAX_BLOCK}")


def _check_id(value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ProtocolError(f"invalid request id {value!r}")
    return value


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_FLAT_DECODER = json.JSONDecoder(object_pairs_hook=tuple)
"""Made once: ``json.dumps``/``json.loads`` with any option build a new one per call, a measurable
share of the device's per-block work (128 requests and replies per 64 MiB, 256 with 256 KiB requests)."""


def _wire_json(obj: dict[str, object]) -> bytes:
    """Compact ASCII JSON for messages (json's C encoder; files use the canonical safejson.dumps)."""
    return _ENCODER.encode(obj).encode("ascii")


def encode_request(req: Request) -> bytes:
    body: dict[str, object] = {"v": PROTOCOL_VERSION, "id": _check_id(req.id), "op": req.op}
    if isinstance(req, MetaRequest):
        body["name"] = check_meta_name(req.name)
    else:
        body.update(path=check_target_path(req.path), offset=req.offset, length=req.length)
    return _wire_json(body)


def _loads(data: bytes, limit: int, what: str) -> dict[str, object]:
    if len(data) > limit:
        raise ProtocolError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    try:
        obj = _parse_json(bytes(data), limit)
    except JsonError as e:
        raise ProtocolError(f"{what}: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: unsupported protocol version {obj.get('v')!r}")
    return obj


def _parse_json(data: bytes, limit: int) -> object:
    """A message's JSON. Every well-formed message is one flat object without escapes: json's C
    parser alone reads it, with duplicate keys still refused (a bad value type is caught by the
    field checks after). Anything else (nesting, escapes, bad UTF-8) goes to the strict parser."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if not text or "\\" in text or text.count("{") + text.count("[") != 1:
        return safejson.loads(data, max_bytes=limit, max_depth=4)
    try:
        pairs = _FLAT_DECODER.decode(text)
    except ValueError as e:  # JSONDecodeError, or an integer past Python's digit limit
        raise JsonError(f"invalid JSON: {e}") from None
    if type(pairs) is not tuple:
        return pairs
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise JsonError("duplicate key")
    return obj


def _exact_keys(obj: dict[str, object], keys: set[str], what: str) -> None:
    if set(obj) != keys:
        extra, missing = sorted(set(obj) - keys), sorted(keys - set(obj))
        raise ProtocolError(f"{what}: unexpected fields {extra} / missing fields {missing}")


def decode_request(data: bytes) -> Request:
    obj = _loads(data, MAX_REQUEST_BYTES, "request")
    op = obj.get("op")
    if op == "meta":
        _exact_keys(obj, {"v", "id", "op", "name"}, "meta request")
        return MetaRequest(id=_check_id(obj["id"]), name=check_meta_name(obj["name"]))
    if op == "block":
        _exact_keys(obj, {"v", "id", "op", "path", "offset", "length"}, "block request")
        return BlockRequest(
            id=_check_id(obj["id"]),
            path=check_target_path(obj["path"]),
            offset=_check_int(obj["offset"], "offset"),
            length=_check_int(obj["length"], "length"),
        )
    raise ProtocolError(f"unknown request op {op!r}")


# --- replies --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Reply:
    """A server reply. For a block, ``offset`` echoes the request and ``total``
    is the size of the whole file; for metadata, ``body`` is the whole file."""

    id: str
    status: Status
    body: bytes | memoryview = b""
    message: str = ""
    offset: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ProtocolError(f"unknown reply status {self.status!r}")
        if self.status != "ok" and self.body:
            raise ProtocolError("an error reply carries no body")


def encode_reply_head(*, id: str, status: Status, length: int, offset: int = 0, total: int = 0,
                      message: str = "") -> bytes:
    """The frame of a reply up to its body (magic, header length, header): a server can read a
    ``length``-byte body straight into a buffer behind it instead of concatenating."""
    header = _wire_json({"v": PROTOCOL_VERSION, "id": id, "status": status, "message": message[:500],
                         "offset": offset, "length": length, "total": total})
    return _HDR.pack(REPLY_MAGIC, len(header)) + header


def encode_reply(reply: Reply) -> bytes:
    return encode_reply_head(id=reply.id, status=reply.status, length=len(reply.body), offset=reply.offset,
                             total=reply.total, message=reply.message) + reply.body


def decode_reply(data: bytes | memoryview, *, max_body: int = MAX_BLOCK) -> Reply:
    if len(data) < _HDR.size:
        raise ProtocolError(f"reply of {len(data)} bytes is shorter than its frame header")
    magic, hlen = _HDR.unpack_from(data)
    if magic != REPLY_MAGIC:
        raise ProtocolError("reply does not start with the edgeship v1 frame marker")
    if hlen > MAX_HEADER_BYTES or _HDR.size + hlen > len(data):
        raise ProtocolError(f"reply header length {hlen} is out of bounds")
    obj = _loads(bytes(data[_HDR.size:_HDR.size + hlen]), MAX_HEADER_BYTES, "reply header")
    _exact_keys(obj, {"v", "id", "status", "message", "offset", "length", "total"}, "reply header")
    body = memoryview(data)[_HDR.size + hlen:]  # a view: a block's bytes are not copied again here
    length = _check_int(obj["length"], "length")
    if length != len(body):
        raise ProtocolError(f"reply header says {length} body bytes, message carries {len(body)}")
    if len(body) > max_body:
        raise ProtocolError(f"reply body of {len(body)} bytes is over the {max_body}-byte limit")
    message = obj["message"]
    status = obj["status"]
    if not isinstance(message, str) or not isinstance(status, str):
        raise ProtocolError("reply header: status and message must be strings")
    offset = _check_int(obj["offset"], "offset")
    total = _check_int(obj["total"], "total")
    if not (0 <= offset <= MAX_OFFSET and 0 <= total <= MAX_OFFSET):
        raise ProtocolError("reply header: offset or total out of range")
    return Reply(id=_check_id(obj["id"]), status=status, body=body, message=message[:500],  # type: ignore[arg-type]
                 offset=offset, total=total)


# --- the retained hint ----------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Hint:
    """"The repository changed": carries the timestamp version, which a device
    compares with what it trusts. It is a hint only; nothing in it is trusted."""

    timestamp_version: int


def encode_hint(hint: Hint) -> bytes:
    return _wire_json({"v": PROTOCOL_VERSION, "timestamp_version": hint.timestamp_version})


def decode_hint(data: bytes) -> Hint:
    obj = _loads(data, MAX_HINT_BYTES, "hint")
    _exact_keys(obj, {"v", "timestamp_version"}, "hint")
    version = _check_int(obj["timestamp_version"], "timestamp_version")
    if not 0 < version < 1 << 62:
        raise ProtocolError("hint: timestamp_version out of range")
    return Hint(timestamp_version=version)
