"""Bounded JSON: every rule of safejson.loads, and the canonical form of safejson.dumps."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import safejson
from agent.errors import JsonError


def load(data: bytes, *, max_bytes: int = 1 << 20, max_depth: int = 32, what: str = "manifest.json") -> Any:
    return safejson.loads(data, max_bytes=max_bytes, max_depth=max_depth, what=what)


def rejects(data: bytes, phrase: str, **kw: Any) -> JsonError:
    with pytest.raises(JsonError, match=phrase) as info:
        load(data, **kw)
    assert str(info.value).startswith(kw.get("what", "manifest.json") + ": ")
    return info.value


def test_valid_documents() -> None:
    assert load(b'{"a": [1, -2, 3.5, true, false, null, "x\\u00e9\\ud83d\\ude00"], "b": {}}') == {
        "a": [1, -2, 3.5, True, False, None, "x\u00e9\U0001f600"],
        "b": {},
    }
    assert load(b"  42 \n") == 42
    assert load('"caf\u00e9 \U0001f600"'.encode()) == "caf\u00e9 \U0001f600"
    assert load(b"-" + b"9" * 100) == -int("9" * 100)
    assert load(b"1e308") == 1e308


def test_size_is_checked_before_parsing() -> None:
    rejects(b"[" + b"1," * 600 + b"1]", r"1203 bytes is larger than the limit of 1000", max_bytes=1000)
    rejects(b"not even json" * 100, "larger than the limit", max_bytes=1000)  # no parse error: never parsed
    assert load(b"[1]", max_bytes=3) == [1]


def test_message_starts_with_what() -> None:
    rejects(b"{", "invalid JSON", what="model.sig")


def test_invalid_utf8() -> None:
    rejects(b'{"a": "\xff"}', "invalid UTF-8 at byte 7")
    rejects(b'"\xed\xa0\x80"', "invalid UTF-8")  # a UTF-8-encoded surrogate
    rejects(b'"\xc0\xaf"', "invalid UTF-8")  # overlong encoding of '/'
    rejects('{"a": 1}'.encode("utf-16"), "invalid UTF-8")


def test_bom() -> None:
    rejects(b'\xef\xbb\xbf{"a": 1}', "byte order mark")


@pytest.mark.parametrize(
    "data",
    [b"", b"   ", b"{", b'{"a" 1}', b"[1,]", b"{'a': 1}", b"[1] [2]", b'"\x01"', b"01", b"+1", b".5", b"[}",
     b'"\\x"', b"tru", b"]"],
)
def test_invalid_json(data: bytes) -> None:
    rejects(data, "invalid JSON")


def test_depth_limit() -> None:
    assert load(b"[" * 32 + b"]" * 32) is not None
    rejects(b"[" * 33 + b"]" * 33, "nested deeper than 32 levels")
    rejects(b'{"a":' * 33 + b"1" + b"}" * 33, "nested deeper than 32 levels")
    assert load(b'{"a": [{"b": []}]}', max_depth=4) == {"a": [{"b": []}]}
    rejects(b'{"a": [{"b": [[]]}]}', "nested deeper than 4 levels", max_depth=4)


def test_brackets_inside_strings_do_not_count() -> None:
    doc = json.dumps(["[[[[{{{{" * 50, '\\"[[[[', "\"]]]]"]).encode()
    assert load(doc, max_depth=1)[0].startswith("[[[[")
    rejects(b'["\\\\", [[]]]', "nested deeper than 2 levels", max_depth=2)  # an escaped backslash ends no string


def test_million_deep_document_is_rejected_quickly() -> None:
    data = b"[" * 1_000_000 + b"]" * 1_000_000
    start = time.monotonic()
    rejects(data, "nested deeper than 32 levels", max_bytes=len(data))
    assert time.monotonic() - start < 0.5


def test_million_deep_objects_and_unterminated_input() -> None:
    rejects(b'{"a":' * 1_000_000, "nested deeper than 32 levels", max_bytes=10**7)
    rejects(b"[" * 1_000_000, "nested deeper than 32 levels", max_bytes=10**7)


def test_depth_prescan_is_linear_on_hostile_strings() -> None:
    """Escaped quotes in an unterminated string must not make the pre-scan quadratic."""
    data = b'"' + b'\\"' * 400_000 + b"\\"
    start = time.monotonic()
    rejects(data, "invalid JSON", max_bytes=len(data))
    assert time.monotonic() - start < 1


def test_duplicate_keys() -> None:
    rejects(b'{"a": 1, "a": 2}', "duplicate key 'a'")
    rejects(b'{"x": {"k": 1, "k": 1}}', "duplicate key 'k'")
    rejects(b'{"\\u0061": 1, "a": 2}', "duplicate key 'a'")  # same key once decoded
    assert load(b'{"a": 1, "A": 2}') == {"a": 1, "A": 2}


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_constants(literal: bytes) -> None:
    rejects(b'{"x": ' + literal + b"}", f"{literal.decode()} is not allowed")


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400", b"1" * 400 + b".0"])
def test_numbers_overflowing_to_infinity(literal: bytes) -> None:
    rejects(b"[" + literal + b"]", "out of range")


def test_long_integers() -> None:
    assert load(b"9" * 100) == int("9" * 100)
    rejects(b"9" * 101, "integer longer than 100 digits")
    rejects(b"-" + b"9" * 101, "integer longer than 100 digits")


def test_int_parsing_dos_is_cheap() -> None:
    data = b"[" + b"7" * 900_000 + b"]"
    start = time.monotonic()
    rejects(data, "integer longer than 100 digits", max_bytes=len(data))
    assert time.monotonic() - start < 0.5


def test_lone_surrogates() -> None:
    rejects(b'"\\ud800"', "lone surrogate")
    rejects(b'{"\\udc00": 1}', "lone surrogate")
    rejects(b'[{"a": ["x\\uDFFFy"]}]', "lone surrogate")
    assert load(b'"\\ud83d\\ude00"') == "\U0001f600"
    assert load(b'"\\\\ud800"') == "\\ud800"  # an escaped backslash, not a surrogate


def test_loads_wants_bytes() -> None:
    with pytest.raises(TypeError):
        safejson.loads("{}", max_bytes=10, max_depth=2)  # type: ignore[arg-type]


def test_dumps_is_canonical() -> None:
    out = safejson.dumps({"b": [1, 2.5, None], "a": {"z": "caf\u00e9", "y": True}})
    assert out == (
        b'{\n  "a": {\n    "y": true,\n    "z": "caf\xc3\xa9"\n  },\n  "b": [\n    1,\n    2.5,\n    null\n  ]\n}\n'
    )
    assert safejson.dumps({"a": 1, "b": 2}) == safejson.dumps({"b": 2, "a": 1})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "\ud800"])
def test_dumps_refuses_what_loads_would_reject(bad: Any) -> None:
    with pytest.raises(JsonError, match="cannot encode"):
        safejson.dumps({"x": bad})


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_dumps_then_loads_round_trips(value: Any) -> None:
    assert load(safejson.dumps(value), max_depth=64) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_json_error(data: bytes) -> None:
    try:
        load(data, max_depth=4)
    except JsonError:
        pass
