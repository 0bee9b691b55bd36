"""The API's JSON parser: DRF's, with the limits that keep any body a client sends a 400, not a 500.

DRF's parser hands the text to `json.loads`, which recurses once per nesting level (about 1,000
levels raise RecursionError) and accepts `"\\ud800"`, a lone UTF-16 surrogate that no UTF-8
encoder (PostgreSQL, the JSON renderer, the logs) can write later. Both are refused here, before
any view sees the data.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.utils.json import strict_constant

MAX_DEPTH = 32

# A JSON string literal (unrolled loop: linear, no backtracking), and what is left between them.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class StrictJSONParser(JSONParser):
    """UTF-8 JSON (RFC 8259), nested at most `max_depth` levels, without unpaired surrogates;
    NaN and Infinity refused as DRF does. Raises ParseError (400) naming what is wrong."""

    max_depth = MAX_DEPTH

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            text = stream.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON parse error - the body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        depth = _depth(text)
        if depth > self.max_depth:
            raise ParseError(f"JSON parse error - nested {depth} levels deep; at most {self.max_depth} are allowed")
        try:
            data = json.loads(text, parse_constant=strict_constant if self.strict else None)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        if "\\u" in text:  # a surrogate can only be written as a \u escape
            _refuse_lone_surrogates(data)
        return data


def _depth(text: str) -> int:
    """How deeply arrays and objects nest in `text`, brackets inside strings not counted. Runs
    at C speed (regex, accumulate), so a 2.5 MB body costs milliseconds and no recursion."""
    brackets = _NOT_A_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _refuse_lone_surrogates(data) -> None:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # every key and string value
    except UnicodeEncodeError as exc:
        code_point = ord(exc.object[exc.start])
        raise ParseError(
            f"JSON parse error - a string contains the unpaired surrogate \\u{code_point:04x}; "
            "text must be valid Unicode (a surrogate is only allowed as half of a pair)"
        ) from None
