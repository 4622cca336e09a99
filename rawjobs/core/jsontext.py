"""JSON text on the hot paths (every job is encoded and decoded several times).

The standard library's C encoder and scanner, called directly: ``json.dumps`` with
options builds a new ``JSONEncoder`` per call, and ``JSONEncoder.encode`` and
``json.loads`` each go through Python frames that rebuild the C encoder or match
whitespace with a regular expression. The output is the same text, and errors are
those of the json module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring, encode_basestring_ascii
from typing import Any


def make_encoder(*, separators: tuple[str, str] = (",", ":"), ensure_ascii: bool = True,
                 allow_nan: bool = True, check_circular: bool = True) -> Callable[[Any], str]:
    """``encode(value) -> str``, the text ``json.dumps(value, **options)`` gives.

    Without ``check_circular`` a circular structure raises RecursionError (not
    ValueError), and each call is cheaper: only for values known to be trees.
    """
    reference = json.JSONEncoder(separators=separators, ensure_ascii=ensure_ascii,
                                 allow_nan=allow_nan, check_circular=check_circular)
    fallback = reference.encode
    if c_make_encoder is None:  # pragma: no cover - CPython always has it
        return fallback
    item_separator, key_separator = separators
    string = encode_basestring_ascii if ensure_ascii else encode_basestring

    def build(markers: dict[int, Any] | None) -> Any:
        return c_make_encoder(markers, reference.default, string, None, key_separator,
                              item_separator, False, False, allow_nan)

    try:
        shared = build(None)
        if "".join(shared({"a": [1.5, None, "é"]}, 0)) != fallback({"a": [1.5, None, "é"]}):
            return fallback
    except TypeError:  # pragma: no cover - another signature in another Python
        return fallback
    if check_circular:
        return lambda value: "".join(build({})(value, 0))
    return lambda value: "".join(shared(value, 0))


_scan = json.JSONDecoder().scan_once


def decode(text: str) -> Any:
    """``json.loads(text)`` for a ``str``; raises json.JSONDecodeError."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)  # raises the error json.loads gives
    if end != len(text):  # whitespace or extra data after the value: the full path
        return json.loads(text)
    return value
