"""Bounded, strict JSON: parse untrusted documents without surprises, write canonical ones.

:func:`loads` checks size before decoding and nesting depth with a linear
pre-scan before :func:`json.loads` runs, so a deeply nested document cannot
exhaust the stack. It rejects what the standard parser lets through: duplicate
keys, ``NaN``/``Infinity``, numbers that overflow to infinity, integers longer
than :data:`MAX_INT_DIGITS` digits (the int-parsing DoS), a BOM, lone
surrogates.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from agent.errors import JsonError

MAX_INT_DIGITS = 100
"""Longest integer literal accepted (digits, without the sign)."""

_BOM = b"\xef\xbb\xbf"
# A string (escapes consumed pairwise; an unterminated one runs to the end of the
# text so a failed match never restarts inside it: linear time) or a bracket.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)|[\[\]{}]', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _fail(what: str, problem: str) -> NoReturn:
    raise JsonError(f"{what}: {problem}")


def _check_depth(text: str, max_depth: int, what: str) -> None:
    """Reject nesting deeper than ``max_depth``: one pass, string contents skipped, stops early."""
    depth = 0
    for match in _TOKENS.finditer(text):
        c = match.group()[0]
        if c == "[" or c == "{":
            depth += 1
            if depth > max_depth:
                _fail(what, f"nested deeper than {max_depth} levels")
        elif c == "]" or c == "}":
            depth -= 1
            if depth < 0:
                _fail(what, "invalid JSON: unbalanced closing bracket")


def _no_surrogates(value: Any, what: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                _fail(what, "invalid JSON: lone surrogate in a string")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(data: bytes, *, max_bytes: int, max_depth: int, what: str = "JSON") -> Any:
    """Parse the UTF-8 JSON document ``data`` or raise :class:`JsonError` starting with ``what``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"safejson.loads expects bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        _fail(what, f"{len(data)} bytes is larger than the limit of {max_bytes}")
    data = bytes(data)
    if data.startswith(_BOM):
        _fail(what, "a byte order mark (BOM) is not allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(what, f"invalid UTF-8 at byte {e.start}")
    _check_depth(text, max_depth, what)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                _fail(what, f"duplicate key {key[:64]!r}")
            obj[key] = value
        return obj

    def constant(name: str) -> NoReturn:
        _fail(what, f"{name} is not allowed")

    def integer(literal: str) -> int:
        if len(literal.lstrip("-")) > MAX_INT_DIGITS:
            _fail(what, f"integer longer than {MAX_INT_DIGITS} digits")
        return int(literal)

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            _fail(what, f"number {literal[:32]!r} is out of range")
        return value

    try:
        result = json.loads(
            text, object_pairs_hook=pairs, parse_constant=constant, parse_int=integer, parse_float=number
        )
    except json.JSONDecodeError as e:
        _fail(what, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except RecursionError:  # only reachable if max_depth is set near the interpreter's limit
        _fail(what, "nested too deeply for this interpreter")
    if _SURROGATE_ESCAPE.search(text):
        _no_surrogates(result, what)
    return result


def dumps(obj: Any) -> bytes:
    """Canonical UTF-8 JSON for files edgeship writes: sorted keys, 2-space indent, trailing newline."""
    try:
        text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8") + b"\n"
    except (ValueError, UnicodeEncodeError) as e:  # NaN/Infinity, lone surrogates, cycles
        raise JsonError(f"JSON: cannot encode: {e}") from None


__all__ = ["loads", "dumps", "MAX_INT_DIGITS"]
