"""Wire protocol codecs: round trips, strictness, and fuzzing (only ProtocolError escapes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import (
    MAX_BLOCK, BlockRequest, Hint, MetaRequest, ProtocolError, Reply, check_device_id, check_target_path,
    decode_hint, decode_reply, decode_request, device_from_topic, encode_hint, encode_reply, encode_request,
    req_topic, resp_topic,
)

RID = "0123456789abcdef"


def test_round_trips() -> None:
    for req in (MetaRequest(id=RID, name="3.root.json"), MetaRequest(id=RID, name="timestamp.json"),
                BlockRequest(id=RID, path="digits/ab.digits-1.0.0.edge", offset=262144, length=262144)):
        assert decode_request(encode_request(req)) == req
    rep = Reply(id=RID, status="ok", body=b"\x00" * 10, offset=20, total=30)
    assert decode_reply(encode_reply(rep)) == rep
    assert decode_hint(encode_hint(Hint(timestamp_version=7))) == Hint(timestamp_version=7)


@pytest.mark.parametrize("name", ["../root.json", "root", "0.root.json", "/etc/passwd", "x.json", "root.json/",
                                  "1.targets.json.bak", "timestamp.JSON", "%2e%2e.json"])
def test_meta_names_outside_the_set_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError):
        decode_request(b'{"v":1,"id":"%s","op":"meta","name":"%s"}' % (RID.encode(), name.encode()))


@pytest.mark.parametrize("path", ["../x", "a/../b", "/abs", "a//b", ".", "a/./b", "a/b/c/d/e", "x\\y", "", ".hidden"])
def test_target_paths_that_could_escape_are_refused(path: str) -> None:
    with pytest.raises(ProtocolError):
        check_target_path(path)


@pytest.mark.parametrize("body", [
    b'{"v":1,"id":"%s","op":"block","path":"a/b","offset":0,"length":%d}' % (RID.encode(), MAX_BLOCK + 1),
    b'{"v":1,"id":"%s","op":"block","path":"a/b","offset":-1,"length":10}' % RID.encode(),
    b'{"v":1,"id":"%s","op":"block","path":"a/b","offset":0,"length":0}' % RID.encode(),
    b'{"v":1,"id":"%s","op":"block","path":"a/b","offset":0,"length":1.5}' % RID.encode(),
    b'{"v":1,"id":"%s","op":"block","path":"a/b","offset":true,"length":1}' % RID.encode(),
    b'{"v":2,"id":"%s","op":"meta","name":"root.json"}' % RID.encode(),
    b'{"v":1,"id":"XYZ","op":"meta","name":"root.json"}',
    b'{"v":1,"id":"%s","op":"meta","name":"root.json","extra":1}' % RID.encode(),
    b'{"v":1,"id":"%s","op":"delete","name":"root.json"}' % RID.encode(),
    b'{"v":1,"id":"%s","op":"meta","name":"root.json","name":"x"}' % RID.encode(),
    b"[]", b"", b"\xff\xfe", b"{" * 100, b'{"v":1,"pad":"' + b"x" * 2000 + b'"}',
])
def test_bad_requests_are_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(body)


def test_reply_frame_is_checked() -> None:
    good = encode_reply(Reply(id=RID, status="ok", body=b"abc", total=3))
    for bad in (good[:-1], good + b"x", b"XX" + good[2:], good[:6], b""):
        with pytest.raises(ProtocolError):
            decode_reply(bad)
    with pytest.raises(ProtocolError):
        decode_reply(good, max_body=2)


def test_device_ids_and_topics() -> None:
    assert req_topic("pi-01") == "edgeship/v1/req/pi-01"
    assert device_from_topic(resp_topic("pi-01"), "resp") == "pi-01"
    for bad in ("", "a/b", "+", "#", "edgeship-server", "edgeship-fleet", "x" * 65, "..", "dév"):
        with pytest.raises(ProtocolError):
            check_device_id(bad)
    with pytest.raises(ProtocolError):
        device_from_topic("edgeship/v1/req/a/b", "req")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_decoders_raise_only_protocol_error(data: bytes) -> None:
    for decode in (decode_request, decode_reply, decode_hint):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "id", "op", "name", "path", "offset", "length", "x"]),
                       st.one_of(st.integers(-5, 2**41), st.text(max_size=20), st.none(), st.booleans()),
                       max_size=7))
def test_fuzz_request_objects(obj: dict[str, object]) -> None:
    import json
    try:
        decode_request(json.dumps(obj).encode())
    except ProtocolError:
        pass
